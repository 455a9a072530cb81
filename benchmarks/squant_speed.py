"""Whole-model SQuant weight-quantization time per device: the plain PyTorch path and the
native kernels (`vquant::squant_round`, CPU and CUDA) on the same layers, same run.

    python benchmarks/squant_speed.py [--bits 4] [--runs 5] [--models resnet18 resnet50]

Prints a Markdown table: model, layers, device, torch ms, native backend, native ms,
speed-up (torch / native). Models are the SQuant paper models from pytorchcv with random
init (timing does not depend on values). Each run quantizes every layer's weight with
`rounding="squant"` through `quantize_weight`, as `quantize_model` does; median of the runs.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import vquant_pl as vq
from vquant_pl.ops import backends

MODELS = ["resnet18", "resnet50", "inceptionv3", "sqnxt23_w2", "shufflenet_g1_w1"]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def time_model(weights, bits: int, backend: str, runs: int) -> float:
    def once():
        for w in weights:
            vq.quantize_weight(w, bits, "squant", backend=backend)
        if weights[0].is_cuda:
            torch.cuda.synchronize()

    once()  # warm-up: builds/loads the kernels, fills caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    from pytorchcv.model_provider import get_model

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"W{args.bits} SQuant, whole model, median of {args.runs} runs; torch {torch.__version__}")
    print("| model | layers | device | torch ms | native | native ms | speed-up |")
    print("| --- | ---: | --- | ---: | --- | ---: | ---: |")
    for name in args.models:
        model = get_model(name, pretrained=False)
        cpu_weights = [layer.weight.detach() for _, layer in vq.quantizable_layers(model)]
        for device in devices:
            weights = [w.to(device) for w in cpu_weights]
            native = "cuda" if device == "cuda" else "cpp"
            try:
                backends.resolve(native, torch.device(device))
                native_ms = time_model(weights, args.bits, native, args.runs)
            except backends.BackendUnavailable as err:
                native, native_ms = f"none ({err})", float("nan")
            torch_ms = time_model(weights, args.bits, "torch", args.runs)
            print(f"| {name} | {len(weights)} | {device_name(device)} | {torch_ms:.1f} | {native} | {native_ms:.1f} "
                  f"| {torch_ms / native_ms:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
