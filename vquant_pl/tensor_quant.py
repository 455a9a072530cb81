"""NVIDIA pytorch-quantization style scale-only symmetric quantization.

`scale = max_bound / amax` with `max_bound = 2^(b-1) - 1` (signed) or `2^b - 1`
(unsigned); codes `clamp(round(x * scale), min_bound, max_bound)`, `min_bound = -max_bound`
with `narrow_range`, else `-max_bound - 1` (0 when unsigned). `fake_tensor_quant` returns
`codes / scale` with a straight-through gradient that is zero where `|x| > amax`.
`amax` is a scalar or a tensor broadcastable to `x` (per-channel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CALIB_METHODS = ("max", "histogram", "percentile", "mse", "entropy")


@dataclass
class QuantDescriptor:
    """How a tensor is quantized: bits, per-channel `axis` (None: per tensor), a fixed
    `amax` (None: calibrated, or per batch "in flight"), sign, narrow range, calibrator."""

    num_bits: int = 8
    axis: int | tuple[int, ...] | None = None
    amax: float | None = None
    unsigned: bool = False
    narrow_range: bool = False
    calib_method: str = "max"

    def __post_init__(self):
        if isinstance(self.num_bits, bool) or not isinstance(self.num_bits, int) or not 1 <= self.num_bits <= 16:
            raise ValueError(f"num_bits must be an integer in 1..16, got {self.num_bits!r}")
        if self.calib_method not in CALIB_METHODS:
            raise ValueError(f"unknown calib_method {self.calib_method!r}; expected one of {', '.join(CALIB_METHODS)}")
        if self.amax is not None and not float(self.amax) > 0:
            raise ValueError(f"amax must be positive, got {self.amax!r}")


def _bounds(num_bits: int, unsigned: bool, narrow_range: bool) -> tuple[int, int]:
    max_bound = 2 ** (num_bits - (0 if unsigned else 1)) - 1
    min_bound = 0 if unsigned else (-max_bound if narrow_range else -max_bound - 1)
    return min_bound, max_bound


def _scale(amax: Tensor | float, max_bound: int, like: Tensor) -> Tensor:
    amax = torch.as_tensor(amax, dtype=torch.float32, device=like.device)
    if (amax <= 0).any() or not torch.isfinite(amax).all():
        raise ValueError("amax must be positive and finite")
    return torch.full_like(amax, float(max_bound)) / amax


def tensor_quant(x: Tensor, amax: Tensor | float, num_bits: int = 8, unsigned: bool = False,
                 narrow_range: bool = True) -> tuple[Tensor, Tensor]:
    """Integer codes (as floats) of `x` and the scale they were made with."""
    min_bound, max_bound = _bounds(num_bits, unsigned, narrow_range)
    if unsigned and (x < 0).any():
        raise ValueError("unsigned quantization of a tensor holding negative values")
    scale = _scale(amax, max_bound, x)
    return torch.clamp(torch.round(x.float() * scale), min_bound, max_bound), scale


class _FakeTensorQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, amax, num_bits, unsigned, narrow_range):
        amax_t = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, amax_t)
        codes, scale = tensor_quant(x, amax_t, num_bits, unsigned, narrow_range)
        return (codes / scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, amax = ctx.saved_tensors
        return torch.where(x.abs() <= amax, grad, torch.zeros_like(grad)), None, None, None, None


def fake_tensor_quant(x: Tensor, amax: Tensor | float, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = True) -> Tensor:
    """Quantize-dequantize `x` (straight-through gradient inside `[-amax, amax]`)."""
    return _FakeTensorQuant.apply(x, amax, num_bits, unsigned, narrow_range)


def reduce_amax(x: Tensor, axis: int | tuple[int, ...] | None = None) -> Tensor:
    """`max |x|`, over everything (axis None) or keeping the dims in `axis` (per channel)."""
    if axis is None:
        return x.detach().abs().amax()
    keep = {a % x.dim() for a in ((axis,) if isinstance(axis, int) else axis)}
    dims = tuple(d for d in range(x.dim()) if d not in keep)
    return x.detach().abs().amax(dim=dims, keepdim=True)
