"""Weight quantization: per-channel affine codes rounded by SQuant on a chosen backend."""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import check_bits
from . import backends, kernels
from .affine import dequantize, weight_codes
from .squant import ROUNDINGS, levels


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {', '.join(ROUNDINGS)}")
    return rounding


def check_weight(weight: Tensor, name: str = "weight", finite: bool = True) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {weight.dtype}")
    if weight.dim() < 1 or weight.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor with an output-channel dim, "
                         f"got shape {tuple(weight.shape)}")
    if finite and not torch.isfinite(weight).all():
        raise ValueError(f"{name} holds NaN or infinite values")


@torch.no_grad()
def quantize_weight(weight: Tensor, bits: int, rounding: str = "squant",
                    backend: str | None = None, _allow_one_bit: bool = False) -> Tensor:
    """Fake-quantize a weight per output channel (affine, channel min/max).

    Returns the dequantized weight, same shape and dtype (fp16/bf16 are computed in
    float32 and cast back). `rounding` is one of `nearest`, `squant-e`, `squant-k`,
    `squant-c`, `squant`; `backend` one of None (fastest available), `torch`, `cpp`,
    `cuda` -- all give identical results.
    """
    if not (_allow_one_bit and bits == 1):  # 1 bit only inside ACIQ bit allocation
        check_bits(bits, "weight bits")
    check_rounding(rounding)
    check_weight(weight, finite=False)  # finiteness: below, or in the fused kernel's own pass
    name, round_fn = backends.resolve(backend, weight.device)
    if name == "cpp" and weight.device.type == "cpu":  # codes, rounding, dequantization in one pass
        w = weight.detach().float().reshape(weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1)
        q = kernels.native_ops().squant_weight(w.contiguous(), bits, *levels(rounding, w.shape[-1]))
        return q.reshape(weight.shape).to(weight.dtype)
    check_weight(weight)
    if name == "cuda":  # the same fused operator on the GPU: 3 kernel launches per layer
        w = weight.detach().float().reshape(weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1)
        q = kernels.native_ops().squant_weight(w.contiguous(), bits, *levels(rounding, w.shape[-1]))
        return q.reshape(weight.shape).to(weight.dtype)
    codes, scale, zero_point = weight_codes(weight, bits)
    q = round_fn(codes.contiguous(), bits, rounding)
    return dequantize(q, scale, zero_point).reshape(weight.shape).to(weight.dtype)
