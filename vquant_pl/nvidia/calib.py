"""Calibrators with NVIDIA pytorch-quantization 2.2.1's names and numbers: `MaxCalibrator`
(running `max |x|`, per tensor or per channel) and `HistogramCalibrator` (histogram of
`|x|`; amax by percentile, mse or entropy), and `calibrate_weights`.

`make_calibrator(method, num_bits, axis, unsigned)` gives the object `quantize_model` uses:
`collect(x)`, `reset()` and `compute_amax(method, percentile=...)` for any of
max / percentile / mse / entropy.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor, nn

from .utils import reduce_amax
from .tensor_quant import HISTOGRAM_METHODS, fake_tensor_quant


def reduced_dims(axis, dim: int) -> list[int] | None:
    """The dims to reduce so that those in `axis` keep their own amax (None: all). Negative
    axes count from the end, as NVIDIA's docstring says (its code would reduce every dim); an
    axis outside `[-dim, dim)` is an IndexError, as torch's."""
    if axis is None:
        return None
    keep, n = set(), max(dim, 1)  # a 0-dim tensor takes axis 0 / -1, as torch
    for a in axis if isinstance(axis, (tuple, list)) else (axis,):
        if not -n <= a < n:  # as torch: an IndexError, not wrapped around
            raise IndexError(f"axis {a} is out of range for a tensor of {dim} dims (expected in range [{-n}, {n - 1}])")
        keep.add(a % n)
    return [d for d in range(dim) if d not in keep]


def _reduced_list(axis, dim: int) -> list[int]:
    dims = reduced_dims(axis, dim)
    return list(range(dim)) if dims is None else dims


class _Calibrator:
    """Base of the calibrators: `num_bits`, `axis`, `unsigned` as given."""

    def __init__(self, num_bits: int, axis, unsigned: bool):
        self._num_bits, self._axis, self._unsigned = num_bits, axis, unsigned

    @property
    def axis(self):
        return self._axis

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_bits={self._num_bits} axis={self._axis} unsigned={self._unsigned})"


class MaxCalibrator(_Calibrator):
    """Running `max |x|`, per tensor (axis None) or keeping the dims in `axis` (per channel).

    Args:
        num_bits, axis, unsigned: as the quantizer's.
        track_amax: also keep each collected tensor's amax (as numpy) in `amaxs`.

    Raises:
        RuntimeError: from `collect`, when the amax shape changes between tensors.
        IndexError: from `collect`, an axis out of range for the tensor.

    Example:
        >>> calib = MaxCalibrator(8, None, False)
        >>> calib.collect(torch.tensor([1.0, -3.0])); calib.compute_amax()
        tensor(3.)
    """

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, track_amax: bool = False):
        super().__init__(num_bits, axis, unsigned)
        self._track_amax = track_amax
        if track_amax:
            self._amaxs: list[np.ndarray] = []
        self._calib_amax: Tensor | None = None

    @property
    def amaxs(self) -> list[np.ndarray]:
        """The amax of each collected tensor (only with `track_amax=True`)."""
        if not self._track_amax:
            raise AttributeError("amaxs are kept only with MaxCalibrator(..., track_amax=True)")
        return self._amaxs

    def collect(self, x: Tensor) -> None:
        """Update the running amax with `max |x|` (over the dims not in `axis`)."""
        local = reduce_amax(x, axis=_reduced_list(self._axis, x.dim()))
        if self._calib_amax is None:
            self._calib_amax = local
        elif local.shape != self._calib_amax.shape:
            raise RuntimeError(f"amax shape changed! {tuple(self._calib_amax.shape)} -> {tuple(local.shape)}")
        else:
            self._calib_amax.copy_(torch.max(self._calib_amax, local))
        if self._track_amax:
            self._amaxs.append(local.cpu().numpy().copy())  # not a view of the running amax

    def reset(self) -> None:
        self._calib_amax = None

    def compute_amax(self) -> Tensor | None:
        """The amax of everything collected (None before any tensor)."""
        return self._calib_amax


class HistogramCalibrator(_Calibrator):
    """Histogram of `|x|` (per tensor): `num_bins` equal bins from 0 to the first tensor's
    max, more bins of the same width as larger values come.

    Args:
        num_bits, axis, unsigned: as the quantizer's (axis must be None).
        num_bins: bins of the first histogram.
        grow_method: deprecated in NVIDIA's and ignored (a warning says so).
        skip_zeros: leave exact zeros out of the histogram.
        torch_hist: build it with `torch.histc` (default) or, if False, `np.histogram`
            (whose first histogram spans min..max of the first tensor, as NVIDIA's).

    Raises:
        NotImplementedError: an axis (histograms are per tensor).
        ValueError: from `collect`, a tensor holding NaN or inf (NVIDIA's drops NaN silently).

    Zeros only give amax 0; zeros first, then other values, give the histogram of all of them
    collected at once (NVIDIA's fails).

    Example:
        >>> calib = HistogramCalibrator(8, None, False)
        >>> calib.collect(torch.arange(100.)); calib.compute_amax("percentile", percentile=90)
        tensor(88.9937)
    """

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, num_bins: int = 2048,
                 grow_method: str | None = None, skip_zeros: bool = False, torch_hist: bool = True):
        super().__init__(num_bits, axis, unsigned)
        if axis is not None:
            raise NotImplementedError(f"HistogramCalibrator is per tensor only (axis=None), got axis={axis!r}")
        if grow_method is not None:
            warnings.warn(f"grow_method is deprecated (as in NVIDIA's); got {grow_method!r}, ignored", stacklevel=2)
        self._first_num_bins, self._skip_zeros, self._torch_hist = num_bins, skip_zeros, torch_hist
        self.reset()

    _top = math.inf  # a calibrator pickled before `_top` existed is not taken for "zeros only"

    def reset(self) -> None:
        """Forget the histogram (and its growth: the next one starts at `num_bins` bins again)."""
        self._num_bins = self._first_num_bins
        self._calib_bin_edges = None
        self._calib_hist = None
        self._top = 0.0  # the largest |x| collected

    def collect(self, x: Tensor) -> None:
        """Add `|x|` to the histogram."""
        with torch.no_grad():
            x = x.detach().abs().float()
            if self._skip_zeros:
                x = x[x != 0]
            if x.numel() == 0:
                raise ValueError("HistogramCalibrator.collect: no value to collect"
                                 + (" (all zero, skip_zeros=True)" if self._skip_zeros else ""))
            top = x.max()  # float32 arithmetic on 0-dim tensors, as NVIDIA's, then .item() (any device)
            seen = top.item()
            if not math.isfinite(seen):
                raise ValueError("HistogramCalibrator.collect: the tensor holds NaN or infinite values")
            zeros = None
            if self._calib_hist is not None and self._top == 0 < seen:
                # only zeros so far (NVIDIA's fails here): start over as if collected with this tensor
                zeros, self._calib_hist = self._calib_hist.sum(), None
            if self._torch_hist:
                self._collect_torch(x, top)
            else:
                self._collect_numpy(x.cpu().numpy(), from_zero=zeros is not None)
            if zeros is not None:
                self._calib_hist[0] += zeros
            self._top = max(self._top, seen)

    def _collect_torch(self, x: Tensor, top: Tensor) -> None:
        if self._calib_hist is None:
            self._calib_hist = torch.histc(x, bins=self._num_bins, min=0, max=top.item())
            self._calib_bin_edges = torch.linspace(0, top.item(), self._num_bins + 1)
            return
        edges = self._calib_bin_edges
        if top.item() > edges[-1].item():  # grow by bins of the first width
            width, top = (edges[1] - edges[0]).cpu(), top.cpu()
            self._num_bins = int((top / width).ceil().item())
            self._calib_bin_edges = edges = torch.arange(0, (top + width).item(), width.item(), device=x.device)
        hist = torch.histc(x, bins=self._num_bins, min=0, max=edges[-1].item())
        hist[:self._calib_hist.numel()] += self._calib_hist
        self._calib_hist = hist

    def _collect_numpy(self, x: np.ndarray, from_zero: bool = False) -> None:
        if self._calib_hist is None:  # from_zero: the range of x and the zeros seen before
            self._calib_hist, self._calib_bin_edges = np.histogram(
                x, bins=self._num_bins, range=(0, np.max(x)) if from_zero else None)
            return
        edges = self._calib_bin_edges
        top = np.max(x)
        if top > edges[-1]:
            width = edges[1] - edges[0]
            edges = np.hstack((edges, np.arange(edges[-1] + width, top + width, width)))
        hist, self._calib_bin_edges = np.histogram(x, bins=edges)
        hist[:len(self._calib_hist)] += self._calib_hist
        self._calib_hist = hist

    def _numpy(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        if isinstance(self._calib_hist, Tensor):  # integer counts, as NVIDIA's
            return self._calib_hist.int().cpu().numpy(), self._calib_bin_edges.cpu().numpy()
        return self._calib_hist, self._calib_bin_edges

    def compute_amax(self, method: str, *, stride: int = 1, start_bin: int = 128,
                     percentile: float = 99.99) -> Tensor | None:
        """amax from the histogram (None before any tensor).

        Args:
            method: "percentile" (the left edge of the bin where the cumulative fraction,
                summed in float64, reaches `percentile`), "mse" (the bin centre, from
                `start_bin` on, minimizing the count-weighted squared error of fake
                quantizing the bin centres, narrow range) or "entropy" (the bin edge, from
                `start_bin` on, minimizing TensorRT's KL divergence, bin 0's count first
                replaced by bin 1's; the last of equal minima).
            stride: step between candidate bins (mse, entropy).
            start_bin: first candidate bin (mse, entropy).
            percentile: in [0, 100].

        Raises:
            ValueError: a percentile outside [0, 100]; no candidate bin (start_bin too large).
            TypeError: an unknown method.
        """
        if method == "percentile" and not 0 <= percentile <= 100:
            raise ValueError(f"Invalid percentile {percentile}: must be in range 0 <= percentile <= 100")
        if method not in HISTOGRAM_METHODS:
            raise TypeError(f"Unknown calibration method {method!r}; expected one of {', '.join(HISTOGRAM_METHODS)}")
        hist, edges = self._numpy()
        if hist is None:
            return None
        if self._top == 0:  # nothing but zeros: amax 0, as the max calibrator's
            return torch.tensor(0.0)
        if method == "percentile":
            return _amax_percentile(hist, edges, percentile)
        if method == "mse":
            return _amax_mse(hist, edges, self._num_bits, self._unsigned, stride, start_bin)
        return _amax_entropy(hist, edges, self._num_bits, self._unsigned, stride, start_bin)

    def __repr__(self) -> str:
        edges = self._calib_bin_edges
        if edges is not None:
            edges = f"[{float(edges[0]):.3f}, ..., {float(edges[-1]):.3f}]({len(edges)})"
        return f"{super().__repr__()[:-1]} calib_bin_edges={edges})"


def _amax_percentile(hist: np.ndarray, edges: np.ndarray, percentile: float) -> Tensor:
    cdf = np.cumsum(hist / hist.sum())  # a float64 running sum, as NVIDIA's
    return torch.tensor(edges[np.searchsorted(cdf, percentile / 100)].item())


def _candidates(first: int, stop: int, stride: int, nbins: int) -> range:
    found = range(first, stop, stride)
    if not found:
        raise ValueError(f"no candidate bin: start_bin={first} but the histogram has {nbins} bins")
    return found


def _amax_mse(hist: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, stride: int,
              start_bin: int) -> Tensor:
    counts = torch.from_numpy(np.asarray(hist)).float()
    edges_t = torch.from_numpy(np.asarray(edges)).float()
    centers = (edges_t[1:] + edges_t[:-1]) / 2
    candidates = _candidates(start_bin, len(centers), stride, len(centers))
    mses = [((fake_tensor_quant(centers, centers[i], num_bits, unsigned) - centers) ** 2 * counts).mean().item()
            for i in candidates]
    return centers[candidates[int(np.argmin(np.array(mses, dtype=np.float32)))]].clone()


def _amax_entropy(hist: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, stride: int,
                  start_bin: int) -> Tensor:
    """TensorRT's KL calibration: for each candidate `i`, P is bins `[:i]` with the tail
    added to the last, Q merges bins `[:i]` into `2^(b-1+unsigned)` levels (np.linspace /
    np.digitize), spreading each level's count over its non-empty bins; KL(P || Q)."""
    from scipy.special import rel_entr

    bins = np.array(hist)
    bins[0] = bins[1]  # the zero bin (ReLU zeros) would dominate: NVIDIA replaces its count
    nlevels = 1 << (num_bits - 1 + int(unsigned))
    tails = np.concatenate([np.cumsum(bins[::-1])[::-1], [0]])  # tails[i] = bins[i:].sum()
    candidates = _candidates(start_bin, len(bins) + 1, stride, len(bins))
    divergences = np.empty(len(candidates))
    for n, i in enumerate(candidates):
        head = bins[:i]
        level = np.digitize(range(i), np.linspace(0, i, num=nlevels + 1)) - 1
        used = head != 0
        sums = np.bincount(level[used], weights=head[used], minlength=nlevels)
        sizes = np.bincount(level[used], minlength=nlevels)
        per_bin = np.divide(sums, sizes, out=np.zeros(nlevels), where=sizes > 0)
        q = np.where(used, per_bin[level], 0.0)
        p = np.array(head)
        p[-1] += tails[i]
        p = p.astype(np.float64)  # then scipy.stats.entropy(p, q), as NVIDIA's, without its per-call overhead
        divergences[n] = np.sum(rel_entr(p / np.sum(p), q / np.sum(q)))
    last_argmin = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
    return torch.tensor(edges[candidates[last_argmin]].item())


def calibrate_weights(model: nn.Module, method: str = "percentile", perchannel: bool = True,
                      percentile: float = 99.99, num_bins: int = 2048) -> None:
    """Set the amax of every quant layer's `weight_quantizer` from its weights (NVIDIA's).

    Per output channel (or per tensor), a histogram of `|w|` from 0 to its max
    (`np.histogram`; `num_bins` bins per channel, 2048 per tensor), then "percentile" or
    "mse" as `HistogramCalibrator`, or "max".

    Args:
        model: a module holding quant layers (modules with `weight` and `weight_quantizer`).
        method: "percentile", "mse" or "max".
        perchannel: an amax per output channel (axis 0), else one per tensor.
        percentile: for "percentile".
        num_bins: bins per channel.

    Raises:
        TypeError: an unsupported method; an amax shape that differs from one already set.
        ValueError: a weight holding NaN or inf (percentile, mse).

    An all-zero channel gets amax 0, as with "max" (NVIDIA's histogram of it spans -0.5..0.5).

    Example:
        >>> calibrate_weights(model, "mse")  # doctest: +SKIP
    """
    if method not in ("percentile", "mse", "max"):
        raise TypeError(f"Unsupported calibration method {method!r}; expected percentile, mse or max")
    for name, module in model.named_modules():
        if not (hasattr(module, "weight") and hasattr(module, "weight_quantizer")):
            continue
        weight, quantizer = module.weight.detach(), module.weight_quantizer
        axis = 0 if perchannel else None
        if method == "max":
            amax = reduce_amax(weight, axis=_reduced_list(axis, weight.dim()))
            if axis is not None:
                amax = amax.reshape([-1] + [1] * (weight.dim() - 1))
        else:
            rows = [weight.abs()] if axis is None else [weight.select(axis, c).abs() for c in range(weight.shape[axis])]
            amaxs = []
            for c, row in enumerate(rows):
                values = row.cpu().numpy()
                if not np.isfinite(values.max()):
                    raise ValueError(f"calibrate_weights: the weight of {name or type(module).__name__!r} holds NaN "
                                     f"or infinite values" + (f" (output channel {c})" if axis is not None else ""))
                if values.max() == 0:  # an all-zero channel: amax 0, as "max" gives (NVIDIA's: a negative amax)
                    amaxs.append(torch.tensor(0.0))
                    continue
                hist, edges = np.histogram(values, bins=2048 if axis is None else num_bins, range=(0, values.max()))
                amaxs.append(_amax_mse(hist, edges, quantizer.num_bits, quantizer.unsigned, 1, 128) if method == "mse"
                             else _amax_percentile(hist, edges, percentile))
            amax = amaxs[0] if axis is None else torch.stack(amaxs).reshape([-1] + [1] * (weight.dim() - 1))
        quantizer.amax = amax.detach().cpu().numpy()


class _MethodCalibrator:
    """A calibrator whose `compute_amax(method, **kwargs)` takes any of max, percentile,
    mse, entropy (what `quantize_model` uses)."""

    def __init__(self, calibrator: MaxCalibrator | HistogramCalibrator):
        self.calibrator = calibrator

    def collect(self, x: Tensor) -> None:
        self.calibrator.collect(x)

    def reset(self) -> None:
        self.calibrator.reset()

    def compute_amax(self, method: str = "max", **kwargs) -> Tensor | None:
        if isinstance(self.calibrator, MaxCalibrator):
            return self.calibrator.compute_amax()
        return self.calibrator.compute_amax(method, **kwargs)


def make_calibrator(method: str, num_bits: int, axis, unsigned: bool) -> _MethodCalibrator:
    """A max calibrator for "max", else a histogram one, behind `compute_amax(method, **kwargs)`.

    Example:
        >>> calib = make_calibrator("percentile", 8, None, False)
        >>> calib.collect(torch.arange(100.)); calib.compute_amax("percentile", percentile=90)
        tensor(88.9937)
    """
    if method == "max":
        return _MethodCalibrator(MaxCalibrator(num_bits, axis, unsigned))
    return _MethodCalibrator(HistogramCalibrator(num_bits, axis, unsigned))

