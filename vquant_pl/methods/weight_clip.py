"""Per-channel weight clipping that minimizes the expected rounding error (data-free).

Per-channel min/max ranges spend the few levels of a 4-bit grid on one or two outlier
weights. For each output channel the range `[r * min, r * max]` is searched over ratios
`r` (a grid in `[min_ratio, 1]`), the weight quantized to nearest on that grid and the
squared error summed, each input channel weighted by its expected squared input `E[x^2]`
from the BatchNorm-derived distribution (`bn_ranges`; equal weights where none), so the
error is the expected output error of that channel (up to cross terms). The chosen clip
is applied by clamping the float weight in place (saved first, restored exactly by
`restore_model`); the weight quantizer (SQuant) then ranges the clamped weight.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..layers import QUANTIZABLE, quantizable_layers
from ..state import SaveFn, save_original
from .bn_mse import sample_stats


__all__ = ["clip_ratios", "clip_weights", "input_moments"]



def clip_ratios(weight: Tensor, bits: int, moments: Tensor | None = None, grid: int = 16,
                min_ratio: float = 0.4) -> Tensor:
    """The per-output-channel ratio `r` minimizing the (weighted) nearest-rounding error.

    Args:
        weight: `[O, I, *kernel]` (or `[O, I]`).
        bits: weight bits.
        moments: optional `E[x^2]` per input channel (`I`), weighting each weight's error.
        grid: ratios tried, evenly spaced in `[min_ratio, 1]` (1 = no clipping is always tried).
        min_ratio: the smallest ratio.

    Returns:
        A float tensor `[O]` of ratios.

    Example:
        >>> w = torch.tensor([[0.1, -0.1, 0.12, 5.0]])
        >>> clip_ratios(w, 2)  # the outlier is kept only if clipping it costs more
        tensor([1.])
    """
    w = weight.detach().float().reshape(weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1)
    weights = None if moments is None else moments.float().view(1, -1, 1).expand_as(w)
    lo, hi = w.amin((1, 2), keepdim=True), w.amax((1, 2), keepdim=True)
    ratios = torch.linspace(min_ratio, 1.0, grid)
    errs = []
    for r in ratios.tolist():
        l, h = lo * r, hi * r
        scale = float(2 ** bits - 1) / torch.clamp(h - l, min=1e-8)
        zero_point = torch.round(scale * l) + 2 ** (bits - 1)
        c = w.clamp(l, h)
        q = (torch.round(scale * c - zero_point) + zero_point) / scale
        e = (q - w).pow(2)
        errs.append((e if weights is None else e * weights).sum((1, 2)))
    return ratios[torch.stack(errs).argmin(0)]


def input_moments(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> dict[str, Tensor]:
    """`E[x^2]` per input channel of each layer whose input comes from BatchNorm (by the
    seeded samples of `act_mse`); layers without statistics are left out."""
    from .bn_graph import bn_stats

    stats = bn_stats(model, [n for n, _ in layers], QUANTIZABLE)
    out = {}
    for name, layer in layers:
        s = stats.get(name)
        if s is None or isinstance(s, str):
            continue
        m = sample_stats(s, 256, 0).pow(2).mean(1)
        channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels // layer.groups
        if isinstance(layer, nn.Linear) or layer.groups == 1:
            if m.numel() == channels:
                out[name] = m
        elif layer.groups == layer.in_channels == layer.out_channels and m.numel() == layer.in_channels:
            out[name] = None  # depthwise: one input channel per output channel, the weight is uniform
    return out


@torch.no_grad()
def clip_weights(model: nn.Module, bits: int | Mapping[str, int], grid: int = 16, min_ratio: float = 0.4, weighted: bool = True,
                 save: SaveFn | None = None, layers: list[tuple[str, nn.Module]] | None = None) -> dict[str, Tensor]:
    """Clamp every quantizable layer's weight per output channel to its MSE-optimal range.

    Args:
        model: the float model (changed in place).
        bits: the weight bits the clip is optimized for, or each layer's (by name).
        grid, min_ratio: the searched ratios (see `clip_ratios`).
        weighted: weight the error by `E[x^2]` of the input channel, from BatchNorm.
        save: called as `save(module, "weight")` first (default `vquant_pl.state.save_original`).
        layers: `(name, layer)` pairs (default every Conv/Linear).

    Returns:
        `{layer name: ratios [O]}`.

    Raises:
        ValueError: on min_ratio outside (0, 1] or grid < 1.

    Example:
        >>> import torch, vquant_pl as vq
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                             torch.nn.Conv2d(8, 4, 1)).eval()
        >>> sorted(clip_weights(model, 4))  # a ratio per output channel of every layer
        ['0', '3']
    """
    if not 0 < min_ratio <= 1 or grid < 1:
        raise ValueError(f"min_ratio must lie in (0, 1] and grid be >= 1, got {min_ratio!r}, {grid!r}")
    save = save or save_original
    if layers is None:
        layers = quantizable_layers(model)
    moments = input_moments(model, layers) if weighted else {}
    out = {}
    for name, layer in layers:
        ratios = clip_ratios(layer.weight, bits if isinstance(bits, int) else bits[name], moments.get(name), grid,
                             min_ratio)
        out[name] = ratios
        if bool((ratios == 1).all()):
            continue
        w = layer.weight
        flat = w.detach().float().reshape(w.shape[0], -1)
        lo = (flat.amin(1) * ratios).view(-1, *[1] * (w.dim() - 1))
        hi = (flat.amax(1) * ratios).view(-1, *[1] * (w.dim() - 1))
        save(layer, "weight")
        w.copy_(torch.maximum(torch.minimum(w.float(), hi), lo).to(w.dtype))
    return out
