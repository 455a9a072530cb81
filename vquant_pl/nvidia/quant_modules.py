"""NVIDIA pytorch-quantization (2.2.1) style modules: `TensorQuantizer`, drop-in
`QuantConv1d/2d/3d` and `QuantLinear` (with `input_quantizer` / `weight_quantizer`),
`initialize()` / `deactivate()` and the `quantized_layers()` context manager, and
`calibrate()` (ours: calibrate every quantizer of a model over some batches)."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .calib import HistogramCalibrator, MaxCalibrator, reduced_dims
from .utils import reduce_amax
from .tensor_quant import (HISTOGRAM_METHODS, QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL,
                           QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL, QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL,
                           QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW, QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor,
                           check_num_bits, fake_tensor_quant, tensor_quant)

class _ClipFunction(torch.autograd.Function):
    """`min(max(x, lo), hi)`; PACT gradient: x's inside, lo / hi get the sum of the
    gradients of the values clipped to them."""

    @staticmethod
    def forward(ctx, inputs, lo, hi):
        ctx.save_for_backward(inputs, lo, hi)
        return torch.max(torch.min(inputs, hi), lo)

    @staticmethod
    def backward(ctx, grad):
        inputs, lo, hi = ctx.saved_tensors
        above_lo, below_hi = (inputs > lo).to(grad.dtype), (inputs < hi).to(grad.dtype)
        grads = []
        for i, (bound, inside, what) in enumerate(((lo, above_lo, "min"), (hi, below_hi, "max")), 1):
            if not ctx.needs_input_grad[i]:  # as NVIDIA's: only a bound that needs a gradient must be a scalar
                grads.append(None)
                continue
            if bound.numel() != 1:
                raise ValueError(f"Learnable {what} value must be scalar, got size {tuple(bound.shape)}")
            grads.append((grad * (1.0 - inside)).sum().to(lo.dtype))
        return grad * above_lo * below_hi, *grads


class Clip(nn.Module):
    """Clip to `[clip_value_min, clip_value_max]`, each learnable (a scalar parameter) or fixed.

    Raises:
        ValueError: a learnable bound that is not a scalar.
    """

    def __init__(self, clip_value_min, clip_value_max, learn_min: bool = False, learn_max: bool = False):
        super().__init__()
        for name, value, learn in (("clip_value_min", clip_value_min, learn_min),
                                   ("clip_value_max", clip_value_max, learn_max)):
            if learn:
                if not isinstance(value, float) and np.size(value) != 1:
                    raise ValueError(f"clip_value_min/clip_value_max must be scalar for initializing a learnable "
                                     f"range ({name} is {value!r})")
                value = nn.Parameter(torch.tensor(value))
            setattr(self, name, value)

    def forward(self, inputs: Tensor) -> Tensor:
        return _ClipFunction.apply(inputs, torch.as_tensor(self.clip_value_min), torch.as_tensor(self.clip_value_max))


class TensorQuantizer(nn.Module):
    """Fake-quantizes (or, with `fake_quant=False`, integer-quantizes) what passes through
    it as its `QuantDescriptor` says. With no amax (fixed, set or calibrated) the amax of
    each tensor is used ("in flight").

    Args:
        quant_desc: the descriptor (default: 8 bits, per tensor).
        disabled: pass inputs through untouched.
        if_quant: quantize (the `quant` stage).
        if_clip: clip with learned bounds first (needs `learn_amax`).
        if_calib: feed inputs to the calibrator (the `calib` stage).

    Mutable properties: `num_bits`, `unsigned`, `narrow_range` (used by the next forward),
    `amax`, `pre_quant_scale` (inputs are multiplied by it first, also while disabled). Read-only: `axis`, `fake_quant`, `scale`, `step_size`.

    Raises:
        NotImplementedError: a histogram calibrator with an axis (histograms are per tensor).
        TypeError: setting an amax of another shape.
        ValueError: `if_clip` without `learn_amax`.
        AttributeError: setting a read-only property.

    Example:
        >>> q = TensorQuantizer(QuantDescriptor(num_bits=4, amax=1.0))
        >>> q(torch.tensor([0.3, -2.0]))
        tensor([ 0.2857, -1.1429])
    """

    def __init__(self, quant_desc: QuantDescriptor | None = None, disabled: bool = False, if_quant: bool = True,
                 if_clip: bool = False, if_calib: bool = False):
        super().__init__()
        desc = QuantDescriptor() if quant_desc is None else quant_desc
        if not isinstance(desc, QuantDescriptor):
            raise TypeError(f"quant_desc must be a QuantDescriptor, got {type(desc).__name__}")
        self._num_bits, self._fake_quant, self._axis = desc.num_bits, desc.fake_quant, desc.axis
        self._scale_amax, self._learn_amax = desc.scale_amax, desc.learn_amax
        self._unsigned, self._narrow_range, self._calib_method = desc.unsigned, desc.narrow_range, desc.calib_method
        self._scale = None if not desc.fake_quant else 1.0
        self._disabled, self._if_quant, self._if_clip, self._if_calib = disabled, if_quant, False, if_calib
        if desc.amax is not None:
            self.register_buffer("_amax", torch.tensor(desc.amax))
        if self._learn_amax:
            init = desc.amax if desc.amax is not None else 1.0
            self.clip = Clip(-init, init, learn_min=True, learn_max=True)
            self.enable_clip()
        if if_clip:
            self.enable_clip()
        if desc.calib_method == "max":
            self._calibrator = MaxCalibrator(self._num_bits, self._axis, self._unsigned)
        else:
            self._calibrator = HistogramCalibrator(self._num_bits, self._axis, self._unsigned)

    # -- properties (NVIDIA's names) --------------------------------------------------------
    @property
    def num_bits(self) -> int:
        return self._num_bits

    @num_bits.setter
    def num_bits(self, value: int) -> None:
        self._num_bits = check_num_bits(value)

    @property
    def unsigned(self) -> bool:
        return self._unsigned

    @unsigned.setter
    def unsigned(self, value: bool) -> None:
        self._unsigned = bool(value)

    @property
    def narrow_range(self) -> bool:
        return self._narrow_range

    @narrow_range.setter
    def narrow_range(self, value: bool) -> None:
        self._narrow_range = bool(value)

    @property
    def axis(self):
        return self._axis

    @property
    def fake_quant(self) -> bool:
        return self._fake_quant

    @property
    def scale(self):
        """The scale of the last integer quantization (1.0 in fake-quant mode)."""
        return self._scale

    @property
    def step_size(self) -> Tensor | None:
        """`amax / max_bound` (None without a fixed amax)."""
        if not hasattr(self, "_amax"):
            return None
        return self._amax / (2.0 ** (self._num_bits - 1 + int(self._unsigned)) - 1.0)

    @property
    def amax(self) -> Tensor | None:
        return getattr(self, "_amax", None)

    @property
    def pre_quant_scale(self) -> Tensor | None:
        """A factor the input is multiplied by before anything else (pytorch-quantization
        2.2's SmoothQuant-style scaling, also while disabled); None until set."""
        return getattr(self, "_pre_quant_scale", None)

    @pre_quant_scale.setter
    def pre_quant_scale(self, value) -> None:
        if value is None:
            return  # NVIDIA: "Setting pre_quant_scale no None is meaningless" (logged, nothing changes)
        value = value.detach().clone() if isinstance(value, Tensor) else torch.tensor(value)
        if not hasattr(self, "_pre_quant_scale"):
            self.register_buffer("_pre_quant_scale", value)
            return
        if self._pre_quant_scale.shape != value.shape:
            raise RuntimeError(f"Changing shape when setting pre_quant_scale is not allowed: "
                               f"{tuple(self._pre_quant_scale.shape)} -> {tuple(value.shape)}")
        self._pre_quant_scale.data.copy_(value.to(self._pre_quant_scale.device))

    @amax.setter
    def amax(self, value) -> None:
        if value is None:
            return  # NVIDIA: "Setting amax to None is meaningless" (logged, nothing changes)
        value = value.detach().clone() if isinstance(value, Tensor) else torch.tensor(value)
        if not hasattr(self, "_amax"):
            self.register_buffer("_amax", value)
            return
        if self._amax.shape != value.shape:
            raise TypeError(f"Changing shape when setting amax is not allowed: {tuple(self._amax.shape)} -> "
                            f"{tuple(value.shape)}")
        self._amax.data.copy_(value.to(self._amax.device))

    # -- stages ------------------------------------------------------------------------------
    def disable(self) -> None:
        """Bypass the module."""
        self._disabled = True

    def enable(self) -> None:
        self._disabled = False

    def enable_quant(self) -> None:
        self._if_quant = True

    def disable_quant(self) -> None:
        self._if_quant = False

    def enable_calib(self) -> None:
        if self._calibrator is None:
            raise ValueError("Calibrator was not created, cannot enable calibration.")
        self._if_calib = True

    def disable_calib(self) -> None:
        self._if_calib = False

    def enable_clip(self) -> None:
        """Clip with learned bounds (needs `learn_amax=True`)."""
        if not self._learn_amax:
            raise ValueError("learn_amax is False. Cannot enable clip.")
        self.clip.clip_value_min.requires_grad = True
        self.clip.clip_value_max.requires_grad = True
        self._if_clip = True

    def disable_clip(self) -> None:
        if not self._learn_amax:
            raise ValueError("learn_amax is False: there is no clip to disable.")
        self._if_clip = False
        self.clip.clip_value_min.requires_grad = False
        self.clip.clip_value_max.requires_grad = False

    def init_learn_amax(self) -> None:
        """Start the learned clip from the fixed amax (the max of a per-channel one)."""
        if not self._learn_amax:
            raise RuntimeError("Called init_learn_amax with learn_amax=False.")
        init = self._amax.max() if self._amax.numel() != 1 else self._amax
        self.clip.clip_value_min.data.copy_(-init.data)
        self.clip.clip_value_max.data.copy_(init.data)

    def load_calib_amax(self, *args, strict: bool = True, **kwargs) -> None:
        """Set amax from the calibrator: `compute_amax(*args, **kwargs)`, e.g.
        `load_calib_amax()` (max) or `load_calib_amax("percentile", percentile=99.9)`. With
        calib_method percentile / mse / entropy (ours) that method is the default.

        Raises:
            TypeError: a histogram calibrator and no method.
            RuntimeError: the calibrator has seen no data (with `strict=False` amax becomes NaN,
                which the next forward refuses).
        """
        if isinstance(self._calibrator, HistogramCalibrator) and not args and "method" not in kwargs:
            if self._calib_method not in HISTOGRAM_METHODS:
                raise TypeError("calib_method 'histogram' needs a method: load_calib_amax(\"percentile\" | \"mse\" "
                                "| \"entropy\", ...)")
            args = (self._calib_method,)
        amax = self._calibrator.compute_amax(*args, **kwargs)
        if amax is None:
            message = "Calibrator returned None. This usually happens when calibrator hasn't seen any tensor."
            if strict:
                raise RuntimeError(message + " Passing 'strict=False' to `load_calib_amax()` will ignore the error.")
            amax = torch.tensor(float("nan"))
        if not hasattr(self, "_amax"):
            self.register_buffer("_amax", amax.data)
        else:
            self._amax.copy_(amax)

    # -- forward -----------------------------------------------------------------------------
    def _get_amax(self, inputs: Tensor) -> Tensor:
        if hasattr(self, "_amax"):
            amax = self._amax
        else:
            amax = reduce_amax(inputs, axis=reduced_dims(self._axis, inputs.dim()), keepdims=True).detach()
        if self._scale_amax is not None:
            amax = amax.detach() * self._scale_amax
        return amax

    def _quant_forward(self, inputs: Tensor) -> Tensor:
        if self._learn_amax:
            inputs = self.clip(inputs)
            amax = torch.max(-self.clip.clip_value_min, self.clip.clip_value_max).detach()
        else:
            amax = self._get_amax(inputs)
        if self._fake_quant:
            return fake_tensor_quant(inputs, amax, self._num_bits, self._unsigned, self._narrow_range)
        # integer codes: NVIDIA's quantizer leaves narrow_range at tensor_quant's default (True) here
        outputs, self._scale = tensor_quant(inputs, amax, self._num_bits, self._unsigned)
        return outputs

    def forward(self, inputs: Tensor) -> Tensor:
        if self.pre_quant_scale is not None:  # before the disabled check, as NVIDIA's
            inputs = inputs * self.pre_quant_scale
        if self._disabled:
            return inputs
        outputs = inputs
        if self._if_calib:
            self._calibrator.collect(inputs)
        if self._if_clip:
            outputs = self.clip(inputs)
        if self._if_quant:
            outputs = self._quant_forward(inputs)
        return outputs

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a calibrated checkpoint loads into a fresh (dynamic) quantizer: make the buffer first
        for name in ("_amax", "_pre_quant_scale"):
            if prefix + name in state_dict and name not in self._buffers:
                self.register_buffer(name, state_dict[prefix + name].detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        if self._disabled:
            return "disabled"
        if not hasattr(self, "_amax"):
            amax = "dynamic"
        elif self._amax.numel() == 1:
            amax = f"{self._amax.item():.4f}"
        else:
            amax = f"[{self._amax.min().item():.4f}, {self._amax.max().item():.4f}]({self._amax.numel()})"
        bits = f"{'unsigned ' if self._unsigned else ''}{self._num_bits}bit"
        parts = [bits + (" narrow" if self._narrow_range else "") + (" fake" if self._fake_quant else ""),
                 f"axis={self._axis}" if self._axis is not None else "per-tensor", f"amax={amax}"]
        parts += [f"*{self._scale_amax}"] if self._scale_amax else []
        parts += ["pre_quant_scale"] if self.pre_quant_scale is not None else []
        parts += ["learned"] if self._learn_amax else []
        parts += [f"calibrator={type(self._calibrator).__name__}"]
        parts += [stage for stage, on in (("quant", self._if_quant), ("clip", self._if_clip), ("calib", self._if_calib))
                  if on]
        return " ".join(parts)


class QuantMixin:
    """Input and weight quantizers of a quant layer, from `quant_desc_input` /
    `quant_desc_weight` or the class defaults (`set_default_quant_desc_input/weight`)."""

    default_quant_desc_input = QUANT_DESC_8BIT_PER_TENSOR
    default_quant_desc_weight = QUANT_DESC_8BIT_PER_TENSOR

    @classmethod
    def set_default_quant_desc_input(cls, value: QuantDescriptor) -> None:
        """Descriptor of the input quantizer of layers of this class built from now on."""
        if not isinstance(value, QuantDescriptor):
            raise ValueError(f"{value!r} is not an instance of QuantDescriptor!")
        cls.default_quant_desc_input = copy.deepcopy(value)

    @classmethod
    def set_default_quant_desc_weight(cls, value: QuantDescriptor) -> None:
        """Descriptor of the weight quantizer of layers of this class built from now on."""
        if not isinstance(value, QuantDescriptor):
            raise ValueError(f"{value!r} is not an instance of QuantDescriptor!")
        cls.default_quant_desc_weight = copy.deepcopy(value)

    def init_quantizer(self, quant_desc_input: QuantDescriptor | None,
                       quant_desc_weight: QuantDescriptor | None) -> None:
        """Make `input_quantizer` and `weight_quantizer` (fake quantization only)."""
        quant_desc_input = quant_desc_input or type(self).default_quant_desc_input
        quant_desc_weight = quant_desc_weight or type(self).default_quant_desc_weight
        if not (quant_desc_input.fake_quant and quant_desc_weight.fake_quant):
            raise ValueError("Only fake quantization is supported!")
        self._fake_quant = True
        self._input_quantizer = TensorQuantizer(quant_desc_input)
        self._weight_quantizer = TensorQuantizer(quant_desc_weight)

    @property
    def input_quantizer(self) -> TensorQuantizer:
        return self._input_quantizer

    @property
    def weight_quantizer(self) -> TensorQuantizer:
        return self._weight_quantizer


def _quant_conv(base: type, weight_desc: QuantDescriptor) -> type:
    class QuantConv(base, QuantMixin):
        default_quant_desc_weight = weight_desc

        def __init__(self, *args, quant_desc_input: QuantDescriptor | None = None,
                     quant_desc_weight: QuantDescriptor | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.init_quantizer(quant_desc_input, quant_desc_weight)

        def forward(self, x: Tensor) -> Tensor:
            return self._conv_forward(self._input_quantizer(x), self._weight_quantizer(self.weight), self.bias)

    QuantConv.__name__ = QuantConv.__qualname__ = f"Quant{base.__name__}"
    QuantConv.__doc__ = (f"`nn.{base.__name__}` with quantized input (per tensor) and weight (per output channel); "
                         "`quant_desc_input=` / `quant_desc_weight=` override the class defaults.")
    return QuantConv


QuantConv1d = _quant_conv(nn.Conv1d, QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL)
QuantConv2d = _quant_conv(nn.Conv2d, QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL)
QuantConv3d = _quant_conv(nn.Conv3d, QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL)


class QuantLinear(nn.Linear, QuantMixin):
    """`nn.Linear` with quantized input (per tensor) and weight (per output row)."""

    default_quant_desc_weight = QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW

    def __init__(self, *args, quant_desc_input: QuantDescriptor | None = None,
                 quant_desc_weight: QuantDescriptor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._input_quantizer(x), self._weight_quantizer(self.weight), self.bias)


SWAPS = {"Conv1d": QuantConv1d, "Conv2d": QuantConv2d, "Conv3d": QuantConv3d, "Linear": QuantLinear}
_ORIGINALS: dict[tuple[object, str], object] = {}  # what initialize() replaced, for deactivate()


def initialize(float_module_list: Iterable[str] | None = None,
               custom_quant_modules: Iterable[tuple[object, str, type]] | None = None) -> None:
    """Make `torch.nn.Conv1d/2d/3d` and `torch.nn.Linear` build their Quant versions until
    `deactivate()` (code that imported the classes directly before is not affected).

    Every entry is checked before anything is swapped. Calling it again (also inside
    `quantized_layers()`) only swaps what the new call adds: the originals stay those of
    before the first call, never a Quant class, so `deactivate()` restores the float classes.

    Args:
        float_module_list: names to leave alone, e.g. `["Linear"]`.
        custom_quant_modules: more `(module, name, replacement)` swaps.

    Raises:
        TypeError: a custom entry that is not a `(module, name, replacement)` triple.
        AttributeError: a custom entry whose module has no attribute `name`.

    Example:
        >>> initialize(); model = torchvision.models.resnet18(); deactivate()  # doctest: +SKIP
    """
    skip = set(float_module_list or ())
    swaps = [(nn, name, cls) for name, cls in SWAPS.items() if name not in skip]
    for entry in custom_quant_modules or ():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 3 and isinstance(entry[1], str)):
            raise TypeError(f"custom_quant_modules entries are (module, name, replacement) triples, got {entry!r}")
        if not hasattr(entry[0], entry[1]):
            raise AttributeError(f"custom_quant_modules: {getattr(entry[0], '__name__', entry[0])!r} has no attribute "
                                 f"{entry[1]!r} (nothing was swapped)")
        swaps.append(tuple(entry))
    for owner, name, replacement in swaps:
        if (owner, name) not in _ORIGINALS:  # the first original, if called twice
            _ORIGINALS[(owner, name)] = _float_class(getattr(owner, name))
        setattr(owner, name, replacement)


def _float_class(cls: object) -> object:
    """`cls`, or for a Quant layer class (swapped in by `quantized_layers()`) the float class it extends."""
    if isinstance(cls, type) and issubclass(cls, QuantMixin):
        return next(base for base in cls.__mro__ if not issubclass(base, QuantMixin))
    return cls


def deactivate() -> None:
    """Undo `initialize()`: the original classes are back."""
    for (owner, name), original in _ORIGINALS.items():
        setattr(owner, name, original)
    _ORIGINALS.clear()


@contextlib.contextmanager
def quantized_layers():
    """Inside the block, `torch.nn.Conv1d/2d/3d` and `torch.nn.Linear` build their Quant
    versions, so models constructed there are quantized (code that imported the classes
    directly, `from torch.nn import Conv2d`, before the block is not affected). At the end
    the classes of before the block are back, except that an `initialize()` called inside
    holds until `deactivate()`, and a `deactivate()` inside leaves the float classes."""
    originals = {name: getattr(nn, name) for name in SWAPS}
    held = {name: (nn, name) in _ORIGINALS for name in SWAPS}  # swapped by initialize() before the block
    for name, cls in SWAPS.items():
        setattr(nn, name, cls)
    try:
        yield
    finally:
        for name, cls in originals.items():
            now = (nn, name) in _ORIGINALS
            if now and not held[name]:  # initialize() inside the block: it holds until deactivate(), which
                _ORIGINALS[(nn, name)] = _float_class(cls)  # restores the class of before the block
            else:  # a deactivate() inside the block leaves the float class
                setattr(nn, name, _float_class(cls) if held[name] and not now else cls)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int | None = None, method: str | None = None,
              **kwargs) -> int:
    """Set the amax of every enabled TensorQuantizer from up to `num_batches` batches (the
    first element of tuple batches is the input), with the model in eval mode (each module's
    training flag is restored after; BatchNorm statistics do not move). Max calibrators take
    their max; histogram ones `method` (default: their descriptor's calib_method) with `kwargs`
    (e.g. `percentile=99.9`), as NVIDIA's `compute_amax` recipe. Returns the number of batches used.

    Raises:
        ValueError: no TensorQuantizer, or no batch.
        TypeError: a `method` or `kwargs` that no quantizer uses (only max calibrators: they
            compute the max and nothing else), or `method="max"` with histogram calibrators
            (NVIDIA's `load_calib_amax` is a TypeError there too); named, before any batch runs.

    Example:
        >>> calibrate(model, loader, num_batches=4, method="percentile", percentile=99.9)  # doctest: +SKIP
    """
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and not m._disabled]
    if not named:
        raise ValueError(f"{type(model).__name__} has no enabled TensorQuantizer to calibrate")
    histogram = [n or "(model)" for n, m in named if isinstance(m._calibrator, HistogramCalibrator)]
    if method == "max" and histogram:
        raise TypeError(f"method='max': the histogram calibrators of {histogram} compute "
                        f"{' / '.join(HISTOGRAM_METHODS)} only")
    if (method not in (None, "max") or kwargs) and not histogram:
        given = ", ".join([f"method={method!r}"] * (method is not None) + [f"{k}={v!r}" for k, v in kwargs.items()])
        raise TypeError(f"calibrate({given}): every quantizer has a max calibrator, which computes the max only "
                        f"({[n or '(model)' for n, _ in named]}); give the descriptors calib_method='histogram' "
                        "(or 'percentile' / 'mse' / 'entropy') to calibrate by that method")
    quantizers = [m for _, m in named]
    stages = [(q._if_quant, q._if_calib) for q in quantizers]
    modes = [(m, m.training) for m in model.modules()]
    for q in quantizers:
        q._calibrator.reset()
        q.disable_quant(), q.enable_calib()
    used = 0
    try:
        model.eval()
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            used += 1
    finally:
        for q, (quant, calib) in zip(quantizers, stages):
            q._if_quant, q._if_calib = quant, calib
        for m, training in modes:
            m.training = training
    if used == 0:
        raise ValueError("no calibration batch")
    for q in quantizers:
        if isinstance(q._calibrator, MaxCalibrator):
            q.load_calib_amax()
        else:
            q.load_calib_amax(*(() if method is None else (method,)), **kwargs)
    return used
