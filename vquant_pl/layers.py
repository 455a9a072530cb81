"""The layers vquant quantizes (docs/quantization-rules.md rule 1) and how their inputs are laid out."""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

#: Layer types whose weights and inputs are quantized (subclasses included).
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: BatchNorm types whose statistics the data-free methods read (subclasses included: timm's
#: BatchNormAct2d is one; `bn_graph.bn_activation` tells what such a subclass applies after normalizing).
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv1d/2d/3d and Linear (subclasses included), in `model.modules()` order.

    Example:
        >>> import torch
        >>> [n for n, _ in quantizable_layers(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(),
        ...                                                       torch.nn.Flatten(), torch.nn.Linear(4, 2)))]
        ['0', '3']
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def input_channel_dim(layer: nn.Module) -> int:
    """The channel dimension of a layer's input: features last for Linear, 1 for convs."""
    return -1 if isinstance(layer, nn.Linear) else 1


def in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def groups(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else layer.groups


def is_depthwise(layer: nn.Module) -> bool:
    return not isinstance(layer, nn.Linear) and layer.groups == layer.in_channels == layer.out_channels


def per_input_channel(layer: nn.Module, values: Tensor, reduce: Callable[..., Tensor]) -> Tensor:
    """`reduce` (e.g. `torch.amax`, `torch.sum`) of weight-shaped `values` over everything but
    the input channel, grouped convolutions included: one value per input channel."""
    if isinstance(layer, nn.Linear):
        return reduce(values, dim=0)
    g = layer.groups
    return reduce(values.reshape(g, values.shape[0] // g, values.shape[1], -1), dim=(1, 3)).flatten()


def recomputed_by(module: nn.Module, tensor_name: str) -> str | None:
    """What recomputes `module.<tensor_name>` on access or before every forward (pruning, a
    parametrization, weight_norm, spectral_norm), or None: a value written into it would not last."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, tensor_name):
        return "a parametrization"
    for hook in module._forward_pre_hooks.values():
        if tensor_name in (getattr(hook, "_tensor_name", None), getattr(hook, "name", None)):
            return type(hook).__name__
    return None
