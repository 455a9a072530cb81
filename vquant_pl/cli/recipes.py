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

from pathlib import Path

import torch

from .files import load_tensors

__all__ = ["load_recipe", "main", "recipe_names", "recipes_dir", "sample_tensors"]

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


# -- the recipe table on the ImageNet sample -------------------------------------------------
def sample_tensors(model_name: str, cache_dir: str | Path = "runs/recipes"):
    """The 100-image sample preprocessed for `efficientnet_lite:<model_name>`, cached on disk
    as `<cache_dir>/<model_name>_sample.pt` ({"images", "labels"}); labels are the ranks of
    the synsets in `imagenet_synsets.txt` sorted. The sample lives in `$VQUANT_SHARED/data`
    (default `../shared/data` beside the repository)."""
    path = Path(cache_dir) / f"{model_name}_sample.pt"
    if path.is_file():
        data = load_tensors(path, "cached sample")
        return data["images"], data["labels"]
    from PIL import Image

    from ..models import create_model

    import os

    shared = Path(os.environ.get("VQUANT_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data"
    classes = {s: i for i, s in enumerate(sorted((shared / "imagenet_synsets.txt").read_text().split()))}
    files = sorted((shared / "imagenet-sample").glob("*.JPEG"))
    transform = create_model(f"efficientnet_lite:{model_name}", pretrained=False)[1].transform()
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([classes[f.name.split("_")[0]] for f in files])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"images": images, "labels": labels}, path)
    return images, labels


def main(argv: list[str] | None = None) -> int:
    """`python -m vquant_pl.cli.recipes --models lite0 lite1 lite2 --bits 4 6 8 --recipes bn vquant`:
    top-1 on the 100-image sample (float and each recipe) and seconds to quantize, as Markdown."""
    import argparse
    import time

    from ..models import create_model
    from ..quantize import quantize_model, restore_model

    p = argparse.ArgumentParser(prog="python -m vquant_pl.cli.recipes")
    p.add_argument("--models", nargs="+", default=["lite0", "lite1", "lite2"])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 6, 8])
    p.add_argument("--recipes", nargs="+", default=["bn", "vquant"],
                   help="recipe names (configs/recipes/) or YAML files; --bits sets their bit widths")
    p.add_argument("--num", type=int, default=100)
    args = p.parse_args(argv)
    print("| model | W/A | recipe | top-1 | float | seconds |\n| --- | --- | --- | ---: | ---: | ---: |", flush=True)
    for name in args.models:
        model, _ = create_model(f"efficientnet_lite:{name}")
        images, labels = sample_tensors(name)
        images, labels = images[:args.num], labels[:args.num]

        def top1() -> float:
            with torch.no_grad():
                hits = sum(int((model(images[i:i + 50]).argmax(1) == labels[i:i + 50]).sum())
                           for i in range(0, len(images), 50))
            return 100.0 * hits / len(images)

        fp = top1()
        for bits in args.bits:
            for recipe in args.recipes:
                start = time.perf_counter()
                quantize_model(model, **(load_recipe(recipe) | {"weight_bits": bits, "act_bits": bits}))
                seconds = time.perf_counter() - start
                acc = top1()
                restore_model(model)
                print(f"| {name} | W{bits}A{bits} | {recipe} | {acc:.0f} | {fp:.0f} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
