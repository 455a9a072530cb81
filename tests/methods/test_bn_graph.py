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


def _bn_act_nets(act):
    """The same network twice: with timm's BatchNormAct2d(act), and with BatchNorm2d then act()."""
    from timm.layers import BatchNormAct2d

    def make(bn):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), *bn(), nn.Conv2d(8, 8, 3, groups=8), *bn(), nn.Conv2d(8, 4, 1))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.copy_(torch.rand(8, generator=gen) * 1.8 + 0.2)
                    m.bias.copy_(torch.rand(8, generator=gen) * 2 - 1)
        return model.eval()

    return make(lambda: [BatchNormAct2d(8, act_layer=act)]), make(lambda: [nn.BatchNorm2d(8), act()])


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_a_batchnorm_act_clip_is_ranged_as_the_separate_module(act):
    pytest.importorskip("timm")
    fused, plain = _bn_act_nets(act)
    reports = [vq.quantize_model(m, 4, 4, act_range="bn", bn_bias_correction=None) for m in (fused, plain)]
    assert [r.probe_time_s for r in reports] == [0.0, 0.0]  # every range from BatchNorm, no probe
    got = [[(r.act_rule, r.act_lo, r.act_hi, r.signed, r.note) for r in report.layers] for report in reports]
    assert got[0] == got[1]
    assert all(rule == "bn" and lo == 0.0 and not signed for rule, lo, _, signed, _ in got[0][1:])
    if act is nn.ReLU6:
        assert max(hi for _, _, hi, _, _ in got[0][1:]) <= 6.0


def test_a_batchnorm_act_with_another_activation_falls_back_naming_it():
    pytest.importorskip("timm")
    fused, _ = _bn_act_nets(nn.SiLU)
    report = vq.quantize_model(fused, 4, 4, act_range="bn", bn_bias_correction=None, probe=vq.Probe(shape=(2, 3, 12, 12)))
    assert [r.note for r in report.layers[1:]] == [
        f"bn range fallback to sigma on the probe: its BatchNorm {bn!r} (BatchNormAct2d) applies SiLU after normalizing"
        for bn in ("1", "3")]
    vq.restore_model(fused)


def test_a_sync_batchnorm_copy_quantizes_exactly_like_the_batchnorm_model():
    def net():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False),
                              nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        with torch.no_grad():
            for bn in (model[1], model[4]):
                bn.weight.uniform_(0.3, 2)
                bn.bias.uniform_(-1, 1)
        return model.eval()

    plain, synced = net(), nn.SyncBatchNorm.convert_sync_batchnorm(net()).eval()
    assert isinstance(synced[1], nn.SyncBatchNorm)
    from vquant_pl.methods.equalize import find_groups

    assert [(g.producers, g.skipped) for g in find_groups(synced)] == [(["1"], None), (["4"], None)]
    x = torch.rand(2, 3, 12, 12)
    reports = [vq.quantize_model(m, 4, 4, equalize=True, bn_bias_correction="all") for m in (plain, synced)]
    assert [r.probe_time_s for r in reports] == [0.0, 0.0]  # BN ranges everywhere: no probe
    rows = [[(r.act_rule, r.act_lo, r.act_hi, r.note) for r in report.layers] for report in reports]
    assert rows[0] == rows[1] and rows[0][1][0] == "bn" and "bias corrected (all)" in rows[0][1][3]
    assert torch.equal(plain(x), synced(x))
    vq.restore_model(synced)
    assert torch.equal(synced(x), net()(x))
