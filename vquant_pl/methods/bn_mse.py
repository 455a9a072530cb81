"""Activation ranges that minimize the expected quantization error under the BN-derived
distribution: no probe, no data.

A layer input's channels are modelled as in `bn_ranges` (normal with BatchNorm's beta and
|gamma|, clipped by ReLU/ReLU6, summed over residual adds). A fixed, seeded set of
standard-normal draws per channel turns the expectation into an average; the range
`[lo, hi]` of the per-tensor quantizer (docs/quantization-rules.md rule 3 arithmetic: scale, rounded zero
point, clamp) is searched on a grid to minimize the mean squared error over all channels,
each weighted by `channel_weight` (for example the squared norm of the consumer's
input-channel weights, so that error where the next layer looks counts more).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import check_bits
from ..layers import per_input_channel
from .bn_graph import ChannelStats

__all__ = ["bn_mse_method_range", "bn_mse_range", "consumer_weight", "expected_error"]


def sample_stats(s: ChannelStats, samples: int, seed: int) -> Tensor:
    """`[C, samples]` draws of each channel's normal, clamped to `[lo, hi]`: the same numbers
    on every device (drawn on the CPU), on the statistics' device."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(s.mean.numel(), samples, generator=g).to(s.mean.device)
    x = s.mean.float().view(-1, 1) + s.std.float().view(-1, 1) * z
    return x.clamp(min=s.lo, max=s.hi)


def expected_error(x: Tensor, bits: int, lo: float, hi: float, signed: bool,
                   channel_weight: Tensor | None = None) -> float:
    """Weighted mean squared error of fake-quantizing the samples `x [C, n]` with `[lo, hi]`."""
    n = 2 ** (bits - 1)
    scale = torch.tensor(float(2 ** bits - 1)) / torch.clamp(torch.tensor(hi - lo, dtype=torch.float32), min=1e-8)
    zero_point = torch.round(scale * lo) + (n if signed else 0)
    q_min, q_max = (-n, n - 1) if signed else (0, 2 ** bits - 1)
    q = torch.round(x * scale - zero_point).clamp_(q_min, q_max).add_(zero_point).div_(scale)
    err = (q - x).pow_(2).mean(1)
    if channel_weight is not None:
        return float((err * channel_weight).sum() / channel_weight.sum().clamp_min(1e-12))
    return float(err.mean())


def _errors(x: Tensor, bits: int, lo: Tensor, hi: Tensor, signed: bool, w: Tensor | None,
            chunk: int = 16) -> Tensor:
    """`expected_error` for candidate ranges `lo[G]`, `hi[G]` at once (chunked)."""
    n = 2 ** (bits - 1)
    q_min, q_max = (-n, n - 1) if signed else (0, 2 ** bits - 1)
    out = []
    for i in range(0, lo.numel(), chunk):
        l, h = lo[i:i + chunk].view(-1, 1, 1), hi[i:i + chunk].view(-1, 1, 1)
        scale = float(2 ** bits - 1) / torch.clamp(h - l, min=1e-8)
        zero_point = torch.round(scale * l) + (n if signed else 0)
        q = torch.round(x * scale - zero_point).clamp_(q_min, q_max).add_(zero_point).div_(scale)
        err = (q - x).pow_(2).mean(2)  # [g, C]
        out.append(err.mean(1) if w is None else (err * w).sum(1) / w.sum().clamp_min(1e-12))
    return torch.cat(out)


def bn_mse_range(stats: ChannelStats, bits: int, channel_weight: Tensor | None = None, samples: int = 128,
                 grid: int = 64, seed: int = 0) -> tuple[float, float, bool]:
    """The per-tensor range minimizing the expected quantization error of a BN-modelled input.

    Args:
        stats: per-channel mean/std (and clip bounds) from `bn_ranges.bn_stats`.
        bits: activation bits.
        channel_weight: optional per-channel weights of the error (default: all equal).
        samples: standard-normal draws per channel (seeded: the result is deterministic).
        grid: candidate clipping values per searched bound.
        seed: seed of the draws.

    Returns:
        `(lo, hi, signed)`: unsigned `[0, hi]` when no channel can be negative, else the best
        symmetric range with each bound then refined once (it may end asymmetric).

    Raises:
        ValueError: on bad bits or channel weights of the wrong length.

    Example:
        >>> s = ChannelStats(torch.zeros(4), torch.ones(4))
        >>> lo, hi, signed = bn_mse_range(s, 4)   # about (-2.5, 2.5, True) for N(0, 1)
    """
    check_bits(bits, "activation bits")
    if channel_weight is not None and channel_weight.numel() != stats.mean.numel():
        raise ValueError(f"{channel_weight.numel()} channel weights for {stats.mean.numel()} channels")
    x = sample_stats(stats, samples, seed)
    w = None if channel_weight is None else channel_weight.detach().float().flatten()
    x_min, x_max = float(x.min()), float(x.max())
    t = torch.linspace(1.0 / grid, 1.0, grid)
    if x_min >= 0:
        his = t * x_max
        return 0.0, float(his[_errors(x, bits, torch.zeros_like(his), his, False, w).argmin()]), False
    top = max(-x_min, x_max)
    alpha = float(t[_errors(x, bits, -t * top, t * top, True, w).argmin()] * top)
    los = -t * max(-x_min, 1e-8)
    lo = float(los[_errors(x, bits, los, torch.full_like(los, alpha), True, w).argmin()])
    his = t * max(x_max, 1e-8)
    hi = float(his[_errors(x, bits, torch.full_like(his, lo), his, True, w).argmin()])
    return lo, hi, True

def consumer_weight(layer, channels: int) -> Tensor | None:
    """Squared norm of `layer`'s weights per input channel (None if it has not `channels`)."""
    out = per_input_channel(layer, layer.weight.detach().float().pow(2), torch.sum)
    return out if out.numel() == channels else None


def bn_mse_method_range(stats: ChannelStats, bits: int, config, layer) -> tuple[float, float, bool]:
    """`range_methods.BnRange` adapter: `bn_mse_range` weighted by the consuming layer's
    input-channel weight norms (for a `RangeMethod("bn-mse", _sigma, bn_range=..., bn_first=True)`)."""
    return bn_mse_range(stats, bits, consumer_weight(layer, stats.mean.numel()))
