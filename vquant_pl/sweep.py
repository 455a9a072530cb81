"""`vquant sweep`: run a list of configs, write one results table (Markdown, CSV) and a plot.

    vquant sweep configs/resnet18_*.yaml --out runs/sweep [--data.root /data/imagenet ...]

Arguments after the configs that start with `--` are passed to every run (LightningCLI
overrides). On an unlabeled image set (the data module's `root: null`), each model's float
predictions become the labels, so top-1/top-5 read as agreement with the float model.
"""
from __future__ import annotations

import argparse
import csv
import time
import warnings
from pathlib import Path

import torch

from .callbacks import VQuantCallback
from .paper import paper_top1

COLUMNS = ["config", "model", "bits", "method", "top1", "top5", "paper_top1", "diff", "quant_ms", "scored_by"]


def _bits(cb: VQuantCallback | None) -> tuple[int | None, int | None]:
    if cb is None or cb.settings["weight_bits"] is None:
        return None, None
    return cb.settings["weight_bits"], cb.settings["act_bits"]


def _method(settings: dict) -> str:
    text = f"{settings['rounding']}/{settings['act_range'] if settings['act_bits'] else 'none'}"
    if settings["act_bits"] and settings["act_range"].startswith("aciq-") and settings.get("aciq_stats") == "bn":
        text += "(bn)"
    return text + ("+bias-corr" if settings.get("bias_correction") else "") + \
        ("+bit-alloc" if settings.get("bit_allocation") else "") + \
        ("+act-bit-alloc" if settings.get("act_bit_allocation") else "")


def run_config(config: str, overrides: list[str], reference_cache: dict, out: Path | None = None) -> dict:
    """One config's test run (its resolved config.yaml saved under `out/<config name>/`)."""
    from .cli import make_cli

    if out is not None:  # the user's --trainer.default_root_dir, after it, wins
        overrides = ["--trainer.default_root_dir", str(out / Path(config).stem), *overrides]
    with warnings.catch_warnings():  # LightningCLI warns when args are given beside sys.argv
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        cli = make_cli(["--config", config, *overrides], run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    cb = next((c for c in trainer.callbacks if isinstance(c, VQuantCallback)), None)
    spec = model.hparams.get("model", type(model.model).__name__)
    scored_by = "labels"
    if not data.labeled:  # agreement with the float model's top-1
        key = (spec, str(data.root), data.hparams.limit)
        if key not in reference_cache:
            logits = trainer.predict(model, datamodule=data)
            reference_cache[key] = torch.cat(logits).argmax(1).tolist()
        data.set_labels(reference_cache[key])
        scored_by = "float agreement"
    start = time.perf_counter()
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    wb, ab = _bits(cb)
    rounding = cb.settings["rounding"] if cb and wb else "-"
    paper = paper_top1(spec, wb, ab, rounding)
    top1 = 100 * result["test/top1"]
    return {
        "config": Path(config).stem, "model": spec,
        "bits": "FP32" if wb is None else f"W{wb}A{ab if ab is not None else 'fp'}",
        "method": "float" if wb is None else _method(cb.settings),
        "top1": round(top1, 2), "top5": round(100 * result["test/top5"], 2),
        "paper_top1": paper, "diff": None if paper is None else round(top1 - paper, 2),
        "quant_ms": round(cb.report.weight_time_s * 1e3, 1) if wb and cb.report else None,
        "scored_by": scored_by, "_weight_bits": wb, "_seconds": time.perf_counter() - start,
    }


def markdown(rows: list[dict]) -> str:
    head = ["config", "model", "bits", "method", "top-1", "top-5", "paper top-1", "diff", "quant ms", "scored by"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = ["-" if r[c] is None else str(r[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for spec in dict.fromkeys(r["model"] for r in rows):
        points = sorted((r["_weight_bits"] or 32, r["top1"]) for r in rows if r["model"] == spec)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=spec)
    ax.set_xticks(sorted({r["_weight_bits"] or 32 for r in rows}))
    ax.set_xlabel("weight bits (32 = float)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("accuracy against bit width")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="vquant sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="LightningCLI YAML files")
    parser.add_argument("--out", default="runs/sweep", help="folder for results.md/.csv and accuracy.png")
    args, overrides = parser.parse_known_args(argv)
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        parser.error(f"config file(s) not found: {', '.join(missing)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, cache = [], {}
    for config in args.configs:
        rows.append(run_config(config, overrides, cache, out))
        print(f"{rows[-1]['config']}: top-1 {rows[-1]['top1']}  top-5 {rows[-1]['top5']}  "
              f"({rows[-1]['_seconds']:.0f} s)", flush=True)
    table = markdown(rows)
    (out / "results.md").write_text(table + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "accuracy.png")
    print(table)
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'accuracy.png'}")
    return rows
