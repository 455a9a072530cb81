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

    monkeypatch.setattr(sweep_module, "paper_top1", lambda *args: 50.0)  # as if the paper had this model
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

    monkeypatch.setattr(sweep_module, "paper_top1", lambda *args: 50.0)
    config = _config(tmp_path / "m.yaml", checkpoints[0], extra="  mixed_precision: weights\n  mixed_min_bits: 6\n")
    row = sweep([str(config), "--out", str(tmp_path / "o")])[0]
    assert row["bits"] == "W8A8 (average)" and row["method"].endswith("+mixed(weights)")
    assert row["paper_top1"] is None and row["diff"] is None
