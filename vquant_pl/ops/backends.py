"""Backends of the SQuant rounding: vectorized PyTorch (reference), native C++, CUDA.

The native ones are the `vquant::squant_round` operator (CPU and CUDA kernels registered
with the dispatcher, see `vquant_pl.ops.kernels`), built on first use and cached, so `pip
install` never needs a compiler or nvcc. `backend=None` picks the fastest one that works
for the tensor's device; the environment variable `VQUANT_BACKEND` forces one. All
backends give identical results.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable, get_args

import torch
from torch import Tensor

from ..config import Backend
from . import kernels
from .kernels import BackendUnavailable, find_cuda_home  # noqa: F401  (public names)
from .squant import levels, squant_round_torch

BACKENDS: tuple[str, ...] = get_args(Backend)
ENV_VAR = kernels.ENV_BACKEND

RoundFn = Callable[[Tensor, int, str], Tensor]
log = logging.getLogger("vquant_pl")


def _native(kind: str) -> RoundFn:
    """The native rounding (`cpu` or `cuda` kernels of `vquant::squant_round`).

    Raises:
        BackendUnavailable: the kernels could not be built, or (CUDA) failed the self-check.
    """
    op = kernels.native_ops().squant_round
    if kind == "cuda" and kernels.status()["cuda"] != "native":
        raise BackendUnavailable(f"the CUDA kernels are not in use: {kernels.status()['cuda'] or 'no GPU'}")

    def round_fn(codes: Tensor, bits: int, rounding: str) -> Tensor:
        k_level, c_level = levels(rounding, codes.shape[-1])
        if kind == "cpu" and codes.device.type != "cpu":
            return op(codes.cpu(), bits, k_level, c_level).to(codes.device)
        return op(codes, bits, k_level, c_level)

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
    except BackendUnavailable as err:  # already reported once, as a warning, by `kernels`
        _announce("torch", f" (fallback: {err})")
        return "torch", squant_round_torch
    _announce(name)
    return name, fn


def resolve(backend: str | None, device: torch.device) -> tuple[str, RoundFn]:
    """Name and rounding function of `backend` (None: `$VQUANT_BACKEND`, else the fastest
    available for `device`).

    Args:
        backend: None, `"torch"`, `"cpp"` or `"cuda"`.
        device: the device of the weights to round.

    Raises:
        ValueError: an unknown backend, or `cuda` for a tensor that is not on a GPU.
        BackendUnavailable: `cpp`/`cuda` asked for explicitly but not available.

    Example:
        >>> name, round_fn = resolve(None, torch.device("cpu"))  # ("cpp", ...) or ("torch", ...)
    """
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
