"""A literal, loop-based reading of docs/quantization-rules.md "SQuant rounding", for cross-checks only."""
import math

import torch


def _level(number, error, up, down, up_prio, down_prio, groups):
    """groups: list of index lists, each one group (kernel or channel row), flat indices."""
    new_up = [0.0] * len(number)
    new_down = [0.0] * len(number)
    for idx in groups:
        s = 0.0
        for i in idx:
            s += float(error[i])
        go_up = s < 0
        prio = up_prio if go_up else down_prio
        target = up if go_up else down
        k = round(abs(s))  # Python rounds half to even
        over = k >= abs(s)
        order = sorted(range(len(idx)), key=lambda j: -prio[idx[j]])  # stable: ties by index
        for j in order[:k]:
            number[idx[j]], error[idx[j]] = target[idx[j]]
        pos = (k - 1 if over else k) % len(idx)
        b = idx[order[pos]]
        value = abs(error[b])
        if go_up != over:
            new_up[b] = value
        else:
            new_down[b] = value
    return new_up, new_down


def squant_round_loop(codes: torch.Tensor, bits: int, rounding: str) -> torch.Tensor:
    n = 2 ** (bits - 1)
    oc, ic, ks = codes.shape
    x = codes.flatten()
    number = torch.round(x).tolist()
    error = (torch.round(x) - x).tolist()
    xs = x.tolist()
    e32 = torch.round(x) - x
    up, down, up_prio, down_prio = [], [], [], []
    for i in range(len(xs)):
        e = error[i]
        is_up = e < 0 and xs[i] < n - 1
        is_down = e > 0 and xs[i] > -n
        up.append((number[i] + 1, float((e32[i] + 1))) if is_up else (number[i], 0.0))
        down.append((number[i] - 1, float((e32[i] - 1))) if is_down else (number[i], 0.0))
        up_prio.append(abs(e) if is_up else 0.0)
        down_prio.append(abs(e) if is_down else 0.0)
    if rounding in ("squant", "squant-k") and ks > 1:
        groups = [list(range(g * ks, (g + 1) * ks)) for g in range(oc * ic)]
        up_prio, down_prio = _level(number, error, up, down, up_prio, down_prio, groups)
    if rounding in ("squant", "squant-c"):
        groups = [list(range(c * ic * ks, (c + 1) * ic * ks)) for c in range(oc)]
        _level(number, error, up, down, up_prio, down_prio, groups)
    out = torch.tensor(number, dtype=torch.float32).reshape(oc, ic, ks)
    assert not any(math.isnan(v) for v in number)
    return out.clamp_(-n, n - 1)
