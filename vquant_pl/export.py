"""ONNX (QDQ) export of a quantized model: the model you evaluated is the model you ship.

`export_onnx` writes a model quantized by `quantize_model` (or the callback with
`keep_quantized=True`) or built from the NVIDIA-style `QuantConv*`/`QuantLinear` layers
through PyTorch's own exporter (`torch.onnx.export(..., dynamo=True)`), with a translation
of the quantization operators into ONNX `QuantizeLinear`/`DequantizeLinear` (opset 21):

- vquant layers: the weight as integer codes (uint8, or uint4 with `four_bit=True` where
  every channel has at most 4 bits) with its per-channel scale and zero point and one
  `DequantizeLinear`; the layer input as `QuantizeLinear` -> (integer `Clip` when the bit
  width is narrower than the type) -> `DequantizeLinear` with the layer's fixed range
  (`vquant::fake_quant` translated; per-channel ranges of `act_bit_allocation` with
  per-axis scales and per-channel integer clamps). The first layer's input stays float,
  the last layer's is 8-bit, as evaluated. A layer with a channel whose zero point cannot be held in
  8 bits (all weights of one sign: its codes span values on one side of zero) is stored as
  uint16 codes, an input range too far from zero in 16-bit QDQ; both are reported.
- NVIDIA-style layers: scale-only symmetric QDQ (`scale = amax / (2^(b-1) - 1)`, zero
  point 0, int8 -- uint8 when unsigned; with `four_bit=True` int4/uint4 where the codes fill
  the type), on the input and on the float weight (axis 0), as pytorch-quantization's export
  writes it, so TensorRT accepts it. A quantizer's `pre_quant_scale` is a `Mul` before its
  QDQ (broadcast as in PyTorch). A `TensorQuantizer` outside a quant layer is refused.

With `four_bit=True` an input is held in a 4-bit type only where its codes fill it (4 bits;
not a narrow range): ONNX has no Clip of 4-bit integers, so a narrower input stays 8-bit with
its Clip (the report says which). A tied weight (one storage, as `quantize_model` sees it)
is written as the same codes for each layer; a pruned layer (`torch.nn.utils.prune`) as the
codes of `weight_orig * mask`, its pruned weights at the zero point.

ONNX dequantizes as `(y - zero_point) * scale` and quantizes as `round(x / scale)`; vquant
(rules 2 and 3) divides by and multiplies with `(2^b - 1) / width`. The ONNX scale is the
float32 nearest to the reciprocal, so the two agree to the last bit of a weight and, for
an activation, except where a value lies within rounding error of a code boundary;
`ExportReport.max_abs_diff` says how far the logits moved on the example input (the file's
operators as written, run in onnxruntime without graph optimizations). A larger difference
than float rounding explains (`ExportReport.tolerance`: how far PyTorch's own outputs move
when the example input moves by 1e-4 of itself) is an `ExportMismatch`, and the file is
not written: it is written to a temporary file beside `path`, checked, and only then moved
into place, so a failed export leaves no file. `ExportReport.optimized_diff` is the same
difference with onnxruntime's optimizations and integer kernels (`ort_session`), reported.

The file's `metadata_props` carry `vquant.version`, `vquant.preprocessing` (the model's
`Preprocessing` as JSON, at the exported input size) and `vquant.quant_config` (the
`QuantConfig` of a vquant model as JSON, sigma resolved).

Example:
    >>> import torch, vquant_pl as vq
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> _ = vq.quantize_model(net, 8, 8, probe=vq.Probe(shape=(4, 3, 16, 16)))
    >>> report = vq.export_onnx(net, "net.onnx", torch.rand(2, 3, 16, 16))  # doctest: +SKIP
    >>> report.max_abs_diff < 1e-3  # doctest: +SKIP
    True
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from .methods.aciq import weight_channel_bits
from .models import Preprocessing, preprocessing_for
from .nvidia.quant_modules import TensorQuantizer
from .ops.affine import ActivationQuantizer, ChannelActivationQuantizer, affine_scale, dequantize
from .quantize import weight_source, apply_transforms
from .state import copy_model, input_quantizer, iter_states, originals, restore_all, storage_key

OPSET = 21
EXTRA = "pip install 'vquant-pl[export]'"
#: onnxruntime operators that compute with integers.
INTEGER_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
               "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu")
_RANGES = {"uint4": (0, 15), "int4": (-8, 7), "uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535),
           "int16": (-32768, 32767), "int32": (-2 ** 31, 2 ** 31 - 1)}


def require_onnx() -> None:
    """Raise ImportError naming the `export` extra when onnx, onnxruntime or onnxscript is missing."""
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}, which are not installed: {EXTRA}")


@dataclass
class ExportLayer:
    """How one quantized layer was written."""

    name: str
    style: str  # "vquant" or "nvidia"
    weight: str  # e.g. "uint8 codes, per channel" or "int8 QDQ, symmetric"
    input: str  # "float" or e.g. "uint8 QDQ, 4 bits (Clip)"
    ort_op: str = ""  # the onnxruntime operator it ran as (after graph optimization); one per call, "/"-joined
    note: str = ""


@dataclass
class ExportReport:
    """What `export_onnx` wrote, and how the file compares with PyTorch on the example input."""

    path: str
    opset: int
    layers: list[ExportLayer] = field(default_factory=list)
    max_abs_diff: float | None = None  # largest |ONNX - PyTorch| output on the example input (the file's ops as written)
    same_argmax: float | None = None  # fraction of example rows whose top-1 class agrees (in `ort_session`)
    tolerance: float | None = None  # the largest max_abs_diff float rounding explains (see `_tolerance`)
    optimized_diff: float | None = None  # largest |ONNX - PyTorch| in `ort_session` (onnxruntime's own kernels)
    metadata: dict[str, str] = field(default_factory=dict)  # the file's metadata_props

    @property
    def integer_layers(self) -> list[str]:
        """Layers onnxruntime ran as integer kernels (every call of the layer)."""
        return [layer.name for layer in self.layers
                if layer.ort_op and all(op in INTEGER_OPS for op in layer.ort_op.split("/"))]

    def table(self) -> str:
        """One line per layer: name, weight, input, onnxruntime operator, note."""
        rows = [f"{'layer':32} {'weight':28} {'input':30} {'onnxruntime':14} note"]
        rows += [f"{r.name[:32]:32} {r.weight:28} {r.input:30} {r.ort_op:14} {r.note}" for r in self.layers]
        return "\n".join(rows)


class ExportMismatch(ValueError):
    """The ONNX file computes another function than the PyTorch model (its output differs by
    more than float rounding explains); the file was not written."""


# ---------------------------------------------------------------------------------- parameters
@dataclass
class _QDQ:
    """ONNX parameters of one QuantizeLinear/DequantizeLinear (or weight DequantizeLinear)."""

    dtype: str
    scale: np.ndarray  # float32, [] or [C]
    zero_point: np.ndarray  # int64, like scale
    clip: tuple[np.ndarray, np.ndarray] | None = None  # integer bounds, when narrower than the type
    axis: int = 1
    codes: np.ndarray | None = None  # weights only: the stored integers
    torch_fn: object = None  # what the PyTorch model does here (used while tracing)


def _reciprocal(scale: Tensor) -> np.ndarray:
    """The float32 nearest to `1 / scale` (ONNX multiplies where vquant divides)."""
    return (1.0 / scale.detach().double().cpu().numpy()).astype(np.float32)


def _fit_zero_point(v_min: np.ndarray, v_max: np.ndarray, prefer: np.ndarray, dtypes) -> tuple[str, np.ndarray] | None:
    """The first type of `dtypes` holding `y = v + zp` for every `v` in `[v_min, v_max]` with
    a zero point `zp` of the same type (per channel, nearest to `prefer`), or None."""
    for dtype in dtypes:
        t_min, t_max = _RANGES[dtype]
        lo, hi = np.maximum(t_min, t_min - v_min), np.minimum(t_max, t_max - v_max)
        if np.all(lo <= hi):
            return dtype, np.clip(prefer, lo, hi).astype(np.int64)
    return None


def _activation_qdq(scale: Tensor, zero_point: Tensor, q_min: Tensor, q_max: Tensor, signed: bool,
                    four_bit: bool, axis: int) -> _QDQ:
    """Rule 3 as ONNX QDQ: vquant's value `(q + zp) / s` with `q` in `[q_min, q_max]` is
    `(y - zp') * (1/s)` with `y = q + zp + zp'`."""
    zp = zero_point.detach().double().cpu().numpy().astype(np.int64).reshape(-1)
    q_lo = q_min.detach().double().cpu().numpy().astype(np.int64).reshape(-1)
    q_hi = q_max.detach().double().cpu().numpy().astype(np.int64).reshape(-1)
    # a 4-bit type only where every channel's codes fill it: ONNX has no Clip of 4-bit integers
    small = ["int4" if signed else "uint4"] if four_bit and bool(np.all(q_hi - q_lo == 15)) else []
    wide = ["int8", "int16"] if signed else ["uint8", "uint16"]
    dtype, zpo = _fit_zero_point(q_lo + zp, q_hi + zp, -zp, small + wide)  # int16 always fits rule 3's codes
    y_lo, y_hi = q_lo + zp + zpo, q_hi + zp + zpo
    t_min, t_max = _RANGES[dtype]
    clip = None if np.all(y_lo == t_min) and np.all(y_hi == t_max) else (y_lo, y_hi)
    ys = _reciprocal(scale).reshape(-1)
    if ys.size == 1:
        ys, zpo = ys.reshape(()), zpo.reshape(())
        clip = None if clip is None else (clip[0].reshape(()), clip[1].reshape(()))
    return _QDQ(dtype, ys, zpo, clip, axis)


def _quantizer_qdq(quantizer, four_bit: bool) -> _QDQ:
    if isinstance(quantizer, ActivationQuantizer):
        t = lambda v: torch.tensor([float(v)])  # noqa: E731
        return _activation_qdq(quantizer.scale, quantizer.zero_point, t(quantizer.q_min), t(quantizer.q_max),
                               quantizer.signed, four_bit, 1)
    return _activation_qdq(quantizer.scale, quantizer.zero_point, quantizer.q_min, quantizer.q_max,
                           quantizer.signed, four_bit, quantizer.dim)


def _describe(qdq: _QDQ, bits: int | str) -> str:
    per = ", per channel" if qdq.scale.ndim else ""
    return f"{qdq.dtype} QDQ, {bits} bits{per}" + (" (Clip)" if qdq.clip is not None else "")


def _weight_qdq(name: str, quantized: Tensor, before: Tensor, channel_bits: Tensor, four_bit: bool) -> tuple[_QDQ, str]:
    """Integer codes of a vquant weight: recomputes rule 2's scale and zero point from the
    weight before rounding and checks that the codes give back the evaluated weight exactly."""
    oc = quantized.shape[0]
    w = before.detach().float().reshape(oc, -1)
    bits = channel_bits.to(w.device).reshape(oc, 1)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    n = 2.0 ** (bits.float() - 1)
    levels = (2.0 ** bits.float() - 1)
    scale = levels / torch.clamp(hi - lo, min=1e-8) if channel_bits.unique().numel() > 1 else \
        affine_scale(lo, hi, int(channel_bits[0]))
    zp = torch.round(scale * lo) + n
    wq = quantized.detach().float().reshape(oc, -1)
    q = torch.round(wq * scale - zp)
    exact = (dequantize(q, scale, zp) == wq).all(1) & (q >= -n).all(1) & (q <= n - 1).all(1)
    if not bool(exact.all()):
        c = int((~exact).nonzero()[0])
        raise ValueError(f"layer {name!r}: output channel {c} of the quantized weight is not on its integer grid "
                         "(a correction after rounding moved it, e.g. bias_correction=True): it has no integer "
                         "codes to export")
    v = (q + zp).cpu().numpy().astype(np.int64)  # the integer value of each weight, `(q + zp)`
    v_min, v_max = (-n + zp).cpu().numpy().astype(np.int64)[:, 0], (n - 1 + zp).cpu().numpy().astype(np.int64)[:, 0]
    small = ["uint4"] if four_bit and int(channel_bits.max()) <= 4 else []
    fit = _fit_zero_point(v_min, v_max, -v_min, small + ["uint8", "uint16"])
    if fit is None:
        raise ValueError(f"layer {name!r}: a channel's weights lie so far from zero for their spread that their "
                         "integer values exceed 16 bits")
    dtype, zpo = fit
    note = ""
    if dtype == "uint16":
        far = int(sum(_fit_zero_point(v_min[i:i + 1], v_max[i:i + 1], -v_min[i:i + 1], small + ["uint8"]) is None
                      for i in range(oc)))
        note = (f"uint16 codes: {far} of {oc} channels have all weights of one sign, their zero point lies "
                "outside 8 bits")
    codes = (v + zpo[:, None]).reshape(quantized.shape)
    return _QDQ(dtype, _reciprocal(scale).reshape(-1), zpo, None, 0, codes), note


def _weight_bits(layer_name: str, before: Tensor, config, layer_bits: int) -> Tensor:
    """Bits per output channel, as `quantize_model` gave them: ACIQ's bit allocation around the
    layer's bits, or the layer's bits (`config.weight_bits`, or its own under mixed precision)."""
    bits = weight_channel_bits(before, layer_bits, config.bit_allocation_rule) if config.bit_allocation else None
    if bits is None:
        return torch.full((before.shape[0],), layer_bits, dtype=torch.long)
    if bool((bits == 0).any()):
        raise ValueError(f"layer {layer_name!r}: output channel {int((bits == 0).nonzero()[0])} got 0 bits from the "
                         "bit allocation (its weights are set to their minimum): it has no integer grid to export")
    return bits


def _weights_before_rounding(model: nn.Module, states: list) -> dict[str, Tensor]:
    """Each quantized layer's weight as it was just before rounding: the saved original, or,
    when a transform (equalization, weight clipping) ran, that transform applied again to
    a restored copy."""
    config = states[0][2].run.config
    if config.equalize or config.weight_clip:
        twin = copy_model(model)
        restore_all(twin)
        layers = [(name, twin.get_submodule(name)) for name, _, _ in states]
        bits = {name: state.row.weight_bits for name, _, state in states}  # each layer's, under mixed precision
        apply_transforms(twin, config, save=lambda module, name: True, layers=layers, weight_bits=bits)
        return {name: twin.get_submodule(name).weight.detach().clone() for name, _, _ in states}
    saved: dict[tuple, Tensor] = {}  # by storage, as quantize_model saves a tied weight: once
    for module in model.modules():
        for key, value in originals(module).items():
            saved.setdefault(storage_key(getattr(module, key)), value)
    out = {}
    for name, layer, _ in states:
        if weight_source(name, layer) == "weight":
            value = saved.get(storage_key(layer.weight))
        else:  # pruned: quantize_model rounded `weight` (weight_orig * mask) and saved it on the layer
            if "weight_orig" not in originals(layer):
                raise ValueError(f"layer {name!r} was pruned after quantize_model: its masked weight is off the "
                                 "integer grid; prune the float model, then quantize it")
            value = originals(layer).get("weight")
        if value is None:
            raise ValueError(f"layer {name!r}: the float weight before rounding is not saved on the model")
        out[name] = value
    return out


# ------------------------------------------------------------------------ operators for the export
_PARAMS: dict[str, _QDQ] = {}  # key -> parameters, only during one export


@torch.library.custom_op("vquant_export::qdq", mutates_args=())
def _qdq_op(x: Tensor, key: str) -> Tensor:
    return _PARAMS[key].torch_fn(x).clone()


@torch.library.custom_op("vquant_export::weight", mutates_args=())
def _weight_op(weight: Tensor, key: str) -> Tensor:
    return weight.clone()


@_qdq_op.register_fake
def _(x, key):
    return torch.empty_like(x)


@_weight_op.register_fake
def _(weight, key):
    return torch.empty_like(weight)


def _onnx_translations(four_bit: bool) -> dict:
    """The translation of the vquant operators into ONNX (onnxscript, opset 21)."""
    import onnx_ir as ir
    from onnxscript import opset21 as op

    def const(array: np.ndarray, dtype: str):
        if dtype in ("uint4", "int4"):
            import ml_dtypes

            array = np.asarray(array).astype(getattr(ml_dtypes, dtype))
        else:
            array = np.asarray(array).astype(np.dtype(dtype) if dtype != "float32" else np.float32)
        return op.Constant(value=ir.tensor(array))

    def qdq(x, p: _QDQ):
        axis = {"axis": p.axis} if p.scale.ndim else {}
        ys, zp = const(p.scale, "float32"), const(p.zero_point, p.dtype)
        rank = len(x.shape) if x.shape is not None else 4
        bound = (lambda v, dtype: const(_channel_shape(v, p.axis, rank), dtype)) if p.scale.ndim else const
        wide = p.clip is not None and p.dtype.endswith("16")
        if wide:  # onnxruntime clamps no 16-bit integers: clamp the float input to the codes' bounds (exact: monotone)
            lo, hi = ((c - p.zero_point) * p.scale.astype(np.float64) for c in p.clip)
            x = op.Min(op.Max(x, bound(lo, "float32")), bound(hi, "float32"))
        y = op.QuantizeLinear(x, ys, zp, **axis)
        if p.clip is not None and not wide:  # integer bounds of a bit width narrower than the type
            lo, hi = p.clip
            y = op.Min(op.Max(y, bound(lo, p.dtype)), bound(hi, p.dtype)) if p.scale.ndim else \
                op.Clip(y, const(lo, p.dtype), const(hi, p.dtype))
        return op.DequantizeLinear(y, ys, zp, **axis)

    def fake_quant(x, scale: float, zero_point: float, q_min: int, q_max: int):
        t = lambda v: torch.tensor([float(v)])  # noqa: E731
        signed = q_min < 0
        p = _activation_qdq(torch.tensor([scale], dtype=torch.float32), t(zero_point), t(q_min), t(q_max), signed,
                            four_bit, 1)
        return qdq(x, p)

    def qdq_key(x, key: str):
        return qdq(x, _PARAMS[key])

    def weight_key(weight, key: str):
        p = _PARAMS[key]
        return op.DequantizeLinear(const(p.codes, p.dtype), const(p.scale, "float32"), const(p.zero_point, p.dtype),
                                   axis=0)

    table = {torch.ops.vquant_export.qdq.default: qdq_key, torch.ops.vquant_export.weight.default: weight_key,
             torch.ops.vquant_py.fake_quant.default: fake_quant}
    if hasattr(torch.ops, "vquant") and hasattr(torch.ops.vquant, "fake_quant"):
        with contextlib.suppress(AttributeError, RuntimeError):
            table[torch.ops.vquant.fake_quant.default] = fake_quant
    return table


def _channel_shape(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """Per-channel values shaped to broadcast along `axis` of a rank-`rank` input."""
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


class _KeyedQuantizer:
    """Stands in for a per-channel activation quantizer in the export copy."""

    def __init__(self, key: str, quantizer):
        self.key, self.quantizer, self.bits = key, quantizer, quantizer.bits

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.vquant_export.qdq(x, self.key)


class _KeyedWeight(nn.Module):
    """A parametrization whose value is the weight itself; exported as its DequantizeLinear."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def forward(self, weight: Tensor) -> Tensor:
        return torch.ops.vquant_export.weight(weight, self.key)


class _KeyedQDQ(nn.Module):
    """Stands in for an NVIDIA `TensorQuantizer` in the export copy: its `pre_quant_scale`
    (a Mul in the file), then its QDQ (none when `key` is None: the quantizer is off)."""

    def __init__(self, key: str | None, pre_quant_scale: Tensor | None):
        super().__init__()
        self.key = key
        self.register_buffer("pre_quant_scale", None if pre_quant_scale is None else pre_quant_scale.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        return x if self.key is None else torch.ops.vquant_export.qdq(x, self.key)


# ---------------------------------------------------------------------------- preparing the copy
def _prepare_vquant(twin: nn.Module, original: nn.Module, keys: Iterator[str], four_bit: bool) -> list[ExportLayer]:
    states = list(iter_states(original))
    if not states:
        return []
    config = states[0][2].run.config
    check_config(config)
    before = _weights_before_rounding(original, states)
    rows, done = [], {}
    for name, layer, state in states:
        copy_layer = twin.get_submodule(name)
        source = weight_source(name, layer)
        if source != "weight":  # pruned: the copy's weight becomes what the forward computes, weight_orig * mask
            prune.remove(copy_layer, "weight")
        tied = storage_key(getattr(layer, source))  # a tied weight (one storage) was quantized once
        if tied in done:
            key, first = done[tied]
            p, note = _PARAMS[key], f"weight shared with {first!r}: the same codes"
        else:
            key = next(keys)
            bits = _weight_bits(name, before[name], config, state.row.weight_bits)
            p, note = _weight_qdq(name, copy_layer.weight, before[name], bits, four_bit)
            _PARAMS[key] = p
            done[tied] = (key, name)
        parametrize.register_parametrization(copy_layer, "weight", _KeyedWeight(key), unsafe=True)
        w_desc = f"{p.dtype} codes, per channel"
        hook = input_quantizer(copy_layer)
        if hook is None or hook.quantizer is None:
            i_desc = "float"
        else:
            p = _quantizer_qdq(hook.quantizer, four_bit)
            i_desc = _describe(p, hook.quantizer.bits if isinstance(hook.quantizer, ActivationQuantizer) else
                               f"{int(hook.quantizer.channel_bits.min())}..{int(hook.quantizer.channel_bits.max())}")
            if p.dtype.endswith("16"):
                note = (note + "; " if note else "") + "input range too far from zero for 8 bits: 16-bit QDQ"
            if isinstance(hook.quantizer, ChannelActivationQuantizer):
                key = next(keys)
                p.torch_fn = hook.quantizer
                _PARAMS[key] = p
                hook.quantizer = _KeyedQuantizer(key, hook.quantizer)
        rows.append(ExportLayer(name, "vquant", w_desc, i_desc, note=note))
    return rows


def _nvidia_qdq(name: str, q: TensorQuantizer, weight: bool, four_bit: bool) -> _QDQ | None:
    """Scale-only symmetric QDQ of an NVIDIA-style quantizer, or None when it is off; with
    `four_bit`, a quantizer whose codes fill int4 (uint4 when unsigned) in that type."""
    if q._disabled or not q._if_quant:
        return None
    if q._if_clip or q._learn_amax:
        raise ValueError(f"{name}: a learned clip range is not exported (NVIDIA's export neither); fix amax first")
    if not q._fake_quant:
        raise ValueError(f"{name}: fake_quant=False outputs integer codes, not the dequantized values a QDQ computes")
    if q.amax is None:
        raise ValueError(f"{name}: no amax (dynamic, per batch): calibrate the model (vquant_pl.calibrate) or set "
                         "amax before exporting")
    amax = q.amax.detach().float().cpu()
    if q._scale_amax is not None:
        amax = amax * q._scale_amax
    max_bound = 2.0 ** (q.num_bits - 1 + int(q.unsigned)) - 1.0
    tiny = amax <= 2.0 ** -24
    if bool(tiny.any()) and not weight:
        raise ValueError(f"{name}: amax is zero: the exported QuantizeLinear would divide by zero")
    ys = torch.where(tiny, torch.ones_like(amax), amax / max_bound).numpy().astype(np.float32).reshape(-1)
    dtype = "uint8" if q.unsigned else "int8"
    if q.num_bits > 8:
        raise ValueError(f"{name}: {q.num_bits}-bit quantizers have no 8-bit ONNX type")
    lo = 0 if q.unsigned else (-max_bound if q.narrow_range else -max_bound - 1)
    if four_bit and (lo, max_bound) == _RANGES[dtype.replace("8", "4")]:  # its codes fill the 4-bit type
        dtype = dtype.replace("8", "4")
    t_min, t_max = _RANGES[dtype]
    clip = None if (lo, max_bound) == (t_min, t_max) else (np.array(int(lo)), np.array(int(max_bound)))
    axis = 0
    if ys.size > 1:
        dims = [d for d in range(q.amax.dim()) if q.amax.shape[d] != 1]
        if len(dims) != 1:
            raise ValueError(f"{name}: amax of shape {tuple(q.amax.shape)}: only one quantization axis is exported")
        axis = dims[0]
        if clip is not None:
            clip = (np.full(ys.size, clip[0]), np.full(ys.size, clip[1]))
    else:
        ys = ys.reshape(())
    zp = np.zeros(ys.shape, dtype=np.int64)
    return _QDQ(dtype, ys, zp, clip, axis, torch_fn=q._quant_forward)  # pre_quant_scale: applied by _KeyedQDQ


def _prepare_nvidia(twin: nn.Module, keys: Iterator[str], four_bit: bool) -> list[ExportLayer]:
    rows = []
    for name, layer in list(twin.named_modules()):
        quantizers = {what: getattr(layer, what, None) for what in ("_input_quantizer", "_weight_quantizer")}
        if not all(isinstance(q, TensorQuantizer) for q in quantizers.values()):
            continue
        desc = {}
        for what, q in quantizers.items():
            p = _nvidia_qdq(f"layer {name!r} {what[1:]}", q, what == "_weight_quantizer", four_bit)
            key = None if p is None else next(keys)
            if p is not None:
                _PARAMS[key] = p
            setattr(layer, what, _KeyedQDQ(key, q.pre_quant_scale))
            desc[what] = "float" if p is None else _describe(p, q.num_bits).replace("QDQ", "QDQ symmetric")
            if q.pre_quant_scale is not None:
                desc[what] = "pre_quant_scale Mul, " + desc[what]
        rows.append(ExportLayer(name, "nvidia", desc["_weight_quantizer"], desc["_input_quantizer"]))
    for name, module in twin.named_modules():  # the quant layers' own quantizers are replaced by now
        if isinstance(module, TensorQuantizer) and not module._disabled and module._if_quant:
            raise ValueError(f"module {name!r} is a TensorQuantizer outside a QuantConv*/QuantLinear layer: "
                             "export_onnx writes only the quantizers of quant layers; disable it "
                             "(module.disable()) or quantize through a quant layer")
    return rows


# ---------------------------------------------------------------------------------------- export
def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: Tensor, *, dynamic_batch: bool = True,
                four_bit: bool = False, overwrite: bool = False, verify: bool = True,
                preprocessing: Preprocessing | None = None) -> ExportReport:
    """Write a quantized model as an ONNX QDQ model (opset 21) and check it in onnxruntime.

    Args:
        model: quantized by `quantize_model` (or the callback with `keep_quantized=True`), or
            built from NVIDIA-style `QuantConv*`/`QuantLinear` layers with fixed amax. It is
            not changed: a copy is exported. Its output must be one tensor.
        path: the `.onnx` file to write.
        example_input: an input batch (float32); its shape fixes all but the batch size.
        dynamic_batch: leave the batch dimension free.
        four_bit: hold weights of 4 bits or fewer, and inputs whose codes fill 4 bits, in
            ONNX's uint4/int4 types instead of 8-bit types with a clamp (onnxruntime then runs
            them as float); on both vquant and NVIDIA-style layers.
        overwrite: replace an existing file.
        verify: run the file in onnxruntime (CPU) on `example_input` before it is moved into
            place: fill `max_abs_diff` (its operators as written), `optimized_diff` and
            `same_argmax` (`ort_session`), `tolerance` and each layer's onnxruntime operator,
            and refuse the file when `max_abs_diff` exceeds `tolerance`. `onnx.checker` (full
            check) runs in any case.
        preprocessing: written into the file's metadata (`vquant.preprocessing`); default: the
            model's own (`vquant_pl.models.preprocessing_for`) at the example input's size.

    Returns:
        An `ExportReport`: per layer how its weight and input were written.

    Raises:
        ImportError: onnx, onnxruntime or onnxscript is missing (the `export` extra).
        FileExistsError: `path` exists and `overwrite` is False.
        ExportMismatch: (a ValueError) onnxruntime's output differs from PyTorch's by more
            than float rounding explains; nothing is written.
        ValueError: the model is not quantized, is not float32, does not return one tensor,
            holds a `TensorQuantizer` outside a quant layer, or a layer cannot be written
            exactly (the message names it and says why). Nothing is written.

    Example:
        >>> report = export_onnx(net, "net.onnx", torch.rand(1, 3, 224, 224))  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    require_onnx()
    with torch.inference_mode(False):  # also from inside a Lightning test loop
        return _export(model, Path(path), example_input, dynamic_batch, four_bit, overwrite, verify, preprocessing)


def check_config(config) -> None:
    """Raise ValueError when models quantized with this `QuantConfig` cannot be exported."""
    if config.bias_correction:
        raise ValueError("bias_correction=True (ACIQ's per-channel weight correction) moves the quantized weights off "
                         "their integer grid: such a model has no integer codes to export; quantize without it")


def _export(model: nn.Module, path: Path, example_input: Tensor, dynamic_batch: bool, four_bit: bool,
            overwrite: bool, verify: bool, preprocessing: Preprocessing | None) -> ExportReport:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
    if not isinstance(example_input, Tensor) or example_input.dtype != torch.float32:
        raise ValueError(f"example_input must be a float32 tensor, got "
                         f"{getattr(example_input, 'dtype', type(example_input).__name__)}")
    bad = next((n for n, p in itertools.chain(model.named_parameters(), model.named_buffers())
                if p.is_floating_point() and p.dtype != torch.float32), None)
    if bad is not None:
        raise ValueError(f"tensor {bad!r} of the model is not float32: export a float32 model (model.float())")
    metadata = _metadata(model, example_input, preprocessing)
    twin = copy_model(model).cpu().eval()
    x = example_input.detach().cpu().clone()
    # the reference: the model in float32 on the CPU, as onnxruntime runs the file (not a GPU's TF32 convolutions)
    on_cpu = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device.type == "cpu"
    reference = model if on_cpu else twin  # the copy before it is prepared for the exporter
    want = _forward(reference, x)  # one tensor out, checked before anything is written
    tolerance = _tolerance(reference, x, want) if verify else None
    keys = (f"{id(twin)}:{i}" for i in itertools.count())
    try:
        rows = _prepare_vquant(twin, model, keys, four_bit) + _prepare_nvidia(twin, keys, four_bit)
        if not rows:
            raise ValueError(f"{type(model).__name__} is not quantized: quantize it with vquant_pl.quantize_model "
                             "(or the callback with keep_quantized=True), or build it from QuantConv*/QuantLinear")
        dynamic = ({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None
        path.parent.mkdir(parents=True, exist_ok=True)
        # written and checked beside `path`, moved into place only when it passed: a failure leaves no file
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            written = Path(tmp) / path.name
            with torch.no_grad(), _quiet():
                torch.onnx.export(twin, (x,), str(written), dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic,
                                  custom_translation_table=_onnx_translations(four_bit), optimize=True,
                                  external_data=False, verbose=False)
            _finish(written, metadata)
            report = ExportReport(str(path), OPSET, rows, metadata=metadata)
            if verify:
                report.tolerance = tolerance
                _verify(report, written, x, want)
            if path.exists() and not overwrite:  # created meanwhile
                raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
            os.replace(written, path)
    finally:
        _PARAMS.clear()
    return report


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    """The model's output on `x` in eval mode, as float32 on the CPU; a ValueError unless it
    is one tensor (the file has one output)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(training)
    if not isinstance(out, Tensor):
        kind = (f"a dict (keys {', '.join(map(repr, out))})" if isinstance(out, dict) else
                f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}")
        raise ValueError(f"{type(model).__name__} returns {kind}: export_onnx writes models with one output tensor; "
                         "export a module that returns the one you ship (e.g. a wrapper returning out['logits'])")
    return out.detach().float().cpu()


def _metadata(model: nn.Module, example_input: Tensor, preprocessing: Preprocessing | None) -> dict[str, str]:
    """The file's metadata_props: vquant's version, the preprocessing, the QuantConfig (JSON)."""
    from importlib import metadata

    try:
        version = metadata.version("vquant-pl")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = "unknown"
    meta = {"vquant.version": version}
    prep = preprocessing if preprocessing is not None else preprocessing_for(model)
    size = tuple(example_input.shape[-2:]) if example_input.dim() == 4 else None
    if prep is not None and size is not None and tuple(prep.input_size) != size:
        if preprocessing is not None:
            raise ValueError(f"preprocessing.input_size {tuple(prep.input_size)} is not the example input's {size}: "
                             "the file would describe inputs it does not take")
        prep = dataclasses.replace(prep, input_size=size)  # the model's preprocessing, at the size exported
    if prep is not None:
        meta["vquant.preprocessing"] = json.dumps(prep.to_dict())
    states = list(iter_states(model))
    if states:
        meta["vquant.quant_config"] = json.dumps(states[0][2].run.config.to_dict(resolved=True))
    return meta


def _finish(path: Path, metadata: dict[str, str]) -> None:
    """Write the metadata into the exported file and run onnx.checker (full check) on it."""
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its steps; keep the user's terminal to what vquant says."""
    import io
    import contextlib as cl

    with cl.redirect_stdout(io.StringIO()):
        yield


# --------------------------------------------------------------------------------- onnxruntime
def ort_session(path: str | os.PathLike, optimized_path: str | os.PathLike | None = None, threads: int | None = None,
                optimize: bool = True):
    """An onnxruntime CPU session of `path`: with `optimize`, onnxruntime's graph optimizations
    and kernels, integer ones included (`QLinearConv` & co. round a layer's bias to the int32
    grid of input scale x weight scale and requantize their output: a value within that
    rounding of a code boundary takes the neighbouring code), except that `DequantizeLinear ->
    MatMul` becomes a `MatMulNBits` computing in float32, not its default int8, which would
    quantize an input the file leaves float; without, the file's operators as written. With
    `optimized_path`, the optimized graph is written there (to see which kernels run)."""
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # 1: float32, as the file says
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, x: Tensor) -> np.ndarray:
    """The session's first output on a batch."""
    return session.run(None, {session.get_inputs()[0].name: x.detach().cpu().float().numpy()})[0]


def _optimized_graph(path: str | os.PathLike):
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, optimized)
        return onnx.load(str(optimized)).graph


def onnxruntime_kernels(path: str | os.PathLike) -> dict[str, str]:
    """Per weight initializer of the file, the operator onnxruntime runs it with after its
    graph optimizations (e.g. `QLinearConv` for an integer kernel, `Conv` for float emulation)."""
    return _kernels(_optimized_graph(path))


def _kernels(graph) -> dict[str, str]:
    producers = {out: node for node in graph.node for out in node.output}
    found = {}
    for node in graph.node:
        if node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            continue
        for name in node.input:
            src = producers.get(name)
            while src is not None and src.op_type in ("DequantizeLinear", "QuantizeLinear"):
                name = src.input[0]
                src = producers.get(name)
            found.setdefault(name, node.op_type)
    return found


def _module_of(node) -> str | None:
    """The module whose forward torch.onnx traced `node` in: the innermost of its name scopes
    (`pkg.torch.onnx.name_scopes`, e.g. `['', 'features', 'features.0', 'conv2d']`)."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    try:
        scopes = ast.literal_eval(scopes) if scopes else []
    except (ValueError, SyntaxError):
        return None
    return scopes[-2] if len(scopes) >= 2 else None


def _layer_ops(path: str, rows: list[ExportLayer]) -> None:
    """Fill each row's onnxruntime operator and, for a float one, the reason onnxruntime did
    not fuse it into an integer kernel: the layer's Conv/Gemm/MatMul nodes found by module
    name (one per call), each looked up by node name in onnxruntime's optimized graph (a
    fused node keeps the name, or gets `_token_<n>` appended)."""
    import onnx

    graph = onnx.load(path).graph
    optimized = _optimized_graph(path)
    ran_as = {n.name: n.op_type for n in optimized.node}
    kernels = _kernels(optimized)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    calls: dict[str, list] = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            calls.setdefault(_module_of(node), []).append(node)
    for row in rows:
        ops, why = [], []
        for node in calls.get(row.name, []):
            op = ran_as.get(node.name) or next((t for n, t in ran_as.items()
                                                if re.fullmatch(re.escape(node.name) + r"_token_\d+", n)), None)
            if op is None:  # renamed: the operator of its weight initializer (or what that was folded into)
                weight_src = producers.get(node.input[1])
                chain = [weight_src.input[0] if weight_src is not None else node.input[1]]
                while chain[-1] in producers and producers[chain[-1]].op_type in ("QuantizeLinear", "Transpose"):
                    chain.append(producers[chain[-1]].input[0])
                op = next((kernels[n] for n in reversed(chain) if n in kernels), "?")
            ops.append(op)
            if op not in INTEGER_OPS:
                why.append(_why_float(row, node, consumers))
        row.ort_op = "/".join(ops) or "?"
        if not ops:
            why = ["no Conv/Gemm/MatMul of this layer in the graph (not called on the example input)"]
        why = list(dict.fromkeys(w for w in why if w))
        if why:
            row.note = "; ".join(filter(None, [row.note, *why]))


def _why_float(row: ExportLayer, node, consumers: dict) -> str:
    after = consumers.get(node.output[0], [])
    if len(after) == 1 and after[0].op_type == "Add" and _module_of(after[0]) == _module_of(node):  # MatMul + bias
        after = consumers.get(after[0].output[0], [])
    why = ["input float"] if row.input == "float" else []
    if not row.weight.startswith(("uint8", "int8")):
        why.append(f"{row.weight.split()[0]} weights")
    if "QuantizeLinear" not in {c.op_type for c in after}:
        kinds = "/".join(sorted({c.op_type for c in after})) or "the graph output"
        why.append(f"output goes to {kinds}, not a QuantizeLinear")
    return "float emulation: " + ", ".join(why or ["not fused"])


def _tolerance(model: nn.Module, x: Tensor, want: Tensor) -> float:
    """The largest difference float rounding explains: four times how far the model's own
    outputs move when the example input moves by 1e-4 of itself (three sign patterns; a value
    within rounding error of a code boundary then takes the neighbouring code, as happens in
    onnxruntime, which sums in another order), plus 1e-5 of the largest output."""
    generator = torch.Generator().manual_seed(0)
    moved = 0.0
    for _ in range(3):
        sign = (torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x)
        moved = max(moved, float((_forward(model, x * (1 + 1e-4 * sign)) - want).abs().max()))
    return 4 * moved + 1e-5 * max(1.0, float(want.abs().max()))


def _verify(report: ExportReport, path: Path, x: Tensor, want: Tensor) -> None:
    """Check the file's function (its operators as written, no onnxruntime rewrites) against
    PyTorch's output `want` within `report.tolerance`; report onnxruntime's kernels beside it."""
    _layer_ops(str(path), report.layers)
    outputs = []
    for optimize in (False, True):
        got = torch.from_numpy(run_onnx(ort_session(path, optimize=optimize), x))
        if got.shape != want.shape:
            raise ExportMismatch(f"{report.path}: onnxruntime's output has shape {tuple(got.shape)}, PyTorch's "
                                 f"{tuple(want.shape)}; nothing was written")
        outputs.append(got)
    report.max_abs_diff, report.optimized_diff = (float((got - want).abs().max()) for got in outputs)
    report.same_argmax = float((outputs[1].argmax(-1) == want.argmax(-1)).float().mean())
    if not report.max_abs_diff <= report.tolerance:
        raise ExportMismatch(f"{report.path}: onnxruntime's output differs from PyTorch's by {report.max_abs_diff:.3g} "
                             f"on the example input, more than float rounding explains ({report.tolerance:.3g}): the "
                             "graph computes another function; nothing was written (verify=False writes it unchecked)")
