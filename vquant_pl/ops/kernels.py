"""The vquant operators: registration with the PyTorch dispatcher, their PyTorch and fake
implementations, and the native libraries' loading and self-check (the build itself:
`vquant_pl.ops.build`).

Two operators carry the package's hot loops (schemas in `csrc/ops_schema.h`):

- `vquant::squant_round(Tensor codes, int bits, bool k_level, bool c_level) -> Tensor`
- `vquant::fake_quant(Tensor x, float scale, float zero_point, int q_min, int q_max) -> Tensor`

`torch.ops.vquant` holds the native ones: schemas and CPU kernels from `csrc/ops.cpp`
(`TORCH_LIBRARY`), CUDA kernels from `csrc/*.cu`, fake (meta) implementations here, so
`torch.compile` traces them as single nodes. They are built with
`torch.utils.cpp_extension` on first use, or ahead with `python -m vquant_pl.ops.kernels`
(`vquant build-kernels`), into a private folder named after the package version, a hash of
the sources (and of torch's version) and, for CUDA, the target GPU architectures, under a
file lock (`vquant_pl.ops.build`). A failed build, or a build folder that is not safe to
load from, is tried once per process and reported once, as a warning with the reason;
`torch.ops.vquant_py` then holds the same two operators in pure PyTorch
(`torch.library.custom_op`, identical results).

The CUDA kernels are checked at first use against the PyTorch reference on a small fixed
case (`self_check`); on any difference a loud warning is given and CUDA tensors take the
PyTorch path for the rest of the process. `load_emulation` compiles the same `.cu` sources
for the CPU under an emulation of the CUDA execution model (`csrc/cuda_emulation.h`), as
`torch.ops.vquant_emu`, so the GPU code is tested bit for bit on machines without a GPU.

Example:
    >>> from vquant_pl.ops import kernels
    >>> ops = kernels.ops()  # torch.ops.vquant, or torch.ops.vquant_py without a compiler
    >>> ops.fake_quant(torch.rand(4), 15.0, 0.0, 0, 15)  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# The build's public names stay importable from here (`kernels.build`, `kernels.build_name`, ...).
from .build import (BUILD_SECONDS, ENV_BUILD_DIR, ENV_VERBOSE, KINDS, BackendUnavailable,  # noqa: F401
                    build, build_name, build_root, cuda_archs, find_cuda_home, package_version, source_dir)
from .build import rank_zero as _rank_zero
from .squant import ROUNDINGS, levels, squant_round_torch

ENV_BACKEND = "VQUANT_BACKEND"
# Per process: None (not tried yet), "native", or why not (one attempt per kind).
_state: dict[str, str | None] = {"cpu": None, "cuda": None}
attempts: dict[str, int] = {"cpu": 0, "cuda": 0}
_libraries: list[torch.library.Library] = []  # Python registrations, kept alive


def status() -> dict[str, str | None]:
    """Per device kind (`cpu`, `cuda`): None (not tried), "native", or the reason it is not."""
    return dict(_state)


# ----------------------------------------------------------------------------- reference math
def _check_fake_quant(x: Tensor, q_min: int, q_max: int) -> None:
    """What the native `vquant::fake_quant` checks (csrc/fake_quant_cpu.cpp)."""
    torch._check(x.is_floating_point(), lambda: f"vquant::fake_quant: x must be floating point, got {x.dtype}")
    torch._check(q_min <= q_max, lambda: f"vquant::fake_quant: q_min {q_min} > q_max {q_max}")


def _check_codes(t: Tensor, op: str, what: str, bits: int) -> None:
    """What the native `vquant::squant_round` / `squant_weight` check (csrc/squant_cpu.cpp)."""
    torch._check(t.dtype == torch.float32, lambda: f"vquant::{op}: {what} must be float32, got {t.dtype}")
    torch._check(t.dim() == 3, lambda: f"vquant::{op}: {what} must be [OC, IC, K], got {t.dim()} dims")
    torch._check(1 <= bits <= 16, lambda: f"vquant::{op}: bits must lie in 1..16, got {bits}")


def fake_quant_reference(x: Tensor, scale: float, zero_point: float, q_min: int, q_max: int) -> Tensor:
    """docs/quantization-rules.md rule 3 in PyTorch ops: float32 math, result in `x`'s dtype (and layout)."""
    _check_fake_quant(x, q_min, q_max)
    s = torch.tensor(scale, dtype=torch.float32, device=x.device)
    zp = torch.tensor(zero_point, dtype=torch.float32, device=x.device)
    q = torch.mul(x.float(), s)
    q.sub_(zp).round_().clamp_(q_min, q_max)
    return q.add_(zp).div_(s).to(x.dtype)


def _rounding_of(k_level: bool, c_level: bool) -> str:
    return {(True, True): "squant", (True, False): "squant-k", (False, True): "squant-c",
            (False, False): "squant-e"}[(bool(k_level), bool(c_level))]


def _squant_round_reference(codes: Tensor, bits: int, k_level: bool, c_level: bool) -> Tensor:
    _check_codes(codes, "squant_round", "codes", bits)
    # `rounding` never asks for a K-level where the kernel has one element; the levels can.
    k_level = k_level and codes.shape[-1] > 1
    return squant_round_torch(codes.contiguous(), bits, _rounding_of(k_level, c_level))


# --------------------------------------------------------------- pure-PyTorch fallback operators
@torch.library.custom_op("vquant_py::squant_round", mutates_args=())
def _py_squant_round(codes: Tensor, bits: int, k_level: bool, c_level: bool) -> Tensor:
    return _squant_round_reference(codes, bits, k_level, c_level)


@torch.library.custom_op("vquant_py::fake_quant", mutates_args=())
def _py_fake_quant(x: Tensor, scale: float, zero_point: float, q_min: int, q_max: int) -> Tensor:
    return _like(x, fake_quant_reference(x, scale, zero_point, q_min, q_max))


def _like(x: Tensor, out: Tensor) -> Tensor:
    """`out` in the layout of `torch.empty_like(x)` (what the fake implementations promise)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return out
    like = torch.empty_like(x)
    return out if like.stride() == out.stride() else like.copy_(out)


@torch.library.custom_op("vquant_py::fake_quant_channel", mutates_args=())
def fake_quant_channel(x: Tensor, scale: Tensor, zero_point: Tensor, q_min: Tensor, q_max: Tensor) -> Tensor:
    """Per-channel rule 3 (parameters already shaped to broadcast against `x`), one operator:
    `torch.compile` keeps it as one node, so compiled and eager results are the same bits."""
    q = torch.mul(x.float(), scale)
    q.sub_(zero_point).round_().clamp_(q_min, q_max)
    return _like(x, q.add_(zero_point).div_(scale).to(x.dtype))


def _fake_squant_round(codes: Tensor, bits: int, k_level: bool, c_level: bool) -> Tensor:
    _check_codes(codes, "squant_round", "codes", bits)
    return torch.empty_like(codes, memory_format=torch.contiguous_format)


def _fake_fake_quant(x: Tensor, scale: float, zero_point: float, q_min: int, q_max: int) -> Tensor:
    _check_fake_quant(x, q_min, q_max)
    return torch.empty_like(x)


def _squant_weight_reference(weight: Tensor, bits: int, k_level: bool, c_level: bool) -> Tensor:
    """`vquant::squant_weight` in PyTorch: affine codes, SQuant rounding, dequantization."""
    from .affine import dequantize, weight_codes

    _check_codes(weight, "squant_weight", "weight", bits)
    codes, scale, zero_point = weight_codes(weight, bits)
    return dequantize(_squant_round_reference(codes.contiguous(), bits, k_level, c_level), scale, zero_point)


def _fake_squant_weight(weight: Tensor, bits: int, k_level: bool, c_level: bool) -> Tensor:
    _check_codes(weight, "squant_weight", "weight", bits)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


torch.library.register_fake("vquant_py::squant_round", _fake_squant_round)
torch.library.register_fake("vquant_py::fake_quant", _fake_fake_quant)


@torch.library.register_fake("vquant_py::fake_quant_channel")
def _(x, scale, zero_point, q_min, q_max):
    return torch.empty_like(x)


def _warn(message: str) -> None:
    if _rank_zero():
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _short(err: BaseException, limit: int = 1500) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= limit else "... " + text[-limit:]


# --------------------------------------------------------------------------------- registration
def _register_python_parts() -> None:
    """Fake implementations of the native operators and a PyTorch kernel for devices without
    a native one (CompositeExplicitAutograd: used where no CPU/CUDA kernel is registered)."""
    lib = torch.library.Library("vquant", "IMPL")
    lib.impl("squant_round", _squant_round_reference, "CompositeExplicitAutograd")
    lib.impl("fake_quant", fake_quant_reference, "CompositeExplicitAutograd")
    lib.impl("squant_weight", _squant_weight_reference, "CompositeExplicitAutograd")
    _libraries.append(lib)
    torch.library.register_fake("vquant::squant_round", _fake_squant_round)
    torch.library.register_fake("vquant::fake_quant", _fake_fake_quant)
    torch.library.register_fake("vquant::squant_weight", _fake_squant_weight)


def _use_torch_on_cuda(reason: str) -> None:
    """CUDA tensors take the PyTorch kernels of `vquant::*` for the rest of the process."""
    lib = torch.library.Library("vquant", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("squant_round", _squant_round_reference, "CUDA")
        lib.impl("fake_quant", fake_quant_reference, "CUDA")
        lib.impl("squant_weight", _squant_weight_reference, "CUDA")
    _libraries.append(lib)
    _state["cuda"] = reason


def _load_cuda() -> None:
    attempts["cuda"] += 1
    try:
        build("cuda")
    except BackendUnavailable as err:
        _state["cuda"] = str(err)
        _warn(f"vquant_pl: the CUDA kernels are unavailable ({err}); CUDA tensors take the PyTorch path "
              "(identical results, slower). `vquant build-kernels` shows the full build log.")
        return
    problems = self_check(torch.ops.vquant, "cuda")
    if problems:
        _use_torch_on_cuda("failed the self-check: " + "; ".join(problems[:3]))
        _warn("vquant_pl: THE CUDA KERNELS GIVE WRONG RESULTS on this machine (self-check against the PyTorch "
              f"reference: {'; '.join(problems[:3])}). The PyTorch path runs for the rest of this process. "
              "Please report this with the output of `vquant selftest`.")
        return
    _state["cuda"] = "native"


def native_ops() -> Any:
    """`torch.ops.vquant` with the native kernels (built and loaded on first call; with a GPU,
    the CUDA kernels too, self-checked).

    Raises:
        BackendUnavailable: the native library could not be built or loaded (tried once per
        process; the reason was shown once as a warning).
    """
    if _state["cpu"] is None:
        attempts["cpu"] += 1
        try:
            build("cpu")
        except BackendUnavailable as err:
            _state["cpu"] = str(err)
            _warn(f"vquant_pl: the native kernels are unavailable ({err}); the PyTorch implementation runs "
                  "instead (identical results, slower). `vquant build-kernels` shows the full build log.")
        else:
            _register_python_parts()
            _state["cpu"] = "native"
            if torch.cuda.is_available():
                _load_cuda()
    if _state["cpu"] != "native":
        raise BackendUnavailable(_state["cpu"])
    return torch.ops.vquant


def ops() -> Any:
    """The operators the package calls: `torch.ops.vquant` (native) where it builds, else
    `torch.ops.vquant_py` (pure PyTorch, same results); `VQUANT_BACKEND=torch` picks the latter."""
    if os.environ.get(ENV_BACKEND) == "torch":
        return torch.ops.vquant_py
    try:
        return native_ops()
    except BackendUnavailable:
        return torch.ops.vquant_py


def load_emulation(src: Path | str | None = None, namespace: str = "vquant_emu") -> Any:
    """Build (first time) and load the CUDA sources compiled for the CPU under the emulation of
    the CUDA execution model; returns `torch.ops.<namespace>` (CPU tensors only).

    Raises:
        BackendUnavailable: no compiler or a compile error.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", namespace):
        raise ValueError(f"invalid operator namespace {namespace!r}")
    if not hasattr(torch.ops, namespace) or not hasattr(getattr(torch.ops, namespace), "squant_round"):
        build("emulation", src, defines=() if namespace == "vquant_emu" else (f"VQ_EMU_NS={namespace}",))
    return getattr(torch.ops, namespace)


# ----------------------------------------------------------------------------------- self-check
def _check_cases() -> tuple[list[tuple[Tensor, int]], Tensor]:
    """Small fixed cases: rows longer than a CUDA block (256), one input channel, 1x1 kernels,
    exact ties; activations with ties, both signs and out-of-range values."""
    g = torch.Generator().manual_seed(20220125)
    weights = [(torch.randn(6, 130, 3, generator=g), 4), (torch.randn(5, 1, 9, generator=g), 3),
               (torch.randn(7, 300, 1, generator=g), 2), (torch.randint(-4, 5, (4, 6, 9), generator=g) / 2.0, 8)]
    x = torch.cat([torch.arange(-40, 41) / 4.0, torch.randn(3000, generator=g) * 3, torch.tensor([1e30, -1e30])])
    return weights, x


def self_check(namespace: Any, device: str | torch.device) -> list[str]:
    """Run `namespace.squant_round` / `.fake_quant` on `device` on small fixed cases and compare
    with the PyTorch reference bit for bit; returns the differences found (empty: all equal)."""
    from .affine import weight_codes

    device = torch.device(device)
    problems = []
    weights, x = _check_cases()
    for w, bits in weights:
        codes = weight_codes(w, bits)[0]
        for rounding in ROUNDINGS[1:]:
            k_level, c_level = levels(rounding, codes.shape[-1])
            expected = squant_round_torch(codes, bits, rounding)
            try:
                got = namespace.squant_round(codes.to(device), bits, k_level, c_level).cpu()
            except Exception as err:  # a crash is a failed check too
                problems.append(f"squant_round raised {_short(err, 200)}")
                continue
            if not torch.equal(got, expected):
                wrong = int((got != expected).sum()) if got.shape == expected.shape else -1
                problems.append(f"squant_round {rounding} {bits} bits {tuple(codes.shape)}: {wrong} codes differ")
            if hasattr(namespace, "squant_weight"):  # the fused codes + rounding + dequantization
                w3 = w.reshape(w.shape[0], w.shape[1], -1).contiguous()
                expected = _squant_weight_reference(w3, bits, k_level, c_level)
                try:
                    got = namespace.squant_weight(w3.to(device), bits, k_level, c_level).cpu()
                except Exception as err:
                    problems.append(f"squant_weight raised {_short(err, 200)}")
                    continue
                if not torch.equal(got, expected):
                    problems.append(f"squant_weight {rounding} {bits} bits {tuple(w3.shape)}: "
                                    f"{int((got != expected).sum())} values differ")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for scale, zp, lo, hi in ((4.0, 0.0, 0, 15), (2.5, 8.0, -8, 7), (127.5, 128.0, -128, 127)):
            xd = x.to(dtype)
            expected = fake_quant_reference(xd, scale, zp, lo, hi)
            try:
                got = namespace.fake_quant(xd.to(device), scale, zp, lo, hi).cpu()
            except Exception as err:
                problems.append(f"fake_quant raised {_short(err, 200)}")
                continue
            if not torch.equal(got, expected):
                problems.append(f"fake_quant {dtype} scale {scale}: {int((got != expected).sum())} values differ")
    return problems


# ------------------------------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> int:
    """`vquant build-kernels` / `python -m vquant_pl.ops.kernels`: build the native kernels ahead
    (Docker images, clusters). Returns 0 when every requested library built.

    Example:
        python -m vquant_pl.ops.kernels --cuda --emulation
    """
    parser = argparse.ArgumentParser(prog="vquant build-kernels", description=main.__doc__.split("\n")[0])
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                        help="build the CUDA kernels (default: when a CUDA toolkit is found)")
    parser.add_argument("--emulation", action="store_true",
                        help="also build the CUDA sources for the CPU under the CUDA emulation (tests)")
    parser.add_argument("--arch", default=None,
                        help="CUDA architectures without a GPU to ask, e.g. '8.0;9.0' (sets TORCH_CUDA_ARCH_LIST)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    kinds = ["cpu"]
    if args.cuda or (args.cuda is None and find_cuda_home() is not None):
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # no GPU to ask: A100 and H100/H200
        kinds.append("cuda")
    if args.emulation:
        kinds.append("emulation")
    failed = 0
    for kind in kinds:
        start = time.perf_counter()
        try:
            path = build(kind, verbose=args.verbose or None)
        except BackendUnavailable as err:
            print(f"{kind}: FAILED: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{kind}: {path} ({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
