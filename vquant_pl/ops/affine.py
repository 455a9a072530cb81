"""Affine fake quantization of weights (per output channel) and activations (per tensor).

Bit-exact with docs/quantization-rules.md rules 2 and 3: the scale is a float32 tensor divided by a
float32 tensor (never `python_number / tensor`, which multiplies by a reciprocal),
zero points are rounded half to even, dequantization divides by the scale.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import MAX_BITS, MIN_BITS, check_bits
from . import kernels


def affine_scale(lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    """`(2^b - 1) / max(hi - lo, 1e-8)`, computed tensor by tensor in float32."""
    width = torch.clamp(hi - lo, min=1e-8)
    return torch.full_like(width, 2 ** bits - 1) / width


def check_activation_range(lo: Tensor, hi: Tensor, scale: Tensor, zero_point: Tensor, q_min, q_max) -> None:
    """Refuse a range (CPU tensors, per tensor or per channel) that is not finite, inverted
    (lo > hi) or whose scale, zero point or quantization grid `(q + zp) / scale` overflows
    float32 (rule 3 would give NaN or a constant). Called where ranges are given: no device sync."""
    def channel(i: int) -> str:
        return f" (channel {i})" if lo.numel() > 1 else ""

    for bad, what in ((~(lo.isfinite() & hi.isfinite()), "must be finite"), (lo > hi, "is inverted (lo > hi)")):
        if bad.any():
            i = int(bad.flatten().nonzero()[0])
            raise ValueError(f"activation range [{float(lo.flatten()[i])}, {float(hi.flatten()[i])}]{channel(i)} {what}")
    grid = (q_min + zero_point) / scale, (q_max + zero_point) / scale
    ends = torch.stack(torch.broadcast_tensors(scale, zero_point, *grid))
    bad = ~ends.isfinite().all(0).flatten()
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"activation range [{float(lo.flatten()[i]):.6g}, {float(hi.flatten()[i]):.6g}]{channel(i)} "
                         "overflows float32 in rule 3's scale, zero point or quantization grid")


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
    """Per-tensor affine fake quantization with a fixed range (docs/quantization-rules.md rule 3).

    Scale and zero point are computed once; each call is one `vquant::fake_quant` operator
    (native kernel, or its PyTorch twin without a compiler): one elementwise pass that keeps
    the input's dtype (fp16/bf16 are computed in float32) and memory format (channels_last),
    and a single node under `torch.compile`. Inputs that need a gradient take `reference`.
    A range that is not finite, inverted (lo > hi) or overflows float32 is a ValueError here,
    at construction (never a check per call).

    Example:
        >>> q = ActivationQuantizer(4, 0.0, 6.0, signed=False)
        >>> q(torch.tensor([0.1, 2.0, 7.0]))
        tensor([0., 2., 6.])
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
        check_activation_range(lo_t, hi_t, self.scale, self.zero_point, self.q_min, self.q_max)
        self._scale_f, self._zero_point_f = float(self.scale), float(self.zero_point)
        self._on: dict[torch.device, tuple] = {}
        self._op = kernels.ops().fake_quant

    def _on_device(self, device: torch.device) -> tuple:
        """Scale and zero point on `device`, once (for `reference`)."""
        if device not in self._on:
            self._on[device] = (self.scale.to(device), self.zero_point.to(device))
        return self._on[device]

    def ranges(self) -> tuple[int, float, float, bool]:
        """`(bits, lo, hi, signed)`: what `__init__` takes."""
        return self.bits, self.lo, self.hi, self.signed

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_on"] = {}  # per-device copies
        state.pop("_op", None)  # the operator is looked up again where the copy lands
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._op = kernels.ops().fake_quant

    def __call__(self, x: Tensor) -> Tensor:
        if not x.is_floating_point() or (x.requires_grad and torch.is_grad_enabled()):
            return self.reference(x)
        return self._op(x, self._scale_f, self._zero_point_f, self.q_min, self.q_max)

    def reference(self, x: Tensor) -> Tensor:
        """The same computation as PyTorch ops (in place after the first: no temporaries)."""
        scale, zero_point = self._on_device(x.device)
        q = torch.mul(x.float(), scale)
        q.sub_(zero_point).round_().clamp_(self.q_min, self.q_max)
        return q.add_(zero_point).div_(scale).to(x.dtype)


def fake_quant_activation(x: Tensor, bits: int, lo: float | Tensor, hi: float | Tensor,
                          signed: bool) -> Tensor:
    """Fake-quantize an activation tensor with range `[lo, hi]` (docs/quantization-rules.md rule 3).

    Raises:
        ValueError: `lo` or `hi` not finite, `lo > hi`, or a range that overflows float32.
    """
    return ActivationQuantizer(bits, lo, hi, signed)(x)


class ChannelActivationQuantizer:
    """Affine fake quantization with a range and a bit width per channel (for activation
    bit allocation): rule 3 applied channel by channel along `dim`, signedness per tensor.
    Each call is one operator (`vquant_py::fake_quant_channel`); dtype and memory format
    of the input are kept. Ranges are checked as `ActivationQuantizer`'s (the channel named)."""

    def __init__(self, bits: Tensor, lo: Tensor, hi: Tensor, signed: bool, dim: int = 1):
        bits = torch.as_tensor(bits).detach().cpu().flatten().long()
        lo = torch.as_tensor(lo, dtype=torch.float32).detach().cpu().flatten()
        hi = torch.as_tensor(hi, dtype=torch.float32).detach().cpu().flatten()
        if not bits.numel() == lo.numel() == hi.numel() > 0:
            raise ValueError(f"per-channel bits, lo and hi differ in length: {bits.numel()}, {lo.numel()}, {hi.numel()}")
        if bits.min() < MIN_BITS or bits.max() > MAX_BITS:
            raise ValueError(f"per-channel activation bits must lie in {MIN_BITS}..{MAX_BITS}, got "
                             f"{int(bits.min())}..{int(bits.max())}")
        self.channel_bits, self.channel_lo, self.channel_hi = bits, lo, hi
        self.signed, self.dim = bool(signed), dim
        self.bits = round(float(bits.float().mean()))  # the average, for reports
        self.lo, self.hi = float(lo.min()), float(hi.max())
        levels = (2.0 ** bits - 1).float()
        half = (2.0 ** (bits - 1)).float()
        self.scale = levels / torch.clamp(hi - lo, min=1e-8)  # (2^b - 1) / width per channel
        self.zero_point = torch.round(self.scale * lo) + (half if signed else 0)
        self.q_min, self.q_max = (-half, half - 1) if signed else (torch.zeros_like(levels), levels)
        check_activation_range(lo, hi, self.scale, self.zero_point, self.q_min, self.q_max)
        self._on: dict[tuple, tuple] = {}

    def ranges(self) -> tuple[Tensor, Tensor, Tensor, bool]:
        """`(bits, lo, hi, signed)` per channel: what `__init__` takes."""
        return self.channel_bits, self.channel_lo, self.channel_hi, self.signed

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_on": {}}

    def __call__(self, x: Tensor) -> Tensor:
        dim = self.dim % x.dim()
        if x.shape[dim] != self.channel_bits.numel():
            raise ValueError(f"input of shape {tuple(x.shape)} has {x.shape[dim]} channels on dim {dim}; "
                             f"the per-channel ranges are for {self.channel_bits.numel()}")
        key = (x.device, x.dim(), dim)
        if key not in self._on:
            shape = [1] * x.dim()
            shape[dim] = -1
            self._on[key] = tuple(t.to(x.device).view(shape) for t in
                                  (self.scale, self.zero_point, self.q_min, self.q_max))
        scale, zero_point, q_min, q_max = self._on[key]
        if not x.is_floating_point() or (x.requires_grad and torch.is_grad_enabled()):
            q = torch.mul(x.float(), scale)
            q.sub_(zero_point).round_().clamp_(q_min, q_max)
            return q.add_(zero_point).div_(scale).to(x.dtype)
        # One operator: a single node under torch.compile, so compiled equals eager bit for bit.
        return kernels.fake_quant_channel(x, scale, zero_point, q_min, q_max)
