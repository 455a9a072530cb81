"""Analytic bias correction from BatchNorm statistics (vquant_pl.methods.bn_bias_correction)."""
import pytest
import torch
from torch import nn

import vquant_pl as vq

from vquant_pl.ops.affine import ActivationQuantizer
from vquant_pl.methods.bn_bias_correction import correct_bias, expected_shift


class Net(nn.Module):
    """BN (mean beta, std |gamma|) -> ReLU -> 1x1 conv with bias -> BN -> 1x1 conv without bias -> BN."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(2)
        self.act = nn.ReLU()
        self.fc = nn.Conv2d(2, 1, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(1)
        self.out = nn.Conv2d(1, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1)
        with torch.no_grad():
            self.bn0.weight.copy_(torch.tensor([1e-4, 1e-4]))  # nearly constant inputs: means 2.0 and 0.1
            self.bn0.bias.copy_(torch.tensor([2.0, 0.1]))
            self.fc.weight.copy_(torch.tensor([1.0, 3.0]).view(1, 2, 1, 1))
            self.fc.bias.fill_(0.5)
            self.bn1.weight.fill_(1e-4)
            self.bn1.bias.fill_(1.0)
            self.out.weight.fill_(2.0)
        self.eval()

    def forward(self, x):
        return self.bn2(self.out(self.bn1(self.fc(self.act(self.bn0(x))))))


def test_expected_shift_is_weight_error_times_input_mean():
    conv = nn.Conv2d(2, 1, 3)
    wf = torch.zeros(1, 2, 3, 3)
    wq = wf.clone()
    wq[0, 0, 0, 0] = 0.5
    shift = expected_shift(conv, wf, wq, torch.tensor([2.0, 7.0]), torch.tensor([2.0, 7.0]))
    assert torch.allclose(shift, torch.tensor([1.0]))


def test_weight_and_activation_shifts_are_removed_and_restored_exactly():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    floats = {"fc": net.fc.weight.clone(), "out": net.out.weight.clone()}
    with torch.no_grad():
        net.fc.weight.copy_(torch.tensor([1.25, 3.0]).view(1, 2, 1, 1))  # weight error 0.25 on the mean-2 input
        net.out.weight.fill_(2.5)  # error 0.5 on an input of mean 1
    # step 0.4 on [0, 6]: channel 1 (about 0.1) reads as 0, channel 0 (about 2.0) as 2.0
    q = ActivationQuantizer(4, 0.0, 6.0, False)
    done = correct_bias(net, floats, {"fc": q}, save=vq.save_original)
    # fc: 0.25 * 2 (weights) + 3 * (0 - 0.1) (activations) = 0.2, taken off its bias
    assert torch.allclose(done["fc"], torch.tensor([0.2]), atol=1e-3)
    assert torch.allclose(net.fc.bias, torch.tensor([0.3]), atol=1e-3)
    # out has no bias: 0.5 * 1 goes into the running mean of the BatchNorm after it
    assert torch.allclose(done["out"], torch.tensor([0.5]), atol=1e-3)
    assert torch.allclose(net.bn2.running_mean, torch.tensor([0.5]), atol=1e-3)
    vq.restore_model(net)
    net.fc.weight.data.copy_(floats["fc"])
    net.out.weight.data.copy_(floats["out"])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_weights_only_ignores_the_input_quantizer():
    net = Net()
    floats = {"fc": net.fc.weight.clone()}
    done = correct_bias(net, floats, {"fc": ActivationQuantizer(4, 0.0, 6.0, False)}, activations=False,
                        save=vq.save_original)
    assert torch.allclose(done["fc"], torch.tensor([0.0]), atol=1e-6)  # weights unchanged: nothing to correct


def test_after_quantize_model_restore_model_undoes_the_correction():

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn0.weight.fill_(1.0)
        net.bn1.weight.fill_(1.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    floats = {n: layer.weight.detach().clone() for n, layer in vq.quantizable_layers(net)}
    vq.quantize_model(net, 3, 4, act_range="bn")
    done = correct_bias(net, floats, {})  # default save: vquant_pl.state.save_original
    assert set(done) == {"fc", "out"}
    assert not torch.equal(net.fc.bias, before["fc.bias"])
    vq.restore_model(net)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


class SharedBn(nn.Module):
    """Two bias-free convs normalized by one BatchNorm module (called twice)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn, self.head = nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            for bn in (self.bn0, self.bn):
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(0.5, 1.5)
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
        self.eval()

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        return self.head(torch.relu(self.bn(self.a(h))) + torch.relu(self.bn(self.b(h))))


def test_a_batchnorm_shared_by_two_layers_gets_no_correction_and_says_so():
    torch.manual_seed(0)
    net = SharedBn()
    mean = net.bn.running_mean.clone()
    floats = {n: layer.weight.detach().clone() for n, layer in vq.quantizable_layers(net)}
    with torch.no_grad():
        net.a.weight.add_(0.01)
        net.b.weight.sub_(0.02)
    why = ("no bias, and its BatchNorm 'bn' is called 2 times in one forward (a running_mean shift would reach "
           "every call)")
    with pytest.warns(UserWarning) as caught:
        done = correct_bias(net, floats, {}, save=vq.save_original)
    assert [str(w.message) for w in caught] == [f"bias correction skipped layer(s) 'a': {why}; 'b': {why}"]
    assert set(done) == {"head"} and done.skipped == {"a": why, "b": why}
    assert torch.equal(net.bn.running_mean, mean)
    vq.restore_model(net)
    with torch.no_grad():
        net.a.weight.copy_(floats["a"])
        net.b.weight.copy_(floats["b"])
    with pytest.warns(UserWarning, match="bias correction skipped layer"):
        report = vq.quantize_model(net, 4, None, bn_bias_correction="weights")
    assert torch.equal(net.bn.running_mean, mean)
    assert {r.name: "bias corrected (weights)" in r.note for r in report.layers} == {
        "stem": False, "a": False, "b": False, "head": True}
    notes = {r.name: r.note for r in report.layers}
    assert f"not bias corrected: {why}" in notes["a"] and f"not bias corrected: {why}" in notes["b"]
    vq.restore_model(net)
