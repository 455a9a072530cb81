"""Per-channel MSE-optimal weight clipping (vquant_pl.methods.weight_clip)."""
import pytest
import torch
from torch import nn

import vquant_pl as vq

from vquant_pl.methods.weight_clip import clip_ratios, clip_weights


def test_gaussian_channel_is_clipped_to_about_two_std():
    torch.manual_seed(0)
    w = torch.randn(1, 2000)
    r = clip_ratios(w, 3, grid=61, min_ratio=0.4)
    # 3-bit MSE optimum of a normal is about 2 std, against a max of about 3.5 std
    assert 0.45 < float(r[0]) < 0.8


def test_weighted_error_keeps_the_weights_that_matter():
    torch.manual_seed(0)
    w = torch.cat([torch.randn(1, 500), torch.tensor([[8.0]])], 1)
    heavy = torch.cat([torch.full((500,), 1e-6), torch.tensor([1e3])])  # the outlier's input dominates
    assert float(clip_ratios(w, 3, heavy, grid=61)[0]) > 0.95
    assert float(clip_ratios(w, 3, None, grid=61)[0]) < 0.6


def test_clip_weights_clamps_in_place_and_restores_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(5, 2))
    before = [p.clone() for p in net.parameters()]
    ratios = clip_weights(net, 3, weighted=False, save=vq.save_original)
    w = net[0].weight.reshape(4, -1)
    b = before[0].reshape(4, -1)
    assert torch.allclose(w.amax(1), b.amax(1) * ratios["0"])
    assert torch.allclose(w.amin(1), b.amin(1) * ratios["0"])
    vq.restore_model(net)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_bad_ratio_is_named():
    with pytest.raises(ValueError, match="min_ratio must lie in"):
        clip_weights(nn.Linear(2, 2), 4, min_ratio=0.0, save=vq.save_original)
