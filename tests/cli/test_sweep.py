"""The sweep's rows: float references keyed on the whole float model, the float pass float,
one row under DDP, unique run folders, `diff` only against labels, a quiet console."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vquant_pl as vq
from vquant_pl.cli.sweep import main as sweep, markdown, run_names, table_paths

from helpers import REPO, SAMPLE, small_cli_config

SCORES = ("top1", "top5", "kl", "cosine", "samples", "skipped", "scored_by")


def _config(path: Path, checkpoint: Path, limit: int = 4, extra: str = "") -> Path:
    return small_cli_config(path, limit=limit, batch_size=4, checkpoint=checkpoint, extra=extra)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    if not SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample not found at {SAMPLE}")
    folder = tmp_path_factory.mktemp("ckpt")
    paths = []
    for seed in (1, 2):  # two different float models of one architecture
        torch.manual_seed(seed)
        model, _ = vq.create_model("pytorchcv:resnet10", pretrained=False)
        torch.save(model.state_dict(), folder / f"seed{seed}.pth")
        paths.append(folder / f"seed{seed}.pth")
    return paths


def test_float_reference_is_the_run_own_float_model_and_runs_float(tmp_path, checkpoints):
    a, b = checkpoints
    # first: quant.stages with predict (the float pass must still run float); then another
    # checkpoint of the same model (its own float reference, not the first one's)
    configs = [_config(tmp_path / "a_predict.yaml", a, extra="  stages: [test, predict]\n"),
               _config(tmp_path / "b.yaml", b), _config(tmp_path / "a.yaml", a)]
    rows = sweep([*map(str, configs), "--out", str(tmp_path / "out"), "--against-float"])
    assert [r["status"] for r in rows] == ["ok"] * 3
    predict, other, plain = rows
    assert predict["kl"] > 0 and predict["cosine"] < 1  # not quantized against itself
    assert {k: predict[k] for k in SCORES} == {k: plain[k] for k in SCORES}
    assert other["cosine"] > 0.9 and other["kl"] < 1  # against its own float logits, not a's


def test_ddp_scores_every_image_once_in_one_row_written_by_rank_zero(tmp_path, checkpoints):
    config = _config(tmp_path / "c.yaml", checkpoints[0], limit=5)  # 5 images: shards of 3 and 2
    single = sweep([str(config), "--out", str(tmp_path / "single"), "--against-float"])[0]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "vquant_pl.cli", "sweep", str(config), "--out", str(tmp_path / "ddp"),
                          "--against-float", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("[1/1] c: agreement") == 1, run.stdout  # rank 0 alone prints
    with open(tmp_path / "ddp" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 1 and table[0]["samples"] == "5"
    assert {k: table[0][k] for k in SCORES} == {k: str(single[k]) for k in SCORES}
    assert "Seed set to" not in run.stdout + run.stderr and "Tip:" not in run.stdout + run.stderr


def test_run_names_are_unique_and_never_reuse_a_folder(tmp_path):
    assert run_names([Path("c/b_x.yaml"), Path("a/x.yaml"), Path("b/x.yaml")]) == ["b_x", "x", "x_2"]
    assert run_names([Path("a/x.yaml"), Path("b/x.yaml")]) == ["x", "b_x"]
    (tmp_path / "x").mkdir()  # an earlier sweep's run
    assert run_names([Path("a/x.yaml"), Path("x.yaml")], tmp_path) == ["a_x", "x_2"]


def test_sweep_run_folders_do_not_overwrite_each_other(tmp_path):
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
    configs = [tmp_path / "c" / "b_x.yaml", tmp_path / "a" / "x.yaml", tmp_path / "b" / "x.yaml"]
    for i, path in enumerate(configs):  # broken on purpose: each fails fast, after its folder is named
        path.write_text(f"model:\n  model: timm:nope{i}\n")
    rows = sweep([*map(str, configs), "--out", str(tmp_path / "out")])
    assert [r["config"] for r in rows] == ["b_x", "x", "x_2"]
    assert [r["status"].split("'")[1] for r in rows] == ["nope0", "nope1", "nope2"]


def test_a_reused_out_keeps_the_earlier_table(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {name: f"earlier {name}\n" for name in ("results.md", "results.csv", "accuracy.png")}
    for name, text in earlier.items():
        (out / name).write_text(text)
    broken = tmp_path / "x.yaml"
    broken.write_text("model:\n  model: timm:nope\n")  # fails fast: a row without any quantization
    rows = sweep([str(broken), "--out", str(out)])
    printed = capsys.readouterr().out
    assert {name: (out / name).read_text() for name in earlier} == earlier
    assert printed.index("results_1.md, results_1.csv, accuracy_1.png") < printed.index("[1/1] x: running")
    assert len(rows) == 1 and "| x |" in (out / "results_1.md").read_text()
    assert str(out / "results_1.csv") in printed  # the final "wrote ..." line
    assert table_paths(out)[2].name == "accuracy_2.png"  # the next sweep's


def test_table_paths_are_numbered_together(tmp_path):
    assert [p.name for p in table_paths(tmp_path)] == ["results.md", "results.csv", "accuracy.png"]
    (tmp_path / "accuracy.png").write_text("a figure of yours")
    assert [p.name for p in table_paths(tmp_path)] == ["results_1.md", "results_1.csv", "accuracy_1.png"]


def test_diff_only_for_rows_scored_by_labels(tmp_path, checkpoints, monkeypatch):
    import vquant_pl.cli.sweep as sweep_module

    # as if the paper had this model and setting
    monkeypatch.setattr(sweep_module, "paper_comparison", lambda *args, **kwargs: (50.0, None))
    config = _config(tmp_path / "d.yaml", checkpoints[0])
    agreement = sweep([str(config), "--out", str(tmp_path / "o1"), "--against-float"])[0]
    labels = sweep([str(config), "--out", str(tmp_path / "o2")])[0]
    assert agreement["paper_top1"] == 50.0 and agreement["diff"] is None
    assert labels["scored_by"] == "labels" and labels["diff"] == round(labels["top1"] - 50.0, 2)


def test_agreement_rows_say_agreement_not_top1(tmp_path, capsys, checkpoints):
    config = _config(tmp_path / "e.yaml", checkpoints[0])
    row = sweep([str(config), "--out", str(tmp_path / "o"), "--against-float"])[0]
    printed = capsys.readouterr()
    line = next(ln for ln in printed.out.splitlines() if ln.startswith("[1/1] e: ") and "running" not in ln)
    assert line.startswith(f"[1/1] e: agreement {row['top1']}  top-5 agreement {row['top5']}") and "top-1" not in line
    assert f"| {row['top1']} agreement | {row['top5']} agreement |" in markdown([row])
    console = printed.out + printed.err
    assert "Tip:" not in console and "Seed set to" not in console and "deprecated" not in console


def test_onnx_column_scores_the_exported_model_on_the_same_images(tmp_path, checkpoints):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    pytest.importorskip("onnxscript", reason="the export extra is not installed")
    import onnx

    a = checkpoints[0]
    fp = _config(tmp_path / "fp.yaml", a)
    fp.write_text(fp.read_text().replace("weight_bits: 8", "weight_bits: null"))
    # q: exported; fp: a float run; bc: ACIQ's bias correction moves weights off their grid, no codes to export
    configs = [_config(tmp_path / "q.yaml", a), fp, _config(tmp_path / "bc.yaml", a, extra="  bias_correction: true\n")]
    out = tmp_path / "out"
    rows = sweep([*map(str, configs), "--out", str(out), "--onnx"])
    assert [r["status"] for r in rows] == ["ok"] * 3
    q, fp, bc = rows
    # the exported file, in onnxruntime, on the same 4 labelled images, each once
    assert q["scored_by"] == "labels" and q["onnx_samples"] == q["samples"] == 4
    assert (q["onnx_top1"], q["onnx_top5"]) == (q["top1"], q["top5"])
    onnx.checker.check_model(str(out / "q" / "model.onnx"))
    assert fp["bits"] == "FP32" and fp["onnx_top1"] == "float run: nothing quantized to export"
    assert bc["top1"] is not None and bc["onnx_top1"].startswith("not exported: ValueError: bias_correction=True")
    assert not (out / "bc" / "model.onnx").exists() and not (out / "fp" / "model.onnx").exists()
    table = (out / "results.md").read_text()
    assert "| top-5 | onnxruntime top-1 | onnxruntime top-5 | KL |" in table
    assert f"| {q['top5']} | {q['onnx_top1']} | {q['onnx_top5']} |" in table
    assert "| float run: nothing quantized to export | - |" in table
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["onnx_top1"] == str(q["onnx_top1"]) and table[2]["onnx_top1"] == bc["onnx_top1"]


def test_onnx_without_the_extra_names_it_before_any_run(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    with pytest.raises(SystemExit) as exit_info:
        sweep(["quickstart/w8a8", "--out", str(tmp_path / "out"), "--onnx"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--onnx: ONNX export needs onnxruntime" in err and "vquant-pl[export]" in err
    assert not (tmp_path / "out").exists()


def test_markdown_has_no_onnx_columns_without_onnx():
    assert "onnxruntime" not in markdown([{"config": "x", "top1": 1.0, "status": "ok"}])


def test_a_mixed_precision_row_says_so_and_is_not_compared_with_the_paper(tmp_path, checkpoints, monkeypatch):
    """A mixed run was labelled as uniform W8A8 and given the paper's uniform top-1 and diff."""
    import vquant_pl.cli.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "paper_comparison", lambda *args, **kwargs: (50.0, None))
    config = _config(tmp_path / "m.yaml", checkpoints[0], extra="  mixed_precision: weights\n  mixed_min_bits: 6\n")
    row = sweep([str(config), "--out", str(tmp_path / "o")])[0]
    assert row["bits"] == "W8A8 (average)" and row["method"].endswith("+mixed(weights)")
    assert row["paper_top1"] is None and row["diff"] is None


# -- the paper's top-1 only beside the paper's experiment ----------------------------------
def _paper_settings(**changes) -> dict:
    from vquant_pl.callbacks import VQuantCallback

    quant = dict(weight_bits=4, act_bits=4, rounding="squant", act_range="sigma", bn_bias_correction=None) | changes
    return VQuantCallback(**quant, verbose=False).settings


def test_paper_comparison_needs_the_whole_setting_of_the_paper_row():
    from vquant_pl.cli.paper import paper_comparison

    spec = "pytorchcv:resnet18"
    assert paper_comparison(spec, _paper_settings()) == (66.14, None)
    assert paper_comparison(spec, _paper_settings(sigma=12.0, backend="torch"), precision="32-true",
                            data={"root": "/data", "limit": 50, "batch_size": 8}) == (66.14, None)  # the same run
    assert paper_comparison(spec, _paper_settings(weight_bits=None)) == (71.47, None)  # the float row
    top1, why = paper_comparison(spec, _paper_settings(act_range="bn", bn_bias_correction="all"), pretrained=False)
    assert top1 is None
    assert why == "pretrained false (paper: true), act_range bn (paper: sigma), bn_bias_correction all (paper: null)"
    for changes, kwargs, reason in [
        ({}, {"checkpoint": "ft.pth"}, "checkpoint ft.pth (paper: null)"),
        ({}, {"target": "model.features"}, "target model.features (paper: null)"),
        ({}, {"data": {"crop_pct": 1.0}}, "data.crop_pct 1.0 (paper: null)"),
        ({}, {"precision": "bf16-mixed"}, "trainer.precision bf16-mixed (paper: 32-true)"),
        ({"weight_bits": None}, {"checkpoint": "ft.pth"}, "checkpoint ft.pth (paper: null)"),
        ({"probe_shape": (2, 3, 224, 224)}, {}, "probe_shape [2, 3, 224, 224] (paper: null)"),
        ({"bias_correction": True}, {}, "bias_correction true (paper: false)"),
        ({"mixed_precision": "weights"}, {}, "mixed_precision weights (paper: null)"),
    ]:
        assert paper_comparison(spec, _paper_settings(**changes), **kwargs) == (None, reason)
    # no such row in the paper: nothing to say
    assert paper_comparison(spec, _paper_settings(act_bits=8)) == (None, None)
    assert paper_comparison("pytorchcv:shufflenet_g1_w1", _paper_settings()) == (None, None)
    assert paper_comparison("timm:resnet18", _paper_settings()) == (None, None)


def test_a_run_other_than_the_paper_row_gets_no_paper_top1(tmp_path):
    """`paper/resnet18_w4a4 --model.pretrained false --quant.act_range bn ...` showed the
    paper's 66.14 and a diff of -66.14 beside another experiment."""
    if not SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample not found at {SAMPLE}")
    out = tmp_path / "out"
    row = sweep(["paper/resnet18_w4a4", "--out", str(out), "--model.pretrained", "false", "--quant.act_range", "bn",
                 "--quant.bn_bias_correction", "all", "--data.root", str(SAMPLE), "--data.limit", "2",
                 "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--quant.verbose", "false",
                 "--trainer.enable_progress_bar", "false"])[0]
    assert row["status"] == "ok" and row["scored_by"] == "labels"
    assert row["paper_top1"] is None and row["diff"] is None
    table = (out / "results.md").read_text()
    assert "| W4A4 | squant/bn+bn-bias-corr(all) |" in table and "66.14" not in table
    cells = [c.strip() for c in table.splitlines()[2].split("|")]
    assert cells[table.splitlines()[0].split("|").index(" paper top-1 ")] == "-"
    assert ("- resnet18_w4a4: pretrained false (paper: true), act_range bn (paper: sigma), bn_bias_correction all "
            "(paper: null)") in table
    with open(out / "results.csv") as f:
        assert next(csv.DictReader(f))["paper_top1"] == ""


# -- every config checked before any run; a parser's exit is a failed row --------------------
def test_every_bad_config_is_named_before_any_run(tmp_path, capsys):
    good = small_cli_config(tmp_path / "good.yaml")
    typo = small_cli_config(tmp_path / "typo.yaml", extra="  weight_bitz: 8\n")
    choice = small_cli_config(tmp_path / "choice.yaml", extra="  act_range: nosuch\n")
    rule = small_cli_config(tmp_path / "rule.yaml", extra="  act_range: sigma\n  bn_k: 3.0\n")
    data = small_cli_config(tmp_path / "data.yaml").read_text().replace("limit: 4", "limit: 0")
    (tmp_path / "data.yaml").write_text(data)
    missing = small_cli_config(tmp_path / "missing.yaml", checkpoint=tmp_path / "nowhere.pth")
    configs = [good, typo, choice, good, rule, tmp_path / "data.yaml", missing]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        sweep([*map(str, configs), "--out", str(out)])
    printed = capsys.readouterr()
    assert exit_info.value.code == 2 and "running" not in printed.out and not out.exists()
    err = " ".join(printed.err.split())
    assert "5 of 7 config(s) refused, nothing was run" in err
    assert f"{typo}: Group 'quant' does not accept option 'weight_bitz'" in err
    assert f"{choice}: Parser key \"quant.act_range\"" in err and "Got value: nosuch" in err
    assert f"{rule}: quant: ValueError: bn_k=3.0 would be ignored" in err
    assert f"{tmp_path / 'data.yaml'}: data: ValueError: limit must be >= 1, got 0" in err
    assert f"{missing}: model: checkpoint {tmp_path / 'nowhere.pth'} is not a file" in err
    assert f"{good}:" not in err
    with pytest.raises(SystemExit):  # an override is checked with every config
        sweep([str(good), "--out", str(out), "--quant.act_bitz", "4"])
    assert "1 of 1 config(s) refused" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("fail_fast", [False, True])
def test_a_parser_exit_during_a_run_is_a_failed_row(tmp_path, monkeypatch, fail_fast):
    import sys as _sys

    import vquant_pl.cli.app as app

    real = app.make_cli
    exits = tmp_path / "exits.yaml"

    def make_cli(args=None, run=True, save_config=True, parse_only=False):
        if str(exits) in (args or []):  # as jsonargparse refuses: usage on stderr, then exit 2
            print("usage: vquant ...\nerror: Parser key \"model.model\": changed since the check", file=_sys.stderr)
            raise SystemExit(2)
        return real(args, run=run, save_config=save_config, parse_only=parse_only)

    monkeypatch.setattr(app, "make_cli", make_cli)
    exits.write_text("model:\n  model: timm:nope0\n")
    later = tmp_path / "later.yaml"
    later.write_text("model:\n  model: timm:nope1\n")
    rows = sweep([str(exits), str(later), "--out", str(tmp_path / "out")] + ["--fail-fast"] * fail_fast)
    assert rows[0]["config"] == "exits"
    assert rows[0]["status"] == 'failed: ConfigRefused: Parser key "model.model": changed since the check'
    assert len(rows) == (1 if fail_fast else 2)
    if not fail_fast:
        assert rows[1]["status"].startswith("failed: ValueError") and "nope1" in rows[1]["status"]
    assert "| exits |" in (tmp_path / "out" / "results.md").read_text()


# -- globs --------------------------------------------------------------------------------------
def test_a_glob_without_yaml_is_an_error_naming_where_it_looked(tmp_path, monkeypatch, capsys):
    from vquant_pl.cli.app import configs_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("not a config\n")
    with pytest.raises(SystemExit) as exit_info:
        sweep(["notes/*", "--out", str(tmp_path / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "no config matches notes/*" in err
    assert str(tmp_path) in err and "notes/notes.txt" in err and str(configs_dir()) in err and "notes/*.yaml" in err
    assert not (tmp_path / "out").exists()


def test_a_local_folder_without_yaml_does_not_hide_the_shipped_configs(tmp_path, monkeypatch):
    import argparse

    from vquant_pl.cli.app import configs_dir
    from vquant_pl.cli.sweep import _configs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "quickstart" / "notes.txt").write_text("not a config\n")
    found = _configs(["quickstart/*"], argparse.ArgumentParser())
    assert found == sorted((configs_dir() / "quickstart").glob("*.yaml")) and len(found) == 3
    (tmp_path / "quickstart" / "mine.yaml").write_text("model:\n  model: timm:x\n")
    assert _configs(["quickstart/*"], argparse.ArgumentParser()) == [Path("quickstart/mine.yaml")]


# -- the figure: one line per model, method and activation bits; one axis per kind of score -----
def _row(bits: str, top1: float, scored_by: str = "labels", model: str = "m", method: str = "squant/sigma",
         config: str = "") -> dict:
    wb = None if bits == "FP32" else int(bits[1:].split("A")[0])
    act = None if wb is None else bits.split("A")[1]
    return {"config": config or bits, "model": model, "method": "float" if wb is None else method, "bits": bits,
            "top1": top1, "_weight_bits": wb, "_act_bits": int(act) if act and act.isdigit() else None,
            "scored_by": scored_by, "status": "ok"}


def test_sweep_figure_keeps_activation_bits_and_scores_apart():
    from vquant_pl.plots import sweep_figure

    rows = [_row("W4A4", 60.0), _row("W8A8", 69.0), _row("W4A8", 65.0), _row("W6A8", 67.0), _row("FP32", 70.0)]
    (ax,) = sweep_figure(rows).axes
    lines = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.get_lines()}
    # x positions: W4 0, W6 1, W8 2, FP32 3
    assert lines == {"m squant/sigma WxAx": [(0, 60.0), (2, 69.0), (3, 70.0)],
                     "m squant/sigma A8": [(0, 65.0), (1, 67.0), (3, 70.0)], "m FP32": [(3, 70.0)]}
    assert ax.get_ylabel() == "top-1 (%)"
    # one row scored against the float model: its own axis, not a relabelled top-1 axis
    fig = sweep_figure(rows + [_row("W4A4", 95.0, "float agreement", model="n"),
                               _row("FP32", 100.0, "float agreement", model="n")])
    labels_ax, agreement_ax = fig.axes
    assert labels_ax.get_ylabel() == "top-1 (%)" and agreement_ax.get_ylabel() == "top-1 agreement with float (%)"
    assert {line.get_label() for line in agreement_ax.get_lines()} == {"n squant/sigma WxAx", "n FP32"}
    assert "n FP32" not in {line.get_label() for line in labels_ax.get_lines()}
    # two rows of one line at the same bits (two checkpoints): separate lines, named by config
    (ax,) = sweep_figure([_row("W4A4", 60.0, config="a"), _row("W4A4", 50.0, config="b")]).axes
    assert sorted(line.get_label() for line in ax.get_lines()) == ["m squant/sigma WxAx (a)", "m squant/sigma WxAx (b)"]


# -- selftest: the number of timed runs is checked first ------------------------------------
def test_selftest_refuses_zero_runs_before_any_check(monkeypatch, capsys):
    import vquant_pl.cli.selftest as selftest

    def no_work(*args, **kwargs):
        raise AssertionError("a check ran before --runs was checked")

    monkeypatch.setattr(selftest, "backends_present", no_work)
    for runs in ("0", "-2"):
        with pytest.raises(SystemExit) as exit_info:
            selftest.main(["--runs", runs])
        assert exit_info.value.code == 2 and f"--runs must be at least 1, got {runs}" in capsys.readouterr().err
