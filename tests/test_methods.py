"""The other seed methods: NVIDIA-style fake quant, DFQ BN ranges, ACIQ clip, bias correction, bit allocation."""

import pytest
import torch
from torch import nn

import vquant_pl as vq
from vquant_pl.aciq import ACIQ_ALPHA, aciq_range, allocate_bits, bias_correct
from vquant_pl.quant_modules import (QuantConv2d, QuantLinear, TensorQuantizer, calibrate, quantized_layers)
from vquant_pl.tensor_quant import QuantDescriptor, fake_tensor_quant, tensor_quant


def test_pytorch_quantization_known_answer():
    torch.manual_seed(12345)
    x = torch.rand(10)
    codes, scale = tensor_quant(x, x.abs().max())
    assert codes.tolist() == [126, 113, 127, 59, 11, 23, 47, 73, 43, 27]
    assert round(scale.item(), 4) == 128.0057
    expected = [0.9843, 0.8828, 0.9921, 0.4609, 0.0859, 0.1797, 0.3672, 0.5703, 0.3359, 0.2109]
    assert [round(v, 4) for v in fake_tensor_quant(x, x.abs().max()).tolist()] == expected


def test_straight_through_gradient_is_zero_outside_the_clip():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 0.9, 1.5], requires_grad=True)
    fake_tensor_quant(x, 1.0).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_tensor_quantizer_in_flight_fixed_and_per_channel():
    x = torch.randn(4, 3, 5, 5)
    dynamic = TensorQuantizer(QuantDescriptor(num_bits=8))
    assert torch.equal(dynamic(x), fake_tensor_quant(x, x.abs().max(), 8, narrow_range=False))
    fixed = TensorQuantizer(QuantDescriptor(num_bits=4, amax=1.0))
    out = fixed(x)  # not narrow range: codes -8..7, so -8/7 * amax .. amax
    assert out.max() <= 1.0 and out.min() == pytest.approx(-8 / 7) and fixed.amax.item() == 1.0
    per_channel = TensorQuantizer(QuantDescriptor(num_bits=8, axis=0))
    amax = x.abs().amax(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(per_channel(x), fake_tensor_quant(x, amax, 8, narrow_range=False))
    with pytest.raises(ValueError, match="num_bits must be an integer in 1..16"):
        QuantDescriptor(num_bits=0)
    with pytest.raises(ValueError, match="unknown calib_method 'kl'"):
        QuantDescriptor(calib_method="kl")


def test_drop_in_layers_and_context_manager():
    import torchvision

    original = nn.Conv2d
    with quantized_layers():
        model = torchvision.models.resnet18(num_classes=10)
    assert nn.Conv2d is original  # restored
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.fc, QuantLinear)
    conv = model.conv1
    x = torch.rand(2, 3, 32, 32)
    xq = fake_tensor_quant(x, x.abs().max(), 8, narrow_range=False)
    wq = fake_tensor_quant(conv.weight, conv.weight.detach().abs().amax((1, 2, 3), keepdim=True), 8, narrow_range=False)
    assert torch.equal(conv(x), nn.functional.conv2d(xq, wq, None, conv.stride, conv.padding))


@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy"])
def test_calibrators(method):
    layer = QuantLinear(16, 4, quant_desc_input=QuantDescriptor(num_bits=8, calib_method=method))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(256, 16, generator=g) for _ in range(3)]
    batches[1][0, 0] = 40.0  # one outlier
    kwargs = {"percentile": 99.9} if method == "percentile" else {}  # 99.99 of 8192 values is the outlier
    assert calibrate(layer, batches, num_batches=2, **kwargs) == 2
    amax = layer._input_quantizer.amax.item()
    if method == "max":
        assert amax == 40.0
    else:
        assert 2.0 < amax < 40.0  # the histogram methods clip the outlier
    assert torch.equal(layer._weight_quantizer.amax, layer.weight.detach().abs().amax(1, keepdim=True))


class ConvBnReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.bn1.weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.1]))
            self.bn1.bias.copy_(torch.tensor([0.2, -0.3, 1.0, -2.0]))
            self.bn2.weight.copy_(torch.tensor([1.0, 1.0, 3.0, 0.5]))
            self.bn2.bias.copy_(torch.tensor([-1.0, 0.0, 0.5, 0.0]))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.conv3(self.bn2(self.conv2(h)) + h)  # residual add, no ReLU: signed


def test_bn_ranges_are_the_analytic_values_and_need_no_probe():
    model = ConvBnReluConv()
    wrong_probe = torch.rand(2, 7, 3, 3)  # would not fit: proves the probe is never used
    report = vq.quantize_model(model, 8, 4, act_range="bn", bn_k=3.0, probe=wrong_probe)
    g1, b1 = model.bn1.weight.detach().abs(), model.bn1.bias.detach()
    g2, b2 = model.bn2.weight.detach().abs(), model.bn2.bias.detach()
    hi2 = float(torch.clamp(b1 + 3 * g1, min=0).max())  # after ReLU: [max(0, b - 3g), b + 3g]
    assert (report.layers[1].act_lo, report.layers[1].act_hi, report.layers[1].signed) == (0.0, hi2, False)
    mean, std = b2 + b1, torch.sqrt(g2 ** 2 + g1 ** 2)  # add: sum of means, root-sum-square of stds
    lo3, hi3 = float((mean - 3 * std).min()), float((mean + 3 * std).max())
    alpha = max(-lo3, hi3)
    assert report.layers[2].act_bits == 8  # last layer: 8 bits
    assert (report.layers[2].act_lo, report.layers[2].act_hi, report.layers[2].signed) == (-alpha, alpha, True)
    assert report.probe_time_s == 0.0
    vq.restore_model(model)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_bn_ranges_cover_every_layer_of_resnets(name):
    from pytorchcv.model_provider import get_model

    model = get_model(name, pretrained=False)
    report = vq.quantize_model(model, 4, 4, act_range="bn", probe=vq.Probe(shape=(2, 3, 224, 224)))
    for row in report.layers[1:]:
        assert row.act_hi is not None or "fallback" in row.note, row.name
    assert sum("fallback" in r.note for r in report.layers) == 0  # all BN-derived in ResNets
    vq.restore_model(model)


def test_bn_range_falls_back_to_sigma_and_says_why():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))  # no BatchNorm
    report = vq.quantize_model(model, 4, 4, act_range="bn", probe=vq.Probe(shape=(4, 3, 10, 10)))
    assert report.layers[1].note == "bn range fallback to sigma on the probe: input not produced by a BatchNorm"
    assert report.layers[1].act_hi is not None and report.probe_time_s > 0
    vq.restore_model(model)


@pytest.mark.parametrize("dist,k", [("gauss", ACIQ_ALPHA["gauss"][4]), ("laplace", ACIQ_ALPHA["laplace"][4] / 2 ** 0.5)])
def test_aciq_clip_from_bn_statistics(dist, k):
    model = ConvBnReluConv()
    report = vq.quantize_model(model, 8, 4, act_range=f"aciq-{dist}", aciq_stats="bn")
    g1, b1 = model.bn1.weight.detach().abs(), model.bn1.bias.detach()
    assert report.layers[1].act_hi == float(torch.clamp(b1 + k * g1, min=0).max())
    assert report.probe_time_s == 0.0
    vq.restore_model(model)


@pytest.mark.parametrize("dist", ["laplace", "gauss"])
def test_aciq_clip(dist):
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    lo, hi, signed = aciq_range(x, 4, dist)
    spread = (x - x.mean()).abs().mean() if dist == "laplace" else x.std()
    assert signed and lo == -hi and hi == pytest.approx(float(ACIQ_ALPHA[dist][4] * spread))
    relu = x.relu()
    lo, hi, signed = aciq_range(relu, 8, dist)
    assert (lo, signed) == (0.0, False) and hi <= relu.max()


def test_bias_correction_restores_channel_spread():
    w = torch.randn(8, 4, 3, 3)
    q = vq.quantize_weight(w, 3)
    c = bias_correct(w, q)
    dev = lambda t: (t - t.mean((1, 2, 3), keepdim=True)).flatten(1).norm(dim=1)  # noqa: E731
    assert torch.allclose(dev(c), dev(w), rtol=1e-5)
    mu = w.mean((1, 2, 3), keepdim=True) - q.mean((1, 2, 3), keepdim=True)
    xi = (dev(w) / dev(q)).view(-1, 1, 1, 1)
    assert torch.allclose(c, xi * (q + mu))


def test_bit_allocation_keeps_budget_and_favours_wide_channels():
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
    report = vq.quantize_model(model, 4, None, bit_allocation=True)
    channel_bits = allocate_bits((w.flatten(1).amax(1) - w.flatten(1).amin(1)) / 2, 4)
    assert channel_bits.sum() == 4 * 16 and report.layers[1].note.startswith("channel bits")
    for channel, b in zip(model[2].weight, channel_bits):
        assert channel.unique().numel() <= 2 ** int(b)
    vq.restore_model(model)


@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy"])
def test_data_driven_ranges_for_comparison(method):
    model = ConvBnReluConv().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 6, 6, generator=g) for _ in range(3)]
    with pytest.raises(ValueError, match="data-driven: pass calibration="):
        vq.quantize_model(model, 8, 8, act_range=method)
    report = vq.quantize_model(model, 8, 8, act_range=method, calibration=batches, calib_batches=2)
    assert report.probe_time_s > 0
    with torch.no_grad():
        h = torch.relu(model.bn1(model.conv1(batches[0])))
        h2 = torch.relu(model.bn1(model.conv1(batches[1])))
    top = float(torch.maximum(h.max(), h2.max()))
    assert report.layers[1].signed is False and 0 < report.layers[1].act_hi <= top * 1.01
    if method == "max":
        assert report.layers[1].act_hi == top
    vq.restore_model(model)


def test_channel_activation_quantizer_is_rule_3_channel_by_channel():
    from vquant_pl.affine import ActivationQuantizer, ChannelActivationQuantizer

    x = torch.randn(5, 3, 4, 4) * 3
    bits, lo, hi = torch.tensor([2, 5, 8]), torch.tensor([-1.0, -2.5, -0.3]), torch.tensor([1.0, 2.5, 0.3])
    out = ChannelActivationQuantizer(bits, lo, hi, True, dim=1)(x)
    for c in range(3):
        per_tensor = ActivationQuantizer(int(bits[c]), float(lo[c]), float(hi[c]), True)
        assert torch.equal(out[:, c], per_tensor.reference(x[:, c]))
    features = x.flatten(1).relu()  # Linear input: channels last
    same = ChannelActivationQuantizer(torch.full((48,), 4), torch.zeros(48), torch.full((48,), 2.0), False, dim=-1)
    assert torch.equal(same(features), ActivationQuantizer(4, 0.0, 2.0, False).reference(features))
    with pytest.raises(ValueError, match="has 48 channels on dim 1; the per-channel ranges are for 3"):
        ChannelActivationQuantizer(bits, lo, hi, True)(features)
    with pytest.raises(ValueError, match="per-channel activation bits must lie in 2..8, got 1..8"):
        ChannelActivationQuantizer(torch.tensor([1, 8]), torch.zeros(2), torch.ones(2), False)


def test_activation_bit_allocation_from_bn_statistics():
    model = ConvBnReluConv()
    wrong_probe = torch.rand(2, 7, 3, 3)  # every range comes from BN: the probe is never used
    report = vq.quantize_model(model, 8, 4, act_range="bn", bn_k=3.0, probe=wrong_probe, act_bit_allocation=True)
    g1, b1 = model.bn1.weight.detach().abs(), model.bn1.bias.detach()
    alpha = torch.clamp(b1 + 3 * g1, min=0)  # after ReLU, per channel
    expected = allocate_bits(alpha, 4, 2, 8)
    bits, lo, hi, signed = vq.activation_ranges(model)[1]
    assert torch.equal(bits, expected) and bits.sum() == 4 * 4 and bits.min() >= 2
    assert torch.equal(hi, alpha) and torch.equal(lo, torch.zeros(4)) and signed is False
    assert report.layers[1].note == f"act channel bits {int(expected.min())}..{int(expected.max())}"
    assert report.layers[1].act_bits == 4 and report.layers[2].act_bits == 8 and report.probe_time_s == 0.0
    vq.restore_model(model)


class BnNet(nn.Module):
    def __init__(self, pool: bool = True):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1) if pool else nn.Identity()
        self.fc = nn.Linear(6 if pool else 6 * 6 * 6, 10)
        with torch.no_grad():  # channels of very different spread
            self.bn1.weight.copy_(torch.logspace(-2, 1, 8))
            self.bn1.bias.copy_(torch.linspace(-0.5, 0.5, 8))
            self.bn2.weight.copy_(torch.logspace(-1, 0.5, 6))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn2(self.conv2(h)))), 1))


@pytest.mark.parametrize("act_range", ["bn", "aciq-laplace", "aciq-gauss"])
def test_activation_bit_allocation_keeps_budget_and_travels_to_other_ranks(act_range):
    model = BnNet().eval()
    probe = torch.rand(4, 3, 10, 10)
    report = vq.quantize_model(model, 8, 4, act_range=act_range, aciq_stats="bn", probe=probe,
                               act_bit_allocation=True)
    ranges = vq.activation_ranges(model)
    bits, lo, hi, signed = ranges[1]
    assert bits.numel() == 8 and bits.sum() == 4 * 8 and bits.max() > bits.min()
    assert torch.all(bits[1:] >= bits[:-1])  # wider BN channel, no fewer bits
    from vquant_pl.bn_ranges import DEFAULT_BN_K

    k = {"bn": DEFAULT_BN_K, "aciq-gauss": ACIQ_ALPHA["gauss"],
         "aciq-laplace": {b: c / 2 ** 0.5 for b, c in ACIQ_ALPHA["laplace"].items()}}[act_range]
    k_by_channel = torch.tensor([k[int(b)] for b in bits])  # each channel re-ranged at its own bits
    g1, b1 = model.bn1.weight.detach().abs(), model.bn1.bias.detach()
    assert torch.equal(hi, torch.clamp(b1 + k_by_channel * g1, min=0)) and torch.equal(lo, torch.zeros(8))
    assert not signed and report.probe_time_s == 0.0
    fc_bits = ranges[2][0]
    assert fc_bits.numel() == 6 and torch.all(fc_bits == 8)  # last layer: 8 bits, channels last
    out = model(probe)
    vq.set_activation_ranges(model, ranges)  # what DDP does with rank 0's ranges
    assert torch.equal(model(probe), out)
    assert report.layers[1].note == f"act channel bits {int(bits.min())}..{int(bits.max())}"
    vq.restore_model(model)


def test_activation_bit_allocation_falls_back_per_tensor_where_channels_do_not_match():
    model = BnNet(pool=False).eval()  # fc sees 6 x 6 x 6 features, BN knows 6 channels
    report = vq.quantize_model(model, 8, 4, act_range="bn", probe=torch.rand(4, 3, 10, 10), act_bit_allocation=True)
    assert report.layers[2].note == "bn range fallback to sigma on the probe: BN statistics for 6 channels, input has 216"
    assert isinstance(vq.activation_ranges(model)[2][0], int) and report.probe_time_s > 0
    vq.restore_model(model)


def test_activation_bit_allocation_needs_bn_statistics():
    model = ConvBnReluConv()
    for kwargs in (dict(act_bits=None, act_range="bn"), dict(act_range="sigma"), dict(act_range="max"),
                   dict(act_range="aciq-laplace")):
        with pytest.raises(ValueError, match="act_bit_allocation takes per-channel statistics from BatchNorm"):
            vq.quantize_model(model, 4, **({"act_bits": 4} | kwargs), act_bit_allocation=True)
    from vquant_pl.callbacks import VQuantCallback

    with pytest.raises(ValueError, match=r"act_range='entropy', aciq_stats='probe'\)"):
        VQuantCallback(act_range="entropy", act_bit_allocation=True)
    assert not vq.is_quantized(model)
