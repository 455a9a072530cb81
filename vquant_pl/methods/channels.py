"""Activation bit allocation (ACIQ): a range and a bit width per input channel.

Per-channel statistics come from BatchNorm (as for DFQ ranges): each channel's clip
`alpha_i = beta_i + k |gamma_i|` is taken at the layer's bit width `M`, `allocate_bits`
turns the `alpha_i` into per-channel bits averaging exactly `M` (within 2..8, the bit
widths the activation quantizer supports), then each channel is re-ranged with the `k` of
its own bits. Signedness stays per tensor. The noise probe is not used: its per-channel
statistics do not carry over to images (many channels are dead or tiny on noise).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .aciq import allocate_bits
from ..config import MAX_BITS, MIN_BITS
from ..ops.affine import ChannelActivationQuantizer
from .bn_graph import ChannelStats


def bn_channel_quantizer(stats: ChannelStats, k_for: Callable[[int], float], bits: int,
                         dim: int) -> ChannelActivationQuantizer:
    """Per-channel bits averaging `bits` and per-channel ranges from BN statistics carried
    to a layer input; `k_for(b)` is the clip in standard deviations at `b` bits. Signed
    when the range at `bits` reaches below zero, as for the per-tensor BN range."""
    ks = torch.zeros(MAX_BITS + 1)
    for b in range(MIN_BITS, MAX_BITS + 1):
        ks[b] = k_for(b)
    mean, std = stats.mean, stats.std
    signed = bool(torch.clamp(mean - ks[bits] * std, min=stats.lo).min() < 0)

    def alpha(channel_bits):
        k = ks[channel_bits]
        hi = torch.clamp(mean + k * std, max=stats.hi)
        return torch.maximum(-torch.clamp(mean - k * std, min=stats.lo), hi) if signed else hi.clamp_min(0)

    first = alpha(torch.tensor(bits))  # every channel at the layer's bit width
    channel_bits = allocate_bits(first, bits, MIN_BITS, MAX_BITS) if first.numel() > 1 else torch.tensor([bits])
    hi = alpha(channel_bits)
    return ChannelActivationQuantizer(channel_bits, -hi if signed else torch.zeros_like(hi), hi, signed, dim)
