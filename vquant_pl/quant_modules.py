"""NVIDIA pytorch-quantization style modules: `TensorQuantizer`, drop-in `QuantConv1d/2d/3d`
and `QuantLinear`, the `quantized_layers()` context manager and `calibrate()`."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import Tensor, nn

from .calib import make_calibrator
from .tensor_quant import QuantDescriptor, fake_tensor_quant, reduce_amax


class TensorQuantizer(nn.Module):
    """Fake-quantizes what passes through it as its `QuantDescriptor` says. With no amax
    (fixed or calibrated) the amax of each batch is used ("in flight")."""

    def __init__(self, quant_desc: QuantDescriptor | None = None, disabled: bool = False):
        super().__init__()
        self.desc = quant_desc or QuantDescriptor()
        self._disabled, self._quant, self._calib = disabled, True, False
        self._calibrator = make_calibrator(self.desc.calib_method, self.desc.num_bits, self.desc.axis,
                                           self.desc.unsigned)
        if self.desc.amax is not None:
            self.register_buffer("_amax", torch.tensor(float(self.desc.amax)))

    @property
    def amax(self) -> Tensor | None:
        return getattr(self, "_amax", None)

    @amax.setter
    def amax(self, value) -> None:
        value = torch.as_tensor(value, dtype=torch.float32).detach().clone()
        if hasattr(self, "_amax"):
            self._amax = value.to(self._amax.device)
        else:
            self.register_buffer("_amax", value)

    def enable(self): self._disabled = False  # noqa: E704
    def disable(self): self._disabled = True  # noqa: E704
    def enable_quant(self): self._quant = True  # noqa: E704
    def disable_quant(self): self._quant = False  # noqa: E704
    def enable_calib(self): self._calib = True  # noqa: E704
    def disable_calib(self): self._calib = False  # noqa: E704

    def load_calib_amax(self, method: str | None = None, **kwargs) -> None:
        """Set amax from the calibrator (`method`: max, percentile, mse, entropy)."""
        amax = self._calibrator.compute_amax(method or self.desc.calib_method, **kwargs)
        if amax is None:
            raise RuntimeError("the calibrator has seen no data")
        self.amax = amax

    def forward(self, x: Tensor) -> Tensor:
        if self._disabled:
            return x
        if self._calib:
            self._calibrator.collect(x)
        if not self._quant:
            return x
        amax = self.amax if self.amax is not None else reduce_amax(x, self.desc.axis)
        return fake_tensor_quant(x, amax.clamp_min(1e-12), self.desc.num_bits, self.desc.unsigned,
                                 self.desc.narrow_range)

    def extra_repr(self) -> str:
        amax = "dynamic" if self.amax is None else f"amax={self.amax.flatten()[:4].tolist()}"
        return f"{self.desc.num_bits}bit axis={self.desc.axis} {amax}" + (" disabled" if self._disabled else "")


class _QuantMixin:
    default_quant_desc_input = QuantDescriptor(num_bits=8)
    default_quant_desc_weight = QuantDescriptor(num_bits=8, axis=0)

    def _init_quantizers(self, quant_desc_input, quant_desc_weight) -> None:
        self._input_quantizer = TensorQuantizer(quant_desc_input or self.default_quant_desc_input)
        self._weight_quantizer = TensorQuantizer(quant_desc_weight or self.default_quant_desc_weight)


def _quant_conv(base: type) -> type:
    class QuantConv(_QuantMixin, base):
        def __init__(self, *args, quant_desc_input=None, quant_desc_weight=None, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_quantizers(quant_desc_input, quant_desc_weight)

        def forward(self, x: Tensor) -> Tensor:
            return self._conv_forward(self._input_quantizer(x), self._weight_quantizer(self.weight), self.bias)

    QuantConv.__name__ = QuantConv.__qualname__ = f"Quant{base.__name__}"
    QuantConv.__doc__ = f"`nn.{base.__name__}` with quantized input and weight (per output channel)."
    return QuantConv


QuantConv1d = _quant_conv(nn.Conv1d)
QuantConv2d = _quant_conv(nn.Conv2d)
QuantConv3d = _quant_conv(nn.Conv3d)


class QuantLinear(_QuantMixin, nn.Linear):
    """`nn.Linear` with quantized input and weight (per output channel)."""

    def __init__(self, *args, quant_desc_input=None, quant_desc_weight=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quantizers(quant_desc_input, quant_desc_weight)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self._input_quantizer(x), self._weight_quantizer(self.weight), self.bias)


SWAPS = {"Conv1d": QuantConv1d, "Conv2d": QuantConv2d, "Conv3d": QuantConv3d, "Linear": QuantLinear}


@contextlib.contextmanager
def quantized_layers():
    """Inside the block, `torch.nn.Conv1d/2d/3d` and `torch.nn.Linear` build their Quant
    versions, so models constructed there are quantized (code that imported the classes
    directly, `from torch.nn import Conv2d`, before the block is not affected)."""
    originals = {name: getattr(nn, name) for name in SWAPS}
    for name, cls in SWAPS.items():
        setattr(nn, name, cls)
    try:
        yield
    finally:
        for name, cls in originals.items():
            setattr(nn, name, cls)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int | None = None, method: str | None = None,
              **kwargs) -> int:
    """Set every TensorQuantizer's amax from up to `num_batches` batches (the first element
    of tuple batches is the input). Returns the number of batches used."""
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    if not quantizers:
        raise ValueError(f"{type(model).__name__} has no TensorQuantizer to calibrate")
    for q in quantizers:
        q._calibrator.reset()
        q.disable_quant(), q.enable_calib()
    used = 0
    try:
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            used += 1
    finally:
        for q in quantizers:
            q.enable_quant(), q.disable_calib()
    if used == 0:
        raise ValueError("no calibration batch")
    for q in quantizers:
        q.load_calib_amax(method, **kwargs)
    return used
