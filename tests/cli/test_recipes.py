"""Recipes through quantize_model: every step together restores the exact float model."""
import pytest
import torch
from torch import nn

import vquant_pl as vq
from helpers import REPO
from vquant_pl.cli.recipes import load_recipe


class Block(nn.Module):
    """stem conv -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> project -> BN (+ skip) -> head -> fc."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.project, self.bn2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head, self.bn3 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            for bn in (self.bn0, self.bn1, self.bn2, self.bn3):
                bn.weight.uniform_(0.2, 2.0)
                bn.bias.uniform_(-0.5, 1.0)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        a = self.act(self.bn0(self.stem(x)))
        s = self.bn2(self.project(self.act(self.bn1(self.dw(a))))) + self.bn0(self.stem(x))
        return self.fc(self.act(self.bn3(self.head(s))).mean((2, 3)))


def test_all_steps_change_the_model_and_restore_exactly():
    torch.manual_seed(0)
    net = Block().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    report = vq.quantize_model(net, 4, 4, act_range="bn-mse", equalize=True, weight_clip=True,
                               bn_bias_correction="all")
    assert vq.is_quantized(net)
    assert any("bias corrected (all)" in r.note for r in report.layers)
    assert not torch.allclose(net(x), ref)
    with pytest.raises(RuntimeError, match="already quantized"):
        vq.quantize_model(net, 4, 4, act_range="bn")
    copy = __import__("copy").deepcopy(net)
    vq.restore_model(net)
    assert not vq.is_quantized(net)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert torch.equal(net(x), ref)
    vq.restore_model(copy)  # a deep copy of the recipe-quantized model restores as well
    assert all(torch.equal(v, before[k]) for k, v in copy.state_dict().items())


def test_failure_leaves_the_model_as_it_was(monkeypatch):
    torch.manual_seed(0)
    net = Block().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="act_bits"):
        vq.quantize_model(net, 4, 99, act_range="bn", equalize=True)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="unknown bn_bias_correction 'yes'"):
        vq.quantize_model(net, 4, 4, bn_bias_correction="yes")

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr("vquant_pl.quantize._fix_ranges", boom)  # fails after the transforms and the weights
    with pytest.raises(RuntimeError, match="boom"):
        vq.quantize_model(net, 4, 4, equalize=True, weight_clip=True)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and not vq.is_quantized(net)


def test_named_and_yaml_recipes():
    assert load_recipe("vquant") == {"act_range": "bn", "bn_bias_correction": "weights"}
    defaults = vq.QuantConfig()  # the vquant recipe is the default
    assert all(getattr(defaults, k) == v for k, v in load_recipe("vquant").items())
    assert load_recipe(str(REPO / "configs" / "recipes" / "vquant.yaml")) == load_recipe("vquant")
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_recipes_are_the_shipped_yaml_files_written_once(tmp_path):
    from vquant_pl.cli.recipes import recipe_names, recipes_dir

    assert {"vquant", "squant", "bn"} <= set(recipe_names())
    assert recipe_names() == sorted(p.stem for p in (REPO / "configs" / "recipes").glob("*.yaml"))
    assert recipes_dir().resolve() == (REPO / "configs" / "recipes").resolve()
    assert load_recipe("squant") == {"act_range": "sigma", "bn_bias_correction": None}  # the paper's rules
    source = (REPO / "vquant_pl" / "cli" / "recipes.py").read_text()
    assert '"act_range": "bn"' not in source and '"sigma"' not in source  # no second copy of a recipe
    assert "sigma" not in (REPO / "vquant_pl" / "cli" / "paper.py").read_text().lower()  # sigma: vquant_pl.config
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant:\n  act_range: bn\n  stages: [test, predict]\n  verbose: false\n")
    with pytest.raises(ValueError, match=r"recipe .*bad.yaml: stages not quantization setting"):
        load_recipe(str(bad))


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cached_sample_and_golden_file_are_loaded_weights_only(tmp_path, monkeypatch):
    from vquant_pl.cli import selftest
    from vquant_pl.cli.recipes import sample_tensors
    from vquant_pl.models import UnsafeFile

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    torch.save({"images": torch.zeros(1), "labels": torch.zeros(1), "x": _Payload(marker)}, tmp_path / "lite0_sample.pt")
    with pytest.raises(UnsafeFile, match="cached sample .*lite0_sample.pt holds objects other than tensors"):
        sample_tensors("lite0", cache_dir=tmp_path)
    torch.save({"weights": [], "x": _Payload(marker)}, tmp_path / "golden.pt")
    with pytest.raises(UnsafeFile, match="golden file .*golden.pt holds objects other than tensors"):
        selftest.check({}, str(tmp_path / "golden.pt"))
    assert not marker.exists()
