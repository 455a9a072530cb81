"""DFQ activation ranges from BatchNorm parameters (vquant_pl.methods.bn_graph)."""
import pytest
import torch
from torch import nn

import vquant_pl as vq

from helpers.models import ConvBnReluConv


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
