"""ACIQ tools ("post-training 4-bit", Banner et al.): analytical clipping, weight bias
correction and per-channel bit allocation -- all data-free."""
from __future__ import annotations

import math

import torch
from torch import Tensor

#: Optimal clip in units of the spread, for 2..8 bits: Laplace `b = E|x - E x|`, Gauss `sigma`.
ACIQ_ALPHA = {
    "laplace": {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89},
    "gauss": {2: 1.71, 3: 2.15, 4: 2.55, 5: 2.94, 6: 3.29, 7: 3.61, 8: 3.92},
}


def aciq_range(x: Tensor, bits: int, dist: str = "laplace") -> tuple[float, float, bool]:
    """`(lo, hi, signed)` of an activation by ACIQ's optimal clip for `bits`.

    The spread is measured on `x` when it holds negative values (range `[-alpha, alpha]`),
    else on its positive values (range `[0, alpha]`); alpha never exceeds `max |x|`.
    """
    if dist not in ACIQ_ALPHA:
        raise ValueError(f"unknown ACIQ distribution {dist!r}; expected laplace or gauss")
    x = x.detach().float()
    signed = bool(x.min() < 0)
    values = x.flatten() if signed else x[x > 0]
    if values.numel() < 2:
        raise ValueError(f"cannot range an activation with {values.numel()} usable value(s)")
    spread = (values - values.mean()).abs().mean() if dist == "laplace" else values.std()
    alpha = float(min(ACIQ_ALPHA[dist][bits] * spread, x.abs().max()))
    return (-alpha if signed else 0.0), alpha, signed


def bias_correct(weight: Tensor, quantized: Tensor) -> Tensor:
    """Per output channel c: `mu = mean(W_c) - mean(Wq_c)`, `xi = ||W_c - mean(W_c)|| /
    ||Wq_c - mean(Wq_c)||`, returns `xi * (Wq_c + mu)` (xi = 1 for a constant channel)."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    q = quantized.detach().float().reshape(weight.shape[0], -1)
    mu = w.mean(1, keepdim=True) - q.mean(1, keepdim=True)
    q_norm = (q - q.mean(1, keepdim=True)).norm(dim=1, keepdim=True)
    xi = torch.where(q_norm > 0, (w - w.mean(1, keepdim=True)).norm(dim=1, keepdim=True) / q_norm,
                     torch.ones_like(q_norm))
    return (xi * (q + mu)).reshape(weight.shape).to(quantized.dtype)


def allocate_bits(alphas: Tensor, mean_bits: int, min_bits: int = 1, max_bits: int = 8) -> Tensor:
    """Per-channel bits `~ round(log2(alpha_i^(2/3) / sum_j alpha_j^(2/3)) + M + log2 N)`,
    clamped to `[min_bits, max_bits]`, then adjusted one bit at a time (largest rounding
    loss first) so that they add up to exactly `M * N`."""
    a = alphas.detach().double().flatten().clamp_min(1e-12) ** (2 / 3)
    n = a.numel()
    target = torch.log2(a / a.sum()) + mean_bits + math.log2(n)
    bits = torch.round(target).clamp(min_bits, max_bits)
    budget = mean_bits * n
    if not min_bits * n <= budget <= max_bits * n:
        raise ValueError(f"{mean_bits} bits on average cannot be met within {min_bits}..{max_bits}")
    while bits.sum() != budget:
        short = bits.sum() < budget
        room = (bits < max_bits) if short else (bits > min_bits)
        gap = (target - bits) if short else (bits - target)
        i = int(torch.argmax(torch.where(room, gap, torch.tensor(-math.inf, dtype=gap.dtype))))
        bits[i] += 1 if short else -1
    return bits.long()
