"""Evaluation throughput, FP32 vs W4A4 (weights quantized once, one fake-quant per layer input).

    python benchmarks/eval_speed.py [--batch 64] [--runs 5] [--device cpu|cuda] [--channels-last] [--compile]

Synthetic input tensors (data loading excluded); images/s is the median of the runs.
`--channels-last` runs model and input in channels_last (the fake-quant operator keeps the
layout); `--compile` times `torch.compile(model)` (one graph: the operators have fake
implementations), after a warm-up call that compiles.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import vquant_pl as vq

MODELS = ["pytorchcv:resnet18", "efficientnet_lite:lite0"]


def images_per_s(model, x, runs: int) -> float:
    def once():
        with torch.inference_mode():
            model(x)
        if x.is_cuda:
            torch.cuda.synchronize()

    once()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return x.shape[0] / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--probe-batch", type=int, default=32)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    mode = ", channels_last" * args.channels_last + ", torch.compile" * args.compile
    print(f"batch {args.batch}, median of {args.runs} runs, {name}{mode}")
    print("| model | FP32 img/s | W4A4 img/s | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for spec in MODELS:
        model, prep = vq.create_model(spec, pretrained=False)
        model = model.to(device).eval().to(memory_format=fmt)
        x = torch.rand(args.batch, 3, *prep.input_size, device=device).to(memory_format=fmt)
        run = (lambda m: torch.compile(m)) if args.compile else (lambda m: m)
        fp32 = images_per_s(run(model), x, args.runs)
        torch._dynamo.reset()
        vq.quantize_model(model, 4, 4, probe=vq.Probe(0, (args.probe_batch, 3, *prep.input_size)))
        w4a4 = images_per_s(run(model), x, args.runs)
        torch._dynamo.reset()
        vq.restore_model(model)
        print(f"| {spec} | {fp32:.1f} | {w4a4:.1f} | {w4a4 / fp32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
