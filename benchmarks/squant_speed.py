"""Whole-model SQuant weight quantization on the CPU: the current kernel against the kernel of an
older commit (built from git under another operator namespace), same run, same layers, idle
and loaded, on every thread count; then one 256x128x3x3 layer against the PyTorch reference.

    python benchmarks/squant_speed.py [--bits 4] [--runs 7] [--models resnet18 resnet50]
                                      [--old-rev c95c229] [--threads 2 1] [--scenarios idle loaded]

- new: `quantize_weight(w, bits, "squant", backend="cpp")`, as `quantize_model` runs it per layer
  (the fused `vquant::squant_weight`: affine codes, rounding and dequantization in one pass).
- old: what `quantize_weight` ran at `--old-rev`: `weight_codes` and `dequantize` in PyTorch
  around that commit's `squant_round` kernel (`vquant_old::squant_round`).
- kernel columns: the rounding operator alone on the same codes (old and new `squant_round`).
- `idle`: the machine as it is (its 1-minute load average is printed with every figure: other
  jobs may be running); `loaded`: the same with one extra process of ours spinning on a core.
- Every figure is the median of `--runs` runs, old and new runs interleaved; the outputs of old,
  new and the PyTorch reference are checked equal bit for bit before timing.

Models are the SQuant paper models from pytorchcv with random init (timing does not depend on
values). Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import vquant_pl as vq
from vquant_pl.ops import kernels
from vquant_pl.ops.affine import dequantize, weight_codes
from vquant_pl.ops.squant import levels

REPO = Path(__file__).resolve().parents[1]
OLD_REV = "c95c229"  # the kernel before issue 20 (std::partial_sort per kernel, torch codes/dequantize)
OLD_SOURCES = ("ops.cpp", "squant_cpu.cpp", "fake_quant_cpu.cpp")


def build_old(rev: str):
    """`torch.ops.vquant_old` from csrc/ at git revision `rev` (built once into the cache)."""
    from torch.utils import cpp_extension

    full = subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vquant_pl" / f"bench_old_{full[:12]}"
    src = cache / "src"
    src.mkdir(parents=True, exist_ok=True)
    names = subprocess.run(["git", "ls-tree", "--name-only", full, "csrc/"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for path in names:
        if path.endswith((".h", ".cpp")):
            text = subprocess.run(["git", "show", f"{full}:{path}"], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout
            text = re.sub(r".*set_python_module.*\n", "", text)
            (src / Path(path).name).write_text(re.sub(r"\bvquant\b", "vquant_old", text))
    name = f"vquant_old_{full[:12]}"
    cpp_extension.load(name=name, sources=[str(src / f) for f in OLD_SOURCES], build_directory=str(cache),
                       extra_include_paths=[str(src)], is_python_module=False, verbose=False,
                       extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"])
    torch.ops.load_library(str(cache / f"{name}.so"))
    return torch.ops.vquant_old


def old_quantize_weight(op, w: torch.Tensor, bits: int) -> torch.Tensor:
    codes, scale, zero_point = weight_codes(w, bits)
    q = op.squant_round(codes.contiguous(), bits, *levels("squant", codes.shape[-1]))
    return dequantize(q, scale, zero_point).reshape(w.shape).to(w.dtype)


def median_ms(fns: dict, runs: int) -> dict:
    """Median wall time (ms) of each callable; the callables take turns within every run."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(runs):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


@contextlib.contextmanager
def scenario(kind: str):
    """`loaded`: one extra process spinning on a core while the block runs (ours, ended after)."""
    if kind == "idle":
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(1.0)
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--old-rev", default=OLD_REV)
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads(), 1])
    parser.add_argument("--scenarios", nargs="+", default=["idle", "loaded"], choices=["idle", "loaded"])
    parser.add_argument("--layer-runs", type=int, default=5, help="runs of the single-layer comparison")
    args = parser.parse_args()
    from pytorchcv.model_provider import get_model

    old = build_old(args.old_rev)
    kernels.native_ops()
    new = torch.ops.vquant
    bits = args.bits
    models = {}
    for name in args.models:
        weights = [layer.weight.detach() for _, layer in vq.quantizable_layers(get_model(name, pretrained=False))]
        codes = [weight_codes(w, bits)[0].contiguous() for w in weights]
        for w in weights:  # the comparison is meaningless unless the results are the same bits
            assert torch.equal(vq.quantize_weight(w, bits, "squant", backend="cpp"), old_quantize_weight(old, w, bits))
        models[name] = (weights, codes)
    layer = torch.randn(256, 128, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vq.quantize_weight(layer, bits, "squant", backend="cpp"),
                       vq.quantize_weight(layer, bits, "squant", backend="torch"))

    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"W{bits} SQuant on the CPU ({machine}), whole model, median of {args.runs} runs; torch "
          f"{torch.__version__}; old kernel: {args.old_rev}; load: 1-minute load average when the row started")
    print("| scenario | load | threads | model | old ms | new ms | speed-up | old kernel ms | new kernel ms |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    default_threads = torch.get_num_threads()
    for kind in args.scenarios:
        with scenario(kind):
            for threads in args.threads:
                torch.set_num_threads(threads)
                for name, (weights, codes) in models.items():
                    start_load = load()
                    k = [levels("squant", c.shape[-1]) for c in codes]
                    t = median_ms({
                        "old": lambda ws=weights: [old_quantize_weight(old, w, bits) for w in ws],
                        "new": lambda ws=weights: [vq.quantize_weight(w, bits, "squant", backend="cpp") for w in ws],
                        "old_k": lambda cs=codes, ks=k: [old.squant_round(c, bits, *kc) for c, kc in zip(cs, ks)],
                        "new_k": lambda cs=codes, ks=k: [new.squant_round(c, bits, *kc) for c, kc in zip(cs, ks)],
                    }, args.runs)
                    print(f"| {kind} | {start_load} | {threads} | {name} | {t['old']:.1f} | {t['new']:.1f} | "
                          f"{t['old'] / t['new']:.1f}x | {t['old_k']:.1f} | {t['new_k']:.1f} |", flush=True)
            torch.set_num_threads(default_threads)
            start_load = load()
            t = median_ms({"torch": lambda: vq.quantize_weight(layer, bits, "squant", backend="torch"),
                           "old": lambda: old_quantize_weight(old, layer, bits),
                           "new": lambda: vq.quantize_weight(layer, bits, "squant", backend="cpp")}, args.layer_runs)
            print(f"\n{kind}, load {start_load}, {default_threads} threads, one 256x128x3x3 layer: PyTorch reference "
                  f"{t['torch']:.1f} ms, old kernel {t['old']:.2f} ms ({t['torch'] / t['old']:.0f}x), "
                  f"new kernel {t['new']:.2f} ms ({t['torch'] / t['new']:.0f}x)\n", flush=True)
    if torch.cuda.is_available():
        print("| model | device | torch ms | cuda ms |\n| --- | --- | ---: | ---: |")
        for name, (weights, _) in models.items():
            cuda = [w.cuda() for w in weights]

            def run(backend, cuda=cuda):
                for w in cuda:
                    vq.quantize_weight(w, bits, "squant", backend=backend)
                torch.cuda.synchronize()

            t = median_ms({"torch": lambda: run("torch"), "cuda": lambda: run("cuda")}, args.runs)
            print(f"| {name} | {torch.cuda.get_device_name()} | {t['torch']:.1f} | {t['cuda']:.2f} |")


if __name__ == "__main__":
    main()
