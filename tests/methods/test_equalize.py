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
