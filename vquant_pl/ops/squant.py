"""SQuant rounding (E/K/C flipping) in vectorized PyTorch: the readable reference.

Semantics follow docs/quantization-rules.md "SQuant rounding" to the bit: round half to even, flip
targets computed once from the initial rounding, stable priority order (ties by
ascending index), one boundary element carried from the K-level to the C-level.
"""
from __future__ import annotations

from typing import get_args

import torch
from torch import Tensor

from ..config import Rounding

ROUNDINGS: tuple[str, ...] = get_args(Rounding)


def levels(rounding: str, kernel_size: int) -> tuple[bool, bool]:
    """Which flipping levels (K, C) a rounding method runs for a kernel size."""
    k_level = rounding in ("squant", "squant-k") and kernel_size > 1
    c_level = rounding in ("squant", "squant-c")
    return k_level, c_level


def group_error_sum(error: Tensor) -> Tensor:
    """Sum of rounding errors per group (last dim), accumulated in float64.

    Every backend accumulates in double so that the flip decisions (round(|s|) and
    round(|s|) >= |s|) do not depend on a device's reduction order.
    """
    return error.double().sum(-1)


def _flip_level(number, error, up, down, up_prio, down_prio):
    """One SQuant level on groups along the last dim of [G, L] tensors.

    `up`/`down` are the (number, error) flip targets. Returns the new number and error
    and the boundary priorities (all zero but one element per group).
    """
    length = number.shape[-1]
    s = group_error_sum(error)
    go_up = s < 0
    abs_s = s.abs()
    k = torch.round(abs_s)
    over = k >= abs_s
    prio = torch.where(go_up[:, None], up_prio, down_prio)
    order = torch.sort(prio, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(length, device=number.device)
    take = torch.zeros_like(order, dtype=torch.bool).scatter_(
        1, order, positions[None, :] < k[:, None])
    target_number = torch.where(go_up[:, None], up[0], down[0])
    target_error = torch.where(go_up[:, None], up[1], down[1])
    number = torch.where(take, target_number, number)
    error = torch.where(take, target_error, error)
    # Boundary: position k-1 (overshoot; -1 wraps to the last) or position k.
    k_int = k.long()
    boundary_pos = torch.where(over, k_int - 1, k_int).remainder(length)
    boundary = order.gather(1, boundary_pos[:, None])
    value = error.gather(1, boundary).abs()
    mark_up = (go_up ^ over)[:, None]
    zeros = torch.zeros_like(up_prio)
    new_up = zeros.scatter(1, boundary, torch.where(mark_up, value, 0.0))
    new_down = zeros.scatter(1, boundary, torch.where(mark_up, 0.0, value))
    return number, error, new_up, new_down


def squant_round_torch(codes: Tensor, bits: int, rounding: str) -> Tensor:
    """Round real codes `[OC, IC, K]` (float32) with SQuant, clamped to `[-n, n-1]`."""
    n = 2 ** (bits - 1)
    t_min, t_max = -n, n - 1
    oc, ic, ks = codes.shape
    number = torch.round(codes)
    error = number - codes
    is_up = (error < 0) & (codes < t_max)
    is_down = (error > 0) & (codes > t_min)
    up = (torch.where(is_up, number + 1, number), torch.where(is_up, error + 1, 0.0))
    down = (torch.where(is_down, number - 1, number), torch.where(is_down, error - 1, 0.0))
    up_prio = torch.where(is_up, error.abs(), 0.0)
    down_prio = torch.where(is_down, error.abs(), 0.0)
    k_level, c_level = levels(rounding, ks)
    if k_level:
        flat = lambda t: t.reshape(oc * ic, ks)  # noqa: E731
        number, error, up_prio, down_prio = _flip_level(
            flat(number), flat(error), tuple(map(flat, up)), tuple(map(flat, down)),
            flat(up_prio), flat(down_prio))
    if c_level:
        flat = lambda t: t.reshape(oc, ic * ks)  # noqa: E731
        number, error, _, _ = _flip_level(
            flat(number), flat(error), tuple(map(flat, up)), tuple(map(flat, down)),
            flat(up_prio), flat(down_prio))
    return number.reshape(oc, ic, ks).clamp_(t_min, t_max)
