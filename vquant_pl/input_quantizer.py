"""`InputQuantizer`: the forward pre-hook that fake-quantizes a layer's input.

A plain object (no closures), so models that carry it deepcopy and pickle. While a run
fixes the ranges it is in one of two modes: `range` (each input it sees -- the probe,
once per call of the layer in one forward -- is ranged through `ranger`, and the range
covers every call) or `collect` (a calibrator collects inputs, which
stay float). After the run, only `quantizer` (or None: the input stays float) is used.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .ops.affine import ActivationQuantizer, ChannelActivationQuantizer

Quantizer = ActivationQuantizer | ChannelActivationQuantizer


def union_range(ranges: list[tuple[float, float, bool]]) -> tuple[float, float, bool]:
    """One `(lo, hi, signed)` covering every range (of a layer called more than once per
    forward). Ranges of rule 3's form (`[0, a]` or `[-a, a]`) give one of that form: a signed
    union is `[-alpha, alpha]`; ranges of another form (ACIQ's mean-centred ones) give the hull."""
    lo, hi, signed = min(r[0] for r in ranges), max(r[1] for r in ranges), any(r[2] for r in ranges)
    if signed and all(r[0] == 0 or r[0] == -r[1] for r in ranges):
        alpha = max(-lo, hi)
        lo, hi = -alpha, alpha
    return lo, hi, signed


class InputQuantizer:
    """Fake-quantizes the first positional input of a layer with a fixed range."""

    #: Class-level defaults: a model pickled before these attributes existed loads finished.
    calls: int = 0
    counting: bool = False

    def __init__(self, name: str, bits: int, channel_dim: int, quantizer: Quantizer | None = None):
        self.name, self.bits, self.channel_dim = name, bits, channel_dim
        self.quantizer = quantizer
        self.mode = "fixed"
        self.ranger: Callable[[Tensor, int], tuple] | None = None  # only while ranging
        self.calibrator = None  # only while collecting
        self.saw_negative = False
        self.calls = 0  # inputs seen while the run fixes the ranges (a module called twice in one forward: 2)
        self.counting = True

    def __call__(self, module, args: tuple):
        if not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        if self.counting:
            self.calls += 1
        if self.mode == "collect":
            self._check_finite(x)
            self.calibrator.collect(x.float())
            self.saw_negative = self.saw_negative or bool(x.min() < 0)
            return None
        if self.mode == "range":
            self._check_finite(x)
            try:
                lo, hi, signed = self.ranger(x, self.bits)
                q = self.quantizer
                if q is not None:  # called again in the same forward: the range covers every call
                    lo, hi, signed = union_range([(lo, hi, signed), (q.lo, q.hi, q.signed)])
                self.quantizer = ActivationQuantizer(self.bits, lo, hi, signed)
            except ValueError as err:
                raise ValueError(f"layer {self.name!r}: {err}") from None
        elif self.quantizer is None:
            return None  # never reached while ranging: the input stays float
        return (self.quantizer(x), *args[1:])

    def _check_finite(self, x: Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"the input of layer {self.name!r} holds NaN or inf on the probe: a layer before it "
                             "(or the probe) produces non-finite values")

    def finish(self) -> None:
        """End of the run: drop what only ranging needed."""
        self.mode, self.ranger, self.calibrator, self.counting = "fixed", None, None, False

    def __repr__(self) -> str:
        r = "float" if self.quantizer is None else f"{self.quantizer.bits} bits [{self.quantizer.lo:.4g}, {self.quantizer.hi:.4g}]"
        return f"InputQuantizer({self.name!r}, {r})"
