"""The GPU cost model of SQuant weight quantization, computed on the CPU (no GPU needed).

    python benchmarks/gpu_cost_model.py [--models resnet18 resnet50] [--per-layer] [--unfused]

For each layer of the model (pytorchcv, random init, W4 `squant`), as `quantize_weight` runs
it on a CUDA tensor (`vquant::squant_weight`: 3 launches, codes / K-level / C-level with the
dequantization; `--unfused` models the separate PyTorch codes and dequantization around
`vquant::squant_round` instead): the kernel launches (every ATen op that launches a kernel,
recorded by a dispatch mode, plus the launches inside the vquant operator), the bytes those
kernels read and write in device memory (an upper bound: L2 hits are counted as traffic;
the SQuant kernel's re-scans of a channel's priorities, which stay on chip, are not),
the C-level selection rounds of the SQuant kernel (measured: round(|error sum|) per output
channel after the K-level; the layer waits for its slowest channel) and their worst case.
See benchmarks/README.md for the time model built on these numbers.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vquant_pl as vq
from vquant_pl.ops.affine import weight_codes
from vquant_pl.ops.squant import squant_round_torch

NO_KERNEL = {"aten.view", "aten._unsafe_view", "aten.reshape", "aten.detach", "aten.alias", "aten.empty",
             "aten.empty_like", "aten.t", "aten.expand", "aten._to_copy_noop", "aten.lift_fresh"}


class CountKernels(TorchDispatchMode):
    """Counts ATen ops that launch a kernel and the bytes of their tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.launches, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket).replace("aten::", "aten.")
        if name.startswith("vquant"):
            return out  # counted by the model of the SQuant kernel below
        if name not in NO_KERNEL:
            tensors = [t for t in (*args, *(kwargs or {}).values(), out) if isinstance(t, torch.Tensor)]
            self.launches += 1
            self.bytes += sum(t.numel() * t.element_size() for t in tensors if t.numel() > 1)
        return out


def fused_cost(w: torch.Tensor) -> tuple[int, int]:
    """(launches, bytes) that `squant_weight` adds to the two rounding kernels: kernel 0 reads
    the weight twice (min/max, codes) and writes the codes; kernel 2 reads its output once more
    and writes the dequantized weight (in place)."""
    n = w.numel()
    return 1, 4 * n * 3 + 4 * n * 2


def squant_kernel_cost(codes: torch.Tensor, bits: int) -> tuple[int, int, int, int]:
    """(launches, bytes, measured C-level rounds of the slowest channel, worst-case rounds)."""
    oc, ic, ks = codes.shape
    n = codes.numel()
    after_k = squant_round_torch(codes, bits, "squant-k") if ks > 1 else torch.round(codes)
    sums = (after_k - codes).double().sum(dim=(1, 2)).abs()
    rounds = int(torch.round(sums).max())
    worst = (ic + 1) // 2 if ks > 1 else (ic * ks + 1) // 2  # every group's residual error on the same side
    # kernel 1: read x, write number/error/up/down; kernel 2: read number and error (sum), write
    # out, clamp pass (read + write out). The priority row each selection round scans again
    # (4 * IC * K bytes per channel and round) stays in the SM's L1/L2 and is left out.
    return 2, 4 * n * (1 + 4) + 4 * n * (2 + 1 + 2), rounds, worst


def model_cost(name: str, bits: int, per_layer: bool, unfused: bool = False) -> dict:
    from pytorchcv.model_provider import get_model

    model = get_model(name, pretrained=False)
    total = dict(layers=0, params=0, launches=0, bytes=0, rounds=0, worst=0)
    if per_layer:
        print(f"\n{name}: | layer | shape | launches | MB moved | C-level rounds (measured / worst) |")
        print("| --- | --- | ---: | ---: | ---: |")
    for layer_name, layer in vq.quantizable_layers(model):
        w = layer.weight.detach()
        k_launches, k_bytes, rounds, worst = squant_kernel_cost(weight_codes(w, bits)[0], bits)
        if unfused:
            with CountKernels() as counter:
                vq.quantize_weight(w, bits, "squant", backend="torch")  # the same ATen ops as on CUDA, minus the kernel
            # the torch backend's ops inside squant_round_torch are not the CUDA kernel's: subtract them
            with CountKernels() as inner:
                squant_round_torch(weight_codes(w, bits)[0].contiguous(), bits, "squant")
            launches = counter.launches - inner.launches + k_launches
            moved = counter.bytes - inner.bytes + k_bytes
        else:
            f_launches, f_bytes = fused_cost(w)
            launches, moved = k_launches + f_launches, k_bytes + f_bytes
        total["layers"] += 1
        total["params"] += w.numel()
        total["launches"] += launches
        total["bytes"] += moved
        total["rounds"] += rounds
        total["worst"] += worst
        if per_layer:
            print(f"| {layer_name} | {tuple(w.shape)} | {launches} | {moved / 1e6:.1f} | {rounds} / {worst} |")
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--per-layer", action="store_true")
    parser.add_argument("--unfused", action="store_true", help="codes and dequantization as PyTorch ops (before issue 20)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [(name, model_cost(name, args.bits, args.per_layer, args.unfused)) for name in args.models]
    print("\n| model | layers | weights | launches | MB moved | C-level rounds, sum over layers (measured / worst) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, t in rows:
        print(f"| {name} | {t['layers']} | {t['params'] / 1e6:.1f} M | {t['launches']} | {t['bytes'] / 1e6:.0f} "
              f"| {t['rounds']} / {t['worst']} |")


if __name__ == "__main__":
    main()
