"""BN-derived activation ranges minimizing the expected quantization error (vquant_pl.methods.bn_mse)."""
import pytest
import torch
from torch import nn

from vquant_pl.methods.bn_mse import bn_mse_method_range, bn_mse_range, consumer_weight, expected_error
from vquant_pl.methods.bn_graph import ChannelStats


def test_standard_normal_4_bits_clips_near_the_known_optimum():
    # the MSE-optimal clip of a uniform 4-bit quantizer for N(0, 1) is about 2.5 sigma
    lo, hi, signed = bn_mse_range(ChannelStats(torch.zeros(8), torch.ones(8)), 4, samples=2048, grid=128)
    assert signed
    assert 2.2 < hi < 2.9 and -2.9 < lo < -2.2


def test_more_bits_clip_wider():
    s = ChannelStats(torch.zeros(8), torch.ones(8))
    his = [bn_mse_range(s, b, samples=2048, grid=128)[1] for b in (4, 6, 8)]
    assert his[0] < his[1] < his[2]


def test_relu_input_is_unsigned_and_at_most_the_relu6_clip():
    s = ChannelStats(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 3.0]), lo=0.0, hi=6.0)
    lo, hi, signed = bn_mse_range(s, 4)
    assert (lo, signed) == (0.0, False)
    assert 0 < hi <= 6.0


def test_deterministic_and_weights_steer_the_range():
    s = ChannelStats(torch.zeros(2), torch.tensor([1.0, 10.0]))
    narrow = bn_mse_range(s, 4, channel_weight=torch.tensor([1.0, 1e-6]), grid=256)
    wide = bn_mse_range(s, 4, channel_weight=torch.tensor([1e-6, 1.0]), grid=256)
    assert narrow == bn_mse_range(s, 4, channel_weight=torch.tensor([1.0, 1e-6]), grid=256)
    assert narrow[1] < 5 and wide[1] > 15  # optimum about 2.5 std of the weighted channel


def test_expected_error_matches_the_activation_quantizer():
    from vquant_pl.ops.affine import ActivationQuantizer

    x = torch.randn(3, 100)
    q = ActivationQuantizer(4, -1.5, 2.0, True)
    assert expected_error(x, 4, -1.5, 2.0, True) == pytest.approx(float((q.reference(x) - x).pow(2).mean()), rel=1e-5)


def test_method_adapter_weights_by_the_consumer():
    conv = nn.Conv2d(4, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    assert torch.equal(consumer_weight(conv, 4), torch.full((4,), 18.0))
    assert consumer_weight(conv, 5) is None
    s = ChannelStats(torch.zeros(4), torch.ones(4))
    assert bn_mse_method_range(s, 4, None, conv) == bn_mse_range(s, 4, torch.full((4,), 18.0))


def test_wrong_weight_length_is_named():
    with pytest.raises(ValueError, match="3 channel weights for 2 channels"):
        bn_mse_range(ChannelStats(torch.zeros(2), torch.ones(2)), 4, channel_weight=torch.ones(3))
