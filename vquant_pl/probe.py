"""The data-free probe: seeded uniform [0, 1) noise at the model's input size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

DEFAULT_BATCH = 256
DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class Probe:
    """A probe given by a seed and a shape; `shape=None` means `(256, C, H, W)` at the
    model's input size. Two runs with the same Probe see the very same tensor."""

    seed: int = 0
    shape: Sequence[int] | None = None

    def tensor(self, shape: Sequence[int]) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(tuple(shape), generator=generator)


def model_input_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) the model (or the first submodule that says) is evaluated at: the
    `.preprocessing` that `create_model` / `attach_preprocessing` attach, pytorchcv
    `in_size`, timm `pretrained_cfg` (its test size when it has one, as timm's evaluation
    transform uses), EfficientNet-Lite `input_image_size`."""
    for module in model.modules():
        size = getattr(getattr(module, "preprocessing", None), "input_size", None)
        if size is None:
            size = getattr(module, "in_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return int(size[0]), int(size[1])
        for attr in ("pretrained_cfg", "default_cfg"):
            cfg = getattr(module, attr, None)
            if isinstance(cfg, dict):
                size = cfg.get("test_input_size") or cfg.get("input_size") or ()
                if len(size) == 3:
                    return int(size[1]), int(size[2])
        size = getattr(module, "input_image_size", None)
        if isinstance(size, int):
            return size, size
    return None


def default_probe_shape(model: nn.Module, first_layer: nn.Module) -> tuple[int, ...]:
    """`(256, C, H, W)` for image models; `(256, in_features)` when the first layer is Linear."""
    if isinstance(first_layer, nn.Linear):
        return DEFAULT_BATCH, first_layer.in_features
    if isinstance(first_layer, nn.Conv2d):
        h, w = model_input_size(model) or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
        return DEFAULT_BATCH, first_layer.in_channels, h, w
    raise ValueError(
        f"cannot infer a probe shape for a model whose first layer is "
        f"{type(first_layer).__name__}; pass probe=Probe(shape=...) or a probe tensor")


def make_probe(probe: Tensor | Probe | None, model: nn.Module, first_layer: nn.Module,
               device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """The probe tensor on `device`, in the model's `dtype` (drawn in float32)."""
    if probe is None:
        probe = Probe()
    if isinstance(probe, Probe):
        shape = probe.shape or default_probe_shape(model, first_layer)
        probe = probe.tensor(shape)
    if not isinstance(probe, Tensor):
        raise TypeError(f"probe must be a Tensor, a vquant_pl.Probe or None, got {type(probe).__name__}")
    if not probe.is_floating_point() or probe.dim() < 2 or probe.shape[0] < 1:
        raise ValueError(f"probe must be a floating-point batch tensor [N, ...], got "
                         f"{probe.dtype} of shape {tuple(probe.shape)}")
    if not bool(torch.isfinite(probe).all()):
        raise ValueError("the probe holds NaN or infinite values")
    return probe.detach().to(device=device, dtype=dtype)
