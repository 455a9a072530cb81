"""The activation-range methods, one table entry per `act_range` name.

Each entry says how the method ranges a layer input from the probe, which `k` (standard
deviations) it uses when the range comes from BatchNorm statistics, and whether it needs
calibration data. Adding a method is adding one entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from .aciq import Moments, aciq_clip, aciq_range, gaussian_mixture_moments
from .channels import aciq_channel_quantizer, bn_channel_quantizer
from .bn_mse import bn_mse_method_range
from .bn_graph import DEFAULT_BN_K, ChannelStats, stats_range
from ..config import QuantConfig
from .sigma import sigma_range

ProbeRange = Callable[[Tensor, int, QuantConfig], "tuple[float, float, bool]"]
BnK = Callable[[int, QuantConfig], float]
#: (per-channel BN statistics of the input, bits, config, the consuming layer) -> (lo, hi, signed)
BnRange = Callable[[ChannelStats, int, QuantConfig, nn.Module], "tuple[float, float, bool]"]
#: (per-channel BN statistics, bits, config, channel dim) -> a per-channel quantizer (`act_per_channel`)
BnChannels = Callable[[ChannelStats, int, QuantConfig, int], object]


@dataclass(frozen=True)
class RangeMethod:
    """How one `act_range` fixes a layer input's range."""

    name: str
    probe_range: ProbeRange | None  # (probe activation, bits, config) -> (lo, hi, signed)
    bn_k: BnK | None = None  # k(bits) when ranged from BatchNorm statistics: [mean - k std, mean + k std]
    bn_range: BnRange | None = None  # or any other range from BatchNorm statistics
    calibrated: bool = False  # needs calibration batches (data-driven)
    bn_first: bool = False  # ranges from BatchNorm by default (the probe only as fallback)
    bn_channels: BnChannels | None = None  # per-channel ranges (and bits) from BatchNorm statistics
    pre_activation: bool = False  # probe_range takes `pre`: the moments before the ReLU that fed x

    def range_from_probe(self, x: Tensor, bits: int, config: QuantConfig,
                         pre: Moments | None = None) -> tuple[float, float, bool]:
        if self.pre_activation:
            return self.probe_range(x, bits, config, pre)
        return self.probe_range(x, bits, config)

    def uses_bn(self, config: QuantConfig) -> bool:
        return (self.bn_k is not None or self.bn_range is not None) and (self.bn_first or config.aciq_stats == "bn")

    def range_from_bn(self, stats: ChannelStats, bits: int, config: QuantConfig,
                      layer: nn.Module) -> tuple[float, float, bool]:
        if self.bn_range is not None:
            return self.bn_range(stats, bits, config, layer)
        return stats_range(stats, self.bn_k(bits, config))


def _sigma(x: Tensor, bits: int, config: QuantConfig) -> tuple[float, float, bool]:
    return sigma_range(x, bits, config.resolved_sigma)


def _aciq(dist: str) -> ProbeRange:
    def probe_range(x: Tensor, bits: int, config: QuantConfig, pre: Moments | None = None) -> tuple[float, float, bool]:
        return aciq_range(x, bits, dist, pre, config.aciq_cap)
    probe_range.__name__ = f"aciq_{dist}"
    return probe_range


def _aciq_bn(dist: str) -> BnRange:
    """ACIQ per tensor from BatchNorm: the exact moments of the channels' normal mixture
    (before any ReLU); one-sided where a ReLU clipped the statistics (`lo >= 0`)."""
    def bn_range(stats: ChannelStats, bits: int, config: QuantConfig, layer: nn.Module) -> tuple[float, float, bool]:
        m = gaussian_mixture_moments(stats.mean, stats.std, stats.lo, stats.hi)
        one_sided = stats.lo >= 0
        lo, hi = aciq_clip(m, bits, dist, one_sided, config.aciq_cap)
        return float(lo), float(hi), bool(lo < 0)
    bn_range.__name__ = f"aciq_{dist}_bn"
    return bn_range


def _aciq_channels(dist: str) -> BnChannels:
    def bn_channels(stats: ChannelStats, bits: int, config: QuantConfig, dim: int):
        return aciq_channel_quantizer(stats, bits, dist, dim, config.act_bit_allocation, config.bit_allocation_rule,
                                      config.aciq_cap)
    bn_channels.__name__ = f"aciq_{dist}_channels"
    return bn_channels


def _bn_k(bits: int, config: QuantConfig) -> float:
    return config.bn_k or DEFAULT_BN_K[bits]


def _bn_channels(stats: ChannelStats, bits: int, config: QuantConfig, dim: int):
    return bn_channel_quantizer(stats, lambda b: _bn_k(b, config), bits, dim, config.act_bit_allocation,
                                config.bit_allocation_rule)


METHODS: dict[str, RangeMethod] = {m.name: m for m in (
    RangeMethod("bn", _sigma, bn_k=_bn_k, bn_first=True, bn_channels=_bn_channels),  # sigma where no BatchNorm feeds the layer
    RangeMethod("sigma", _sigma),
    RangeMethod("bn-mse", _sigma, bn_range=bn_mse_method_range, bn_first=True),
    RangeMethod("aciq-laplace", _aciq("laplace"), bn_range=_aciq_bn("laplace"), bn_channels=_aciq_channels("laplace"),
                pre_activation=True),
    RangeMethod("aciq-gauss", _aciq("gauss"), bn_range=_aciq_bn("gauss"), bn_channels=_aciq_channels("gauss"),
                pre_activation=True),
    RangeMethod("max", None, calibrated=True),
    RangeMethod("percentile", None, calibrated=True),
    RangeMethod("mse", None, calibrated=True),
    RangeMethod("entropy", None, calibrated=True),
    RangeMethod("none", None),
)}
