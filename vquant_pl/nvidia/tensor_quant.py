"""NVIDIA pytorch-quantization (2.2.1) style scale-only symmetric quantization.

`scale = max_bound / amax` with `max_bound = 2^(b-1) - 1` (signed) or `2^b - 1`
(unsigned); codes `clamp(round(x * scale), min_bound, max_bound)`, `min_bound = -max_bound`
with `narrow_range`, else `-max_bound - 1` (0 when unsigned). `fake_tensor_quant` returns
`codes / scale`. Both pass the gradient straight through where `|x| <= amax` and give zero
elsewhere. `amax` is a scalar or a tensor broadcastable to `x` (per channel); an amax at or
below 2^-24 quantizes its values to 0 (with scale 1). fp16 inputs are computed in fp32 and
returned in fp16, other dtypes follow torch's type promotion of `x * scale`, as NVIDIA's.
"""
from __future__ import annotations

import copy
import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor

CALIB_METHODS = ("max", "histogram", "percentile", "mse", "entropy")
#: Methods of the histogram calibrator; as a descriptor's calib_method (our extension) they
#: make a histogram calibrator whose `load_calib_amax()` uses that method by default.
HISTOGRAM_METHODS = ("percentile", "mse", "entropy")
_ZERO_AMAX = 1.0 / (1 << 24)  # NVIDIA: amax at or below the smallest fp16 subnormal is treated as 0
_FP16_MAX = 65504


class NegativeInputError(TypeError, ValueError):
    """Unsigned quantization of a tensor holding negative values (a TypeError, as NVIDIA's,
    and a ValueError, as ours was)."""


def check_num_bits(num_bits: Any, unsigned: bool = True) -> int:
    """Validate a bit width: a positive integer, at least 2 when signed.

    Raises:
        TypeError: not an integer (NVIDIA's FP8 `(4, 3)` is not offered).
        ValueError: below 1 (NVIDIA's `num_bits=0` debugging mode is not offered); 1 when
            signed (`max_bound = 2^0 - 1 = 0`: NVIDIA's gives NaN, this port refuses it).
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, numbers.Integral):
        fp8 = " (FP8 E4M3 needs NVIDIA's CUDA extension and is not offered)" if num_bits == (4, 3) else ""
        raise TypeError(f"num_bits must be a positive integer, got {num_bits!r}{fp8}")
    if num_bits < 1:
        raise ValueError(f"num_bits must be a positive integer, got {num_bits}")
    if num_bits < 2 and not unsigned:
        raise ValueError(f"signed quantization needs num_bits >= 2, got {num_bits} (its only level would be 0: "
                         "NVIDIA's gives NaN); use unsigned=True for 1 bit")
    return int(num_bits)


class QuantDescriptor:
    """How a tensor is quantized, with NVIDIA's `QuantDescriptor` arguments (read-only
    properties once built).

    Args:
        num_bits: bits per value, a positive integer.
        name: an optional label.
        fake_quant: quantize-dequantize (True) or return integer codes (False; the quant
            layers accept only True, as NVIDIA's).
        axis: None (per tensor) or the dims that keep their own amax (0: per output channel).
        amax: a fixed range, a float or a list / ndarray of floats (stored as a float32
            ndarray); None: calibrated, or per batch ("in flight").
        learn_amax: learn the range (PACT-style clip parameters); needs axis None.
        scale_amax: multiply the amax in use by this factor.
        calib_method: "max" or "histogram" (NVIDIA's), or "percentile" / "mse" / "entropy"
            (ours: a histogram calibrator with that default method).
        unsigned: quantize to `0 .. 2^b - 1`.
        narrow_range: signed codes `-(2^(b-1) - 1) .. 2^(b-1) - 1` instead of from `-2^(b-1)`.

    Raises:
        TypeError: a wrong type (an int or tensor amax, a non-str name, learn_amax with an axis).
        ValueError: num_bits below 1 (below 2 when signed: NVIDIA's gives NaN), a negative or
            non-finite amax, an unknown calib_method.

    Example:
        >>> QuantDescriptor(num_bits=4, amax=[1.0, 2.0]).amax
        array([1., 2.], dtype=float32)
    """

    def __init__(self, num_bits: int = 8, name: str | None = None, *, fake_quant: bool = True,
                 axis: int | tuple[int, ...] | None = None, amax: float | list | np.ndarray | None = None,
                 learn_amax: bool = False, scale_amax: float | None = None, calib_method: str = "max",
                 unsigned: bool = False, narrow_range: bool = False, **unused: Any):
        if unused:  # NVIDIA takes **kwargs and refuses the rest with this message
            raise TypeError(f"Unused keys: {unused.keys()}")
        self._num_bits = check_num_bits(num_bits, unsigned)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string or None, got {type(name).__name__}")
        if axis is not None and not isinstance(axis, (int, tuple, list)):
            raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
        if learn_amax and axis is not None:
            raise TypeError(f"axis is ignored and must be None when learn_amax is true, got {type(axis)} ({axis!r})")
        if amax is not None:
            if isinstance(amax, bool) or not isinstance(amax, (float, list, np.ndarray)):
                raise TypeError(f"amax must be float, list or ndarray, not {type(amax)} ({amax!r})"
                                + (": write 1.0, not 1" if isinstance(amax, int) else ""))
            amax = np.array(amax, dtype=np.float32)
            if not np.isfinite(amax).all() or (amax < 0).any():
                raise ValueError(f"amax must be finite and >= 0, got {amax.tolist()!r}")
        if scale_amax is not None and (isinstance(scale_amax, bool) or not isinstance(scale_amax, numbers.Real)):
            raise TypeError(f"scale_amax must be a number or None, got {scale_amax!r}")
        if calib_method not in CALIB_METHODS:
            raise ValueError(f"unknown calib_method {calib_method!r}; expected one of {', '.join(CALIB_METHODS)}")
        self._name, self._fake_quant, self._axis, self._amax = name, bool(fake_quant), axis, amax
        self._learn_amax, self._scale_amax, self._calib_method = bool(learn_amax), scale_amax, calib_method
        self._unsigned, self._narrow_range = bool(unsigned), bool(narrow_range)

    num_bits = property(lambda self: self._num_bits)
    name = property(lambda self: self._name)
    fake_quant = property(lambda self: self._fake_quant)
    axis = property(lambda self: self._axis)
    amax = property(lambda self: self._amax)
    learn_amax = property(lambda self: self._learn_amax)
    scale_amax = property(lambda self: self._scale_amax)
    calib_method = property(lambda self: self._calib_method)
    unsigned = property(lambda self: self._unsigned)
    narrow_range = property(lambda self: self._narrow_range)

    def dict(self) -> dict:
        """The arguments that differ from the defaults (num_bits and name always), as NVIDIA's."""
        out: dict = {"num_bits": self._num_bits, "name": self._name}
        defaults = {"fake_quant": True, "axis": None, "amax": None, "scale_amax": None, "learn_amax": False,
                    "calib_method": "max", "unsigned": False, "narrow_range": False}
        for key, default in defaults.items():
            value = getattr(self, key)
            if value is not None and not (default is not None and value == default):
                out[key] = value.tolist() if isinstance(value, np.ndarray) else value
        return out

    def __eq__(self, other) -> bool:
        return isinstance(other, QuantDescriptor) and self.dict() == other.dict()

    def __deepcopy__(self, memo):
        return QuantDescriptor(**copy.deepcopy(self.dict(), memo))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.dict().items() if not (k == "name" and v is None))
        return f"QuantDescriptor({args})"


# NVIDIA's predefined descriptors
QUANT_DESC_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8)
QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8, unsigned=True)
QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=(0))
QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=(0))
QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=(0))
QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW = QuantDescriptor(num_bits=8, axis=(0))


def _quantize(inputs: Tensor, amax: Tensor, num_bits: int, unsigned: bool, narrow_range: bool) -> tuple[Tensor, Tensor]:
    """Codes and scale, step by step as NVIDIA's shared body (so dtypes promote the same way)."""
    if unsigned and inputs.min() < 0:
        raise NegativeInputError("Negative values encountered in unsigned quantization.")
    input_dtype = inputs.dtype
    if inputs.dtype == torch.half:  # computed in fp32 to avoid overflow
        inputs = inputs.float()
    if amax.dtype == torch.half:
        amax = amax.float()
    min_amax = amax.min()
    if min_amax < 0:
        raise ValueError(f"amax must be >= 0, got a minimum of {min_amax.item()}")
    if not torch.isfinite(amax).all():
        raise ValueError("amax must be finite (a NaN or infinite amax is refused, NVIDIA would return NaN)")
    max_bound = torch.tensor(2.0 ** (num_bits - 1 + int(unsigned)) - 1.0, device=amax.device)
    min_bound = 0 if unsigned else (-max_bound if narrow_range else -max_bound - 1)
    scale = max_bound / amax
    zero_amax = amax <= _ZERO_AMAX if min_amax <= _ZERO_AMAX else None
    if zero_amax is not None:
        scale[zero_amax] = 0  # the values of a zero range quantize to 0 ...
    codes = torch.clamp((inputs * scale).round_(), min_bound, max_bound)
    if zero_amax is not None:
        scale[zero_amax] = 1.0  # ... and dequantize with scale 1
    if input_dtype == torch.half:
        codes = codes.half()
    return codes, scale


def _straight_through(inputs: Tensor, amax: Tensor, grad: Tensor) -> Tensor:
    return torch.where(inputs.abs() <= amax, grad, grad.new_zeros(1))


class TensorQuantFunction(torch.autograd.Function):
    """`(codes, scale)` of `inputs`; straight-through gradient inside `[-amax, amax]`."""

    @staticmethod
    def forward(ctx, inputs, amax, num_bits=8, unsigned=False, narrow_range=True):
        ctx.save_for_backward(inputs, amax)
        codes, scale = _quantize(inputs, amax, num_bits, unsigned, narrow_range)
        if codes.dtype == torch.half and scale.max() > _FP16_MAX:
            raise ValueError(f"scale is too large for FP16 with amax={amax}")
        return codes, scale.to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_codes, grad_scale):
        inputs, amax = ctx.saved_tensors
        return _straight_through(inputs, amax, grad_codes), None, None, None, None


class FakeTensorQuantFunction(torch.autograd.Function):
    """`codes / scale` of `inputs`; straight-through gradient inside `[-amax, amax]`."""

    @staticmethod
    def forward(ctx, inputs, amax, num_bits=8, unsigned=False, narrow_range=True):
        ctx.save_for_backward(inputs, amax)
        codes, scale = _quantize(inputs, amax, num_bits, unsigned, narrow_range)
        return codes / scale.to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad):
        inputs, amax = ctx.saved_tensors
        return _straight_through(inputs, amax, grad), None, None, None, None


def _as_amax(amax, like: Tensor) -> Tensor:
    if isinstance(amax, Tensor):
        return amax
    return torch.as_tensor(np.asarray(amax, dtype=np.float32), device=like.device)


def tensor_quant(inputs: Tensor, amax: Tensor | float, num_bits: int = 8, unsigned: bool = False,
                 narrow_range: bool = True) -> tuple[Tensor, Tensor]:
    """Integer codes (as floats, fp16 for fp16 inputs) of `inputs` and the scale they were made with.

    Args:
        inputs: the tensor.
        amax: the range, a number or a tensor broadcastable to `inputs` (values at or below
            2^-24 quantize to 0 with scale 1).
        num_bits, unsigned, narrow_range: see `QuantDescriptor` (narrow range by default here).

    Raises:
        ValueError: a negative or non-finite amax; an fp16 input whose scale exceeds 65504;
            signed with num_bits 1 (NVIDIA's gives NaN).
        NegativeInputError: unsigned with negative inputs.

    Example:
        >>> tensor_quant(torch.tensor([0.5, -1.0]), 1.0)
        (tensor([  64., -127.]), tensor(127.))
    """
    check_num_bits(num_bits, unsigned)
    return TensorQuantFunction.apply(inputs, _as_amax(amax, inputs), num_bits, unsigned, narrow_range)


def fake_tensor_quant(inputs: Tensor, amax: Tensor | float, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = True) -> Tensor:
    """Quantize-dequantize `inputs` (arguments and errors as `tensor_quant`).

    Example:
        >>> fake_tensor_quant(torch.tensor([0.5, -1.0]), 1.0)
        tensor([ 0.5039, -1.0000])
    """
    check_num_bits(num_bits, unsigned)
    return FakeTensorQuantFunction.apply(inputs, _as_amax(amax, inputs), num_bits, unsigned, narrow_range)
