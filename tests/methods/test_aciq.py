"""ACIQ as its authors' code computes it (vquant_pl.methods.aciq): known answers from the
original's formulas (submission2019/cnn-quantization, int_quantizer.py and the weight
correction of inference_quantization_manager.py) on fixed tensors.

`_original_*` below restate those formulas step by step, independently of the package."""
import math

import pytest
import torch
from torch import nn

import vquant_pl as vq
from vquant_pl.methods.aciq import (ACIQ_ALPHA, ACIQ_ALPHA_POSITIVE, aciq_allocate_bits, aciq_range, allocate_bits,
                                    bias_correct, gaussian_mixture_moments, moments, weight_channel_bits)
from vquant_pl.ops.affine import ActivationQuantizer

from helpers.models import ConvBnReluConv


# -- the original's formulas, restated --------------------------------------------------------
def _original_range(t, bits, dist, half_range, pre=None):
    """alpha from b (Laplace) / unbiased std (Gauss) of the tensor the original quantizes (the
    pre-activation when half_range), then alpha2DeltaOffset (clip2max off) -> (offset, delta)."""
    src = (pre if pre is not None else t).flatten().float()
    mean = src.mean()
    spread = (src - mean).abs().mean() if dist == "laplace" else src.std(unbiased=True)
    c = {("laplace", False): 5.03, ("laplace", True): 6.2, ("gauss", False): 2.55, ("gauss", True): 2.93}
    alpha = c[(dist, half_range)] * spread if bits == 4 else None
    if half_range:
        return 0.0, float(torch.clamp(mean, min=0) + alpha)
    offset = max(float(src.min()), float(mean - alpha))
    return offset, float(2 * alpha)


def _original_gemmlowp(t, bits, delta, offset):
    """__gemmlowpQuantize1__ with enforce_true_zero."""
    qmax = 2.0 ** bits - 1
    scale = max(delta / qmax, 1e-8)
    zero_point = round(-offset / scale)
    q = torch.clamp(t / scale + zero_point, 0, qmax).round()
    return (q - zero_point) * scale


def _original_bits(prior, target_bits):
    """get_bits_alloc_fixed_target with round mode."""
    def alloc(target):
        p = prior ** (2.0 / 3)
        bins = (prior.numel() * 2.0 ** target * p) / p.sum()
        b = torch.round(torch.log2(bins))
        return b.clamp(0, 8)
    target, delta, it, out = float(target_bits), 1.0, 0, None
    while abs(2 * delta) > 0.01 and it < 10:
        it += 1
        out = alloc(target)
        delta = ((target_bits - out.mean()) / 2).item()
        target += delta
    return out


# -- constants --------------------------------------------------------------------------------
def test_constants_are_the_original_code_tables():
    assert [ACIQ_ALPHA["laplace"][b] for b in (2, 4, 8)] == [2.83, 5.03, 9.89]
    assert [ACIQ_ALPHA["gauss"][b] for b in (4, 5, 6)] == [2.55, 2.93, 3.28]  # the code's, not 2.94 / 3.29
    assert ACIQ_ALPHA_POSITIVE["laplace"][4] == 6.2 and ACIQ_ALPHA_POSITIVE["gauss"][4] == 2.93
    assert ACIQ_ALPHA_POSITIVE["laplace"][3] == 5.02 and ACIQ_ALPHA_POSITIVE["gauss"][8] == 4.2
    assert ACIQ_ALPHA["laplace"][0] == 1.05 and ACIQ_ALPHA_POSITIVE["laplace"][0] == 1.86  # 0-bit channels


# -- clipping ---------------------------------------------------------------------------------
def test_one_sided_clip_from_the_pre_activation_known_answer():
    pre = torch.tensor([-2.0, -1.0, 0.0, 1.0, 4.0])  # mean 0.4, b = 1.68
    x = pre.relu()
    lo, hi, signed = aciq_range(x, 4, "laplace", pre=moments(pre))
    assert (lo, signed) == (0.0, False) and hi == pytest.approx(0.4 + 6.2 * 1.68, rel=1e-6)
    lo, hi, _ = aciq_range(x, 4, "gauss", pre=moments(pre))
    assert hi == pytest.approx(0.4 + 2.93 * float(pre.std()), rel=1e-6)
    neg = pre - 3  # mean below zero: the range starts at max(mean, 0) = 0
    assert aciq_range(neg.relu(), 4, "laplace", pre=moments(neg))[1] == pytest.approx(6.2 * 1.68, rel=1e-6)


@pytest.mark.parametrize("dist", ["laplace", "gauss"])
def test_signed_clip_is_centred_on_the_mean_and_quantizes_as_the_original(dist):
    lo, hi, signed = aciq_range(torch.tensor([-1.0, 0.0, 1.0, 2.0]), 4, "laplace")
    assert (lo, hi, signed) == (-1.0, pytest.approx(9.06), True)  # offset max(min, mean - alpha), width 2 alpha
    torch.manual_seed(0)
    x = torch.distributions.Laplace(1.5, 0.7).sample((4000,))
    x[:3] = torch.tensor([-20.0, 30.0, 25.0])  # outliers: mean - alpha is above the minimum
    offset, delta = _original_range(x, 4, dist, half_range=False)
    lo, hi, signed = aciq_range(x, 4, dist)
    assert lo == pytest.approx(offset, rel=1e-5) and hi - lo == pytest.approx(delta, rel=1e-5)
    assert lo > float(x.min()) and signed == (lo < 0)
    ours = ActivationQuantizer(4, lo, hi, signed).reference(x)
    assert torch.allclose(ours, _original_gemmlowp(x, 4, delta, offset), atol=1e-5)


def test_cap_keeps_the_range_inside_the_observed_one():
    x = torch.tensor([0.0, 0.1, 0.2, 5.0])
    free = aciq_range(x, 4, "laplace")
    capped = aciq_range(x, 4, "laplace", cap=True)
    assert free[1] - free[0] > 5.0 and capped == (0.0, 5.0, False)
    pre = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    assert aciq_range(pre.relu(), 4, "laplace", pre=moments(pre), cap=True)[1] == pytest.approx(1.0)


@pytest.mark.parametrize("dist", ["laplace", "gauss"])
def test_probe_clips_inputs_fed_by_a_relu_from_the_tensor_before_it(dist):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 2, 1))
    probe = torch.rand(8, 3, 12, 12)
    report = vq.quantize_model(model, 8, 4, act_range=f"aciq-{dist}", probe=probe, bn_bias_correction=None)
    with torch.no_grad():
        pre = model[0](probe)  # the first layer: quantized weights, float input -- what the ReLU saw
        x = model[3](model[2](model[1](pre)))  # conv2's input is quantized: its hook runs here
    offset, delta = _original_range(pre.relu(), 4, dist, half_range=True, pre=pre)
    row = report.layers[1]
    assert (row.act_lo, row.signed) == (0.0, False) and row.act_hi == pytest.approx(offset + delta, rel=1e-5)
    # conv2's output went through a max pool: not a ReLU output, so clipped around its own mean
    m = moments(x)
    spread = m.b if dist == "laplace" else m.std
    alpha = ACIQ_ALPHA[dist][8] * spread  # the last layer's input: 8 bits
    assert report.layers[2].act_lo == pytest.approx(max(m.lo, m.mean - alpha), rel=1e-4, abs=1e-6)
    vq.restore_model(model)


@pytest.mark.parametrize("relu", [nn.ReLU, nn.ReLU6])
def test_cap_on_the_probe_bounds_relu_fed_inputs_by_their_observed_max(relu):
    """aciq_cap (the original's clip2max) on an input fed by a ReLU module: `hi = min(max(mean, 0)
    + c+ b, max(x))`. It used to cap at the ReLU's *known* bound only, so after an nn.ReLU (bound
    inf) the setting did nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), relu(), nn.Conv2d(8, 4, 3), nn.Conv2d(4, 2, 1))
    probe = torch.rand(8, 3, 12, 12) * 4 - 2
    free = vq.quantize_model(model, 8, 4, act_range="aciq-laplace", probe=probe, bn_bias_correction=None)
    with torch.no_grad():
        pre = model[0](probe)
    vq.restore_model(model)
    x = model[1](pre)
    offset, delta = _original_range(x, 4, "laplace", half_range=True, pre=pre)
    assert free.layers[1].act_hi == pytest.approx(offset + delta, rel=1e-5)
    assert offset + delta > float(x.max()) > 0  # the formula runs past the largest input value
    capped = vq.quantize_model(model, 8, 4, act_range="aciq-laplace", aciq_cap=True, probe=probe,
                               bn_bias_correction=None)
    assert capped.layers[1].act_lo == 0.0 and capped.layers[1].act_hi == pytest.approx(float(x.max()), rel=1e-6)
    vq.restore_model(model)


@pytest.mark.parametrize("dist", ["laplace", "gauss"])
def test_bn_statistics_clip_the_exact_normal_mixture_one_sidedly(dist):
    model = ConvBnReluConv()
    report = vq.quantize_model(model, 8, 4, act_range=f"aciq-{dist}", aciq_stats="bn", bn_bias_correction=None)
    g1, b1 = model.bn1.weight.detach().abs(), model.bn1.bias.detach()
    torch.manual_seed(0)  # the pre-activation BN describes: channels N(beta, |gamma|), sampled
    sample = torch.cat([b + g * torch.randn(400_000) for b, g in zip(b1, g1)])
    offset, delta = _original_range(sample.relu(), 4, dist, half_range=True, pre=sample)
    assert report.layers[1].act_lo == 0.0 and report.layers[1].act_hi == pytest.approx(offset + delta, rel=5e-3)
    m = gaussian_mixture_moments(b1, g1)
    assert m.mean == pytest.approx(float(b1.mean()), rel=1e-6)
    assert m.b == pytest.approx(float((sample - sample.mean()).abs().mean()), rel=3e-3)
    assert report.probe_time_s == 0.0
    vq.restore_model(model)


# -- bit allocation ---------------------------------------------------------------------------
def test_bit_allocation_is_the_original_fixed_target_search():
    assert aciq_allocate_bits(torch.tensor([0.1, 1.0, 10.0]), 4).tolist() == [2.0, 4.0, 6.0]
    dead = torch.tensor([0.0, 1e-3, 0.05, 0.3, 1.0, 1.0, 2.0, 8.0])
    bits = aciq_allocate_bits(dead, 4)
    assert bits.tolist() == _original_bits(dead, 4).tolist() and bits[0] == 0  # a dead channel: 0 bits
    g = torch.Generator().manual_seed(1)
    for n, target in ((16, 4), (64, 3), (37, 2)):
        prior = torch.rand(n, generator=g) ** 3
        bits = aciq_allocate_bits(prior, target)
        assert torch.equal(bits, _original_bits(prior, target))
        assert bits.min() >= 0 and bits.max() <= 8


def test_weight_bit_allocation_uses_the_std_prior_only_at_4_bits_or_fewer():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) * torch.tensor([1e-4, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0]).view(-1, 1, 1, 1)
    expected = _original_bits(w.flatten(1).std(1), 4).long()
    assert torch.equal(weight_channel_bits(w, 4), expected) and expected[0] == 0
    assert weight_channel_bits(w, 6) is None  # the original allocates at 4 bits or fewer
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
    with torch.no_grad():
        model[2].weight.copy_(w)
    report = vq.quantize_model(model, 4, None, rounding="nearest", bit_allocation=True, bn_bias_correction=None)
    assert report.layers[1].note == f"channel bits {int(expected.min())}..{int(expected.max())}"
    out = model[2].weight
    assert torch.equal(out[0], torch.full_like(out[0], float(w[0].min())))  # 0 bits: the channel minimum
    for channel, b in zip(out[1:], expected[1:]):
        assert channel.unique().numel() <= 2 ** int(b)
    vq.restore_model(model)
    report = vq.quantize_model(model, 6, None, bit_allocation=True, bn_bias_correction=None)
    assert report.layers[1].note == "no bit allocation at 6 bits (ACIQ allocates at 4 bits or fewer)"
    vq.restore_model(model)


def test_exact_budget_allocation_is_kept_as_our_option():
    alphas = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 2.0, 4.0, 0.01])
    for mean_bits in (2, 4, 6):
        bits = allocate_bits(alphas, mean_bits)
        assert bits.sum().item() == mean_bits * len(alphas)
        assert bits.min() >= 1 and bits.max() <= 8
        order = torch.argsort(alphas)
        assert torch.all(bits[order][1:] >= bits[order][:-1])  # wider channel, no fewer bits
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.1, 3, 16).view(-1, 1, 1, 1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3))
    with torch.no_grad():
        model[2].weight.copy_(w)
    report = vq.quantize_model(model, config=vq.QuantConfig(weight_bits=6, act_bits=None, bit_allocation=True,
                                                            bit_allocation_rule="exact"))
    channel_bits = allocate_bits((w.flatten(1).amax(1) - w.flatten(1).amin(1)) / 2, 6)
    assert torch.equal(weight_channel_bits(w, 6, "exact"), channel_bits) and channel_bits.sum() == 6 * 16
    assert report.layers[1].note == f"channel bits {int(channel_bits.min())}..{int(channel_bits.max())}"
    vq.restore_model(model)


# -- weight bias correction -------------------------------------------------------------------
def test_bias_correction_rules_known_answers():
    w = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, -0.5, -0.5]])
    q = torch.tensor([[1.0, 1.0, 3.0, 5.0], [0.5, 0.5, -0.5, -0.5]])
    mean = bias_correct(w, q)  # the original's -bcw: q - mean(q) + mean(w)
    assert torch.allclose(mean, torch.tensor([[1.5, 1.5, 3.5, 5.5], [0.5, 0.5, -0.5, -0.5]]))
    both = bias_correct(w, q, "mean-std")  # -vcw -bcw
    ratio = w[0].std() / (q[0].std() + 1e-8)
    assert torch.allclose(both[0], (q[0] - 2.5) * ratio + 3.0) and torch.allclose(both[0].std(), w[0].std())
    assert torch.allclose(both.mean(1), w.mean(1))
    paper = bias_correct(w, q, "paper")
    dev = lambda t: (t - t.mean(1, keepdim=True)).norm(dim=1)  # noqa: E731
    xi = (dev(w) / dev(q)).view(-1, 1)
    assert torch.allclose(paper, xi * (q + w.mean(1, keepdim=True) - q.mean(1, keepdim=True)))
    assert not torch.allclose(paper.mean(1), w.mean(1))  # the paper's rule leaves (xi - 1) mean(W)
    with pytest.raises(ValueError, match="unknown bias correction 'median'"):
        bias_correct(w, q, "median")


def test_model_bias_correction_follows_the_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
    w = model[2].weight.detach().clone()
    for rule in ("mean", "mean-std", "paper"):
        vq.quantize_model(model, config=vq.QuantConfig(weight_bits=3, act_bits=None, rounding="nearest",
                                                        bias_correction=True, bias_correction_rule=rule,
                                                        bn_bias_correction=None))
        expected = bias_correct(w, vq.quantize_weight(w, 3, "nearest"), rule)
        assert torch.allclose(model[2].weight, expected, atol=1e-6)
        vq.restore_model(model)


def test_settings_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="aciq_cap applies to act_range 'aciq-laplace'/'aciq-gauss', got 'bn'"):
        vq.QuantConfig(aciq_cap=True)
    with pytest.raises(ValueError, match="bias_correction_rule='paper' needs bias_correction=True"):
        vq.QuantConfig(bias_correction_rule="paper")
    with pytest.raises(ValueError, match="bit_allocation_rule='exact' needs bit_allocation or act_bit_allocation"):
        vq.QuantConfig(bit_allocation_rule="exact")
    with pytest.raises(ValueError, match="unknown bit_allocation_rule 'greedy'"):
        vq.QuantConfig(bit_allocation=True, bit_allocation_rule="greedy")
    with pytest.raises(ValueError, match="act_per_channel takes per-channel statistics from BatchNorm"):
        vq.QuantConfig(act_range="aciq-laplace", act_per_channel=True)
    assert math.isclose(vq.QuantConfig(act_range="aciq-gauss", aciq_cap=True).resolved_sigma, 12.0)
