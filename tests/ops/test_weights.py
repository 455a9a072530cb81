"""SQuant rounding and per-channel weight quantization: properties beyond the golden file."""
import pytest
import torch

import vquant_pl as vq
from vquant_pl.ops.affine import weight_codes
from vquant_pl.ops.squant import ROUNDINGS, squant_round_torch

from helpers.reference_squant import squant_round_loop

SHAPES = [(16, 8, 3, 3), (12, 1, 3, 3), (20, 10, 1, 1), (30, 16), (6, 4, 5), (4, 3, 2, 3, 3), (3, 2, 7, 7)]


def _weights(shape, kind):
    w = torch.randn(shape)
    if kind == "grid":  # values on a half-integer grid: exact .5 errors, many priority ties
        w = torch.randint(-6, 7, shape).float() / 4
    elif kind == "degenerate":
        w[0] = 0.0
        w[1] = 0.25
    return w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "grid", "degenerate"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_vectorized_equals_literal_reading_of_design(shape, kind, bits):
    codes, _, _ = weight_codes(_weights(shape, kind), bits)
    for rounding in ROUNDINGS:
        assert torch.equal(squant_round_torch(codes, bits, rounding), squant_round_loop(codes, bits, rounding)), rounding


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_shape_dtype_and_code_count(shape, rounding):
    w = torch.randn(shape)
    q = vq.quantize_weight(w, 3, rounding)
    assert q.shape == w.shape and q.dtype == w.dtype
    codes, scale, zp = weight_codes(q, 3)  # requantizing lands on at most 2^b levels per channel
    for channel in q.reshape(q.shape[0], -1):
        assert channel.unique().numel() <= 2 ** 3


def test_nearest_is_round_to_nearest_per_channel():
    w = torch.randn(8, 4, 3, 3)
    lo = w.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = w.flatten(1).amax(1).view(-1, 1, 1, 1)
    scale = torch.full_like(hi, 15.0) / (hi - lo)
    zp = torch.round(scale * lo) + 8
    expected = (torch.round(scale * w - zp).clamp(-8, 7) + zp) / scale
    assert torch.equal(vq.quantize_weight(w, 4, "nearest"), expected)
    assert torch.equal(vq.quantize_weight(w, 4, "squant-e"), expected)


def test_squant_keeps_kernel_and_channel_error_sums_small():
    codes, _, _ = weight_codes(torch.randn(32, 16, 3, 3), 4)
    err = squant_round_torch(codes, 4, "squant") - codes
    assert err.sum(-1).abs().max() <= 1.0 + 1e-5  # per kernel: at most one flip from the boundary
    assert err.flatten(1).sum(-1).abs().max() <= 0.5 + 1e-5  # per channel: rounded away
    plain = (torch.round(codes) - codes).flatten(1).sum(-1).abs()
    assert plain.max() > 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_weights_are_computed_in_float32(dtype):
    w = torch.randn(8, 4, 3, 3).to(dtype)
    q = vq.quantize_weight(w, 4)
    assert q.dtype == dtype
    assert torch.equal(q, vq.quantize_weight(w.float(), 4).to(dtype))


def test_non_contiguous_weight_equals_contiguous():
    w = torch.randn(3, 3, 4, 8).permute(3, 2, 0, 1)
    assert not w.is_contiguous()
    assert torch.equal(vq.quantize_weight(w, 4), vq.quantize_weight(w.contiguous(), 4))


def test_constant_channels():
    # range 0 is clamped to 1e-8 (scale 1.5e9 at 4 bits): zero stays exactly zero, other
    # constants come back within float32 precision of that huge scale, as in the reference
    w = torch.zeros(4, 2, 3, 3)
    w[1] = 0.5
    w[2] = -3.0
    q = vq.quantize_weight(w, 4)
    assert torch.equal(q[0], w[0]) and torch.equal(q[3], w[3])
    assert torch.allclose(q, w, rtol=1e-6, atol=0)
    for channel in q:
        assert channel.unique().numel() == 1


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="weight bits must be an integer in 2..8"):
        vq.quantize_weight(torch.randn(4, 4), bits)


def test_bad_rounding_and_inputs():
    with pytest.raises(ValueError, match="unknown rounding 'squant-x'"):
        vq.quantize_weight(torch.randn(4, 4), 4, "squant-x")
    with pytest.raises(TypeError, match="floating-point"):
        vq.quantize_weight(torch.ones(4, 4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        vq.quantize_weight(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(ValueError, match="unknown backend 'fpga'"):
        vq.quantize_weight(torch.randn(4, 4), 4, backend="fpga")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_range_that_overflows_float32_is_refused_not_turned_into_nan(backend):
    """Review defect 1: max - min of a finite float32 channel overflowed (scale 0, then 0/0)."""
    w = torch.tensor([[3e38, -3e38, 1.0, 0.5], [0.1, -0.2, 0.3, 0.4]])
    with pytest.raises(ValueError, match=r"weight: output channel 0 spans \[-3e\+38, 3e\+38\]: its range overflows "
                                         r"float32 \(max - min overflows float32\)"):
        vq.quantize_weight(w, 4, backend=backend)
    const = torch.full((2, 4), 1e30)  # zero width: scale (2^b - 1) / 1e-8, scale * w overflows above 2 bits
    assert torch.equal(vq.quantize_weight(const, 2, backend=backend), const)
    with pytest.raises(ValueError, match="output channel 0 spans .*its range overflows float32"):
        vq.quantize_weight(const, 4, backend=backend)
    edge = torch.tensor([[-1.7e38, 1.7e38, 0.0, 1.0]])  # finite range: quantized, and finite
    assert vq.quantize_weight(edge, 8, backend=backend).isfinite().all()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_float64_value_beyond_float32_is_named(backend):
    w = torch.tensor([[1e39, -1.0, 0.5, 0.25]], dtype=torch.float64)  # was NaN (torch) or "holds NaN" (cpp)
    with pytest.raises(ValueError, match=r"weight: value 1e\+39 \(output channel 0\) exceeds the float32 range"):
        vq.quantize_weight(w, 4, backend=backend)


def test_quantize_model_names_the_layer_whose_range_overflows():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight[0] = torch.tensor([3e38, -3e38, 1.0, 0.5])
    before = model[1].weight.detach().clone()
    with pytest.raises(ValueError, match=r"weight of layer '1': output channel 0 spans .* overflows float32"):
        vq.quantize_model(model, 4, None)
    assert torch.equal(model[1].weight, before)
