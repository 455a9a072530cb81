"""ImageNet validation/test data: folder or flat layouts, exact distributed evaluation."""
from __future__ import annotations

import csv
import functools
import importlib
import logging
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from vquant_pl._lightning import LightningDataModule
from vquant_pl.models import CropMode, Interpolation, Preprocessing, describe, preprocessing_for

log = logging.getLogger("vquant_pl")
SYNSET = re.compile(r"^n\d{8}$")
SYNSET_PREFIX = re.compile(r"^(n\d{8})_")
OFFICIAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})$")  # the official validation file names


def imagenet_synsets() -> list[str]:
    """The ImageNet-1k synsets in class-index order (the list timm ships)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


#: Colour photographs bundled in the scikit-image wheel: the offline default image set.
EMBEDDED_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "motorcycle_right.png", "hubble_deep_field.jpg", "brick.png", "grass.png", "gravel.png",
                   "retina.jpg", "ihc.png")
UNLABELED = -1
QUICKSTART_EXTRA = "quickstart"  # the vquant-pl extra that installs scikit-image


def embedded_samples() -> list[tuple[Path, int]]:
    """The bundled photographs, unlabeled (label -1).

    Raises:
        ImportError: scikit-image (the `quickstart` extra) is not installed.
    """
    from importlib import resources

    try:
        root = resources.files("skimage") / "data"
    except ModuleNotFoundError as err:
        raise ImportError(f"root=None means the photographs bundled with scikit-image, which is not installed: "
                          f"pip install \"vquant-pl[{QUICKSTART_EXTRA}]\" (or pip install scikit-image), "
                          "or pass root= an image folder") from err
    missing = [name for name in EMBEDDED_PHOTOS if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-image at {root} lacks {len(missing)} of the bundled photographs "
                                f"({', '.join(missing[:3])}); reinstall scikit-image or pass root=")
    return [(Path(str(root / name)), UNLABELED) for name in EMBEDDED_PHOTOS]


#: The PIL formats read as images: raster formats only (JPEG includes multi-picture MPO
#: files). Vector/PostScript formats (EPS, PS), which PIL renders by running Ghostscript,
#: are never opened, whatever the file's name.
RASTER_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")


@functools.lru_cache(maxsize=1)
def image_suffixes() -> frozenset[str]:
    """The file suffixes (lower case, with the dot) listed as images: those of the raster
    formats in `RASTER_FORMATS` that PIL can open here (.jpeg/.jpg, .png, .webp, .bmp,
    .tif/.tiff, .gif, .ppm/.pgm/.pbm, ...); never .eps/.ps."""
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in RASTER_FORMATS and fmt in Image.OPEN)


def open_image(path: Path):
    """`PIL.Image.open(path)` restricted to `RASTER_FORMATS`: the content decides the
    format (a PNG named .JPEG opens), but never as EPS/PS or another non-raster format."""
    from PIL import Image

    Image.init()
    return Image.open(path, formats=[fmt for fmt in RASTER_FORMATS if fmt in Image.OPEN])


def to_rgb(img):
    """`img` as 8-bit RGB. Integer samples wider than 8 bits are scaled by their depth, as
    torchvision's `to_dtype(..., scale=True)` does (a bit shift): 16 bits for mode I;16 and
    for mode I from PNG/PPM (16-bit files Pillow reads as I). Other mode I (32-bit signed,
    e.g. TIFF) says nothing of its depth: the smallest of 8, 16 and 31 bits holding its values
    (negatives as 0). `img.convert("RGB")` alone clips them at 255: almost white."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        import numpy as np
        from PIL import Image

        pixels = np.maximum(np.asarray(img), 0)
        if img.mode != "I" or img.format in ("PNG", "PPM"):
            bits = 16
        else:
            bits = next(b for b in (8, 16, 31) if int(pixels.max(initial=0)) < 2 ** b)
        pixels = pixels >> (bits - 8)
        img = Image.fromarray(pixels.astype(np.uint8))
    return img.convert("RGB")


def _images(folder: Path, left_out: dict[str, list[Path]] | None = None, class_folder: bool = False) -> list[Path]:
    """The image files of `folder`, sorted. The other visible entries are added to `left_out`
    by kind: `files` (not raster images), `broken` (broken links, special files) and, in a
    class folder, `subfolders` (not read: images sit directly in `<synset>/`)."""
    suffixes = image_suffixes()
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if left_out is not None:
        left_out["files"] += [p for p in entries if p.is_file() and p.suffix.lower() not in suffixes]
        left_out["broken"] += [p for p in entries if not p.is_file() and not p.is_dir()]
        left_out["subfolders"] += [p for p in entries if class_folder and p.is_dir()]
    return [p for p in entries if p.is_file() and p.suffix.lower() in suffixes]


def _count_images(folder: Path) -> int:
    """Visible image files anywhere under `folder`."""
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in image_suffixes() and p.is_file()
               and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _left_out_warning(folder: Path, left_out: dict[str, list[Path]]) -> str | None:
    """The warning that counts and names, by kind, the entries `scan` left out."""
    def names(paths, show=lambda p: str(p.relative_to(folder))):
        return ", ".join(show(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")

    def link(p):
        return f"{p.relative_to(folder)}{f' -> {os.readlink(p)}' if p.is_symlink() else ''}"

    files, subfolders, broken = left_out["files"], left_out["subfolders"], left_out["broken"]
    parts = []
    if files:
        suffixes = sorted({p.suffix.lower() or "(none)" for p in files})
        parts.append(f"{len(files)} file(s) that are not raster images ({names(files)}; "
                     f"suffixes {', '.join(suffixes)})")
    if subfolders:
        counts = {p: _count_images(p) for p in subfolders}
        parts.append(f"{len(subfolders)} subfolder(s) of class folders holding {sum(counts.values())} image(s), not "
                     f"read ({names(subfolders, lambda p: f'{p.relative_to(folder)}/ holds {counts[p]}')}; "
                     "images must sit directly in <synset>/)")
    if broken:
        parts.append(f"{len(broken)} broken link(s) or special file(s) ({names(broken, link)})")
    if not parts:
        return None
    return f"{folder}: left out {'; '.join(parts)}; images are {', '.join(sorted(image_suffixes()))}"


def read_synsets_file(path: Path) -> list[str]:
    """The devkit's synset list in ILSVRC2012 ID order: one line per class, its first
    token the synset (`n01440764` or `n01440764 tench, Tinca tinca`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not exactly the 1000 distinct ImageNet-1k synsets (the error names the
            file, the count, and the duplicates or unknown synsets).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synsets file {path} not found")
    order = []
    for n, line in enumerate(_read_text(path, "synsets file").splitlines(), 1):
        if line.strip():
            token = line.split()[0]
            if not SYNSET.match(token):
                raise ValueError(f"synsets file {path}, line {n}: {token[:40]!r} is not a synset (nXXXXXXXX)")
            order.append(token)
    known = set(imagenet_synsets())
    unknown = [s for s in order if s not in known]
    seen: set[str] = set()
    duplicates = [s for s in order if s in seen or seen.add(s)]
    if len(order) != len(known) or unknown or duplicates:
        detail = [f"{len(order)} synsets ({len(set(order))} distinct)"]
        if duplicates:
            detail.append(f"repeated: {', '.join(duplicates[:3])}{' ...' if len(duplicates) > 3 else ''}")
        if unknown:
            detail.append(f"not ImageNet-1k: {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
        raise ValueError(f"synsets file {path} must list the {len(known)} distinct ImageNet-1k synsets in "
                         f"ILSVRC2012 ID order, but has {'; '.join(detail)}: every ID would map to a wrong class")
    return order


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_text(path: Path, what: str) -> str:
    """UTF-8 text of `path`; an error names the file and the line of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{what} {path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                         "save it as UTF-8") from None


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
    - text, one ILSVRC2012 ID (1-based) per line, the official
      `ILSVRC2012_validation_ground_truth.txt`, with `synsets_file` listing the synsets in
      ILSVRC2012 ID order (from the devkit; see `read_synsets_file`). Line N is the ID of the
      image named `ILSVRC2012_val_N` (N in 8 digits, as the official files are named): files
      are matched by that number, never by their order.

    Raises:
        FileNotFoundError: no labels (or synsets) file.
        ValueError: a malformed line (file and line named), a count that does not match the
            images, a synsets file that is not the 1000 ImageNet-1k synsets, a
            `synsets_file` with a labels file that does not hold ILSVRC2012 IDs, or (official
            ground truth) an image not named `ILSVRC2012_val_<8 digits>`, or whose number has
            no ID line or is another image's too (the first such file named).
    """
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} not found")
    numbered = [(i + 1, ln.strip()) for i, ln in enumerate(_read_text(path, "labels file").splitlines())]
    numbered = [(n, ln) for n, ln in numbered if ln]
    lines = [ln for _, ln in numbered]
    official = path.suffix.lower() != ".csv" and bool(lines) and all(ln.isdigit() for ln in lines)
    if synsets_file is not None and not official:
        raise ValueError(f"synsets_file {synsets_file} applies only to the official ground truth (one "
                         f"ILSVRC2012 ID per line), but labels file {path} names its classes itself; drop synsets_file")
    if official:
        if len(lines) != len(files):
            raise ValueError(f"labels file {path} has {len(lines)} lines but {files[0].parent if files else path.parent} "
                             f"holds {len(files)} images")
        if synsets_file is None:
            raise ValueError(f"labels file {path} holds ILSVRC2012 IDs; pass synsets_file= the devkit's "
                             "synset list in ILSVRC2012 ID order to map them to classes")
        order = read_synsets_file(Path(synsets_file))
        for n, ln in numbered:
            if not 1 <= int(ln) <= len(order):
                raise ValueError(f"labels file {path}, line {n}: ID {ln} outside 1..{len(order)}")
        ids, seen, labels = dict(numbered), {}, []  # line number -> ID; image number -> file
        for f in files:
            match = OFFICIAL_NAME.match(f.stem)
            if not match:
                raise ValueError(f"labels file {path} is the official ground truth (line N: the ID of image "
                                 f"ILSVRC2012_val_N), but {f.name} is not named ILSVRC2012_val_<8 digits>; keep "
                                 "the official file names, or give a 'filename label' labels file")
            number = int(match.group(1))
            if number not in ids:
                raise ValueError(f"labels file {path} has no ID on line {number}, the line of {f.name}")
            if number in seen:
                raise ValueError(f"{seen[number].name} and {f.name} are both image {number} of labels file {path}")
            seen[number] = f
            labels.append(classes[order[int(ids[number]) - 1]])
        return labels
    pairs = []
    if path.suffix.lower() == ".csv":
        for (n, ln), row in zip(numbered, csv.reader(lines)):
            if len(row) < 2 or not row[1].split():
                raise ValueError(f"labels file {path}, line {n}: expected 'filename,label', got {ln[:60]!r}")
            pairs.append((row[0].strip(), row[1].split()[0]))
        if pairs and not (SYNSET.match(pairs[0][1]) or pairs[0][1].isdigit()):
            pairs = pairs[1:]  # a header row
    else:
        for n, ln in numbered:
            tokens = ln.split()
            if len(tokens) < 2:
                raise ValueError(f"labels file {path}, line {n}: expected 'filename label', got one column "
                                 f"{ln[:60]!r}")
            pairs.append((tokens[0], tokens[1]))
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
    """(image, class index) pairs of an ImageNet folder; see `ImageNetDataModule`.

    Files that are not raster images (see `image_suffixes`), subfolders of class folders
    (not read, unlike torchvision's recursive `ImageFolder`: the layout is `<synset>/*.JPEG`)
    and broken links are left out with a warning that counts and names them by kind (for
    subfolders, the images they hold); hidden files and folders (`.name`) are not looked at.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: a mixed layout, folders that are not synsets, no images, labels that
            cannot be read, or a `labels_file`/`synsets_file` the layout does not use.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet folder {folder} not found")
    if synsets_file is not None and labels_file is None:
        raise ValueError(f"synsets_file {synsets_file} is given without labels_file (it maps the official "
                         "ground truth's ILSVRC2012 IDs to classes); pass labels_file too, or drop synsets_file")
    classes = {s: i for i, s in enumerate(imagenet_synsets())}
    subdirs = _subdirs(folder)
    left_out: dict[str, list[Path]] = {"files": [], "subfolders": [], "broken": []}
    loose = _images(folder, left_out)
    if subdirs and loose:
        raise ValueError(
            f"{folder} mixes two layouts: {len(subdirs)} class folder(s) ({subdirs[0].name}/"
            f"{' ...' if len(subdirs) > 1 else ''}) and {len(loose)} loose image(s) ({loose[0].name}"
            f"{' ...' if len(loose) > 1 else ''}); keep either <synset>/ folders or a flat folder of images")
    if subdirs:
        unknown = [d.name for d in subdirs if d.name not in classes]
        if unknown:
            raise ValueError(f"{folder} has {len(unknown)} folder(s) that are not ImageNet-1k synsets: "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        if labels_file is not None:
            raise ValueError(f"labels_file {labels_file} is given but {folder} holds <synset>/ class folders, "
                             "which are the labels; drop labels_file (it applies to a flat folder of images)")
        samples = [(f, classes[d.name]) for d in subdirs for f in _images(d, left_out, class_folder=True)]
    else:
        files = loose
        if labels_file is not None:
            samples = list(zip(files, read_labels_file(Path(labels_file), files, classes, synsets_file)))
        elif files and all(SYNSET_PREFIX.match(f.name) for f in files):
            samples = [(f, _label(SYNSET_PREFIX.match(f.name).group(1), str(f), classes)) for f in files]
        elif files:
            raise ValueError(f"{folder} holds {len(files)} images in a flat layout; pass labels_file= "
                             "(or name files '<synset>_*.JPEG', or use val/<synset>/ folders)")
        else:
            samples = []
    message = _left_out_warning(folder, left_out)
    if message:
        warnings.warn(message, stacklevel=2)
    if not samples:
        raise ValueError(f"no images ({', '.join(sorted(image_suffixes()))}) found in {folder}")
    return samples


class ImageFiles(Dataset):
    """Images and labels; a file that cannot be decoded raises an error naming it, or,
    with `skip_corrupt`, yields None (dropped and counted by `collate_skipping`)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform, skip_corrupt: bool = False):
        self.samples, self.transform, self.skip_corrupt = list(samples), transform, skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with open_image(path) as img:
                img = to_rgb(img)
        except Exception as err:
            if self.skip_corrupt:
                log.warning("vquant_pl: skipping unreadable image %s (%s)", path, err)
                return None
            raise RuntimeError(f"cannot decode image {path}: {err} (pass skip_corrupt=True to skip and count "
                               "such files)") from err
        return self.transform(img), label


def collate_skipping(batch):
    """Collate, dropping skipped (None) samples; returns (images, labels, number skipped).
    `SkipCountingLoader` turns this into `(images, labels)` batches and a count."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(kept)
    return images, labels, skipped


class SkipCount:
    """How many unreadable images the current pass over the data skipped (and saw)."""

    def __init__(self):
        self.skipped = 0
        self.seen = 0


class SkipCountingLoader(DataLoader):
    """A DataLoader over `ImageFiles` with `collate_skipping` that yields ordinary
    `(images, labels)` batches and adds the skipped files to `counter` (reset at the start
    of every pass); a batch whose images were all skipped is not yielded."""

    def __init__(self, *args, counter: SkipCount | None = None, **kwargs):
        kwargs.setdefault("collate_fn", collate_skipping)
        super().__init__(*args, **kwargs)
        self.counter = counter if counter is not None else SkipCount()

    @property
    def skipped(self) -> int:
        return self.counter.skipped

    def __iter__(self):
        self.counter.skipped = self.counter.seen = 0
        for images, labels, skipped in super().__iter__():
            self.counter.skipped += int(skipped)
            self.counter.seen += len(labels) + int(skipped)
            if len(labels):
                yield images, labels
        if self.counter.skipped:
            log.warning("vquant_pl: skipped %d unreadable image(s) of %d", self.counter.skipped, self.counter.seen)


class ImageNetDataModule(LightningDataModule):
    """ImageNet-1k validation data for `trainer.test` / `trainer.validate` / `trainer.predict`
    (no training split); batches are `(images, labels)`.

    Layouts: `val/<synset>/*.JPEG`; a flat folder with `labels_file` (see
    `read_labels_file`); flat files named `<synset>_*.JPEG`. A folder that mixes class
    folders and loose images is an error naming both. Raster images only (`RASTER_FORMATS`:
    .JPEG, .png, .webp, .bmp, .tif, .gif, .ppm), opened as those formats only (never EPS/PS,
    which PIL renders with Ghostscript); other files, subfolders of class folders (not read,
    unlike torchvision's recursive `ImageFolder`) and broken links are left out with a
    warning counting them by kind. 16-bit and 32-bit integer images are scaled to 8 bits
    (`to_rgb`). Labels are class indices in the ImageNet-1k order, so a
    folder with only some synsets still gets the right ones. Under DDP every sample is
    evaluated by exactly one rank (no padding duplicates); fewer samples than ranks is an
    error naming both.

    Preprocessing: `preprocessing` (a `Preprocessing` or its dict) if given, else the
    model's own config when the Trainer's module has one (the `.preprocessing` that
    `create_model` attaches to its model, timm's `resolve_data_config` with its test size and
    crop mode, pytorchcv's `in_size`), else 224 px, bilinear, crop 0.875, ImageNet mean/std,
    with a warning naming the model; each of `image_size`, `crop_pct`, `resize`,
    `interpolation`, `crop_mode`, `mean`, `std` that is set overrides it.

    Args:
        root: the ImageNet folder holding `val/` (or the image folder itself); None means the
            12 photographs bundled with scikit-image, unlabeled (label -1) until `set_labels`.
        image_size: square input size of the model (overrides the model's).
        crop_pct: fraction of the resized image kept by the crop.
        resize: size of the short side before the center crop (overrides `crop_pct`).
        interpolation: resampling filter of the resize.
        crop_mode: `center`, `squash` or `border` (timm's crop modes).
        mean: per-channel normalization mean.
        std: per-channel normalization standard deviation.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory (on CUDA machines only).
        persistent_workers: keep workers alive between passes.
        limit: evaluate only the first N samples.
        labels_file: labels of a flat folder (official ground truth, CSV, or `file label` lines).
        synsets_file: the devkit's synset list in ILSVRC2012 ID order (for the official ground truth).
        skip_corrupt: skip images that cannot be decoded and count them (`skipped`) instead of failing.
        preprocessing: a model's preprocessing (from `create_model`), used as the base.

    Example:
        >>> dm = ImageNetDataModule(root=None, batch_size=4, num_workers=0)
        >>> images, labels = next(iter(dm.test_dataloader()))
        >>> tuple(images.shape), labels.tolist()
        ((4, 3, 224, 224), [-1, -1, -1, -1])
    """

    def __init__(self, root: str | Path | None = None, image_size: int | None = None, crop_pct: float | None = None,
                 resize: int | None = None, interpolation: Interpolation | None = None,
                 crop_mode: CropMode | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, batch_size: int = 64, num_workers: int = 4,
                 pin_memory: bool = True, persistent_workers: bool = False, limit: int | None = None,
                 labels_file: str | Path | None = None, synsets_file: str | Path | None = None,
                 skip_corrupt: bool = False, preprocessing: Preprocessing | dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["preprocessing"])
        if isinstance(preprocessing, dict):
            preprocessing = Preprocessing(**preprocessing)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._given = preprocessing
        self._overrides = {k: v for k, v in dict(
            input_size=None if image_size is None else (image_size, image_size), crop_pct=crop_pct,
            resize=resize, interpolation=interpolation, crop_mode=crop_mode,
            mean=None if mean is None else tuple(mean), std=None if std is None else tuple(std)).items()
            if v is not None}
        self.preprocessing  # checks the overrides now
        self.root = None if root is None else Path(root)
        self.dataset: ImageFiles | None = None
        self.counter = SkipCount()

    @property
    def preprocessing(self) -> Preprocessing:
        """The resolved preprocessing (given, else the Trainer's model's, else the defaults;
        then the explicit arguments)."""
        base = self._given
        if base is None:
            trainer = getattr(self, "trainer", None)
            module = getattr(trainer, "lightning_module", None) if trainer is not None else None
            base = preprocessing_for(module) if module is not None else None
            if base is None and module is not None:
                self._warn_defaults(module)
        return replace(base or Preprocessing(), **self._overrides)

    #: Settings that change what the model sees (crop_mode alone keeps the default "center").
    _DECISIVE = ("input_size", "interpolation", "mean", "std")

    def _warn_defaults(self, module) -> None:
        """Once per model: its preprocessing is unknown, so (some of) the defaults are used."""
        defaulted = [k for k in self._DECISIVE if k not in self._overrides]
        if not ({"crop_pct", "resize"} & set(self._overrides)):
            defaulted.append("crop_pct")
        model = getattr(module, "model", module)
        if not defaulted or getattr(self, "_warned_for", None) is model:
            return
        self._warned_for = model
        warnings.warn(
            f"ImageNetDataModule: the preprocessing of {type(model).__name__} is unknown (no preprocessing=, no "
            f".preprocessing from create_model, timm pretrained_cfg or pytorchcv in_size), so the defaults are "
            f"used for {', '.join(defaulted)}: {describe(replace(Preprocessing(), **self._overrides))}. A model "
            "trained with other preprocessing scores lower; pass preprocessing= (or image_size=, mean=, std=, ...), "
            "or attach it with vquant_pl.models.attach_preprocessing(model, Preprocessing(...))", stacklevel=3)

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing | dict | None) -> None:
        self._given = Preprocessing(**value) if isinstance(value, dict) else value

    @property
    def skipped(self) -> int:
        """Unreadable images skipped in the latest pass over the data (on this process)."""
        return self.counter.skipped

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
        self.dataset = ImageFiles(samples, None, hp.skip_corrupt)

    def _loader(self) -> DataLoader:
        self.setup()
        self.dataset.transform = self.preprocessing.transform()
        hp = self.hparams
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            if len(self.dataset) < trainer.world_size:
                raise ValueError(
                    f"{len(self.dataset)} image(s){f' (limit={hp.limit})' if hp.limit else ''} for world size "
                    f"{trainer.world_size}: each image is evaluated by exactly one process, so a process would get "
                    f"none and DDP would hang; use at most {len(self.dataset)} device(s), or more images")
            distributed = importlib.import_module(f"{self.lightning_namespace}.overrides.distributed")
            sampler = distributed.UnrepeatedDistributedSampler(self.dataset, num_replicas=trainer.world_size,
                                                               rank=trainer.global_rank, shuffle=False)
        return SkipCountingLoader(self.dataset, batch_size=hp.batch_size, sampler=sampler, shuffle=False,
                                  num_workers=hp.num_workers, pin_memory=hp.pin_memory and torch.cuda.is_available(),
                                  persistent_workers=hp.persistent_workers and hp.num_workers > 0,
                                  collate_fn=collate_skipping, counter=self.counter)

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
