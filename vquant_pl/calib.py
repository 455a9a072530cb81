"""Calibrators for `TensorQuantizer` (data-driven, optional): max and histogram-based
percentile / mse / entropy, in the manner of NVIDIA pytorch-quantization."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .tensor_quant import reduce_amax


class MaxCalibrator:
    """Running `max |x|` (per tensor, or per channel along `axis`)."""

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False):
        self.num_bits, self.axis, self.unsigned = num_bits, axis, unsigned
        self._amax: Tensor | None = None

    def collect(self, x: Tensor) -> None:
        amax = reduce_amax(x, self.axis).float()
        self._amax = amax if self._amax is None else torch.maximum(self._amax, amax)

    def compute_amax(self, method: str = "max", **_) -> Tensor | None:
        return self._amax

    def reset(self) -> None:
        self._amax = None


class HistogramCalibrator:
    """Histogram of `|x|` with a fixed bin width that grows in bins as larger values come."""

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, num_bins: int = 2048):
        if axis is not None:
            raise ValueError("HistogramCalibrator is per tensor (axis=None)")
        self.num_bits, self.unsigned, self.num_bins = num_bits, unsigned, num_bins
        self.reset()

    def reset(self) -> None:
        self.hist: Tensor | None = None
        self.width = 0.0

    def collect(self, x: Tensor) -> None:
        x = x.detach().abs().float().flatten().cpu()
        top = float(x.max()) if x.numel() else 0.0
        if self.hist is None:
            self.width = (top or 1.0) / self.num_bins
            self.hist = torch.zeros(self.num_bins, dtype=torch.float64)
        bins = max(self.hist.numel(), math.ceil(top / self.width))
        if bins > self.hist.numel():
            self.hist = torch.cat([self.hist, torch.zeros(bins - self.hist.numel(), dtype=torch.float64)])
        idx = torch.clamp((x / self.width).long(), max=bins - 1)
        self.hist += torch.bincount(idx, minlength=bins).double()

    def compute_amax(self, method: str = "percentile", percentile: float = 99.99, start_bin: int = 128,
                     stride: int = 1) -> Tensor:
        if self.hist is None:
            raise RuntimeError("no data collected")
        edges = torch.arange(1, self.hist.numel() + 1, dtype=torch.float64) * self.width
        if method == "percentile":
            if not 0 < percentile <= 100:
                raise ValueError(f"percentile must be in (0, 100], got {percentile}")
            cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
            return torch.tensor(float(edges[int(torch.searchsorted(cdf, percentile / 100))]), dtype=torch.float32)
        if method == "mse":
            return torch.tensor(self._min_mse(edges, start_bin, stride), dtype=torch.float32)
        if method == "entropy":
            return torch.tensor(self._min_kl(edges, start_bin, stride), dtype=torch.float32)
        raise ValueError(f"unknown method {method!r}; expected percentile, mse or entropy")

    def _levels(self) -> int:
        return 2 ** (self.num_bits - 1 + int(self.unsigned))

    def _candidates(self, start_bin: int, stride: int) -> Tensor:
        first = min(max(start_bin, self._levels()), self.hist.numel())
        return torch.arange(first, self.hist.numel() + 1, stride)

    def _min_mse(self, edges: Tensor, start_bin: int, stride: int) -> float:
        """amax (a bin edge) minimizing the squared error of quantizing the bin centres."""
        candidates = self._candidates(start_bin, stride)
        centers = (torch.arange(self.hist.numel(), dtype=torch.float64) + 0.5) * self.width
        amax = edges[candidates - 1][:, None]
        levels = self._levels() - 1
        q = torch.clamp(torch.round(centers / amax * levels), max=levels) * amax / levels
        err = (self.hist * (centers - q) ** 2).sum(1)
        return float(amax[int(torch.argmin(err))])

    def _min_kl(self, edges: Tensor, start_bin: int, stride: int) -> float:
        """amax minimizing KL(P || Q) (TensorRT's entropy calibration): P the first i bins with
        the tail folded into the last, Q that merged into the quantization levels and spread
        back over the non-empty bins."""
        import numpy as np

        levels, best, best_kl = self._levels(), None, math.inf
        full = self.hist.numpy()
        tails = np.cumsum(full[::-1])[::-1]  # tails[i] = sum of bins i..end
        for i in self._candidates(start_bin, stride).tolist():
            hist = full[:i]
            p = hist.copy()
            p[-1] += tails[i] if i < len(full) else 0.0
            sizes = np.full(levels, i // levels)
            sizes[: i % levels] += 1  # as torch.tensor_split: the first chunks one longer
            sizes = sizes[sizes > 0]
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            nonzero = (hist > 0).astype(np.float64)
            per_bin = np.add.reduceat(hist, starts) / np.maximum(np.add.reduceat(nonzero, starts), 1)
            q = nonzero * np.repeat(per_bin, sizes)
            mask = p > 0
            if (q[mask] == 0).any():
                continue
            p, q = p[mask] / p.sum(), q[mask] / q.sum()
            kl = float((p * np.log(p / q)).sum())
            if kl < best_kl:
                best, best_kl = i, kl
        return float(edges[(best or self.hist.numel()) - 1])


def make_calibrator(method: str, num_bits: int, axis, unsigned: bool):
    if method == "max":
        return MaxCalibrator(num_bits, axis, unsigned)
    return HistogramCalibrator(num_bits, axis, unsigned)
