"""Named data-free recipes: sets of `QuantConfig` settings, and the recipe table command.

`vquant` (the defaults of `QuantConfig`) is the best recipe found on the 100-image sample:
BatchNorm-derived activation ranges with the sigma rule as per-layer fallback, and the
analytic bias correction of the weight error from BatchNorm statistics. `squant` is the
paper's rules exactly (the sigma rule on the probe, no correction). A recipe is a YAML file
of `configs/recipes/` (settings under `quant:`, the CLI layout), written there once; every transform
(`equalize`, `weight_clip`) and correction runs inside `quantize_model`, so
`restore_model` undoes all of it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .files import load_tensors

__all__ = ["cache_file", "data_folder", "load_recipe", "main", "paired_difference", "recipe_names", "recipes_dir",
           "sample_tensors", "shared_data"]

#: `quant:` keys of a CLI config that are the callback's display settings, not quantization
#: settings: a recipe may carry them (e.g. `verbose: false`); they change no number.
DISPLAY_KEYS = {"verbose"}


def recipes_dir() -> Path:
    """The folder of the shipped recipes, `configs/recipes/` (one YAML file per recipe)."""
    from .app import configs_dir

    return configs_dir() / "recipes"


def recipe_names() -> list[str]:
    """Names of the shipped recipes (`vquant`, `squant`, `bn`, ...): the files of `recipes_dir()`."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> dict:
    """The `QuantConfig` settings of a recipe: a YAML file in the CLI layout (its `quant:`
    mapping), or the name of a shipped one (`vquant` = the defaults, `squant` = the paper's
    rules, ...). The recipes are written once, in `configs/recipes/`.

    Raises:
        ValueError: neither a file nor a shipped name; no `quant:` mapping; a key that is
            neither a `QuantConfig` field nor a display setting (named, with the file).

    Example:
        >>> load_recipe("squant")
        {'act_range': 'sigma', 'bn_bias_correction': None}
    """
    from ..config import QuantConfig

    path = Path(name_or_path)
    if not path.is_file():
        shipped = recipes_dir() / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise ValueError(f"unknown recipe {str(name_or_path)!r}: not one of {', '.join(recipe_names())} "
                             "nor a file")
        path = shipped
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("quant"), dict):
        raise ValueError(f"recipe {path} has no 'quant:' mapping")
    quant = {k: v for k, v in data["quant"].items() if k not in DISPLAY_KEYS}
    unknown = sorted(set(quant) - set(QuantConfig.field_names()))
    if unknown:
        raise ValueError(f"recipe {path}: {', '.join(unknown)} not quantization setting(s); a recipe holds "
                         f"QuantConfig fields ({', '.join(QuantConfig.field_names())})")
    if isinstance(quant.get("probe_shape"), list):
        quant["probe_shape"] = tuple(quant["probe_shape"])
    return quant


# -- the recipe table on labelled ImageNet folders -------------------------------------------
DEFAULT_DATA = ("imagenet-sample",)


def shared_data() -> Path:
    """`$VQUANT_SHARED/data`: the labelled ImageNet samples (`imagenet-sample/`, 100 images,
    `imagenet-sample-extra/`, 400); default `../shared/data` beside the repository checkout."""
    return Path(os.environ.get("VQUANT_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data"


def data_folder(name: str | Path) -> Path:
    """A folder of labelled ImageNet images: an existing path, else a folder of `shared_data()`.

    Raises:
        FileNotFoundError: neither exists (both places named).
    """
    path = Path(name)
    if path.is_dir():
        return path
    if not path.is_absolute() and (shared_data() / path).is_dir():
        return shared_data() / path
    raise FileNotFoundError(f"image folder {str(name)!r} not found, neither as a path nor in {shared_data()} "
                            "(set VQUANT_SHARED to the folder holding data/)")


def cache_file(model_name: str, folder: str | Path, cache_dir: str | Path = "runs/recipes") -> Path:
    """Where `sample_tensors` caches a folder preprocessed for a model: `<model>_<folder name>.pt`."""
    return Path(cache_dir) / f"{model_name}_{Path(folder).name}.pt"


def sample_tensors(model_name: str, folder: str | Path = DEFAULT_DATA[0], cache_dir: str | Path = "runs/recipes"):
    """A folder of labelled ImageNet images (see `data_folder`; default the 100-image sample)
    preprocessed for `efficientnet_lite:<model_name>` with the model's own transform: `(images,
    labels)`, labels the ImageNet-1k class indices (the folder is read as `ImageNetDataModule`
    reads it: `<synset>_*.JPEG` files or `<synset>/` folders).

    The tensors are cached as `cache_file(model_name, folder, cache_dir)`, a dict of `images`,
    `labels` and `key`: a digest of the model name, its preprocessing and every file's name,
    size, modification time and label. A cache whose key differs (other files, another
    transform) is rebuilt; cached files are read with `weights_only=True`, and not at all
    where others can write the cache or its folder (the images are then read every time).

    Raises:
        FileNotFoundError: no such folder.
        ValueError: a file that is not labelled (see `ImageNetDataModule`).
        UnsafeFile: a cache holding objects other than tensors.
    """
    import hashlib
    import json

    from vquant_pl.datamodules.imagenet import open_image, scan, to_rgb

    from ..models import create_model
    from ..ops.build import untrusted

    folder = data_folder(folder)
    samples = scan(folder)
    prep = create_model(f"efficientnet_lite:{model_name}", pretrained=False)[1]
    files = [(str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns, label) for f, label in samples]
    key = hashlib.sha256(json.dumps([model_name, prep.to_dict(), files], default=str).encode()).hexdigest()
    path = cache_file(model_name, folder, cache_dir)
    why = next(filter(None, (untrusted(p) for p in (path.parent, path) if p.exists())), None)
    if why:  # anyone who can write the cache could hand this run other images
        print(f"not using the cache {path}: {why}", flush=True)
    elif path.is_file():
        data = load_tensors(path, "cached sample")
        if isinstance(data, dict) and data.get("key") == key:
            return data["images"], data["labels"]
        print(f"{path}: made from other files or another preprocessing than {folder} now; rebuilding it", flush=True)
    transform = prep.transform()
    images = []
    for f, _ in samples:
        with open_image(f) as img:
            images.append(transform(to_rgb(img)))
    labels = torch.tensor([label for _, label in samples])
    if why:
        return torch.stack(images), labels
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    torch.save({"images": torch.stack(images), "labels": labels, "key": key}, part)
    part.replace(path)
    return torch.stack(images), labels


def paired_difference(correct: torch.Tensor, reference: torch.Tensor, z: float = 1.96):
    """The top-1 difference of two classifiers on the same images, in points, with its 95 %
    interval: `(points, low, high)`.

    Only the images on which exactly one of the two is right carry the difference (McNemar's
    pairs). The interval is Agresti and Min's for paired proportions (2005): the Wald interval
    after adding half an image to each of the four right/wrong cells, which keeps a width when
    no image differs (about +-0.4 points on 500 images).

    Example:
        >>> t, f = torch.tensor([True, True, False, True]), torch.tensor([True, False, False, True])
        >>> paired_difference(t, f)[0]
        25.0
    """
    gained = int((correct & ~reference).sum()) + 0.5
    lost = int((reference & ~correct).sum()) + 0.5
    total = len(correct) + 2
    shift = (gained - lost) / total
    half = z * ((gained + lost) / total - shift ** 2) ** 0.5 / total ** 0.5
    return 100.0 * (gained - lost) / (total - 2), 100.0 * (shift - half), 100.0 * (shift + half)


def main(argv: list[str] | None = None) -> int:
    """`python -m vquant_pl.cli.recipes --models lite0 lite1 lite2 --bits 4 6 8 --recipes squant
    vquant vquant-mixed --data imagenet-sample imagenet-sample-extra`: top-1 per folder and on
    all of them (float and each recipe), the difference to float with its 95 % interval,
    agreement with float's top-1, the mean KL divergence to float and seconds to quantize, as
    Markdown."""
    import argparse
    import time

    from torch.nn import functional as F

    from ..models import create_model
    from ..quantize import quantize_model, restore_model

    p = argparse.ArgumentParser(prog="python -m vquant_pl.cli.recipes")
    p.add_argument("--models", nargs="+", default=["lite0", "lite1", "lite2"])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 6, 8])
    p.add_argument("--recipes", nargs="+", default=["bn", "vquant"],
                   help="recipe names (configs/recipes/) or YAML files; --bits sets their bit widths")
    p.add_argument("--data", nargs="+", default=list(DEFAULT_DATA),
                   help="folders of labelled ImageNet images, paths or names in $VQUANT_SHARED/data "
                        "(default: imagenet-sample, 100 images)")
    p.add_argument("--num", type=int, default=None, help="the first NUM images of each folder (default: all)")
    args = p.parse_args(argv)
    try:
        folders = [data_folder(d) for d in args.data]
        recipes = {r: load_recipe(r) for r in args.recipes}
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    names = [f.name for f in folders]
    if len(set(names)) < len(names):
        p.error(f"--data folders must have distinct names (their columns), got {', '.join(names)}")
    if args.num is not None and args.num < 1:
        p.error(f"--num must be a positive integer, got {args.num}")
    cols = names + (["all"] if len(folders) > 1 else [])
    print(f"| model | W/A | recipe | {' | '.join(cols)} | vs float, points (95 %) | agree | KL | seconds |\n"
          f"| --- | --- | --- |{' ---: |' * (len(cols) + 4)}", flush=True)
    for name in args.models:
        model, _ = create_model(f"efficientnet_lite:{name}")
        data = [sample_tensors(name, f) for f in folders]
        data = [(x[:args.num], y[:args.num]) for x, y in data]
        images, labels = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
        parts = [len(y) for _, y in data]

        def logits() -> torch.Tensor:
            with torch.inference_mode():
                return torch.cat([model(images[i:i + 50]) for i in range(0, len(images), 50)])

        def top1(right: torch.Tensor) -> str:
            cells = [(int(r.sum()), len(r)) for r in right.split(parts)] + ([(int(right.sum()), len(right))]
                                                                            if len(parts) > 1 else [])
            return " | ".join(f"{100.0 * h / n:.1f} ({h}/{n})" for h, n in cells)

        ref = logits()
        ref_right, ref_logp = ref.argmax(1) == labels, F.log_softmax(ref, 1)
        print(f"| {name} | float | - | {top1(ref_right)} | - | - | - | - |", flush=True)
        for bits in args.bits:
            for recipe, settings in recipes.items():
                start = time.perf_counter()
                quantize_model(model, **(settings | {"weight_bits": bits, "act_bits": bits}))
                seconds = time.perf_counter() - start
                out = logits()
                restore_model(model)
                right = out.argmax(1) == labels
                diff, low, high = paired_difference(right, ref_right)
                agree = int((out.argmax(1) == ref.argmax(1)).sum())
                kl = float((ref_logp.exp() * (ref_logp - F.log_softmax(out, 1))).sum(1).mean())
                label = Path(recipe).stem if Path(recipe).suffix in (".yaml", ".yml") else recipe
                print(f"| {name} | W{bits}A{bits} | {label} | {top1(right)} | {diff:+.1f} ({low:+.1f}, {high:+.1f}) "
                      f"| {agree}/{len(labels)} | {kl:.4f} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
