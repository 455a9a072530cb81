"""Backends of the SQuant rounding: vectorized PyTorch (reference), native C++, CUDA.

The native ones are compiled with `torch.utils.cpp_extension` on first use and cached
(so `pip install` never needs a compiler or nvcc). `backend=None` picks the fastest one
that works for the tensor's device; the environment variable `VQUANT_BACKEND` forces one.
All backends give identical results.
"""
from __future__ import annotations

import functools
import logging
import os
from importlib import resources
from typing import Callable

import torch
from torch import Tensor

from .squant import _levels, squant_round_torch

BACKENDS = ("torch", "cpp", "cuda")
ENV_VAR = "VQUANT_BACKEND"

RoundFn = Callable[[Tensor, int, str], Tensor]
log = logging.getLogger("vquant_pl")


class BackendUnavailable(RuntimeError):
    """A native backend could not be built or cannot run here."""


def find_cuda_home() -> str | None:
    """A CUDA toolkit with headers: $CUDA_HOME, torch's guess, nvcc's real location, /usr/local/cuda."""
    import shutil

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME,
                  nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


@functools.cache
def load_extension(kind: str):
    """Build (first time, then cached) and import the `cpu` or `cuda` extension."""
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import load

    if kind == "cuda":
        home = find_cuda_home()
        if home is None:
            raise BackendUnavailable("no CUDA toolkit with headers found; set CUDA_HOME")
        cpp_extension.CUDA_HOME = home  # torch guesses from `which nvcc`, which may be a wrapper
    src = resources.files("vquant_pl.csrc")
    common = dict(extra_include_paths=[str(src)], verbose=os.environ.get("VQUANT_VERBOSE_BUILD") == "1")
    try:
        if kind == "cpu":
            sources = [str(src / f) for f in ("squant_cpu.cpp", "fake_quant_cpu.cpp", "bindings.cpp")]
            return load(name="vquant_squant_cpu", sources=sources,
                        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
                        extra_ldflags=["-fopenmp"], **common)
        sources = [str(src / f) for f in ("squant_cuda.cu", "fake_quant_cuda.cu", "bindings.cpp")]
        return load(name="vquant_squant_cuda", sources=sources,
                    extra_cflags=["-O3", "-ffp-contract=off", "-DVQUANT_CUDA"],
                    extra_cuda_cflags=["-O3", "--fmad=false"], **common)
    except Exception as err:  # compiler missing, CUDA toolkit missing, build error
        raise BackendUnavailable(f"could not build the {kind} SQuant extension: {err}") from err


def _native(kind: str) -> RoundFn:
    module = load_extension(kind)

    def round_fn(codes: Tensor, bits: int, rounding: str) -> Tensor:
        k_level, c_level = _levels(rounding, codes.shape[-1])
        if kind == "cpu" and codes.device.type != "cpu":
            return module.squant_round(codes.cpu(), bits, k_level, c_level).to(codes.device)
        return module.squant_round(codes, bits, k_level, c_level)

    return round_fn


@functools.cache
def _announce(name: str, why: str = "") -> None:
    log.info("vquant_pl: SQuant rounding runs on the %s backend%s", name, why)


def _auto(device: torch.device) -> tuple[str, RoundFn]:
    kind, name = ("cuda", "cuda") if device.type == "cuda" else ("cpu", "cpp")
    if device.type not in ("cpu", "cuda"):
        _announce("torch", f" ({device.type} tensors have no native kernel)")
        return "torch", squant_round_torch
    try:
        fn = _native(kind)
    except BackendUnavailable as err:
        _announce("torch", f" (fallback: {err})")
        return "torch", squant_round_torch
    _announce(name)
    return name, fn


def native_fake_quant(device: torch.device) -> Callable | None:
    """The fused one-pass fake-quantizer of the native extension for `device`, or None
    (then the in-place PyTorch chain runs; results are identical)."""
    if os.environ.get(ENV_VAR) == "torch" or device.type not in ("cpu", "cuda"):
        return None
    try:
        return load_extension("cpu" if device.type == "cpu" else "cuda").fake_quant
    except BackendUnavailable:
        return None


def resolve(backend: str | None, device: torch.device) -> tuple[str, RoundFn]:
    """Name and rounding function of `backend` (None: `$VQUANT_BACKEND`, else the fastest
    available for `device`)."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
    if backend is None:
        return _auto(torch.device(device))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected None or one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch", squant_round_torch
    if backend == "cuda" and torch.device(device).type != "cuda":
        raise ValueError(f"backend 'cuda' needs a CUDA tensor, got one on {device}")
    return backend, _native("cpu" if backend == "cpp" else "cuda")
