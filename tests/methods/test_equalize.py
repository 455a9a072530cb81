"""Equalization of activation channel ranges (vquant_pl.methods.equalize) on hand-built networks."""
import math

import pytest
import torch
from torch import nn

import vquant_pl as vq

from vquant_pl.methods.equalize import equalize, find_groups


class Stream(nn.Module):
    """conv -> BN -> 1x1 conv: a linear stream with one consumer."""

    def __init__(self, gamma=(1.0, 0.1), beta=(0.0, 0.0)):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2).eval()
        self.out = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.bn.weight.copy_(torch.tensor(gamma))
            self.bn.bias.copy_(torch.tensor(beta))
            self.out.weight.fill_(1.0)

    def forward(self, x):
        return self.out(self.bn(self.conv(x)))


class Residual(nn.Module):
    """Two BN outputs summed; the sum feeds two convs, one BN output also feeds the add only."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.c1, self.c2 = nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(4, 4, 1, groups=2)
        with torch.no_grad():
            for bn in (self.bn_a, self.bn_b):
                bn.weight.copy_(torch.tensor([2.0, 0.5, 0.05, 1.0]))
                bn.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
        self.eval()

    def forward(self, x):
        s = self.bn_a(self.a(x)) + self.bn_b(self.b(x))
        return self.c1(s).sum((2, 3)) + self.c2(s).mean((1, 2, 3))[:, None]


class Clipped(nn.Module):
    """BN -> ReLU6 -> depthwise conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3).eval()
        self.act = nn.ReLU6()
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([1.0, 0.25, 0.5]))
            self.bn.bias.copy_(torch.tensor([3.0, 0.0, 1.0]))

    def forward(self, x):
        return self.dw(self.act(self.bn(self.conv(x))))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_stream_alpha_one_equalizes_fully_and_restores_exactly():
    model = Stream()
    before = _snapshot(model)
    x = torch.randn(4, 2, 5, 5)
    ref = model(x)
    (group,) = equalize(model, alpha=1.0, k=4.0, save=vq.save_original)
    assert group.producers == ["bn"] and group.consumers == ["out"] and group.clip is None
    # ranges 4|gamma| = (4, 0.4): the narrow channel is scaled x10 up to the widest
    assert torch.allclose(group.scales, torch.tensor([1.0, 10.0]))
    assert torch.allclose(model.bn.weight, torch.tensor([1.0, 1.0]))
    assert torch.allclose(model.out.weight.flatten(), torch.tensor([1.0, 0.1]))
    assert torch.allclose(model(x), ref, atol=1e-5)
    vq.restore_model(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_stream_alpha_half_is_dfq_sqrt_balance():
    model = Stream()
    (group,) = equalize(model, alpha=0.5, k=4.0, save=vq.save_original)
    # equal consumer weights: f ~ 1/sqrt(a), widest channel kept -> (1, sqrt(10))
    assert torch.allclose(group.scales, torch.tensor([1.0, math.sqrt(10.0)]))


def test_residual_stream_groups_both_producers_and_consumers_and_is_exact():
    torch.manual_seed(0)
    model = Residual()
    groups = find_groups(model)
    assert [(g.producers, g.consumers, g.clip) for g in groups] == [(["bn_a", "bn_b"], ["c1", "c2"], None)]
    x = torch.randn(3, 3, 6, 6)
    ref = model(x)
    (group,) = equalize(model, alpha=0.5, save=vq.save_original)
    assert not torch.allclose(group.scales, torch.ones(4))
    assert torch.allclose(model.bn_a.weight, model.bn_b.weight)  # both producers scaled alike
    assert torch.allclose(model(x), ref, rtol=1e-5, atol=1e-5)
    vq.restore_model(model)
    assert torch.equal(model(x), ref)


def test_relu6_pair_scales_only_channels_below_the_clip():
    model = Clipped()
    (group,) = equalize(model, alpha=0.5, k=4.0, clip_k=8.0, save=vq.save_original)
    assert group.clip == (0.0, 6.0) and group.consumers == ["dw"]
    # channel 0: 3 + 8*1 > 6 -> untouched; channel 1: upper 4*0.25 = 1, safe 8*0.25 = 2 -> depthwise
    # consumer equalizes to the widest range 6 but the cap 6 / 2 = 3 binds; channel 2: upper 3,
    # safe 5 -> cap 6 / 5 = 1.2 binds before 6 / 3 = 2
    assert torch.allclose(group.scales, torch.tensor([1.0, 3.0, 1.2]))
    assert torch.allclose(model.bn.weight, torch.tensor([1.0, 0.75, 0.6]))


def test_bn_with_other_users_is_not_a_group():
    class Escapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.out = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.out(y) + torch.sigmoid(y)

    assert find_groups(Escapes().eval()) == []


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="alpha must lie in"):
        equalize(Stream(), alpha=1.5, save=vq.save_original)
    with pytest.raises(ValueError, match="k must be > 0"):
        equalize(Stream(), k=0, save=vq.save_original)


def _rand_bns(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 2.8 + 0.1)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
    return model.eval()


def _bn_act_net(act):
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    return _rand_bns(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=act), nn.Conv2d(8, 8, 3, groups=8),
                                   BatchNormAct2d(8, act_layer=act), nn.Conv2d(8, 4, 1)))


def test_a_batchnorm_act_that_does_not_commute_with_a_scale_is_skipped_and_said():
    pytest.importorskip("timm")
    model = _bn_act_net(nn.SiLU)
    x = torch.rand(2, 3, 12, 12)
    ref = model(x)
    with pytest.warns(UserWarning) as caught:
        groups = equalize(model, alpha=0.5, save=vq.save_original)
    assert [str(w.message) for w in caught] == [
        "equalize changed nothing in Sequential: every group was skipped: ['1'] -> ['2']: BatchNorm '1' "
        "(BatchNormAct2d) applies SiLU after normalizing; ['3'] -> ['4']: BatchNorm '3' (BatchNormAct2d) applies "
        "SiLU after normalizing"]
    assert [g.scales for g in groups] == [None, None]
    assert torch.equal(model(x), ref)


def test_a_batchnorm_act_leaky_relu_commutes_with_the_scale_and_is_equalized():
    """timm's CSP/DarkNet models: LeakyReLU(f x) = f LeakyReLU(x) for f > 0."""
    pytest.importorskip("timm")
    model = _bn_act_net(lambda: nn.LeakyReLU(0.1))
    x = torch.rand(2, 3, 12, 12)
    ref = model(x)
    groups = equalize(model, save=vq.save_original)
    assert [g.skipped for g in groups] == [None, None] and not torch.equal(groups[0].scales, torch.ones(8))
    assert torch.allclose(model(x), ref, rtol=1e-5, atol=1e-5)
    vq.restore_model(model)
    assert torch.equal(model(x), ref)


def test_a_skipped_group_is_noted_on_its_consumers_rows():
    pytest.importorskip("timm")
    model = _bn_act_net(nn.SiLU)
    with pytest.warns(UserWarning, match="every group was skipped"):
        report = vq.quantize_model(model, 8, None, equalize=True, bn_bias_correction=None)
    notes = {r.name: r.note for r in report.layers}
    assert notes["2"] == "not equalized: BatchNorm '1' (BatchNormAct2d) applies SiLU after normalizing"
    assert notes["4"] == "not equalized: BatchNorm '3' (BatchNormAct2d) applies SiLU after normalizing"
    assert "equalized" not in notes["0"]
    vq.restore_model(model)


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_a_batchnorm_act_relu_or_relu6_is_equalized_as_with_the_separate_module(act):
    pytest.importorskip("timm")
    model = _bn_act_net(act)
    torch.manual_seed(0)
    plain = _rand_bns(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act(), nn.Conv2d(8, 8, 3, groups=8),
                                    nn.BatchNorm2d(8), act(), nn.Conv2d(8, 4, 1)))
    x = torch.rand(2, 3, 12, 12)
    ref = model(x)
    assert torch.equal(plain(x), ref)
    groups, plain_groups = equalize(model, save=vq.save_original), equalize(plain, save=vq.save_original)
    assert [g.clip for g in groups] == [g.clip for g in plain_groups] == [(0.0, 6.0 if act is nn.ReLU6 else math.inf)] * 2
    for g, p in zip(groups, plain_groups):
        assert g.skipped is None and torch.equal(g.scales, p.scales) and not torch.equal(g.scales, torch.ones(8))
    assert torch.allclose(model(x), plain(x), rtol=1e-6, atol=1e-6)
    if act is nn.ReLU:  # commutes with the scale: the float output is kept
        assert torch.allclose(model(x), ref, rtol=1e-5, atol=1e-5)
    vq.restore_model(model)
    assert torch.equal(model(x), ref)


def test_timm_mobilenetv3_float_logits_survive_equalize():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _rand_bns(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10))
    x = torch.rand(2, 3, 64, 64)
    ref = model(x).detach()
    with pytest.warns(UserWarning, match=r"BatchNorm 'bn1' \(BatchNormAct2d\) applies Hardswish after normalizing"):
        groups = equalize(model, alpha=0.5, save=vq.save_original)
    assert any(g.scales is not None for g in groups)
    assert torch.allclose(model(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))  # was off by ~100


class _Reuse(nn.Module):
    """One conv called on two BatchNorm outputs."""

    def __init__(self):
        super().__init__()
        self.c0, self.bn1, self.bn2, self.shared = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        _rand_bns(self)

    def forward(self, x):
        h = self.c0(x)
        return self.shared(self.bn1(h)) + self.shared(self.bn2(h * 2))


class _BnTwice(nn.Module):
    """One BatchNorm called twice; only the first call feeds a layer."""

    def __init__(self):
        super().__init__()
        self.c0, self.bn, self.c1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        _rand_bns(self)

    def forward(self, x):
        h = self.c0(x)
        return self.c1(self.bn(h)) + self.bn(h * 3)


class _Tied(nn.Module):
    """The consumer's weight is also the weight of a layer outside the group."""

    def __init__(self):
        super().__init__()
        self.c0, self.bn, self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.c2.weight = self.c1.weight
        _rand_bns(self)

    def forward(self, x):
        h = self.c0(x)
        return self.c1(self.bn(h)) + self.c2(h)


@pytest.mark.parametrize("make, why", [
    (_Reuse, "every group was skipped: ['bn1'] -> ['shared']: 'shared' is called 2 times in one forward; "
             "['bn2'] -> ['shared']: 'shared' is called 2 times in one forward"),
    (_BnTwice, "every group was skipped: ['bn'] -> ['c1']: 'bn' is called 2 times in one forward"),
    (_Tied, "every group was skipped: ['bn'] -> ['c1']: 'c1.weight' shares memory with ['c2.weight']"),
])
def test_a_group_with_a_shared_module_or_tensor_is_skipped_naming_it(make, why):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 3, 4, 4)
    ref = model(x)
    with pytest.warns(UserWarning) as caught:
        equalize(model, alpha=0.5, save=vq.save_original)
    assert [str(w.message) for w in caught] == [f"equalize changed nothing in {make.__name__}: {why}"]
    assert torch.equal(model(x), ref)
    with pytest.warns(UserWarning, match="equalize changed nothing"):  # also through quantize_model
        vq.quantize_model(model, 8, None, equalize=True, bn_bias_correction=None)
    vq.restore_model(model)


def _two_pairs():
    torch.manual_seed(0)
    return _rand_bns(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                   nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)))


@pytest.mark.parametrize("recompute, by", [
    (lambda bn: torch.nn.utils.prune.l1_unstructured(bn, "weight", amount=0.25), "L1Unstructured"),
    (lambda bn: torch.nn.utils.parametrize.register_parametrization(bn, "weight", _Positive()), "a parametrization"),
])
def test_a_batchnorm_gamma_recomputed_on_access_is_not_equalized(recompute, by):
    import torch.nn.utils.parametrize  # noqa: F401
    import torch.nn.utils.prune  # noqa: F401

    model = _two_pairs()
    with torch.no_grad():
        recompute(model[1])
    x = torch.rand(4, 3, 12, 12)
    ref = model(x)
    with pytest.warns(UserWarning) as caught:
        groups = equalize(model, alpha=0.5, save=vq.save_original)
    assert [str(w.message) for w in caught] == [
        f"equalize skipped 1 of 2 group(s): ['1'] -> ['3']: '1.weight' is recomputed on access ({by})"]
    assert groups[0].scales is None and groups[1].scales is not None
    assert torch.allclose(model(x), ref, rtol=1e-5, atol=1e-5)  # the next forward recomputes gamma: still exact
    vq.restore_model(model)


class _Positive(nn.Module):
    def forward(self, w):
        return w.abs() + 0.05


def test_a_linear_reading_another_dimension_than_the_batchnorm_is_skipped():
    class BnLinear(nn.Module):  # BatchNorm2d(4) on [N, 4, H, 4]: the Linear contracts W, not the channels
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Linear(4, 2)
            _rand_bns(self)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)))

    model = BnLinear()
    x = torch.randn(2, 3, 5, 4)
    ref = model(x)
    with pytest.warns(UserWarning, match=r"\['bn'\] -> \['fc'\]: Linear 'fc' reads its input's last dimension, "
                                         r"BatchNorm\(s\) \['bn'\] scale dimension 1"):
        equalize(model, save=vq.save_original)
    assert torch.equal(model(x), ref)


@pytest.mark.parametrize("model, why", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)), "it has no affine BatchNorm"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sigmoid(), nn.Conv2d(4, 4, 3)),
     "no BatchNorm output feeds only quantizable layers (directly, through residual adds, or through one "
     "ReLU / ReLU6 / Hardtanh(0, H))"),
])
def test_finding_no_group_is_a_warning_saying_why(model, why):
    with pytest.warns(UserWarning) as caught:
        assert equalize(model.eval(), save=vq.save_original) == []
    assert [str(w.message) for w in caught] == [f"equalize changed nothing in Sequential: {why}"]


def test_a_batchnorm_subclass_with_a_forward_of_its_own_is_skipped():
    class Shifted(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) - 1.0  # a scale of gamma and beta no longer passes through

    torch.manual_seed(0)
    model = _rand_bns(nn.Sequential(nn.Conv2d(3, 4, 1), Shifted(4), nn.Conv2d(4, 2, 1)))
    x = torch.randn(2, 3, 5, 5)
    ref = model(x)
    with pytest.warns(UserWarning) as caught:
        equalize(model, save=vq.save_original)
    assert [str(w.message) for w in caught] == [
        "equalize changed nothing in Sequential: every group was skipped: ['1'] -> ['2']: BatchNorm '1' (Shifted) has "
        "a forward of its own"]
    assert torch.equal(model(x), ref)
