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
from .aciq import aciq_range, allocate_bits, bias_correct
from .affine import ActivationQuantizer, ChannelActivationQuantizer, check_bits
from .channel_ranges import bn_channel_quantizer
from .probe import Probe, make_probe
from .ranges import default_sigma, sigma_range
from .report import LayerReport, QuantReport
from .weights import check_rounding, check_weight, quantize_weight

#: Layer types whose weights and inputs are quantized (subclasses included).
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ACT_RANGES = ("sigma", "bn", "aciq-laplace", "aciq-gauss", "max", "percentile", "mse", "entropy", "none")
#: Data-driven methods (NVIDIA-style calibrators on `calibration` batches), for comparison.
CALIBRATED_RANGES = ("max", "percentile", "mse", "entropy")
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


Quantizer = ActivationQuantizer | ChannelActivationQuantizer


class _InputHook:
    """Forward pre-hook: ranges the first input it sees while calibrating (by
    `make_quantizer(x, bits)`), unless a quantizer was given, then fake-quantizes every
    input with that fixed range."""

    def __init__(self, bits: int, make_quantizer, quantizer: Quantizer | None = None, calibrator=None,
                 channel_dim: int = 1):
        self.bits, self.make_quantizer, self.calibrator = bits, make_quantizer, calibrator
        self.quantizer, self.channel_dim = quantizer, channel_dim
        self.calibrating = True
        self.saw_negative = False

    def __call__(self, module: nn.Module, args: tuple):
        if not args or not isinstance(args[0], Tensor):
            return None
        if self.calibrator is not None and self.calibrating:  # collect only, input stays float
            self.calibrator.collect(args[0])
            self.saw_negative = self.saw_negative or bool(args[0].min() < 0)
            return None
        if self.quantizer is None:
            if not self.calibrating:
                return None  # never reached by the probe: the input stays float
            self.quantizer = self.make_quantizer(args[0], self.bits)
        return (self.quantizer(args[0]), *args[1:])


def _quantizer_fn(act_range: str, sigma: float):
    """`(x, bits) -> quantizer` ranging one probe activation (`bn` falls back to sigma)."""
    if act_range.startswith("aciq-"):
        dist = act_range.split("-", 1)[1]
        return lambda x, bits: ActivationQuantizer(bits, *aciq_range(x, bits, dist))
    return lambda x, bits: ActivationQuantizer(bits, *sigma_range(x, bits, sigma))


def _channel_dim(layer: nn.Module) -> int:
    """The channel dimension of a layer's input: features last for Linear, 1 for convs."""
    return -1 if isinstance(layer, nn.Linear) else 1


def _in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def quantize_layer_weight(weight: Tensor, bits: int, rounding: str, backend: str | None,
                          bias_correction: bool = False, bit_allocation: bool = False) -> tuple[Tensor, Tensor | None]:
    """A layer's quantized weight; with `bit_allocation`, output channels get ACIQ-allocated
    bits (averaging `bits`; returned as the second value), grouped so that SQuant still runs
    per channel; with `bias_correction`, ACIQ's per-channel correction is applied after."""
    channel_bits = None
    if bit_allocation and weight.shape[0] > 1:
        flat = weight.detach().float().reshape(weight.shape[0], -1)
        channel_bits = allocate_bits((flat.amax(1) - flat.amin(1)) / 2, bits)
        q = torch.empty_like(weight)
        for b in channel_bits.unique().tolist():
            rows = (channel_bits == b).nonzero().flatten().to(weight.device)
            q[rows] = quantize_weight(weight[rows], b, rounding, backend, _allow_one_bit=True)
    else:
        q = quantize_weight(weight, bits, rounding, backend)
    if bias_correction:
        q = bias_correct(weight, q)
    return q, channel_bits


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv1d/2d/3d and Linear (subclasses included), in `model.modules()` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def is_quantized(model: nn.Module) -> bool:
    return model in _STATES


def check_settings(weight_bits: int, act_bits: int | None, rounding: str, act_range: str,
                   sigma: float | None, bn_k: float | None = None, aciq_stats: str = "probe",
                   act_bit_allocation: bool = False) -> None:
    """Raise a ValueError naming the first bad quantization setting."""
    check_bits(weight_bits, "weight_bits")
    if act_bits is not None:
        check_bits(act_bits, "act_bits")
    check_rounding(rounding)
    if act_range not in ACT_RANGES:
        raise ValueError(f"unknown act_range {act_range!r}; expected one of {', '.join(ACT_RANGES)}")
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if bn_k is not None and (isinstance(bn_k, bool) or not isinstance(bn_k, (int, float)) or not bn_k > 0):
        raise ValueError(f"bn_k must be a positive number, got {bn_k!r}")
    if aciq_stats not in ("probe", "bn"):
        raise ValueError(f"aciq_stats must be 'probe' or 'bn', got {aciq_stats!r}")
    if act_bit_allocation and (act_bits is None or not (
            act_range == "bn" or (act_range.startswith("aciq-") and aciq_stats == "bn"))):
        raise ValueError("act_bit_allocation takes per-channel statistics from BatchNorm: it needs quantized "
                         "activations and act_range='bn', or 'aciq-laplace'/'aciq-gauss' with aciq_stats='bn' "
                         f"(got act_bits={act_bits!r}, act_range={act_range!r}, aciq_stats={aciq_stats!r})")


def _check_args(model, weight_bits, act_bits, rounding, act_range, sigma, bn_k, aciq_stats, act_bit_allocation):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_settings(weight_bits, act_bits, rounding, act_range, sigma, bn_k, aciq_stats, act_bit_allocation)
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
                   probe: Tensor | Probe | None = None, backend: str | None = None,
                   bias_correction: bool = False, bit_allocation: bool = False,
                   bn_k: float | None = None, aciq_stats: str = "probe", calibration=None,
                   calib_batches: int | None = None, percentile: float = 99.99,
                   act_bit_allocation: bool = False) -> QuantReport:
    """Quantize `model` in place, data-free, by the VQuant/SQuant rules; return a report.

    Weights of every Conv1d/2d/3d and Linear (subclasses included) are quantized per output
    channel with `rounding`. Unless `act_bits` is None or `act_range` is "none", each layer
    input is fake-quantized with a per-tensor range fixed by one pass of `probe` (a tensor,
    a `Probe`, or None for seeded uniform noise, batch 256, at the model's input size)
    through the model as it is being quantized. The first layer's input stays float; the
    last layer's input uses 8 bits. `sigma` defaults to the paper's value for `act_bits`.

    `act_range`: `sigma` (default), `aciq-laplace` / `aciq-gauss` (ACIQ's optimal clip on
    the probe), `bn` (DFQ: from BatchNorm parameters, `bn_k` standard deviations, default by
    bits; layers whose input has no BatchNorm producer fall back to `sigma`, noted in the
    report), `none`. `bias_correction` applies ACIQ's per-channel weight correction;
    `bit_allocation` gives output channels ACIQ-allocated bits averaging `weight_bits`;
    `act_bit_allocation` gives each layer input a range and ACIQ-allocated bits per channel,
    averaging the layer's activation bits, from BatchNorm statistics (with `act_range="bn"`
    or ACIQ with `aciq_stats="bn"`; layers without them keep a per-tensor probe range).
    `max` / `percentile` / `mse` / `entropy` are data-driven, for comparison: ranges from
    NVIDIA-style calibrators over up to `calib_batches` batches of `calibration` (an iterable
    of input tensors or `(input, ...)` tuples), passed through the weight-quantized model.
    Undo with `restore_model(model)`. On any error the model is left as it was.
    """
    layers = _check_args(model, weight_bits, act_bits, rounding, act_range, sigma, bn_k, aciq_stats,
                         act_bit_allocation)
    backend_name, _ = backends.resolve(backend, layers[0][1].weight.device)
    quantize_acts = act_bits is not None and act_range != "none"
    if quantize_acts and sigma is None:
        sigma = default_sigma(act_bits)
    layer_bits = [None] + [LAST_LAYER_ACT_BITS if i == len(layers) - 1 else act_bits for i in range(1, len(layers))]
    fixed: dict[str, Quantizer | str] = {}  # quantizers (or why none) known before the probe
    from_bn = act_range == "bn" or (act_range.startswith("aciq-") and aciq_stats == "bn")
    if quantize_acts and from_bn:
        from .aciq import ACIQ_ALPHA
        from .bn_ranges import DEFAULT_BN_K, bn_stats, stats_range

        def k_for(bits: int) -> float:
            if act_range == "aciq-gauss":
                return ACIQ_ALPHA["gauss"][bits]  # alpha = c * std
            if act_range == "aciq-laplace":
                return ACIQ_ALPHA["laplace"][bits] / 2 ** 0.5  # Laplace: E|x - mu| = std / sqrt(2)
            return bn_k or DEFAULT_BN_K[bits]

        stats = bn_stats(model, [name for name, _ in layers[1:]], QUANTIZABLE)
        for (name, layer), bits in zip(layers[1:], layer_bits[1:]):
            s = stats[name]
            if isinstance(s, str):
                fixed[name] = s
            elif not act_bit_allocation:
                fixed[name] = ActivationQuantizer(bits, *stats_range(s, k_for(bits)))
            elif s.mean.numel() != _in_channels(layer):
                fixed[name] = f"BN statistics for {s.mean.numel()} channels, input has {_in_channels(layer)}"
            else:
                fixed[name] = bn_channel_quantizer(s, k_for, bits, _channel_dim(layer))
    calibrated = quantize_acts and act_range in CALIBRATED_RANGES
    if calibrated and calibration is None:
        raise ValueError(f"act_range {act_range!r} is data-driven: pass calibration= (batches of inputs)")
    needs_probe = quantize_acts and not calibrated and (
        not from_bn or any(isinstance(v, str) for v in fixed.values()))
    probe_tensor = None
    if needs_probe:
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
            q, channel_bits = quantize_layer_weight(original, weight_bits, rounding, backend,
                                                    bias_correction, bit_allocation)
            weight.copy_(q)
            if weight.is_cuda:
                torch.cuda.synchronize(weight.device)
            mse.append((weight.float() - original.float()).pow(2).mean())
            report.layers.append(LayerReport(
                name, type(layer).__name__, tuple(weight.shape), weight_bits, None, None, None,
                None, 0.0, (time.perf_counter() - t0) * 1e3))
            if channel_bits is not None:
                report.layers[-1].note = f"channel bits {int(channel_bits.min())}..{int(channel_bits.max())}"
            hook = None
            if quantize_acts and i > 0:
                given = fixed.get(name)
                calibrator = None
                if calibrated:
                    from .calib import make_calibrator

                    calibrator = make_calibrator(act_range, layer_bits[i], None, False)
                hook = _InputHook(layer_bits[i], _quantizer_fn(act_range, sigma),
                                  None if given is None or isinstance(given, str) else given, calibrator,
                                  _channel_dim(layer))
                if isinstance(given, str):
                    fallback = act_range if act_range != "bn" else "sigma"
                    report.layers[-1].note = f"bn range fallback to {fallback} on the probe: {given}"
                state.hooks.append(layer.register_forward_pre_hook(hook))
            hooks.append(hook)
        report.weight_time_s = time.perf_counter() - start
        for row, value in zip(report.layers, torch.stack(mse).tolist()):
            row.weight_mse = value

        if quantize_acts:
            start = time.perf_counter()
            try:
                if needs_probe:
                    _run(model, probe_tensor)
                if calibrated:
                    _calibrate(model, hooks, calibration, calib_batches, act_range, percentile)
            except Exception as err:
                raise RuntimeError(f"the probe pass through the quantized model failed: {err}") from err
            if needs_probe or calibrated:
                report.probe_time_s = time.perf_counter() - start
            for row, hook in zip(report.layers, hooks):
                if hook is None:
                    row.note = "first layer: input float"
                    continue
                hook.calibrating = False
                if hook.quantizer is None:
                    row.note = "not reached by the probe: input float"
                    continue
                _fill_row(row, hook.quantizer)
    except BaseException:
        _undo(state)
        raise
    state.input_hooks = hooks
    _STATES[model] = state
    _QUANTIZED_LAYERS.update(layer for _, layer in layers)
    return report


def _fill_row(row: LayerReport, q: Quantizer) -> None:
    row.act_bits, row.act_lo, row.act_hi, row.signed = q.bits, q.lo, q.hi, q.signed
    if isinstance(q, ChannelActivationQuantizer):
        note = f"act channel bits {int(q.channel_bits.min())}..{int(q.channel_bits.max())}"
        if note not in row.note:
            row.note = f"{row.note}; {note}" if row.note else note


def _calibrate(model, hooks, batches, limit, method, percentile) -> None:
    """Collect each layer input over the batches (inputs float), then fix the ranges."""
    used = 0
    for batch in batches:
        if limit is not None and used >= limit:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        _run(model, x.to(next(model.parameters()).device))
        used += 1
    if used == 0:
        raise ValueError("calibration gave no batch")
    for hook in hooks:
        if hook is None or hook.calibrator is None:
            continue
        amax = float(hook.calibrator.compute_amax(method, percentile=percentile).max())
        signed = hook.saw_negative
        hook.quantizer = ActivationQuantizer(hook.bits, -amax if signed else 0.0, amax, signed)
        hook.calibrator = None


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


def activation_ranges(model: nn.Module) -> list[tuple | None]:
    """Per quantized layer, `(bits, lo, hi, signed)` of its input (bits, lo and hi are
    per-channel tensors under `act_bit_allocation`), or None for a float input."""
    state = _state(model)
    return [None if h is None or h.quantizer is None else h.quantizer.ranges() for h in state.input_hooks]


def set_activation_ranges(model: nn.Module, ranges: list[tuple | None]) -> None:
    """Fix the input ranges of a quantized model (e.g. rank 0's, broadcast under DDP)."""
    state = _state(model)
    if len(ranges) != len(state.input_hooks):
        raise ValueError(f"{len(ranges)} ranges for {len(state.input_hooks)} quantized layers")
    for hook, row, r in zip(state.input_hooks, state.report.layers, ranges):
        if hook is None or r is None:
            continue
        hook.quantizer = (ChannelActivationQuantizer(*r, dim=hook.channel_dim) if isinstance(r[0], Tensor)
                          else ActivationQuantizer(*r))
        _fill_row(row, hook.quantizer)


def quantization_report(model: nn.Module) -> QuantReport | None:
    """The report of the run that quantized `model`, or None."""
    state = _STATES.get(model)
    return None if state is None else state.report
