"""Affine fake quantization of weights (per output channel) and activations (per tensor).

Bit-exact with DESIGN.md rules 2 and 3: the scale is a float32 tensor divided by a
float32 tensor (never `python_number / tensor`, which multiplies by a reciprocal),
zero points are rounded half to even, dequantization divides by the scale.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, what: str = "bits") -> int:
    """Return `bits` if it is an int in the supported range, else raise ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def affine_scale(lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    """`(2^b - 1) / max(hi - lo, 1e-8)`, computed tensor by tensor in float32."""
    width = torch.clamp(hi - lo, min=1e-8)
    return torch.full_like(width, 2 ** bits - 1) / width


def weight_codes(weight: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Real (unrounded) codes of a weight, per output channel, and their scale and zero point.

    Returns `(codes [OC, IC, K], scale [OC, 1, 1], zero_point [OC, 1, 1])` in float32;
    Linear weights get K = 1, 1-D weights IC = K = 1.
    """
    w = weight.detach().float().reshape(weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1)
    lo = w.amin(dim=(1, 2), keepdim=True)
    hi = w.amax(dim=(1, 2), keepdim=True)
    scale = affine_scale(lo, hi, bits)
    zero_point = torch.round(scale * lo) + 2 ** (bits - 1)
    return scale * w - zero_point, scale, zero_point


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """`(q + zero_point) / scale`."""
    return (q + zero_point) / scale


class ActivationQuantizer:
    """Per-tensor affine fake quantization with a fixed range (DESIGN.md rule 3).

    Scale and zero point are computed once; each call is one elementwise pass.
    """

    def __init__(self, bits: int, lo: float | Tensor, hi: float | Tensor, signed: bool):
        self.bits = check_bits(bits, "activation bits")
        self.signed = bool(signed)
        lo_t = torch.as_tensor(lo, dtype=torch.float32).detach().cpu()
        hi_t = torch.as_tensor(hi, dtype=torch.float32).detach().cpu()
        self.lo, self.hi = float(lo_t), float(hi_t)
        n = 2 ** (bits - 1)
        self.scale = affine_scale(lo_t, hi_t, bits)
        self.zero_point = torch.round(self.scale * lo_t) + (n if signed else 0)
        self.q_min, self.q_max = (-n, n - 1) if signed else (0, 2 ** bits - 1)
        self._scale_f, self._zero_point_f = float(self.scale), float(self.zero_point)
        self._on: dict[torch.device, tuple] = {}

    def _on_device(self, device: torch.device) -> tuple:
        """Scale, zero point and the fused native kernel (or None) for `device`, once."""
        if device not in self._on:
            self._on[device] = (self.scale.to(device), self.zero_point.to(device),
                                backends.native_fake_quant(device))
        return self._on[device]

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_on": {}}  # the per-device cache holds a native function

    def __call__(self, x: Tensor) -> Tensor:
        fused = self._on_device(x.device)[2]
        if fused is not None and x.dtype == torch.float32 and not x.requires_grad:
            return fused(x, self._scale_f, self._zero_point_f, self.q_min, self.q_max)
        return self.reference(x)

    def reference(self, x: Tensor) -> Tensor:
        """The same computation as PyTorch ops (in place after the first: no temporaries)."""
        scale, zero_point, _ = self._on_device(x.device)
        q = torch.mul(x.float(), scale)
        q.sub_(zero_point).round_().clamp_(self.q_min, self.q_max)
        return q.add_(zero_point).div_(scale).to(x.dtype)


def fake_quant_activation(x: Tensor, bits: int, lo: float | Tensor, hi: float | Tensor,
                          signed: bool) -> Tensor:
    """Fake-quantize an activation tensor with range `[lo, hi]` (DESIGN.md rule 3)."""
    return ActivationQuantizer(bits, lo, hi, signed)(x)
