"""Weight quantization: per-channel affine codes rounded by SQuant on a chosen backend."""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import MAX_BITS, check_bits
from . import backends, kernels
from .affine import affine_scale, dequantize, weight_codes
from .squant import ROUNDINGS, levels

_F32_MAX = torch.finfo(torch.float32).max


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {', '.join(ROUNDINGS)}")
    return rounding


def check_weight(weight: Tensor, name: str = "weight", finite: bool = True, bits: int | None = None) -> None:
    """Refuse what `quantize_weight` cannot quantize: not a float tensor, no output-channel dim
    and, with `finite`, NaN / inf values or a channel whose affine codes (rule 2, float32) would
    overflow at `bits` (None: at any of 1..MAX_BITS). One reduction (channel min and max)."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {weight.dtype}")
    if weight.dim() < 1 or weight.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor with an output-channel dim, "
                         f"got shape {tuple(weight.shape)}")
    if not finite:
        return
    if weight.is_meta:
        raise ValueError(f"{name} is on the meta device and holds no values")
    lo, hi = (t.cpu().double() for t in torch.aminmax(weight.detach().reshape(weight.shape[0], -1), dim=1))
    bad = ~(lo.isfinite() & hi.isfinite())
    if bad.any():
        raise ValueError(f"{name} holds NaN or infinite values (output channel {int(bad.nonzero()[0])})")
    big = torch.maximum(lo.abs(), hi.abs())
    if big.max() > _F32_MAX:
        c = int(big.argmax())
        raise ValueError(f"{name}: value {float(hi[c] if hi[c].abs() >= lo[c].abs() else lo[c]):.6g} (output channel "
                         f"{c}) exceeds the float32 range (+-{_F32_MAX:.6g}) that quantization computes in")
    bad = _overflows(lo.float(), hi.float(), range(1, MAX_BITS + 1) if bits is None else [bits])
    if bad.any():
        c = int(bad.nonzero()[0])
        what = "max - min overflows float32" if torch.isinf(hi[c].float() - lo[c].float()) else \
            "scale, zero point or dequantized values of its affine codes overflow float32"
        raise ValueError(f"{name}: output channel {c} spans [{float(lo[c]):.6g}, {float(hi[c]):.6g}]: its range "
                         f"overflows float32 ({what})")


def _overflows(lo: Tensor, hi: Tensor, bit_widths) -> Tensor:
    """Per channel (float32 `lo`, `hi` [OC]): does rule 2 leave float32 at any of `bit_widths`?
    The codes `scale * w - zp` and dequantized values `(q + zp) / scale` (q in [-n, n-1]) are
    monotone in w and q, so their extremes decide."""
    bad = torch.zeros(lo.shape, dtype=torch.bool)
    for b in bit_widths:
        n = 2 ** (b - 1)
        scale = affine_scale(lo, hi, b)
        zero_point = torch.round(scale * lo) + n
        ends = (scale * lo - zero_point, scale * hi - zero_point, (zero_point - n) / scale,
                (zero_point + (n - 1)) / scale)
        bad |= ~torch.stack(ends).isfinite().all(0)
    return bad


@torch.no_grad()
def quantize_weight(weight: Tensor, bits: int, rounding: str = "squant",
                    backend: str | None = None, _allow_one_bit: bool = False) -> Tensor:
    """Fake-quantize a weight per output channel (affine, channel min/max).

    Returns the dequantized weight, same shape and dtype (fp16/bf16 are computed in
    float32 and cast back). `rounding` is one of `nearest`, `squant-e`, `squant-k`,
    `squant-c`, `squant`; `backend` one of None (fastest available), `torch`, `cpp`,
    `cuda` -- all give identical results.

    Raises:
        ValueError: NaN or inf values; a value beyond float32 (float64 weights); a channel
            whose range overflows float32 in the affine codes (e.g. max - min > 3.4e38), named.
    """
    if not (_allow_one_bit and bits == 1):  # 1 bit only inside ACIQ bit allocation
        check_bits(bits, "weight bits")
    check_rounding(rounding)
    check_weight(weight, bits=bits)  # NaN / inf, or a range that overflows float32: one min/max pass
    name, round_fn = backends.resolve(backend, weight.device)
    if name == "cpp" and weight.device.type == "cpu":  # codes, rounding, dequantization in one pass
        w = weight.detach().float().reshape(weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1)
        q = kernels.native_ops().squant_weight(w.contiguous(), bits, *levels(rounding, w.shape[-1]))
        return q.reshape(weight.shape).to(weight.dtype)
    if name == "cuda":  # the same fused operator on the GPU: 3 kernel launches per layer
        w = weight.detach().float().reshape(weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1)
        q = kernels.native_ops().squant_weight(w.contiguous(), bits, *levels(rounding, w.shape[-1]))
        return q.reshape(weight.shape).to(weight.dtype)
    codes, scale, zero_point = weight_codes(weight, bits)
    q = round_fn(codes.contiguous(), bits, rounding)
    return dequantize(q, scale, zero_point).reshape(weight.shape).to(weight.dtype)
