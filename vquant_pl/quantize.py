"""Model-level quantization (in place, reversible): weights by SQuant, activations by hooks.

Module types and state_dict keys stay as they are: weights are overwritten in place
(the float originals are kept aside for `restore_model`) and each layer input is
fake-quantized by a forward pre-hook whose range is fixed by one probe pass.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import backends
from .affine import ActivationQuantizer, check_bits
from .probe import Probe, make_probe
from .ranges import default_sigma, sigma_range
from .report import LayerReport, QuantReport
from .weights import check_rounding, check_weight, quantize_weight

#: Layer types whose weights and inputs are quantized (subclasses included).
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ACT_RANGES = ("sigma", "bn", "aciq-laplace", "aciq-gauss", "none")
_IMPLEMENTED_ACT_RANGES = ("sigma", "none")
#: Bits of the last layer's input (DESIGN.md rule 4).
LAST_LAYER_ACT_BITS = 8


@dataclass
class _State:
    originals: list[tuple[nn.Parameter, Tensor]]
    hooks: list[RemovableHandle]
    report: QuantReport
    input_hooks: list["_InputHook | None"] = None  # one per layer, None for float inputs


_STATES: "weakref.WeakKeyDictionary[nn.Module, _State]" = weakref.WeakKeyDictionary()
_QUANTIZED_LAYERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class _InputHook:
    """Forward pre-hook: ranges the first input it sees while calibrating, then
    fake-quantizes every input with that fixed range."""

    def __init__(self, bits: int, sigma: float):
        self.bits, self.sigma = bits, sigma
        self.quantizer: ActivationQuantizer | None = None
        self.calibrating = True

    def __call__(self, module: nn.Module, args: tuple):
        if not args or not isinstance(args[0], Tensor):
            return None
        if self.quantizer is None:
            if not self.calibrating:
                return None  # never reached by the probe: the input stays float
            self.quantizer = ActivationQuantizer(self.bits, *sigma_range(args[0], self.bits, self.sigma))
        return (self.quantizer(args[0]), *args[1:])


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv1d/2d/3d and Linear (subclasses included), in `model.modules()` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def is_quantized(model: nn.Module) -> bool:
    return model in _STATES


def check_settings(weight_bits: int, act_bits: int | None, rounding: str, act_range: str,
                   sigma: float | None) -> None:
    """Raise a ValueError naming the first bad quantization setting."""
    check_bits(weight_bits, "weight_bits")
    if act_bits is not None:
        check_bits(act_bits, "act_bits")
    check_rounding(rounding)
    if act_range not in ACT_RANGES:
        raise ValueError(f"unknown act_range {act_range!r}; expected one of {', '.join(ACT_RANGES)}")
    if act_range not in _IMPLEMENTED_ACT_RANGES:
        raise NotImplementedError(f"act_range {act_range!r} is not available yet; use 'sigma' or 'none'")
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")


def _check_args(model, weight_bits, act_bits, rounding, act_range, sigma):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_settings(weight_bits, act_bits, rounding, act_range, sigma)
    if model in _STATES:
        raise RuntimeError("model is already quantized; call vquant_pl.restore_model(model) first")
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv1d/Conv2d/Conv3d/Linear layer to quantize")
    for name, layer in layers:
        if layer in _QUANTIZED_LAYERS:
            raise RuntimeError(f"layer {name!r} is already quantized (inside another quantized model); "
                               "restore that model first")
        if isinstance(layer.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {name!r} is lazy and not initialized yet; run one forward first")
        check_weight(layer.weight, f"weight of layer {name!r}")
    return layers


@torch.no_grad()
def _run(model: nn.Module, x: Tensor) -> None:
    training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(training)


@torch.no_grad()
def quantize_model(model: nn.Module, weight_bits: int = 4, act_bits: int | None = 4,
                   rounding: str = "squant", act_range: str = "sigma", sigma: float | None = None,
                   probe: Tensor | Probe | None = None, backend: str | None = None) -> QuantReport:
    """Quantize `model` in place, data-free, by the VQuant/SQuant rules; return a report.

    Weights of every Conv1d/2d/3d and Linear (subclasses included) are quantized per output
    channel with `rounding`. Unless `act_bits` is None or `act_range` is "none", each layer
    input is fake-quantized with a per-tensor range fixed by one pass of `probe` (a tensor,
    a `Probe`, or None for seeded uniform noise, batch 256, at the model's input size)
    through the model as it is being quantized. The first layer's input stays float; the
    last layer's input uses 8 bits. `sigma` defaults to the paper's value for `act_bits`.
    Undo with `restore_model(model)`. On any error the model is left as it was.
    """
    layers = _check_args(model, weight_bits, act_bits, rounding, act_range, sigma)
    backend_name, _ = backends.resolve(backend, layers[0][1].weight.device)
    quantize_acts = act_bits is not None and act_range != "none"
    if quantize_acts and sigma is None:
        sigma = default_sigma(act_bits)
    probe_tensor = None
    if quantize_acts:
        probe_tensor = make_probe(probe, model, layers[0][1], layers[0][1].weight.device)
        try:  # a cheap shape check on one sample, before any work on the weights
            _run(model, probe_tensor[:1])
        except Exception as err:
            raise ValueError(f"probe of shape {tuple(probe_tensor.shape)} does not fit "
                             f"{type(model).__name__}: {err}") from err

    report = QuantReport(weight_bits, act_bits if quantize_acts else None, rounding,
                         act_range if quantize_acts else "none", sigma if quantize_acts else None,
                         backend_name)
    state = _State([], [], report)
    try:
        hooks: list[_InputHook | None] = []
        mse: list[Tensor] = []
        start = time.perf_counter()
        for i, (name, layer) in enumerate(layers):
            t0 = time.perf_counter()
            weight = layer.weight
            original = weight.detach().clone()
            if weight.is_shared():
                # shared memory (ddp_spawn on CPU, Hogwild): other processes read the same
                # storage, so quantize a private copy and never write to the shared one
                weight.data = original.clone()
            state.originals.append((weight, original))
            weight.copy_(quantize_weight(original, weight_bits, rounding, backend))
            if weight.is_cuda:
                torch.cuda.synchronize(weight.device)
            mse.append((weight.float() - original.float()).pow(2).mean())
            report.layers.append(LayerReport(
                name, type(layer).__name__, tuple(weight.shape), weight_bits, None, None, None,
                None, 0.0, (time.perf_counter() - t0) * 1e3))
            hook = None
            if quantize_acts and i > 0:
                bits = LAST_LAYER_ACT_BITS if i == len(layers) - 1 else act_bits
                hook = _InputHook(bits, sigma)
                state.hooks.append(layer.register_forward_pre_hook(hook))
            hooks.append(hook)
        report.weight_time_s = time.perf_counter() - start
        for row, value in zip(report.layers, torch.stack(mse).tolist()):
            row.weight_mse = value

        if quantize_acts:
            start = time.perf_counter()
            try:
                _run(model, probe_tensor)
            except Exception as err:
                raise RuntimeError(f"the probe pass through the quantized model failed: {err}") from err
            report.probe_time_s = time.perf_counter() - start
            for row, hook in zip(report.layers, hooks):
                if hook is None:
                    row.note = "first layer: input float"
                    continue
                hook.calibrating = False
                if hook.quantizer is None:
                    row.note = "not reached by the probe: input float"
                    continue
                q = hook.quantizer
                row.act_bits, row.act_lo, row.act_hi, row.signed = q.bits, q.lo, q.hi, q.signed
    except BaseException:
        _undo(state)
        raise
    state.input_hooks = hooks
    _STATES[model] = state
    _QUANTIZED_LAYERS.update(layer for _, layer in layers)
    return report


def _undo(state: _State) -> None:
    with torch.no_grad():
        for handle in state.hooks:
            handle.remove()
        for weight, original in state.originals:
            weight.copy_(original)


def restore_model(model: nn.Module) -> None:
    """Put back the exact float weights and remove the activation hooks."""
    _undo(_state(model))
    del _STATES[model]
    for _, layer in quantizable_layers(model):
        _QUANTIZED_LAYERS.discard(layer)


def _state(model: nn.Module) -> _State:
    state = _STATES.get(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not quantized by vquant_pl")
    return state


def activation_ranges(model: nn.Module) -> list[tuple[int, float, float, bool] | None]:
    """Per quantized layer, `(bits, lo, hi, signed)` of its input, or None for a float input."""
    state = _state(model)
    return [None if h is None or h.quantizer is None else
            (h.quantizer.bits, h.quantizer.lo, h.quantizer.hi, h.quantizer.signed) for h in state.input_hooks]


def set_activation_ranges(model: nn.Module, ranges: list[tuple[int, float, float, bool] | None]) -> None:
    """Fix the input ranges of a quantized model (e.g. rank 0's, broadcast under DDP)."""
    state = _state(model)
    if len(ranges) != len(state.input_hooks):
        raise ValueError(f"{len(ranges)} ranges for {len(state.input_hooks)} quantized layers")
    for hook, row, r in zip(state.input_hooks, state.report.layers, ranges):
        if hook is None or r is None:
            continue
        hook.quantizer = ActivationQuantizer(*r)
        row.act_bits, row.act_lo, row.act_hi, row.signed = r


def quantization_report(model: nn.Module) -> QuantReport | None:
    """The report of the run that quantized `model`, or None."""
    state = _STATES.get(model)
    return None if state is None else state.report
