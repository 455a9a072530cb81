"""Per-channel activation ranges and bits from BatchNorm statistics (ACIQ's `-pcq_a` and
`-baa`; also the `bn` method's per-channel variant).

Each layer input channel is described by the normal `N(mean_c, std_c)` that BatchNorm
statistics carry to it (`bn_graph.ChannelStats`, clipped by any ReLU on the way). Bits
per channel, when allocated, follow `bit_allocation_rule`:

- ``aciq`` (the original code): prior = each channel's pre-activation std, only at 4 bits
  or fewer (above, every channel keeps the layer's bits), 0..8 bits, budget approximate.
  The activation quantizer takes 2..8 bits per channel, so channels allocated 0 or 1 bit
  are raised to 2; how many is counted on the quantizer (`note`) and in the report.
- ``exact`` (ours): prior = each channel's clip at the layer's bits, 2..8 bits, the budget
  met exactly.

The noise probe is not used: its per-channel statistics do not carry over to images (many
channels are dead or tiny on noise).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .aciq import ACIQ_MAX_ALLOC_BITS, aciq_allocate_bits, aciq_clip, allocate_bits, gaussian_moments
from ..config import MAX_BITS, MIN_BITS
from ..ops.affine import ChannelActivationQuantizer
from .bn_graph import ChannelStats


def channel_bits_for(prior: Tensor, bits: int, rule: str, allocate: bool) -> tuple[Tensor, int]:
    """Per-channel bits for a layer input at `bits` (and how many were raised to 2).

    Args:
        prior: the per-channel prior of the allocation (see the module docstring).
        bits: the layer's bit width.
        rule: ``aciq`` or ``exact``.
        allocate: False gives every channel `bits`.
    """
    n = prior.numel()
    if not allocate or n < 2 or (rule == "aciq" and bits > ACIQ_MAX_ALLOC_BITS):
        return torch.full((n,), bits, dtype=torch.long), 0
    if rule == "exact":
        return allocate_bits(prior, bits, MIN_BITS, MAX_BITS), 0
    raw = aciq_allocate_bits(prior, bits).long()
    raised = int((raw < MIN_BITS).sum())
    return raw.clamp(MIN_BITS, MAX_BITS), raised


def _quantizer(bits: Tensor, lo: Tensor, hi: Tensor, signed: bool, dim: int, raised: int) -> ChannelActivationQuantizer:
    q = ChannelActivationQuantizer(bits, lo, hi, signed, dim)
    q.note = f"{raised} channel(s) allocated 0-1 bits raised to {MIN_BITS}" if raised else ""
    return q


def bn_channel_quantizer(stats: ChannelStats, k_for: Callable[[int], float], bits: int, dim: int,
                         allocate: bool = True, rule: str = "exact") -> ChannelActivationQuantizer:
    """The `bn` method per channel: `[mean - k std, mean + k std]` clipped by the carried
    bounds, `k_for(b)` standard deviations at `b` bits. Signed when the range at `bits`
    reaches below zero, as for the per-tensor BN range."""
    ks = torch.zeros(MAX_BITS + 1)
    for b in range(MIN_BITS, MAX_BITS + 1):
        ks[b] = k_for(b)
    mean, std = stats.mean, stats.std
    signed = bool(torch.clamp(mean - ks[bits] * std, min=stats.lo).min() < 0)

    def alpha(channel_bits):
        k = ks[channel_bits]
        hi = torch.clamp(mean + k * std, max=stats.hi)
        return torch.maximum(-torch.clamp(mean - k * std, min=stats.lo), hi) if signed else hi.clamp_min(0)

    prior = std if rule == "aciq" else alpha(torch.tensor(bits))
    channel_bits, raised = channel_bits_for(prior, bits, rule, allocate)
    hi = alpha(channel_bits)
    return _quantizer(channel_bits, -hi if signed else torch.zeros_like(hi), hi, signed, dim, raised)


def aciq_channel_quantizer(stats: ChannelStats, bits: int, dist: str, dim: int, allocate: bool = True,
                           rule: str = "aciq", cap: bool = False) -> ChannelActivationQuantizer:
    """ACIQ per channel (the original's `-pcq_a`, with `-baa` when `allocate`): each
    channel's normal gives `b = sqrt(2/pi) std`; an input fed by a ReLU (`stats.lo >= 0`)
    is clipped one-sidedly, `[0, max(mean_c, 0) + c+ b_c]`, otherwise around the channel
    mean. Laplace takes the constant of each channel's own bits (as the original), Gauss
    the layer's. `cap` keeps each range inside the carried bounds (ReLU6: 6)."""
    one_sided = stats.lo >= 0
    m = gaussian_moments(stats.mean, stats.std, stats.lo, stats.hi)
    if rule == "aciq":
        prior = m.std
    else:  # ours: each channel's clip at the layer's bits
        lo, hi = aciq_clip(m, bits, dist, one_sided, cap)
        prior = torch.maximum(hi.abs(), torch.as_tensor(lo).abs())
    channel_bits, raised = channel_bits_for(prior, bits, rule, allocate)
    lo, hi = aciq_clip(m, channel_bits if dist == "laplace" else bits, dist, one_sided, cap)
    lo = torch.as_tensor(lo, dtype=torch.float32).expand_as(hi).clone()
    if not bool(torch.isfinite(hi).all()):
        raise ValueError(f"ACIQ per-channel range is not finite (BN statistics: mean {stats.mean.tolist()[:4]}..., "
                         f"std {stats.std.tolist()[:4]}...)")
    signed = bool((lo < 0).any()) and not one_sided
    return _quantizer(channel_bits, lo, hi, signed, dim, raised)

