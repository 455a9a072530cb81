"""The activation-range methods, one table entry per `act_range` name.

Each entry says how the method ranges a layer input from the probe, which `k` (standard
deviations) it uses when the range comes from BatchNorm statistics, and whether it needs
calibration data. Adding a method is adding one entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from .aciq import ACIQ_ALPHA, aciq_range
from .bn_mse import bn_mse_method_range
from .bn_graph import DEFAULT_BN_K, ChannelStats, stats_range
from ..config import QuantConfig
from .sigma import sigma_range

ProbeRange = Callable[[Tensor, int, QuantConfig], "tuple[float, float, bool]"]
BnK = Callable[[int, QuantConfig], float]
#: (per-channel BN statistics of the input, bits, config, the consuming layer) -> (lo, hi, signed)
BnRange = Callable[[ChannelStats, int, QuantConfig, nn.Module], "tuple[float, float, bool]"]


@dataclass(frozen=True)
class RangeMethod:
    """How one `act_range` fixes a layer input's range."""

    name: str
    probe_range: ProbeRange | None  # (probe activation, bits, config) -> (lo, hi, signed)
    bn_k: BnK | None = None  # k(bits) when ranged from BatchNorm statistics: [mean - k std, mean + k std]
    bn_range: BnRange | None = None  # or any other range from BatchNorm statistics
    calibrated: bool = False  # needs calibration batches (data-driven)
    bn_first: bool = False  # ranges from BatchNorm by default (the probe only as fallback)

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
    def probe_range(x: Tensor, bits: int, config: QuantConfig) -> tuple[float, float, bool]:
        return aciq_range(x, bits, dist)
    probe_range.__name__ = f"aciq_{dist}"
    return probe_range


def _bn_k(bits: int, config: QuantConfig) -> float:
    return config.bn_k or DEFAULT_BN_K[bits]


def _aciq_gauss_k(bits: int, config: QuantConfig) -> float:
    return ACIQ_ALPHA["gauss"][bits]  # alpha = c * std


def _aciq_laplace_k(bits: int, config: QuantConfig) -> float:
    return ACIQ_ALPHA["laplace"][bits] / math.sqrt(2)  # Laplace: E|x - mu| = std / sqrt(2)


METHODS: dict[str, RangeMethod] = {m.name: m for m in (
    RangeMethod("bn", _sigma, bn_k=_bn_k, bn_first=True),  # sigma where no BatchNorm feeds the layer
    RangeMethod("sigma", _sigma),
    RangeMethod("bn-mse", _sigma, bn_range=bn_mse_method_range, bn_first=True),
    RangeMethod("aciq-laplace", _aciq("laplace"), bn_k=_aciq_laplace_k),
    RangeMethod("aciq-gauss", _aciq("gauss"), bn_k=_aciq_gauss_k),
    RangeMethod("max", None, calibrated=True),
    RangeMethod("percentile", None, calibrated=True),
    RangeMethod("mse", None, calibrated=True),
    RangeMethod("entropy", None, calibrated=True),
    RangeMethod("none", None),
)}
