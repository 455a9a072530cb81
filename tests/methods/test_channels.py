"""Per-channel activation ranges and bits from BatchNorm (vquant_pl.methods.channels)."""
import pytest
import torch

import vquant_pl as vq

from vquant_pl.methods.aciq import ACIQ_ALPHA, ACIQ_ALPHA_POSITIVE, aciq_allocate_bits, allocate_bits

from helpers.models import BnNet, ConvBnReluConv


def test_channel_activation_quantizer_is_rule_3_channel_by_channel():
    from vquant_pl.ops.affine import ActivationQuantizer, ChannelActivationQuantizer

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


def test_activation_bit_allocation_from_bn_statistics_exact_budget():
    model = ConvBnReluConv()
    wrong_probe = torch.rand(2, 7, 3, 3)  # every range comes from BN: the probe is never used
    report = vq.quantize_model(model, probe=wrong_probe, config=vq.QuantConfig(
        weight_bits=8, act_bits=4, act_range="bn", bn_k=3.0, act_bit_allocation=True, bit_allocation_rule="exact"))
    g1, b1 = model.bn1.weight.detach().abs(), model.bn1.bias.detach()
    alpha = torch.clamp(b1 + 3 * g1, min=0)  # after ReLU, per channel
    expected = allocate_bits(alpha, 4, 2, 8)
    bits, lo, hi, signed = vq.activation_ranges(model)[1]
    assert torch.equal(bits, expected) and bits.sum() == 4 * 4 and bits.min() >= 2
    assert torch.equal(hi, alpha) and torch.equal(lo, torch.zeros(4)) and signed is False
    assert report.layers[1].note.endswith(f"act channel bits {int(expected.min())}..{int(expected.max())}")
    assert report.layers[1].act_bits == 4 and report.layers[2].act_bits == 8 and report.probe_time_s == 0.0
    vq.restore_model(model)



def test_bn_activation_bit_allocation_keeps_budget_and_travels_to_other_ranks():
    model = BnNet().eval()
    probe = torch.rand(4, 3, 10, 10)
    report = vq.quantize_model(model, probe=probe, config=vq.QuantConfig(
        weight_bits=8, act_bits=4, act_range="bn", act_bit_allocation=True, bit_allocation_rule="exact"))
    ranges = vq.activation_ranges(model)
    bits, lo, hi, signed = ranges[1]
    assert bits.numel() == 8 and bits.sum() == 4 * 8 and bits.max() > bits.min()
    assert torch.all(bits[1:] >= bits[:-1])  # wider BN channel, no fewer bits
    from vquant_pl.methods.bn_graph import DEFAULT_BN_K

    k_by_channel = torch.tensor([DEFAULT_BN_K[int(b)] for b in bits])  # each channel re-ranged at its own bits
    g1, b1 = model.bn1.weight.detach().abs(), model.bn1.bias.detach()
    assert torch.equal(hi, torch.clamp(b1 + k_by_channel * g1, min=0)) and torch.equal(lo, torch.zeros(8))
    assert not signed and report.probe_time_s == 0.0
    fc_bits = ranges[2][0]
    assert fc_bits.numel() == 6 and torch.all(fc_bits == 8)  # last layer: 8 bits, channels last
    out = model(probe)
    vq.set_activation_ranges(model, ranges)  # what DDP does with rank 0's ranges
    assert torch.equal(model(probe), out)
    assert report.layers[1].note.endswith(f"act channel bits {int(bits.min())}..{int(bits.max())}")
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


@pytest.mark.parametrize("dist", ["laplace", "gauss"])
def test_aciq_per_channel_ranges_and_bits_follow_the_original(dist):
    """-pcq_a -baa: std prior, 0..8 bits (raised to 2 here, counted), one-sided clip of each
    channel's normal N(beta, |gamma|): [0, max(beta, 0) + c+ sqrt(2/pi) |gamma|]."""
    model = BnNet().eval()
    report = vq.quantize_model(model, probe=torch.rand(4, 3, 10, 10), config=vq.QuantConfig(
        weight_bits=8, act_bits=4, act_range=f"aciq-{dist}", aciq_stats="bn", act_bit_allocation=True))
    g1, b1 = model.bn1.weight.detach().abs(), model.bn1.bias.detach()
    raw = aciq_allocate_bits(g1, 4).long()  # the original's allocation on the channel stds
    raised = int((raw < 2).sum())
    bits, lo, hi, signed = vq.activation_ranges(model)[1]
    assert raised > 0 and torch.equal(bits, raw.clamp(2, 8))
    c = torch.tensor([ACIQ_ALPHA_POSITIVE[dist][int(b) if dist == "laplace" else 4] for b in bits])
    spread = g1 * (2 / torch.pi) ** 0.5 if dist == "laplace" else g1
    assert torch.allclose(hi, b1.clamp(min=0) + c * spread, rtol=1e-6) and torch.equal(lo, torch.zeros(8))
    assert not signed and report.probe_time_s == 0.0
    assert report.layers[1].note.endswith(f"{raised} channel(s) allocated 0-1 bits raised to 2")
    assert torch.all(vq.activation_ranges(model)[2][0] == 8)  # 8 bits: the original allocates only at <= 4
    vq.restore_model(model)


def test_aciq_per_channel_ranges_without_allocation_are_mean_centred_when_signed():
    model = ConvBnReluConv()  # conv3 sees bn2 + h: signed, no ReLU
    vq.quantize_model(model, config=vq.QuantConfig(weight_bits=8, act_bits=6, act_range="aciq-laplace",
                                                    aciq_stats="bn", act_per_channel=True, bn_bias_correction=None))
    bits, lo, hi, signed = vq.activation_ranges(model)[2]
    g1, b1 = model.bn1.weight.detach().abs(), model.bn1.bias.detach()
    g2, b2 = model.bn2.weight.detach().abs(), model.bn2.bias.detach()
    mean, std = b1 + b2, (g1 ** 2 + g2 ** 2).sqrt()  # bn_graph's residual add
    alpha = ACIQ_ALPHA["laplace"][8] * std * (2 / torch.pi) ** 0.5  # the last layer's input: 8 bits
    assert torch.all(bits == 8) and signed
    assert torch.allclose(lo, mean - alpha, rtol=1e-6) and torch.allclose(hi - lo, 2 * alpha, rtol=1e-6)
    vq.restore_model(model)
