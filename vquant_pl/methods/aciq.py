"""ACIQ tools ("post-training 4-bit", Banner et al.) as the authors' public code computes them
(repository submission2019/cnn-quantization, `int_quantizer.py` and the weight correction of
`inference_quantization_manager.py`), on the statistics vquant-pl has: the probe, or
BatchNorm. docs/methods.md lists every remaining difference and why.

- Clip: `alpha = c_M * b` (Laplace, `b = E|x - E x|`) or `c_M * std` (Gauss). A signed
  tensor is ranged around its mean, `[max(min, mean - alpha), that + 2 alpha]`; a tensor fed
  by a ReLU is ranged one-sidedly from the statistics *before* the ReLU, `[0, max(mean, 0) +
  c+_M * b]`, with the one-sided constants `c+`. `cap=True` (the original's `clip2max`
  option, off in its runs) keeps the range inside the tensor's `[min, max]`.
- Bit allocation (`aciq_allocate_bits`): `M_i = round(log2(N 2^M p_i / sum p))`,
  `p = prior^(2/3)`, clamped to 0..8, with the target nudged up to ten times until the
  mean is within 0.005 bit of `M` (the budget is met approximately). `allocate_bits` is our
  exact-budget variant.
- Weight bias correction (`bias_correct`): `mean` (the original's `-bcw`) matches each
  output channel's mean, `mean-std` (`-vcw -bcw`) also its std, `paper` is the paper's
  `xi (Wq + mu)`.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Two-sided optimal clip in units of the spread per bit width (the original code's tables;
#: Laplace `b = E|x - E x|`, Gauss `std`).
ACIQ_ALPHA = {
    "laplace": {0: 1.05, 1: 1.86, 2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 7: 8.64, 8: 9.89},
    "gauss": {1: 1.24, 2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92},
}
#: One-sided optimal clip (a range `[0, alpha]`): the original's `alpha_*_positive`.
ACIQ_ALPHA_POSITIVE = {
    "laplace": {0: 1.86, 1: 2.83, 2: 3.89, 3: 5.02, 4: 6.2, 5: 7.41, 6: 8.64, 7: 9.89, 8: 11.16},
    "gauss": {1: 1.71, 2: 2.15, 3: 2.55, 4: 2.93, 5: 3.28, 6: 3.61, 7: 3.92, 8: 4.2},
}
#: The original allocates bits only at this many bits or fewer.
ACIQ_MAX_ALLOC_BITS = 4
BIAS_CORRECTIONS = ("mean", "mean-std", "paper")


@dataclass
class Moments:
    """What ACIQ needs of a tensor (per tensor: floats; per channel: tensors)."""

    mean: float | Tensor
    b: float | Tensor  # E|x - E x|
    std: float | Tensor
    lo: float | Tensor = -math.inf  # min (or the known lower bound)
    hi: float | Tensor = math.inf  # max (or the known upper bound)


def moments(x: Tensor) -> Moments:
    """Per-tensor moments of `x` (float32), as the original's `__act_stats__`: unbiased std."""
    t = x.detach().float().flatten()
    if t.numel() < 2:
        raise ValueError(f"cannot range an activation with {t.numel()} value(s)")
    mean = t.mean()
    return Moments(float(mean), float((t - mean).abs().mean()), float(t.std()), float(t.min()), float(t.max()))


def gaussian_mixture_moments(mean: Tensor, std: Tensor, lo: float = -math.inf, hi: float = math.inf) -> Moments:
    """Per-tensor moments of the equal-weight mixture of the per-channel normals
    `N(mean_c, std_c)` (BatchNorm's description of a pre-activation), exactly:
    `E|x - m| = mean_c of (s sqrt(2/pi) exp(-d^2 / 2 s^2) + d erf(d / (s sqrt 2)))`, `d = mean_c - m`."""
    mean, std = mean.double(), std.double().abs()
    m = mean.mean()
    var = (std ** 2 + mean ** 2).mean() - m ** 2
    d = mean - m
    safe = std.clamp_min(1e-30)
    b = torch.where(std > 0, safe * math.sqrt(2 / math.pi) * torch.exp(-d ** 2 / (2 * safe ** 2))
                    + d * torch.erf(d / (safe * math.sqrt(2))), d.abs()).mean()
    return Moments(float(m), float(b), float(var.clamp_min(0).sqrt()), lo, hi)


def gaussian_moments(mean: Tensor, std: Tensor, lo: float = -math.inf, hi: float = math.inf) -> Moments:
    """Per-channel moments of normals `N(mean_c, std_c)`: `b = sqrt(2/pi) std`."""
    std = std.float().abs()
    return Moments(mean.float(), std * math.sqrt(2 / math.pi), std, lo, hi)


def _constant(dist: str, bits, one_sided: bool):
    if dist not in ACIQ_ALPHA:
        raise ValueError(f"unknown ACIQ distribution {dist!r}; expected laplace or gauss")
    table = (ACIQ_ALPHA_POSITIVE if one_sided else ACIQ_ALPHA)[dist]
    if isinstance(bits, Tensor):
        missing = sorted(set(bits.flatten().tolist()) - set(table))
        if missing:
            raise ValueError(f"no ACIQ {dist} constant for {missing} bits")
        return torch.tensor([table[int(b)] for b in bits.flatten()], dtype=torch.float32).view(bits.shape)
    if bits not in table:
        raise ValueError(f"no ACIQ {dist} constant for {bits} bits")
    return table[bits]


def aciq_clip(m: Moments, bits, dist: str, one_sided: bool, cap: bool = False):
    """`(lo, hi)` of the original's `alpha2DeltaOffset` for moments `m` (floats or
    per-channel tensors; `bits` an int or per-channel tensor).

    One-sided: `[0, max(mean, 0) + c+ * spread]`; signed: offset `max(min, mean - alpha)`,
    width `2 alpha`. `cap` bounds the width by `max` (one-sided) or `max - min`.
    """
    spread = m.b if dist == "laplace" else m.std
    alpha = _constant(dist, bits, one_sided) * spread
    if one_sided:
        mean = torch.clamp(m.mean, min=0.0) if isinstance(m.mean, Tensor) else max(m.mean, 0.0)
        hi = mean + alpha
        if cap:
            hi = torch.minimum(hi, torch.as_tensor(m.hi)) if isinstance(hi, Tensor) else min(hi, m.hi)
        return (torch.zeros_like(hi) if isinstance(hi, Tensor) else 0.0), hi
    width = 2 * alpha
    if isinstance(width, Tensor) or isinstance(m.mean, Tensor):
        width = torch.as_tensor(width, dtype=torch.float32)
        if cap:
            width = torch.minimum(width, torch.as_tensor(m.hi - m.lo, dtype=torch.float32))
        lo = torch.maximum(torch.as_tensor(m.lo, dtype=torch.float32), torch.as_tensor(m.mean) - alpha)
        return lo, lo + width
    if cap:
        width = min(width, m.hi - m.lo)
    lo = max(m.lo, m.mean - alpha)
    return lo, lo + width


def aciq_range(x: Tensor, bits: int, dist: str = "laplace", pre: Moments | None = None,
               cap: bool = False) -> tuple[float, float, bool]:
    """`(lo, hi, signed)` of an activation by ACIQ's clip for `bits`.

    Args:
        x: the activation (the probe's layer input).
        bits: its bit width.
        dist: ``laplace`` or ``gauss``.
        pre: moments of the tensor before the ReLU that produced `x` (one-sided clip), or
            None: `x` is clipped around its own mean.
        cap: keep the range inside `x`'s observed `[min, max]` (the original's clip2max; for
            an input fed by a ReLU, `hi <= max(x)`: the pre-activation's max after a ReLU, at
            most 6 after a ReLU6).

    Raises:
        ValueError: an unknown distribution, or fewer than two values.

    Example:
        >>> aciq_range(torch.tensor([-1.0, 0.0, 1.0, 2.0]), 4)
        (-1.0, 9.06, True)
    """
    if pre is not None:
        lo, hi = aciq_clip(pre, bits, dist, True)
        if cap:  # the observed maximum of the ReLU's output (`pre` carries the ReLU's bounds, not it)
            hi = min(hi, float(x.detach().float().max()))
        return float(lo), float(hi), False
    lo, hi = aciq_clip(moments(x), bits, dist, False, cap)
    return float(lo), float(hi), bool(lo < 0)


class PreActivationTap:
    """While installed on a model, records the moments of every `nn.ReLU` / `nn.ReLU6`
    module's input, keyed by the output tensor, so that a layer whose input *is* such an
    output can be clipped one-sidedly from the pre-activation (`lookup`). A layer input that
    went through anything else after the ReLU (pooling, a functional relu) is not matched.
    """

    def __init__(self) -> None:
        self._pending: Moments | None = None
        self._seen: list[tuple[weakref.ref, Moments]] = []
        self._handles: list = []

    def install(self, model: nn.Module) -> "PreActivationTap":
        for m in model.modules():
            if isinstance(m, (nn.ReLU, nn.ReLU6)):
                self._handles.append(m.register_forward_pre_hook(self._before))
                self._handles.append(m.register_forward_hook(self._after))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._seen, self._pending = [], [], None

    def _before(self, module, args) -> None:
        x = args[0] if args and isinstance(args[0], Tensor) else None
        self._pending = None
        if x is not None and x.numel() >= 2:
            m = moments(x)
            m.lo, m.hi = 0.0, (6.0 if isinstance(module, nn.ReLU6) else math.inf)  # the bounds after the ReLU
            self._pending = m

    def _after(self, module, args, out) -> None:
        if self._pending is not None and isinstance(out, Tensor):
            self._seen.append((weakref.ref(out), self._pending))
        self._pending = None

    def lookup(self, x: Tensor) -> Moments | None:
        """The pre-activation moments when `x` is a recorded ReLU output, else None."""
        for ref, m in reversed(self._seen):
            if ref() is x:
                return m
        return None


# -- bit allocation --------------------------------------------------------------------------
def _bits_for(prior: Tensor, target: float) -> Tensor:
    """The original's `get_bits_alloc` (round mode), in float32 as it computes it."""
    budget = prior.numel() * 2.0 ** target
    p = prior ** (2.0 / 3)
    bins = (budget * p) / p.sum()
    bits = torch.round(torch.log2(bins))
    bits[bits < 0] = 0
    bits[bits > 8] = 8
    return bits


def aciq_allocate_bits(prior: Tensor, bits: float) -> Tensor:
    """Per-channel bits by the original's `get_bits_alloc_fixed_target`: allocate at a
    target, move the target by half the gap between `bits` and the mean, at most ten
    times, until the gap is within 0.005 bit. Bits in 0..8; the budget is met approximately.

    Args:
        prior: one value per channel (the original: each channel's std).
        bits: the mean bit width aimed at.

    Example:
        >>> aciq_allocate_bits(torch.tensor([0.1, 1.0, 10.0]), 4).tolist()
        [2.0, 4.0, 6.0]
    """
    prior = prior.detach().float().flatten()
    if not bool(prior.sum() > 0) or not bool(torch.isfinite(prior).all()):
        return torch.full_like(prior, float(bits))  # no information: every channel at `bits`
    target, delta, i = float(bits), 1.0, 0
    alloc = _bits_for(prior, target)
    while abs(2 * delta) > 0.01 and i < 10:
        i += 1
        alloc = _bits_for(prior, target)
        delta = float((bits - alloc.mean()) / 2)
        target += delta
    return alloc


def allocate_bits(alphas: Tensor, mean_bits: int, min_bits: int = 1, max_bits: int = 8) -> Tensor:
    """Our exact-budget variant (``bit_allocation_rule="exact"``): bits
    `~ round(log2(alpha_i^(2/3) / sum_j alpha_j^(2/3)) + M + log2 N)`, clamped to
    `[min_bits, max_bits]`, then adjusted one bit at a time (largest rounding loss first) so
    that they add up to exactly `M * N`.

    Raises:
        ValueError: `mean_bits` cannot be met within the bounds.
    """
    a = alphas.detach().double().flatten().clamp_min(1e-12) ** (2 / 3)
    n = a.numel()
    target = torch.log2(a / a.sum()) + mean_bits + math.log2(n)
    bits = torch.round(target).clamp(min_bits, max_bits)
    budget = mean_bits * n
    if not min_bits * n <= budget <= max_bits * n:
        raise ValueError(f"{mean_bits} bits on average cannot be met within {min_bits}..{max_bits}")
    while bits.sum() != budget:
        short = bits.sum() < budget
        room = (bits < max_bits) if short else (bits > min_bits)
        gap = (target - bits) if short else (bits - target)
        i = int(torch.argmax(torch.where(room, gap, torch.tensor(-math.inf, dtype=gap.dtype))))
        bits[i] += 1 if short else -1
    return bits.long()


# -- weight bias correction ------------------------------------------------------------------
def bias_correct(weight: Tensor, quantized: Tensor, rule: str = "mean") -> Tensor:
    """Per output channel correction of a quantized weight.

    Args:
        weight: the float weight.
        quantized: its quantized (dequantized) values, same shape.
        rule: ``mean`` (the original's `-bcw`): `Wq - mean(Wq) + mean(W)`; ``mean-std``
            (`-vcw -bcw`): `(Wq - mean(Wq)) * std(W) / (std(Wq) + 1e-8) + mean(W)`;
            ``paper``: `xi (Wq + mean(W) - mean(Wq))`, `xi = ||W - mean W|| / ||Wq - mean Wq||`
            (1 for a constant channel).

    Raises:
        ValueError: an unknown rule.

    Example:
        >>> bias_correct(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]])).tolist()
        [[1.5, 1.5]]
    """
    if rule not in BIAS_CORRECTIONS:
        raise ValueError(f"unknown bias correction {rule!r}; expected one of {', '.join(BIAS_CORRECTIONS)}")
    w = weight.detach().float().reshape(weight.shape[0], -1)
    q = quantized.detach().float().reshape(weight.shape[0], -1)
    w_mean, q_mean = w.mean(1, keepdim=True), q.mean(1, keepdim=True)
    if rule == "paper":
        q_norm = (q - q_mean).norm(dim=1, keepdim=True)
        xi = torch.where(q_norm > 0, (w - w_mean).norm(dim=1, keepdim=True) / q_norm, torch.ones_like(q_norm))
        out = xi * (q + (w_mean - q_mean))
    else:
        if rule == "mean-std":
            q = (q - q_mean) * (w.std(1, keepdim=True) / (q.std(1, keepdim=True) + 1e-8)) + q_mean
        out = q - q_mean + w_mean
    return out.reshape(weight.shape).to(quantized.dtype)


def weight_channel_bits(weight: Tensor, bits: int, rule: str = "aciq") -> Tensor | None:
    """Per-output-channel bits of a weight under ``bit_allocation`` (None: every channel
    keeps `bits`): ``aciq`` allocates on each channel's std, only at 4 bits or fewer, 0..8
    bits; ``exact`` on `(max - min) / 2`, any bit width, 1..8 bits, the budget exact."""
    if weight.shape[0] < 2 or (rule == "aciq" and bits > ACIQ_MAX_ALLOC_BITS):
        return None
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    if rule == "aciq":
        return aciq_allocate_bits(flat.std(1), bits).long()
    return allocate_bits((flat.amax(1) - flat.amin(1)) / 2, bits)
