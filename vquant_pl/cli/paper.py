"""Published numbers: SQuant (ICLR 2022) ImageNet top-1 of pytorchcv models, and when a run is
the paper's experiment (`paper_comparison`), so that its number stands beside it.

A row of the paper is one setting: the pretrained pytorchcv model (no checkpoint, 1000
classes, the model's own preprocessing, float32 numerics), quantized by the settings of the shipped config
`configs/paper/<model>_<w4a4|w6a6|w8a8|fp32>.yaml` (SQuant rounding, the paper's activation
range rule and its constant, no BatchNorm bias correction, uniform bits, the whole model). A run that
differs in any of these (its `QuantConfig`, resolved, `backend` aside: every backend gives the
same codes, `vquant selftest`) is another experiment: it gets no paper top-1, with the reason.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

#: top-1 (%) by pytorchcv model name and setting ("fp32", "w4a4", "w6a6", "w8a8").
SQUANT_TOP1: dict[str, dict[str, float]] = {
    "resnet18": {"fp32": 71.47, "w4a4": 66.14, "w6a6": 70.74, "w8a8": 71.47},
    "resnet50": {"fp32": 77.74, "w4a4": 70.80, "w6a6": 77.05, "w8a8": 77.71},
    "inceptionv3": {"fp32": 78.81, "w4a4": 73.26, "w6a6": 78.30, "w8a8": 78.79},
    "sqnxt23_w2": {"fp32": 69.38, "w4a4": 43.45, "w6a6": 67.34, "w8a8": 69.22},
    "shufflenet_g1_w1": {"fp32": 65.07, "w6a6": 60.25, "w8a8": 64.68},
}

#: The data module's settings that change what the model sees; the paper's rows use the
#: model's own preprocessing (these unset, as in the paper configs).
PREPROCESSING = ("image_size", "crop_pct", "resize", "interpolation", "crop_mode", "mean", "std")
#: Quantization settings that do not change the quantized model: the backends give the same codes.
NOT_COMPARED = ("backend",)


def paper_top1(model_spec: str, weight_bits: int | None, act_bits: int | None, rounding: str = "squant") -> float | None:
    """The paper's top-1 (%) for a model spec and bit widths, or None when it reports none.

    Only the model, the bits and the rounding are looked at: whether a run is the paper's
    experiment (all its other settings) is `paper_comparison`'s question, which the sweep asks.
    """
    source, _, name = model_spec.partition(":")
    if source != "pytorchcv" or name not in SQUANT_TOP1:
        return None
    if weight_bits is None:
        return SQUANT_TOP1[name]["fp32"]
    if rounding != "squant" or act_bits != weight_bits:
        return None
    return SQUANT_TOP1[name].get(f"w{weight_bits}a{act_bits}")


def paper_config(name: str, tag: str) -> Path:
    """The shipped config of the paper's row `tag` (`fp32`, `w4a4`, ...) for pytorchcv model `name`."""
    from .app import configs_dir

    return configs_dir() / "paper" / f"{name}_{tag}.yaml"


@lru_cache(maxsize=None)
def _paper_sections(name: str, tag: str) -> tuple[dict, dict, dict] | None:
    import yaml

    path = paper_config(name, tag)
    if not path.is_file():
        return None
    text = yaml.safe_load(path.read_text()) or {}
    return tuple(dict(text.get(k) or {}) for k in ("model", "quant", "data"))  # type: ignore[return-value]


def paper_setting(name: str, tag: str) -> dict[str, Any] | None:
    """The resolved `QuantConfig` of the paper's row (`QuantConfig.to_dict(resolved=True)`, from
    its shipped config) with its `target`; None for `fp32` or a row without a shipped config.

    Example:
        >>> s = paper_setting("resnet18", "w4a4")
        >>> s["rounding"], s["bn_bias_correction"], s["target"]
        ('squant', None, None)
    """
    from ..config import QuantConfig

    sections = _paper_sections(name, tag)
    if tag == "fp32" or sections is None:
        return None
    quant = sections[1]
    config = QuantConfig.from_kwargs(**{k: v for k, v in quant.items() if k in QuantConfig.field_names()})
    return config.to_dict(resolved=True) | {"target": quant.get("target")}


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def paper_comparison(model_spec: str, settings: Mapping[str, Any] | None, *, pretrained: bool = True,
                     checkpoint: str | None = None, num_classes: int = 1000, target: str | None = None,
                     data: Mapping[str, Any] | None = None, precision: str | None = None
                     ) -> tuple[float | None, str | None]:
    """The paper's top-1 for a run, when the run is the paper's experiment.

    Args:
        model_spec: the run's `create_model` spec.
        settings: the run's resolved quantization settings (`VQuantCallback.settings`:
            `weight_bits` None for a float run), or None (no quantization callback: float).
        pretrained, checkpoint, num_classes: the model's settings (`SpecClassifier`).
        target: the submodule quantized (`quant.target`; None: the whole model).
        data: the data module's settings (its `hparams`); only `PREPROCESSING` is compared.
        precision: the Trainer's (`trainer.precision`, e.g. `32-true`; None: not compared).

    Returns:
        `(top1, None)` when the paper reports this model and bits and the run equals the
        paper's row in everything (`fp32`: the model alone); `(None, reason)` when the paper
        has that row but the run differs (the reason lists each difference, the paper's value
        in brackets); `(None, None)` when the paper has no such row.

    Example:
        >>> paper_comparison("pytorchcv:resnet18", None)
        (71.47, None)
        >>> paper_comparison("pytorchcv:resnet18", None, pretrained=False)
        (None, 'pretrained false (paper: true)')
        >>> paper_comparison("timm:resnet18", None)
        (None, None)
    """
    source, _, name = model_spec.partition(":")
    if source != "pytorchcv" or name not in SQUANT_TOP1:
        return None, None
    wb = settings.get("weight_bits") if settings else None
    ab = settings.get("act_bits") if settings else None
    if wb is not None and ab != wb:
        return None, None  # the paper quantizes weights and activations alike
    tag = "fp32" if wb is None else f"w{wb}a{ab}"
    top1 = SQUANT_TOP1[name].get(tag)
    if top1 is None:
        return None, None
    sections = _paper_sections(name, tag)
    paper_model, paper_data = (sections[0], sections[2]) if sections else ({}, {})
    differences = []
    for key, value, paper in (("pretrained", pretrained, paper_model.get("pretrained", True)),
                              ("checkpoint", checkpoint, paper_model.get("checkpoint")),
                              ("num_classes", num_classes, paper_model.get("num_classes", 1000))):
        if value != paper:
            differences.append(f"{key} {_show(value)} (paper: {_show(paper)})")
    if precision is not None and str(precision) not in ("32", "32-true"):
        differences.append(f"trainer.precision {precision} (paper: 32-true)")
    for key in PREPROCESSING:
        value, paper = (data or {}).get(key), paper_data.get(key)
        if value != paper:
            differences.append(f"data.{key} {_show(value)} (paper: {_show(paper)})")
    if wb is not None:
        expected = paper_setting(name, tag)
        if expected is None:
            return None, f"no shipped paper config {paper_config(name, tag).name} to compare the setting with"
        given = dict(settings) | {"target": target}
        for key, paper in expected.items():
            if key not in NOT_COMPARED and given.get(key) != paper:
                differences.append(f"{key} {_show(given.get(key))} (paper: {_show(paper)})")
    return (top1, None) if not differences else (None, ", ".join(differences))
