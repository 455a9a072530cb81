"""NVIDIA pytorch-quantization 2.2.1 calibrators: the same amax as NVIDIA's algorithms
(issue 13, item 4, and the item 7 names MaxCalibrator(track_amax=), HistogramCalibrator(
skip_zeros=, grow_method=), calibrate_weights)."""

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from vquant_pl.nvidia.calib import HistogramCalibrator, MaxCalibrator, calibrate_weights, make_calibrator
from vquant_pl.nvidia.quant_modules import QuantLinear


def _hist(x, num_bits=8, unsigned=False, **kwargs):
    calib = HistogramCalibrator(num_bits, None, unsigned, **kwargs)
    calib.collect(x)
    return calib


def test_percentile_is_the_left_edge_of_the_bin_reached_by_a_float_running_sum():
    calib = _hist(torch.arange(100.0))  # 2048 bins of width 99/2048 over [0, 99]
    # 90: the running sum of 0.01 reaches 0.9 (0.9000000000000001) at value 89's bin,
    # floor(89 * 2048 / 99) = 1841, whose left edge is 1841 * 99 / 2048 = 88.99365234375
    assert calib.compute_amax("percentile", percentile=90).item() == 1841 * 99 / 2048
    # 10: ten 0.01 add up to 0.09999999999999999 < 0.1, so the search goes on to value 10's
    # bin, floor(10 * 2048 / 99) = 206: 206 * 99 / 2048 = 9.9580078125 (not value 9's bin)
    assert calib.compute_amax("percentile", percentile=10).item() == 206 * 99 / 2048
    assert calib.compute_amax("percentile", percentile=0).item() == 0.0
    with pytest.raises(ValueError, match="Invalid percentile 100.5"):
        calib.compute_amax("percentile", percentile=100.5)
    with pytest.raises(TypeError, match="Unknown calibration method 'kl'"):
        calib.compute_amax("kl")
    assert HistogramCalibrator(8, None, False).compute_amax("percentile") is None


def test_mse_tries_bin_centres():
    # every value is 1.0, in the last bin (2047) of 2048 bins of width 1/2048. The candidates
    # are the centres of bins 128 .. 2047 and the error is measured on the centres: it is 0
    # for amax = the centre of bin 2047 itself, 2047.5 / 2048 = 0.999755859375 (not 1.0, the
    # right edge, that an edge search would give)
    assert _hist(torch.ones(10)).compute_amax("mse").item() == 2047.5 / 2048


def _reference_entropy(hist, edges, num_bits, unsigned, start_bin):
    """A plain-loop reading of NVIDIA's documented KL calibration (slow, for cross-checks)."""
    bins = hist.copy()
    bins[0] = bins[1]
    levels = 2 ** (num_bits - 1 + int(unsigned))
    found = []
    for i in range(start_bin, len(bins) + 1):
        space = np.linspace(0, i, levels + 1)
        level_of = [int(np.searchsorted(space, j, side="right")) - 1 for j in range(i)]
        totals, members = np.zeros(levels), np.zeros(levels)
        for j in range(i):
            if bins[j]:
                totals[level_of[j]] += bins[j]
                members[level_of[j]] += 1
        q = [totals[level_of[j]] / members[level_of[j]] if bins[j] else 0.0 for j in range(i)]
        p = np.array(bins[:i])
        p[-1] += bins[i:].sum()
        found.append(entropy(p, q))
    best = max(k for k, d in enumerate(found) if d == min(found))  # the last minimum
    return float(edges[start_bin + best])


def test_entropy_replaces_the_zero_bin_count_and_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    relu = torch.relu(torch.randn(100000, generator=g))
    calib = _hist(relu)
    # NVIDIA's figure for these ReLU outputs (issue 13: 3.783; the zero-bin count kept gives 1.996)
    assert calib.compute_amax("entropy").item() == pytest.approx(3.782938003540039, abs=0)
    # bin 0's count is replaced by bin 1's: any number of extra zeros gives the same amax
    assert _hist(torch.cat([relu, torch.zeros(10 ** 6)])).compute_amax("entropy").item() == 3.782938003540039
    small = _hist(relu[:5000], num_bins=256)
    hist, edges = small._numpy()
    assert small.compute_amax("entropy").item() == _reference_entropy(hist, edges, 8, False, 128)


def test_unsigned_entropy_starts_at_bin_128():
    # 1000 values in [0, 1] and one at 10: 2048 bins of width 10/2048, data in bins 0..204
    # (1.0 * 2048 / 10 = 204.8), the outlier in bin 2047. Unsigned: 256 levels, so every
    # candidate i <= 256 keeps each bin its own level, and KL(P || Q) only comes from the tail
    # folded into bin i-1: least at i = 205 (tail = the outlier alone); every i from 206 to
    # 2047 folds the outlier into an empty bin (KL infinite). amax = 205 * 10 / 2048.
    x = torch.cat([torch.linspace(0, 1, 1000), torch.tensor([10.0])])
    assert _hist(x, unsigned=True).compute_amax("entropy").item() == 205 * 10 / 2048  # 1.0009765625
    with pytest.raises(ValueError, match="no candidate bin: start_bin=3000"):
        _hist(x).compute_amax("entropy", start_bin=3000)


def test_histogram_grows_by_bins_of_the_first_width():
    calib = _hist(torch.arange(100.0))
    calib.collect(torch.tensor([150.0, 0.0]))
    # width 99/2048: ceil(150 / (99/2048)) = ceil(3103.03) = 3104 bins, every value counted
    assert calib._calib_hist.numel() == 3104 and calib._calib_hist.sum().item() == 102
    calib.reset()  # deliberate: the next histogram starts at 2048 bins again (NVIDIA's keeps 3104)
    calib.collect(torch.arange(100.0))
    assert calib._calib_hist.numel() == 2048
    skip = _hist(torch.tensor([0.0, 0.0, 1.0, 2.0]), skip_zeros=True)
    assert skip._calib_hist.sum().item() == 2
    with pytest.warns(UserWarning, match="grow_method is deprecated"):
        HistogramCalibrator(8, None, False, grow_method="stretch")
    with pytest.raises(NotImplementedError, match="per tensor only"):
        HistogramCalibrator(8, 0, False)
    numpy_hist = _hist(torch.arange(100.0), torch_hist=False)
    assert numpy_hist.compute_amax("percentile", percentile=90).item() == pytest.approx(1841 * 99 / 2048)


def test_max_calibrator_tracks_and_refuses_a_changed_shape():
    calib = MaxCalibrator(8, 0, False, track_amax=True)
    calib.collect(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
    calib.collect(torch.tensor([[-3.0, 0.0], [0.125, 0.25]]))
    assert calib.compute_amax().tolist() == [[3.0], [0.5]]
    # each tensor's own amax, kept as it was (a copy, also on CPU)
    assert [a.tolist() for a in calib.amaxs] == [[[2.0], [0.5]], [[3.0], [0.25]]]
    with pytest.raises(RuntimeError, match=r"amax shape changed! \(2, 1\) -> \(3, 1\)"):
        calib.collect(torch.ones(3, 2))  # item 4: a per-channel amax cannot silently widen
    per_tensor = MaxCalibrator(8, None, False)
    per_tensor.collect(torch.tensor([[1.0, -2.0]]))
    assert per_tensor.compute_amax().shape == () and per_tensor.compute_amax().item() == 2.0
    with pytest.raises(AttributeError, match="track_amax=True"):
        per_tensor.amaxs


def test_make_calibrator_takes_any_method_name():
    for method, expected in (("max", 99.0), ("percentile", 1841 * 99 / 2048)):
        calib = make_calibrator(method, 8, None, False)
        calib.collect(torch.arange(100.0))
        assert calib.compute_amax(method, percentile=90).item() == expected


def test_calibrate_weights():
    layer = QuantLinear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 1.0], [-2.0, 0.0, 0.0, 0.0]]))
    calibrate_weights(layer, method="max")
    assert layer.weight_quantizer.amax.tolist() == [[1.0], [2.0]]
    # per row, 2048 bins from 0 to the row's max: three zeros in bin 0, the max alone in bin 2047.
    # percentile 99.99 is reached in bin 2047: its left edge, 2047/2048 of the max
    calibrate_weights(layer, method="percentile")
    assert layer.weight_quantizer.amax.tolist() == [[2047 / 2048], [2 * 2047 / 2048]]
    # mse: bin 0's centre rounds to 0 for every candidate (a constant error), bin 2047's centre
    # is exact when it is amax: 2047.5/2048 of the max
    calibrate_weights(layer, method="mse")
    assert layer.weight_quantizer.amax.tolist() == [[2047.5 / 2048], [2 * 2047.5 / 2048]]
    other = QuantLinear(4, 2)
    with torch.no_grad():
        other.weight.copy_(layer.weight)
    calibrate_weights(other, method="max", perchannel=False)  # NVIDIA's raises here; ours: one amax
    assert other.weight_quantizer.amax.item() == 2.0
    with pytest.raises(TypeError, match="Changing shape when setting amax"):
        calibrate_weights(layer, method="max", perchannel=False)
    with pytest.raises(TypeError, match="Unsupported calibration method 'entropy'"):
        calibrate_weights(layer, method="entropy")


@pytest.mark.parametrize("axis", [4, -5, (0, 7)])
def test_an_axis_out_of_range_is_an_index_error_not_wrapped(axis):
    """Review defect 4: axis 4 of a 4-D tensor wrapped to 0."""
    from vquant_pl.nvidia.quant_modules import TensorQuantizer
    from vquant_pl.nvidia.tensor_quant import QuantDescriptor

    x = torch.randn(3, 4, 5, 6)
    bad = axis[1] if isinstance(axis, tuple) else axis
    with pytest.raises(IndexError, match=rf"axis {bad} is out of range for a tensor of 4 dims \(expected in range "
                                         r"\[-4, 3\]\)"):
        MaxCalibrator(8, axis, False).collect(x)
    with pytest.raises(IndexError, match=f"axis {bad} is out of range"):
        TensorQuantizer(QuantDescriptor(axis=axis))(x)
    assert MaxCalibrator(8, -4, False).compute_amax() is None  # in range: fine
    calib = MaxCalibrator(8, -4, False)
    calib.collect(x)
    assert calib.compute_amax().shape == (3, 1, 1, 1)


@pytest.mark.parametrize("torch_hist", [True, False])
def test_zeros_first_then_data_is_the_histogram_of_both(torch_hist):
    """Review defect 10: an all-zero first tensor, then data, was an OverflowError."""
    x = torch.rand(100, generator=torch.Generator().manual_seed(0))
    parts = HistogramCalibrator(8, None, False, torch_hist=torch_hist)
    parts.collect(torch.zeros(100))
    parts.collect(x)
    once = _hist(torch.cat([torch.zeros(100), x]), torch_hist=torch_hist)
    for method in ("percentile", "mse", "entropy"):
        assert parts.compute_amax(method) == once.compute_amax(method)
    zeros = _hist(torch.zeros(10), torch_hist=torch_hist)
    assert [zeros.compute_amax(m).item() for m in ("percentile", "mse", "entropy")] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_histogram_refuses_nan_and_inf(bad):
    calib = _hist(torch.rand(1000))
    with pytest.raises(ValueError, match="HistogramCalibrator.collect: the tensor holds NaN or infinite values"):
        calib.collect(torch.tensor([0.5, bad]))  # NaN was dropped silently
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        _hist(torch.tensor([1.0, bad]))


@pytest.mark.parametrize("method", ["percentile", "mse", "max"])
def test_calibrate_weights_gives_an_all_zero_channel_amax_zero(method):
    """Review defect 10: mse raised "amax must be >= 0, got a minimum of -0.437" (a histogram over -0.5..0.5)."""
    from vquant_pl.nvidia.quant_modules import QuantConv2d

    layer, plain = QuantConv2d(2, 3, 3), QuantConv2d(2, 3, 3)
    with torch.no_grad():
        layer.weight[1] = 0
        plain.weight.copy_(layer.weight)
        plain.weight[1] = layer.weight[0]  # the other channels' amax does not depend on channel 1
    calibrate_weights(layer, method)
    calibrate_weights(plain, method)
    amax = layer.weight_quantizer.amax.flatten()
    assert amax[1].item() == 0.0 and torch.equal(amax[[0, 2]], plain.weight_quantizer.amax.flatten()[[0, 2]])
    with torch.no_grad():
        layer.weight[2, 0, 0, 0] = float("nan")
    if method != "max":
        with pytest.raises(ValueError, match=r"weight of 'QuantConv2d' holds NaN or infinite values \(output "
                                             r"channel 2\)"):
            calibrate_weights(layer, method)
