"""ACIQ tools: analytical clip, bias correction, weight bit allocation (vquant_pl.methods.aciq)."""
import pytest
import torch
from torch import nn

import vquant_pl as vq
from vquant_pl.methods.aciq import ACIQ_ALPHA, aciq_range, allocate_bits, bias_correct

from helpers.models import ConvBnReluConv


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
