"""ImageNet validation/test data: folder or flat layouts, exact distributed evaluation."""
from __future__ import annotations

import csv
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, default_collate

from vquant_pl.models import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

log = logging.getLogger("vquant_pl")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
SYNSET = re.compile(r"^n\d{8}$")
SYNSET_PREFIX = re.compile(r"^(n\d{8})_")


def imagenet_synsets() -> list[str]:
    """The ImageNet-1k synsets in class-index order (the list timm ships)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


#: Colour photographs bundled in the scikit-image wheel: the offline default image set.
EMBEDDED_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "motorcycle_right.png", "hubble_deep_field.jpg", "brick.png", "grass.png", "gravel.png",
                   "retina.jpg", "ihc.png")
UNLABELED = -1


def embedded_samples() -> list[tuple[Path, int]]:
    """The bundled photographs, unlabeled (label -1)."""
    from importlib import resources

    try:
        root = resources.files("skimage") / "data"
    except ModuleNotFoundError as err:
        raise RuntimeError("the embedded photographs ship with scikit-image: pip install scikit-image") from err
    return [(Path(str(root / name)), UNLABELED) for name in EMBEDDED_PHOTOS]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _label(token: str, where: str, classes: dict[str, int]) -> int:
    if SYNSET.match(token):
        if token not in classes:
            raise ValueError(f"{where}: synset {token!r} is not an ImageNet-1k class")
        return classes[token]
    if token.isdigit() and int(token) < len(classes):
        return int(token)
    raise ValueError(f"{where}: {token!r} is neither an ImageNet-1k synset nor a class index 0..{len(classes) - 1}")


def read_labels_file(path: Path, files: list[Path], classes: dict[str, int],
                     synsets_file: Path | None = None) -> list[int]:
    """Labels of `files` (sorted) from a labels file.

    - `.csv`: `filename,label` rows (header allowed), label a synset or class index; the
      first token of the second column counts (Kaggle's `LOC_val_solution.csv` works);
    - text, `filename label` per line;
    - text, one ILSVRC2012 ID (1-based) per line in file-name order, the official
      `ILSVRC2012_validation_ground_truth.txt`, with `synsets_file` listing the synsets in
      ILSVRC2012 ID order (from the devkit).
    """
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} not found")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix.lower() == ".csv":
        pairs = [(r[0], r[1].split()[0]) for r in csv.reader(lines) if len(r) >= 2 and r[1].split()]
        if pairs and not (SYNSET.match(pairs[0][1]) or pairs[0][1].isdigit()):
            pairs = pairs[1:]  # a header row
    elif all(ln.isdigit() for ln in lines):
        if len(lines) != len(files):
            raise ValueError(f"labels file {path} has {len(lines)} lines but {files[0].parent if files else path.parent} "
                             f"holds {len(files)} images")
        if synsets_file is None:
            raise ValueError(f"labels file {path} holds ILSVRC2012 IDs; pass synsets_file= the devkit's "
                             "synset list in ILSVRC2012 ID order to map them to classes")
        order = Path(synsets_file).read_text().split()
        order = [s for s in order if SYNSET.match(s)]
        out = []
        for i, ln in enumerate(lines):
            if not 1 <= int(ln) <= len(order):
                raise ValueError(f"labels file {path}, line {i + 1}: ID {ln} outside 1..{len(order)}")
            out.append(_label(order[int(ln) - 1], f"{synsets_file}", classes))
        return out
    else:
        pairs = [tuple(ln.split()[:2]) for ln in lines]
    by_name: dict[str, str] = {}
    for name, token in pairs:
        by_name[name] = token
        by_name.setdefault(Path(name).stem, token)
    if len(pairs) != len(files):
        raise ValueError(f"labels file {path} has {len(pairs)} entries but the folder holds {len(files)} images")
    labels = []
    for f in files:
        token = by_name.get(f.name, by_name.get(f.stem))
        if token is None:
            raise ValueError(f"labels file {path} has no entry for {f.name}")
        labels.append(_label(token, f"labels file {path}, {f.name}", classes))
    return labels


def scan(folder: Path, labels_file: Path | None = None, synsets_file: Path | None = None) -> list[tuple[Path, int]]:
    """(image, class index) pairs of an ImageNet folder; see `ImageNetDataModule`."""
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet folder {folder} not found")
    classes = {s: i for i, s in enumerate(imagenet_synsets())}
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if subdirs and not _images(folder):
        unknown = [d.name for d in subdirs if d.name not in classes]
        if unknown:
            raise ValueError(f"{folder} has {len(unknown)} folder(s) that are not ImageNet-1k synsets: "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        samples = [(f, classes[d.name]) for d in subdirs for f in _images(d)]
    else:
        files = _images(folder)
        if labels_file is not None:
            samples = list(zip(files, read_labels_file(Path(labels_file), files, classes, synsets_file)))
        elif files and all(SYNSET_PREFIX.match(f.name) for f in files):
            samples = [(f, _label(SYNSET_PREFIX.match(f.name).group(1), str(f), classes)) for f in files]
        elif files:
            raise ValueError(f"{folder} holds {len(files)} images in a flat layout; pass labels_file= "
                             "(or name files '<synset>_*.JPEG', or use val/<synset>/ folders)")
        else:
            samples = []
    if not samples:
        raise ValueError(f"no images (.JPEG/.jpg/.png) found in {folder}")
    return samples


class ImageFiles(Dataset):
    """Images and labels; a file that cannot be decoded raises an error naming it, or,
    with `skip_corrupt`, yields None (dropped and counted by `collate_skipping`)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform, skip_corrupt: bool = False):
        self.samples, self.transform, self.skip_corrupt = list(samples), transform, skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as err:
            if self.skip_corrupt:
                log.warning("vquant_pl: skipping unreadable image %s (%s)", path, err)
                return None
            raise RuntimeError(f"cannot decode image {path}: {err} (pass skip_corrupt=True to skip and count "
                               "such files)") from err
        return self.transform(img), label


def collate_skipping(batch):
    """Collate, dropping skipped (None) samples; returns (images, labels, number skipped)."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(kept)
    return images, labels, skipped


class ImageNetDataModule(pl.LightningDataModule):
    """ImageNet-1k validation data for `trainer.test` / `trainer.validate` (no training split).

    `root` holds `val/` (or is the image folder itself); None means the 12 photographs
    bundled in scikit-image, unlabeled until `set_labels` (e.g. with the float model's
    predictions, to score agreement). Layouts:
    `val/<synset>/*.JPEG`; flat `val/*.JPEG` with `labels_file` (see `read_labels_file`);
    flat files named `<synset>_*.JPEG`. Labels are class indices in the ImageNet-1k order,
    so a folder with only some synsets still gets the right ones. Under DDP every sample
    is evaluated by exactly one rank (no padding duplicates). `limit` keeps the first N
    samples. Preprocessing comes from the arguments or `preprocessing` (a model's).
    """

    def __init__(self, root: str | Path | None = None, image_size: int = 224, crop_pct: float = 0.875,
                 resize: int | None = None, interpolation: str = "bilinear",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 batch_size: int = 64, num_workers: int = 4, pin_memory: bool = True,
                 persistent_workers: bool = False, limit: int | None = None,
                 labels_file: str | Path | None = None, synsets_file: str | Path | None = None,
                 skip_corrupt: bool = False, preprocessing: Preprocessing | dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["preprocessing"])
        if isinstance(preprocessing, dict):
            preprocessing = Preprocessing(**preprocessing)
        self.preprocessing = preprocessing or Preprocessing(
            input_size=(image_size, image_size), crop_pct=crop_pct, interpolation=interpolation,
            mean=tuple(mean), std=tuple(std), resize=resize)
        if preprocessing is not None and resize is not None:
            self.preprocessing = replace(self.preprocessing, resize=resize)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.root = None if root is None else Path(root)
        self.dataset: ImageFiles | None = None

    @property
    def labeled(self) -> bool:
        self.setup()
        return all(label != UNLABELED for _, label in self.dataset.samples)

    def set_labels(self, labels: Sequence[int]) -> None:
        """Replace the labels (in sample order), e.g. by a reference model's predictions."""
        self.setup()
        if len(labels) != len(self.dataset):
            raise ValueError(f"{len(labels)} labels for {len(self.dataset)} images")
        self.dataset.samples = [(path, int(label)) for (path, _), label in zip(self.dataset.samples, labels)]

    @property
    def folder(self) -> Path | None:
        if self.root is None:
            return None
        return self.root / "val" if (self.root / "val").is_dir() else self.root

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        hp = self.hparams
        if self.root is None:
            samples = embedded_samples()
        elif not self.root.exists():
            raise FileNotFoundError(f"ImageNet root {self.root} not found (expected a folder holding val/)")
        else:
            samples = scan(self.folder, hp.labels_file, hp.synsets_file)
        if hp.limit:
            samples = samples[: hp.limit]
        self.dataset = ImageFiles(samples, self.preprocessing.transform(), hp.skip_corrupt)

    def _loader(self) -> DataLoader:
        self.setup()
        hp = self.hparams
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(self.dataset, num_replicas=trainer.world_size,
                                                   rank=trainer.global_rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=hp.batch_size, sampler=sampler, shuffle=False,
                          num_workers=hp.num_workers, pin_memory=hp.pin_memory and torch.cuda.is_available(),
                          persistent_workers=hp.persistent_workers and hp.num_workers > 0,
                          collate_fn=collate_skipping)

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
