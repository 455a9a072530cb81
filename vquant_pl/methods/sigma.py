"""Activation ranges: the sigma rule (docs/quantization-rules.md rule 6) and its paper defaults."""
from __future__ import annotations

from torch import Tensor

from ..config import check_bits


def sigma_range(x: Tensor, bits: int, sigma: float) -> tuple[float, float, bool]:
    """Range `(lo, hi, signed)` of one activation tensor by the sigma rule.

    Unsigned (no negative value seen): `alpha = sigma * std(x[x > 0])`, range `[0, alpha]`.
    Signed: `alpha = sigma * std(x) / 1.25`, range `[-alpha, alpha]`. Below 6 bits alpha
    is clipped to `max(x)`.
    """
    check_bits(bits, "activation bits")
    x = x.detach().float()
    signed = bool(x.min() < 0)
    if signed:
        alpha = sigma * x.std() / 1.25
    else:
        positive = x[x > 0]
        if positive.numel() < 2:
            raise ValueError(
                f"cannot range an activation with {positive.numel()} positive value(s) "
                f"(shape {tuple(x.shape)}): the sigma rule needs at least two")
        alpha = sigma * positive.std()
    if bits < 6:
        if x.max() < 0:
            raise ValueError(f"every value is negative (max {float(x.max()):.4g}, shape {tuple(x.shape)}): below 6 "
                             "bits the sigma rule clips alpha to max(x), which leaves no range")
        alpha = min(alpha, x.max())
    alpha = float(alpha)
    return (-alpha if signed else 0.0), alpha, signed
