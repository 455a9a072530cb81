"""Backends of the SQuant rounding: vectorized PyTorch (reference), native C++, CUDA."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .squant import squant_round_torch

BACKENDS = ("torch",)

RoundFn = Callable[[Tensor, int, str], Tensor]


def resolve(backend: str | None, device: torch.device) -> tuple[str, RoundFn]:
    """Name and rounding function of `backend` (None: the fastest available for `device`)."""
    if backend is None or backend == "torch":
        return "torch", squant_round_torch
    raise ValueError(f"unknown backend {backend!r}; expected None or one of {', '.join(BACKENDS)}")
