"""`InputQuantizer`: the forward pre-hook that fake-quantizes a layer's input.

A plain object (no closures), so models that carry it deepcopy and pickle. While a run
fixes the ranges it is in one of two modes: `range` (the first input it sees -- the
probe -- fixes the range through `ranger`) or `collect` (a calibrator collects inputs, which
stay float). After the run, only `quantizer` (or None: the input stays float) is used.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .ops.affine import ActivationQuantizer, ChannelActivationQuantizer

Quantizer = ActivationQuantizer | ChannelActivationQuantizer


class InputQuantizer:
    """Fake-quantizes the first positional input of a layer with a fixed range."""

    def __init__(self, name: str, bits: int, channel_dim: int, quantizer: Quantizer | None = None):
        self.name, self.bits, self.channel_dim = name, bits, channel_dim
        self.quantizer = quantizer
        self.mode = "fixed"
        self.ranger: Callable[[Tensor, int], tuple] | None = None  # only while ranging
        self.calibrator = None  # only while collecting
        self.saw_negative = False

    def __call__(self, module, args: tuple):
        if not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        if self.mode == "collect":
            self._check_finite(x)
            self.calibrator.collect(x.float())
            self.saw_negative = self.saw_negative or bool(x.min() < 0)
            return None
        if self.quantizer is None:
            if self.mode != "range":
                return None  # never reached while ranging: the input stays float
            self._check_finite(x)
            try:
                lo, hi, signed = self.ranger(x, self.bits)
            except ValueError as err:
                raise ValueError(f"layer {self.name!r}: {err}") from None
            self.quantizer = ActivationQuantizer(self.bits, lo, hi, signed)
        return (self.quantizer(x), *args[1:])

    def _check_finite(self, x: Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"the input of layer {self.name!r} holds NaN or inf on the probe: a layer before it "
                             "(or the probe) produces non-finite values")

    def finish(self) -> None:
        """End of the run: drop what only ranging needed."""
        self.mode, self.ranger, self.calibrator = "fixed", None, None

    def __repr__(self) -> str:
        r = "float" if self.quantizer is None else f"{self.quantizer.bits} bits [{self.quantizer.lo:.4g}, {self.quantizer.hi:.4g}]"
        return f"InputQuantizer({self.name!r}, {r})"
