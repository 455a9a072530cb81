"""Model-level quantization, in place and reversible: plan -> weights -> ranges -> commit.

Module types and `state_dict` keys stay as they are: weights are overwritten in place, the
float originals and an `InputQuantizer` pre-hook live on each quantized layer
(`vquant_pl.state`), so copies and pickles of a quantized model stay quantized and
restorable. The rules are in docs/quantization-rules.md.
"""
from __future__ import annotations

import inspect
import time
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from .ops import backends
from .methods.aciq import PreActivationTap, bias_correct, weight_channel_bits
from .ops.affine import ActivationQuantizer, ChannelActivationQuantizer
from .config import QuantConfig
from .input_quantizer import InputQuantizer, Quantizer, union_range
from .probe import Probe, default_probe_shape, make_probe
from .methods.table import METHODS, RangeMethod
from .report import LayerReport, QuantReport
from .methods.bn_graph import bn_call_stats
from .layers import BATCHNORMS, QUANTIZABLE, in_channels, input_channel_dim, quantizable_layers, recomputed_by
from .state import (LayerState, RunInfo, attach_state, has_state, input_quantizer, iter_states, restore_all,
                    byte_range, in_shared_memory, run_scope, save_original, storage_key, storage_of, undo_run)
from .ops.weights import check_weight, quantize_weight

#: Bits of the last layer's input (docs/quantization-rules.md rule 4).
LAST_LAYER_ACT_BITS = 8


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of `model` carries vquant quantization state."""
    return any(True for _ in iter_states(model))


# -- plan ---------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Everything decided and checked before the model is touched."""

    config: QuantConfig
    method: RangeMethod
    layers: list[tuple[str, nn.Module]]
    act_bits: list[Optional[int]]  # per layer; None: the input stays float
    weight_bits: list[int] | None = None  # per layer under mixed_precision (else config.weight_bits)
    bit_budget: dict | None = None  # mixed_precision: the averages reached (QuantReport.bit_budget)
    fixed: dict[str, "Quantizer | str"] = field(default_factory=dict)  # BN ranges, or why none
    float_weights: dict[str, Tensor] = field(default_factory=dict)  # the reference of bias correction
    unclipped: dict[str, Tensor] = field(default_factory=dict)  # weight_clip: each weight just before clipping
    written: dict[str, Tensor] = field(default_factory=dict)  # the tensor each layer's weight codes went into
    calls: dict[str, int] = field(default_factory=dict)  # calls per forward, where more than one
    passes: int = 0  # forward passes of the ranging run (the probe: 1; calibration: the batches)
    views: dict[str, "_View"] = field(default_factory=dict)  # layer -> its weight's memory, before any change
    readers: dict[tuple, list[tuple[str, nn.Module, str, "_View"]]] = field(default_factory=dict)
    # storage -> (name, module, attribute, view) of the parameters of modules that are not quantized
    notes: dict[str, str] = field(default_factory=dict)  # layer -> what a transform left undone there, and why
    probe: Tensor | None = None
    probe_info: dict | None = None
    probe_read: bool = False  # the probe (or probe_seed/probe_shape) was drawn or run
    tap: PreActivationTap | None = None  # ACIQ on the probe: moments before each ReLU
    backend: str = "torch"


def _check_model(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    quantized = next((name for name, _, _ in iter_states(model)), None)
    if quantized is not None:
        raise RuntimeError(f"model is already quantized (layer {quantized!r}); call vquant_pl.restore_model on it "
                           "first")
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv1d/Conv2d/Conv3d/Linear layer to quantize")
    for what, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if t.is_meta:
            raise ValueError(f"{what!r} is on the meta device (a model built with device='meta' holds no values): "
                             "load its weights first, e.g. model.to_empty(device='cpu') then load_state_dict")
    for name, layer in layers:
        if isinstance(layer.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {name!r} is lazy and not initialized yet; run one forward first")
        weight_source(name, layer)  # refuses a weight recomputed on access that cannot be quantized
        check_weight(layer.weight, f"weight of layer {name!r}")
        bias = getattr(layer, "bias", None)
        if isinstance(bias, Tensor) and not bool(torch.isfinite(bias).all()):
            raise ValueError(f"bias of layer {name!r} holds NaN or infinite values")
    _refuse_pruned_ties(layers)
    for name, bn in model.named_modules():
        if isinstance(bn, BATCHNORMS):
            for what in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(bn, what, None)
                if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"BatchNorm {name!r}: {what} holds NaN or infinite values")
    return layers


def weight_source(name: str, layer: nn.Module) -> str:
    """The attribute the forward really reads the weight from: `weight`, or `weight_orig` for a
    `torch.nn.utils.prune`d layer (its pre-hook recomputes `weight = weight_orig * mask`).
    A weight recomputed by a parametrization, `weight_norm` or `spectral_norm` is refused:
    writing codes into their factors does not give the codes back in the forward."""
    from torch.nn.utils import parametrize, prune

    if parametrize.is_parametrized(layer, "weight"):
        kinds = ", ".join(type(m).__name__ for m in layer.parametrizations["weight"])
        raise ValueError(f"layer {name!r}: its weight is recomputed on access by a parametrization ({kinds}), "
                         "so quantized codes would not reach the forward; remove it first with "
                         "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')")
    for hook in layer._forward_pre_hooks.values():
        kind = type(hook).__name__
        if kind in ("WeightNorm", "SpectralNorm") and getattr(hook, "name", None) == "weight":
            raise ValueError(f"layer {name!r}: its weight is recomputed before every forward by {kind}, so quantized "
                             f"codes would not reach the forward; remove it first "
                             f"(torch.nn.utils.remove_{'weight' if kind == 'WeightNorm' else 'spectral'}_norm)")
        if isinstance(hook, prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == "weight":
            return "weight_orig"
    return "weight"


def _refuse_pruned_ties(layers: list[tuple[str, nn.Module]]) -> None:
    """A pruned layer's `weight_orig` shared with another layer: its mask applies to one of
    them only, so one quantized tensor cannot serve both."""
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for name, layer in layers:
        source = weight_source(name, layer)
        groups.setdefault(storage_key(getattr(layer, source)), []).append((name, source))
    for group in groups.values():
        pruned = [name for name, source in group if source != "weight"]
        if len(group) > 1 and pruned:
            others = [name for name, _ in group if name != pruned[0]]
            raise ValueError(f"layer {pruned[0]!r} is pruned and its weight is shared with layer(s) {others}: the "
                             "mask applies to one of them only, so one quantized weight cannot serve both; untie "
                             "them first (give each layer its own weight)")


def _looks_quantized(layers: list[tuple[str, nn.Module]]) -> tuple[str, int] | None:
    """(name, distinct values) when the largest layer whose channels are long enough to
    tell holds at most 256 distinct values in every output channel: weights that were
    already quantized (a state_dict saved while quantized, loaded into a fresh model)."""
    for name, layer in sorted(layers, key=lambda nl: -nl[1].weight.numel()):
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        if w.shape[1] <= 2 * 2 ** 8:
            continue
        distinct = int(((w.sort(1).values.diff(dim=1) != 0).sum(1) + 1).max())
        return (name, distinct) if distinct <= 2 ** 8 else None
    return None


def _layer_act_bits(config: QuantConfig, count: int) -> list[Optional[int]]:
    """Rule 4: the first layer's input stays float, the last one's uses 8 bits."""
    if not config.quantizes_activations:
        return [None] * count
    return [None] + [LAST_LAYER_ACT_BITS if i == count - 1 else config.act_bits for i in range(1, count)]


def _bn_ranges(model: nn.Module, plan: _Plan) -> None:
    """Ranges from BatchNorm statistics (DFQ), before any probe; reasons where none."""
    config, method = plan.config, plan.method
    stats = bn_call_stats(model, [name for name, _ in plan.layers], QUANTIZABLE)
    first = stats[plan.layers[0][0]]
    if isinstance(first, list) and len(first) > 1:  # its input stays float; the report still names it
        plan.calls[plan.layers[0][0]] = len(first)
    for (name, layer), bits in zip(plan.layers[1:], plan.act_bits[1:]):
        s = stats[name]
        if isinstance(s, list) and len(s) > 1:  # a block called more than once: every call's producer
            plan.calls[name] = len(s)
            plan.fixed[name] = _union_of_calls(s, bits, config, method, layer)
            continue
        s = s[0] if isinstance(s, list) else s
        if isinstance(s, str):
            plan.fixed[name] = s
        elif not (config.act_bit_allocation or config.act_per_channel):
            plan.fixed[name] = ActivationQuantizer(bits, *method.range_from_bn(s, bits, config, layer))
        elif s.mean.numel() != in_channels(layer):
            plan.fixed[name] = f"BN statistics for {s.mean.numel()} channels, input has {in_channels(layer)}"
        else:
            plan.fixed[name] = method.bn_channels(s, bits, config, input_channel_dim(layer))


def _union_of_calls(stats: list, bits: int, config: QuantConfig, method: RangeMethod,
                    layer: nn.Module) -> ActivationQuantizer | str:
    """One per-tensor range covering the BatchNorm range of every call, or why there is none."""
    why = next((s for s in stats if isinstance(s, str)), None)
    if why is not None:
        return f"called {len(stats)} times in one forward, one call's {why}"
    if config.act_bit_allocation or config.act_per_channel:
        return f"called {len(stats)} times in one forward: per-channel ranges need one producer"
    return ActivationQuantizer(bits, *union_range([method.range_from_bn(s, bits, config, layer) for s in stats]))


def _allocate_bits(model: nn.Module, plan: _Plan, probe: Tensor | Probe | None) -> None:
    """`mixed_precision`: per-layer weight (and input) bits on the uniform budget (`methods.bit_budget`)."""
    from .methods.bit_budget import GAIN_PROBES, allocate
    from .methods.bn_graph import bn_stats

    config, method, first = plan.config, plan.method, plan.layers[0][1]
    stats = bn_stats(model, [name for name, _ in plan.layers])
    example = gain_probe = None
    if config.mixed_precision == "all":  # input bits: element counts and output gains on the run's probe
        shape = _probe_shape(model, plan, probe)  # the inputs' element counts at the size the model runs at
        example = torch.zeros((1, *shape[1:]), device=first.weight.device, dtype=first.weight.dtype)  # shapes only
        given = probe if probe is not None else Probe(config.probe_seed, config.probe_shape)
        if isinstance(given, Probe):  # the first samples of the run's probe (a seeded draw's prefix)
            given = Probe(given.seed, (min(GAIN_PROBES, shape[0]), *shape[1:]))
            info = {"seed": given.seed, "shape": list(given.shape)}
        else:
            given = given[:GAIN_PROBES]  # moved to the device after the cut
            info = {"tensor": list(probe.shape)}
        gain_probe = make_probe(given, model, first, first.weight.device, first.weight.dtype)
        plan.probe_read = True
        if plan.probe_info is None:  # the report names the probe the allocation used
            plan.probe_info = info
    alloc = allocate(model, plan.layers, stats, config.weight_bits, _layer_act_bits(config, len(plan.layers)),
                     config.act_bits if gain_probe is not None else None,
                     lambda s, b, layer: method.range_from_bn(s, b, config, layer), example, config.mixed_min_bits,
                     config.rounding, plan.backend, gain_probe)
    plan.weight_bits, plan.act_bits = alloc.weight_bits, alloc.act_bits
    plan.bit_budget = {"weight_average": alloc.weight_average, "params": alloc.weight_budget,
                       "act_average": alloc.act_average, "act_elements": alloc.act_budget}


def _plan(model: nn.Module, config: QuantConfig, probe: Tensor | Probe | None, calibration) -> _Plan:
    layers = _check_model(model)
    if isinstance(probe, Tensor) and probe.is_meta:
        raise ValueError(f"the probe of shape {tuple(probe.shape)} is on the meta device and holds no values; pass "
                         "a real tensor (or a vquant_pl.Probe)")
    quantized = _looks_quantized(layers)
    if quantized is not None:
        warnings.warn(f"the weights of layer {quantized[0]!r} hold at most {quantized[1]} distinct values per output "
                      "channel: the model looks quantized already (a state_dict saved while quantized?); they are "
                      "quantized again", stacklevel=3)
    device = layers[0][1].weight.device
    backend, _ = backends.resolve(config.backend, device)
    plan = _Plan(config, METHODS[config.act_range], layers, _layer_act_bits(config, len(layers)), backend=backend)
    plan.views = {name: _View.of(getattr(layer, weight_source(name, layer))) for name, layer in layers}
    _refuse_partial_overlap(plan.views)
    for owner, module in model.named_modules():  # tensors of other modules that a layer's weight may share
        if not isinstance(module, QUANTIZABLE):
            for what, t in module.named_parameters(recurse=False):
                view = _View.of(t)
                plan.readers.setdefault(view.storage, []).append((f"{owner}.{what}" if owner else what, module,
                                                                   what, view))
    if config.mixed_precision is not None and not (config.equalize or config.weight_clip):  # else in _prepare
        _allocate_bits(model, plan, probe)
    if not config.quantizes_activations:
        return plan
    if plan.method.calibrated:
        if calibration is None:
            raise ValueError(f"act_range {config.act_range!r} is data-driven: pass calibration= (batches of inputs)")
        return plan
    if plan.method.uses_bn(config):
        if (config.act_bit_allocation or config.act_per_channel) and plan.method.bn_channels is None:
            raise ValueError(f"act_bit_allocation / act_per_channel need per-channel BatchNorm ranges; act_range "
                             f"{config.act_range!r} has none")
        _bn_ranges(model, plan)
        if not any(isinstance(v, str) for v in plan.fixed.values()):
            return plan  # every layer ranged from BatchNorm: no probe at all
    if probe is None:
        probe = Probe(config.probe_seed, config.probe_shape)
    plan.probe_info = ({"seed": probe.seed, "shape": list(probe.shape) if probe.shape else None}
                       if isinstance(probe, Probe) else None)
    plan.probe = make_probe(probe, model, layers[0][1], device, layers[0][1].weight.dtype)
    plan.probe_read = True
    if plan.probe_info is not None and plan.probe_info["shape"] is None:
        plan.probe_info["shape"] = list(plan.probe.shape)
    elif plan.probe_info is None:
        plan.probe_info = {"tensor": list(plan.probe.shape)}
    try:  # a cheap shape check on one sample, before any work on the weights
        _run(model, plan.probe[:1])
    except Exception as err:
        raise ValueError(f"probe of shape {tuple(plan.probe.shape)} does not fit {type(model).__name__} "
                         f"(probe as {plan.probe.dtype}): {err}") from err
    return plan


# -- weights ------------------------------------------------------------------------------
def apply_transforms(model: nn.Module, config: QuantConfig, save=save_original,
                     layers: list[tuple[str, nn.Module]] | None = None,
                     weight_bits: dict[str, int] | None = None, notes: dict[str, str] | None = None) -> bool:
    """The pre-quantization transforms of the float model that `config` asks for
    (`equalize`, then `weight_clip`, for `config.weight_bits` or each layer's `weight_bits`);
    `save(module, name)` is called before a tensor changes. True when one ran. `notes`, when
    given, gets each consumer layer of an equalization group left unequalized, with why."""
    if config.equalize:
        from .methods.equalize import equalize

        for group in equalize(model, config.equalize_alpha, config.equalize_k, save=save):
            for name in group.consumers if group.skipped and notes is not None else ():
                notes[name] = f"not equalized: {group.skipped}"
    if config.weight_clip:
        from .methods.weight_clip import clip_weights

        clip_weights(model, config.weight_bits if weight_bits is None else weight_bits, save=save, layers=layers)
    return config.equalize or config.weight_clip


def _prepare(model: nn.Module, plan: _Plan, probe: Tensor | Probe | None) -> bool:
    """The transforms, each saving what it changes so that `restore_model` undoes it:
    `equalize`, then (under `mixed_precision`) the bits allocated for the equalized model,
    then `weight_clip`, each layer for its own bits. The weights just before clipping are kept
    (`plan.unclipped`): bias correction restores their means, the clip's shift included."""
    config = plan.config
    if not (config.equalize or config.weight_clip):
        return False
    apply_transforms(model, config.replace(weight_clip=False), save_original, plan.layers, notes=plan.notes)
    if config.mixed_precision is not None:
        _allocate_bits(model, plan, probe)
    if config.weight_clip:
        for name, layer in plan.layers:
            plan.unclipped[name] = layer.weight.detach().clone()
        bits = None if plan.weight_bits is None else {name: b for (name, _), b in zip(plan.layers, plan.weight_bits)}
        apply_transforms(model, config.without_equalize(), save_original, plan.layers, bits)
    return True


def quantize_layer_weight(weight: Tensor, bits: int, rounding: str, backend: str | None,
                          bias_correction: bool = False, bit_allocation: bool = False,
                          bit_allocation_rule: str = "aciq",
                          bias_correction_rule: str = "mean",
                          reference: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """A layer's quantized weight; with `bit_allocation`, output channels get ACIQ-allocated
    bits (`methods.aciq.weight_channel_bits`; returned as the second value, None where the
    rule allocates nothing), grouped so that SQuant still runs per channel; a channel given
    0 bits becomes its minimum, as in the original code. With `bias_correction`, ACIQ's
    per-channel correction (`bias_correction_rule`) is applied after; `reference`, the
    weight before `weight_clip` clipped it, then gives the channel means (the rule's spread
    stays the clipped weight's)."""
    channel_bits = weight_channel_bits(weight, bits, bit_allocation_rule) if bit_allocation else None
    if channel_bits is not None:
        q = torch.empty_like(weight)
        for b in channel_bits.unique().tolist():
            rows = (channel_bits == b).nonzero().flatten().to(weight.device)
            if b == 0:
                flat = weight[rows].reshape(rows.numel(), -1)
                q[rows] = flat.amin(1, keepdim=True).expand_as(flat).reshape(q[rows].shape)
            else:
                q[rows] = quantize_weight(weight[rows], b, rounding, backend, _allow_one_bit=True)
    else:
        q = quantize_weight(weight, bits, rounding, backend)
    if bias_correction:
        q = bias_correct(weight, q, bias_correction_rule)
        if reference is not None:  # the clip's mean shift, per output channel
            shift = _channel_means(reference) - _channel_means(weight)
            q = (q.float() + shift.view(-1, *[1] * (q.dim() - 1))).to(q.dtype)
    return q, channel_bits


def _channel_means(w: Tensor) -> Tensor:
    return w.detach().float().reshape(w.shape[0], -1).mean(1)


def _quantize_weights(plan: _Plan, progress: bool | None) -> tuple[list[LayerReport], float]:
    """Quantize every layer's weight in place (a tied weight once); one report row each."""
    config = plan.config
    rows: list[LayerReport] = []
    owner: dict[tuple, str] = {}  # storage view of the weight (before any change) -> the layer that quantized it
    start = time.perf_counter()
    for i, (name, layer) in enumerate(_progress(plan.layers, "vquant: quantizing weights", progress)):
        t0 = time.perf_counter()
        source = weight_source(name, layer)
        weight = getattr(layer, source)
        bits = config.weight_bits if plan.weight_bits is None else plan.weight_bits[i]
        row = LayerReport(name, type(layer).__name__, tuple(layer.weight.shape), bits, None, None,
                          None, None, 0.0, 0.0)
        rows.append(row)
        key = plan.views[name].key  # taken in _plan: a tensor in shared memory has moved to a private copy since
        if key in owner:
            row.note, row.shared_with = f"weight shared with {owner[key]!r}: quantized once", owner[key]
            plan.written[name] = weight
            continue
        owner[key] = name
        row.note = _join(_reader_note(plan, name), plan.notes.get(name, ""))
        before = layer.weight.detach().clone()  # what the forward uses, after any transform of _prepare
        reference = plan.unclipped.get(name)  # weight_clip: the mean shift of the clip is corrected too
        if config.bn_bias_correction is not None:
            plan.float_weights[name] = before if reference is None else reference
        q, channel_bits = quantize_layer_weight(before, bits, config.rounding, config.backend,
                                                config.bias_correction, config.bit_allocation,
                                                config.bit_allocation_rule, config.bias_correction_rule, reference)
        weight.copy_(q)
        plan.written[name] = weight
        if source != "weight":  # pruned: the forward computes weight_orig * mask; keep `weight` in step now
            save_original(layer, "weight")
            layer.weight.copy_(q * layer.weight_mask)
            row.note = _join(row.note, f"pruned: {source} quantized, the mask kept")
        if weight.is_cuda:
            torch.cuda.synchronize(weight.device)
        row.weight_mse = float((layer.weight.float() - before.float()).pow(2).mean())
        row.time_ms = (time.perf_counter() - t0) * 1e3
        if channel_bits is not None:
            row.note = _join(row.note, f"channel bits {int(channel_bits.min())}..{int(channel_bits.max())}")
        elif config.bit_allocation:
            row.note = (f"no bit allocation at {row.weight_bits} bits (ACIQ allocates at 4 bits or fewer)"
                        if weight.shape[0] > 1 else "no bit allocation: one output channel")
    return rows, time.perf_counter() - start


@dataclass(frozen=True)
class _View:
    """The memory a tensor views, taken before the run changes anything."""

    key: tuple  # `storage_key`: equal for two tensors over the very same elements
    storage: tuple  # (device, data pointer of its storage)
    lo: int  # [lo, hi): the bytes of the storage it views
    hi: int
    shared: bool  # in shared memory: the run moves it to a private copy (`state.save_original`)

    @classmethod
    def of(cls, t: Tensor) -> "_View":
        return cls(storage_key(t), storage_of(t), *byte_range(t), in_shared_memory(t))

    def overlaps(self, other: "_View") -> bool:
        """Other elements of one storage, some of them in common."""
        return (self.storage == other.storage and self.key != other.key and self.lo < other.hi
                and other.lo < self.hi)


def _refuse_partial_overlap(views: dict[str, _View]) -> None:
    """Two weights over overlapping but different parts of one storage cannot both be quantized
    (views of one buffer that do not overlap, e.g. a fused weight split into layers, are fine)."""
    seen: dict[tuple, list[tuple[str, _View]]] = {}
    for name, view in views.items():
        for other, earlier in seen.get(view.storage, []):
            if view.overlaps(earlier):
                raise ValueError(f"the weights of layers {other!r} and {name!r} are different views of one storage: "
                                 "quantizing one changes the other; give each layer its own weight (clone it)")
        seen.setdefault(view.storage, []).append((name, view))


def _save_weights(plan: _Plan) -> None:
    """Save every layer's weight before anything changes it, then each tensor of a module that is
    not quantized over the very same memory: where that memory is shared (`state.save_original`),
    every tensor over it moves to the one private copy the run writes."""
    for name, layer in plan.layers:
        save_original(layer, weight_source(name, layer))
    for view in plan.views.values():
        for _, module, attr, other in plan.readers.get(view.storage, []):
            if view.shared and other.key == view.key:
                save_original(module, attr)


def _reader_note(plan: _Plan, name: str) -> str:
    """What the parameters of modules that are not quantized see of this layer's quantized weight."""
    view = plan.views[name]
    readers = plan.readers.get(view.storage, [])
    same = [repr(what) for what, _, _, other in readers if other.key == view.key]
    part = [repr(what) for what, _, _, other in readers if other.overlaps(view)]
    notes = []
    if same:
        notes.append(f"weight shared with {', '.join(same)} (not a quantized layer): it reads the quantized values "
                     "too")
    if part:
        notes.append(f"weight overlaps part of {', '.join(part)} (not a quantized layer): " +
                     ("in shared memory, so the layer quantizes a private copy and those keep the float values"
                      if view.shared else "the overlapping elements hold the quantized values too"))
    return "; ".join(notes)


def _probe_shape(model: nn.Module, plan: _Plan, probe: Tensor | Probe | None) -> tuple[int, ...]:
    """The shape of the run's probe: a given tensor's or Probe's, `probe_shape`, else the
    model's default (`default_probe_shape`, which raises where it cannot tell)."""
    if isinstance(probe, Tensor):
        return tuple(probe.shape)
    shape = (probe.shape if isinstance(probe, Probe) else None) or plan.config.probe_shape
    return tuple(shape or default_probe_shape(model, plan.layers[0][1]))


def _check_written(model: nn.Module, plan: _Plan, probe: Tensor | Probe | None) -> None:
    """Every layer's forward still reads the weight this run wrote: checked after the probe
    pass, or, where none ran (BatchNorm ranges, float inputs) and a layer carries a forward
    pre-hook that is not vquant's or pruning's (one that may recompute the weight), after one
    forward of a single probe sample."""
    from torch.nn.utils.prune import BasePruningMethod

    foreign = [name for name, layer in plan.layers for hook in layer._forward_pre_hooks.values()
               if not isinstance(hook, (InputQuantizer, BasePruningMethod))]
    if plan.passes == 0 and foreign:
        first = plan.layers[0][1]
        try:
            shape = _probe_shape(model, plan, probe)
        except ValueError as err:  # no shape to draw a sample of
            warnings.warn(f"layer(s) {foreign[:3]} carry forward pre-hooks of their own, which could recompute "
                          f"their weights; unchecked: {err}", stacklevel=3)
            return
        seed = probe.seed if isinstance(probe, Probe) else plan.config.probe_seed
        one = probe[:1] if isinstance(probe, Tensor) else Probe(seed, (1, *shape[1:])).tensor((1, *shape[1:]))
        plan.probe_read = True
        try:
            _run(model, one.to(first.weight.device, first.weight.dtype))
        except Exception as err:  # e.g. a model of token ids, which no float probe fits
            warnings.warn(f"layer(s) {foreign[:3]} carry forward pre-hooks of their own; one forward of a probe "
                          f"sample of shape {tuple(one.shape)} would check that they still read the quantized "
                          f"weights, but it failed ({type(err).__name__}: {str(err)[:120]}), so this is unchecked "
                          "(pass probe= an input that fits to check it)", stacklevel=3)
    for name, layer in plan.layers:  # also the layers the failed forward reached
        if getattr(layer, weight_source(name, layer)) is not plan.written.get(name):
            raise RuntimeError(f"layer {name!r}: its weight was replaced during the forward (a hook recomputes it), "
                               "so the layer would not run quantized; remove that hook first")


# -- ranges -------------------------------------------------------------------------------
class _Ranger:
    """`(x, bits) -> (lo, hi, signed)` by a method's probe rule (picklable, no closure)."""

    def __init__(self, method: RangeMethod, config: QuantConfig, tap: PreActivationTap | None = None):
        self.method, self.config, self.tap = method, config, tap

    def __call__(self, x: Tensor, bits: int):
        pre = self.tap.lookup(x) if self.tap is not None else None
        return self.method.range_from_probe(x, bits, self.config, pre)


def _attach_input_quantizers(plan: _Plan, rows: list[LayerReport]) -> list[InputQuantizer | None]:
    """One `InputQuantizer` per layer whose input is quantized, in ranging mode."""
    config, hooks = plan.config, []
    fallback = METHODS["sigma"] if plan.method.bn_first else plan.method
    for (name, layer), bits, row in zip(plan.layers, plan.act_bits, rows):
        if bits is None:
            hooks.append(None)
            continue
        given = plan.fixed.get(name)
        hook = InputQuantizer(name, bits, input_channel_dim(layer), None if given is None or isinstance(given, str) else given)
        row.act_rule = plan.method.name
        if hook.quantizer is not None and plan.method.name != "bn":
            row.act_rule += " (BatchNorm)"  # e.g. ACIQ on BatchNorm statistics
        if plan.method.calibrated:
            from .nvidia.calib import make_calibrator

            hook.mode, hook.calibrator = "collect", make_calibrator(config.act_range, bits, None, False)
        elif hook.quantizer is None:
            if fallback.pre_activation and plan.tap is None:
                plan.tap = PreActivationTap()  # ACIQ: one-sided clips from the moments before each ReLU
            hook.mode, hook.ranger = "range", _Ranger(fallback, config, plan.tap)
            row.act_rule = fallback.name
            if isinstance(given, str):
                row.note = _join(row.note, f"bn range fallback to {fallback.name} on the probe: {given}")
        layer.register_forward_pre_hook(hook)
        hooks.append(hook)
    return hooks


def _fix_ranges(model: nn.Module, plan: _Plan, hooks: list, calibration, progress: bool | None) -> float:
    """The probe pass (or the calibration batches) through the weight-quantized model."""
    if plan.probe is None and not plan.method.calibrated:
        return 0.0
    start = time.perf_counter()
    handles = _layer_progress(plan.layers, "vquant: ranging activations", progress)
    if plan.tap is not None:
        handles.append(plan.tap.install(model))
    counters = {name: _Count() for (name, _), hook in zip(plan.layers, hooks) if hook is None}  # the first layer
    handles += [layer.register_forward_pre_hook(counters[name]) for name, layer in plan.layers if name in counters]
    try:
        if plan.method.calibrated:
            plan.passes = _calibrate(model, hooks, calibration, plan.config)
        else:
            _run(model, plan.probe)
            plan.passes = 1
            if _refix_after_multi_calls(hooks):
                _run(model, plan.probe)  # every layer after a shared block ranged on its final range
                plan.passes = 2
    except ValueError:
        raise
    except Exception as err:
        raise RuntimeError(f"the probe pass through the quantized model failed: {err}") from err
    finally:
        for h in handles:
            h.remove()
    for name, counter in counters.items():
        if counter.calls > plan.passes:
            plan.calls[name] = counter.calls // plan.passes
    return time.perf_counter() - start


def _refix_after_multi_calls(hooks: list) -> bool:
    """After a probe pass in which a layer was called more than once: its input range (the
    union of every call) differs from the one its first call was quantized with, so the layers
    after it were ranged on other inputs than the final model gives them. Fix the union ranges
    and range the others again, in a second pass. False when no layer was called twice."""
    ranging = [h for h in hooks if h is not None and h.mode == "range"]
    if not any(h.calls > 1 for h in ranging):
        return False
    for h in ranging:
        if h.calls > 1:
            h.mode = "fixed"
        else:
            h.quantizer = None
    return True


class _Count:
    """A pre-hook counting the calls of a layer that has no input quantizer."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, args) -> None:
        self.calls += 1


def _calibrate(model: nn.Module, hooks: list, batches: Iterable, config: QuantConfig) -> int:
    """Collect each layer input over the batches (inputs float), then fix the ranges; return
    how many batches ran."""
    used = 0
    device = next(model.parameters()).device
    for batch in batches:
        if config.calib_batches is not None and used >= config.calib_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        _run(model, x.to(device))
        used += 1
    if used == 0:
        raise ValueError("calibration gave no batch")
    for hook in hooks:
        if hook is None or hook.calibrator is None:
            continue
        amax = float(hook.calibrator.compute_amax(config.act_range, percentile=config.percentile).max())
        signed = hook.saw_negative
        hook.quantizer = ActivationQuantizer(hook.bits, -amax if signed else 0.0, amax, signed)
    return used


def _correct_bias(model: nn.Module, plan: _Plan, hooks: list, rows: list[LayerReport]) -> None:
    """Analytic bias correction from BatchNorm statistics (`bn_bias_correction`)."""
    mode = plan.config.bn_bias_correction
    if mode is None:
        return
    from .methods.bn_bias_correction import correct_bias

    quantizers = {name: hook.quantizer for (name, _), hook in zip(plan.layers, hooks)
                  if hook is not None and hook.quantizer is not None}
    recomputed = {name: by for name, layer in plan.layers if (by := recomputed_by(layer, "bias")) is not None}
    floats = {name: w for name, w in plan.float_weights.items() if name not in recomputed}
    done = correct_bias(model, floats, quantizers, activations=mode == "all", save=save_original)
    for (name, _), row in zip(plan.layers, rows):
        if name in done:
            row.note = _join(row.note, f"bias corrected ({mode})")
        elif name in recomputed:
            row.note = _join(row.note, f"bias recomputed on access ({recomputed[name]}): not bias corrected")
        elif name in done.skipped:
            row.note = _join(row.note, f"not bias corrected: {done.skipped[name]}")


# -- commit -------------------------------------------------------------------------------
def _commit(plan: _Plan, rows: list[LayerReport], hooks: list, run: RunInfo) -> None:
    """Finish the hooks, fill the rows, and attach the layer states."""
    for (name, layer), row, hook in zip(plan.layers, rows, hooks):
        row.calls = max(plan.calls.get(name, 1), hook.calls // plan.passes if hook is not None and plan.passes else 1)
        if row.calls > 1:
            row.note = _join(row.note, f"called {row.calls} times per forward: the input range covers every call")
        if hook is None:
            if plan.config.quantizes_activations:
                row.note = _join(row.note, "first layer: input float")
        else:
            hook.finish()
            if hook.quantizer is None:
                row.note = _join(row.note, "not reached by the probe: input float")
                row.act_rule = None
            else:
                _fill_row(row, hook.quantizer)
        attach_state(layer, LayerState(row, run))


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a and b not in a else (a or b)


def _fill_row(row: LayerReport, q: Quantizer) -> None:
    row.act_bits, row.act_lo, row.act_hi, row.signed = q.bits, q.lo, q.hi, q.signed
    if isinstance(q, ChannelActivationQuantizer):
        row.note = _join(row.note, f"act channel bits {int(q.channel_bits.min())}..{int(q.channel_bits.max())}")
        if getattr(q, "note", ""):
            row.note = _join(row.note, q.note)


# -- the public entry points ---------------------------------------------------------------
def quantize_model(model: nn.Module, *args: Any, **kwargs: Any) -> QuantReport:
    """Quantize `model` in place, data-free, by the VQuant/SQuant rules; return a report.

    Weights of every Conv1d/2d/3d and Linear (subclasses included, a shared weight once)
    are quantized per output channel with `rounding`. Unless `act_bits` is None or
    `act_range` is "none", each layer input is fake-quantized with a range fixed before any
    data: from BatchNorm statistics (`bn`, or ACIQ with `aciq_stats="bn"`) or by one pass of
    `probe` through the model as it is being quantized (rule 6). The first layer's input
    stays float; the last layer's input uses 8 bits. fp16/bf16/float64 models are
    quantized by the same rules, computed in float32 and cast back.

    Args:
        model: the float model; changed in place (undo with `restore_model`).
        weight_bits, act_bits, rounding, act_range, sigma, ...: every `QuantConfig` field, by
            the same name, default and check (the signature is generated from it); the first
            five may be given by position.
        probe: a probe tensor, a `Probe` (seed and shape), or None for `Probe(probe_seed,
            probe_shape)`: seeded uniform noise, batch 256, at the model's input size.
        calibration: batches of inputs (tensors or `(input, ...)` tuples) for the
            data-driven `act_range`s max/percentile/mse/entropy.
        config: the settings as one `QuantConfig`; a setting keyword given beside it wins
            over the config's value.
        progress: show progress bars (None: only on a terminal).

    Returns:
        A `QuantReport` listing every quantized layer.

    Raises:
        ValueError: a bad setting, a model without quantizable layers, NaN/inf in a weight,
            bias, BatchNorm or the probe (named), a probe that does not fit the model.
        RuntimeError: the model is already quantized, or the probe pass failed.
        TypeError: `model` is not an nn.Module, an unknown keyword, or `config` is not a
            `QuantConfig`.

    On any error the model is left exactly as it was.

    Example:
        >>> import torch, vquant_pl as vq
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> vq.quantize_model(net, 4, 4, probe=vq.Probe(shape=(4, 3, 16, 16))).num_layers
        2
        >>> vq.restore_model(net)
    """
    try:
        call = _SIGNATURE.bind(model, *args, **kwargs).arguments  # only what the caller gave
    except TypeError as err:  # as Python words it for a written signature, with the function named
        raise TypeError(f"quantize_model() {err}; its settings are QuantConfig's fields") from None
    config = _merge_config(call.get("config"), {k: v for k, v in call.items() if k in _SETTINGS})
    probe, calibration, progress = call.get("probe"), call.get("calibration"), call.get("progress")
    _refuse_ignored(config, call)
    model = _uncompiled(model)  # its passes run eagerly; compiled code is reset once the hooks are in place
    with torch.inference_mode(False), torch.no_grad(), run_scope():
        plan = _plan(model, config, probe, calibration)
        run = RunInfo(config, plan.backend, plan.probe_info)
        try:
            _save_weights(plan)  # before any change: shared memory moves to private copies first
            if _prepare(model, plan, probe):  # the transforms changed the weights and BatchNorm parameters
                if config.quantizes_activations and plan.method.uses_bn(config):
                    _bn_ranges(model, plan)
            run.bit_budget, run.probe = plan.bit_budget, plan.probe_info  # both may come from _prepare
            rows, run.weight_time_s = _quantize_weights(plan, progress)
            hooks = _attach_input_quantizers(plan, rows)
            run.probe_time_s = _fix_ranges(model, plan, hooks, calibration, progress)
            _check_written(model, plan, probe)
            _correct_bias(model, plan, hooks, rows)
            _commit(plan, rows, hooks, run)
        except BaseException:
            undo_run(model)
            raise
        finally:
            _drop_compiled_code()
    _warn_probe_unread(plan, call)
    return quantization_report(model)


def _warn_probe_unread(plan: _Plan, call: dict[str, Any]) -> None:
    """`probe`, `probe_seed` or `probe_shape` given (a value other than the default, or named
    by the caller) to a run that drew no probe: a warning naming them (whether a run needs the
    probe is known only once the BatchNorm ranges are traced)."""
    config = plan.config
    given = [f"{k}={getattr(config, k)!r}" for k in ("probe_seed", "probe_shape")
             if k in call or getattr(config, k) != getattr(_DEFAULTS, k)]
    if call.get("probe") is not None:
        given.insert(0, "probe=")
    if plan.probe_read or not given:
        return
    why = ("the activations stay float" if not config.quantizes_activations else
           f"act_range {config.act_range!r} calibrates on the calibration= batches" if plan.method.calibrated else
           "BatchNorm statistics ranged every layer input")
    warnings.warn(f"{', '.join(given)} not used: no probe ran ({why}); drop it", stacklevel=3)


def _is_compiled(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and type(module).__module__.startswith("torch._dynamo")


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper holds (quantized eagerly; the wrapper recompiles at
    its next call). A compiled submodule is refused: the passes that fix the ranges would run
    through its compiled code."""
    if isinstance(model, nn.Module) and _is_compiled(model):
        model = model._orig_mod
    if isinstance(model, nn.Module):
        inner = next((name for name, m in model.named_modules() if _is_compiled(m)), None)
        if inner is not None:
            raise ValueError(f"submodule {inner!r} is compiled (torch.compile): quantize the model before compiling "
                             "its parts, or compile the whole model and pass that")
    return model


def _drop_compiled_code() -> None:
    """`torch.compiler.reset()` when anything may have been compiled: `torch.compile` does not
    see forward hooks added or removed after it compiled a module, so a model compiled before
    `quantize_model` (or `restore_model`) would keep running without (or with) the input
    quantizers. The reset is process-wide (there is no per-module one): all compiled code
    recompiles at its next call."""
    import sys

    if "torch._dynamo" in sys.modules:
        torch.compiler.reset()


_SETTINGS = tuple(QuantConfig.field_names())
#: After `model`, by position: the paper's API `quantize_model(model, 4, 4, "squant", "sigma", 12.0, probe)`.
_POSITIONAL = ("weight_bits", "act_bits", "rounding", "act_range", "sigma", "probe")


def _signature() -> inspect.Signature:
    """`quantize_model`'s signature, generated from `QuantConfig` (one list of settings)."""
    P = inspect.Parameter
    defaults = QuantConfig()
    hints = typing.get_type_hints(QuantConfig)
    own = {"probe": ("Tensor | Probe | None", None), "calibration": ("Iterable | None", None),
           "config": ("QuantConfig | None", None), "progress": ("bool | None", None)}

    def param(name: str, kind) -> inspect.Parameter:
        if name in own:
            return P(name, kind, default=own[name][1], annotation=own[name][0])
        return P(name, kind, default=getattr(defaults, name), annotation=hints[name])

    return inspect.Signature(
        [P("model", P.POSITIONAL_OR_KEYWORD, annotation=nn.Module)]
        + [param(n, P.POSITIONAL_OR_KEYWORD) for n in _POSITIONAL]
        + [param(n, P.KEYWORD_ONLY) for n in (*_SETTINGS, *own) if n not in _POSITIONAL],
        return_annotation=QuantReport)


_SIGNATURE = _signature()
quantize_model.__signature__ = _SIGNATURE


def _refuse_ignored(config: QuantConfig, call: dict[str, Any]) -> None:
    """A probe beside probe_seed/probe_shape, or calibration batches for a data-free range,
    would be ignored: an error instead."""
    config.refuse_probe_beside(call.get("probe"), given=call)
    if call.get("calibration") is not None and not (config.quantizes_activations and METHODS[config.act_range].calibrated):
        raise ValueError(f"calibration= is used only by the data-driven act_range max/percentile/mse/entropy; with "
                         f"act_range={config.act_range!r}, act_bits={config.act_bits!r} it would be ignored")


_DEFAULTS = QuantConfig()


def _merge_config(config: QuantConfig | None, settings: dict[str, Any]) -> QuantConfig:
    """`config` (or the defaults) with the settings the caller gave applied: a keyword wins."""
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a vquant_pl.QuantConfig, got {type(config).__name__}")
    return QuantConfig.from_kwargs(config, **settings)


def restore_model(model: nn.Module) -> None:
    """Put back the exact float weights (and anything a transform changed) and remove the
    input quantizers.

    Raises:
        ValueError: `model` holds no vquant quantization state.
    """
    if not has_state(model):
        raise ValueError(f"{type(model).__name__} is not quantized by vquant_pl")
    restore_all(model)
    _drop_compiled_code()


def activation_ranges(model: nn.Module) -> list[tuple | None]:
    """Per quantized layer, `(bits, lo, hi, signed)` of its input (bits, lo and hi are
    per-channel tensors under `act_bit_allocation`), or None for a float input."""
    states = list(iter_states(model))
    if not states:
        raise ValueError(f"{type(model).__name__} is not quantized by vquant_pl")
    out = []
    for _, layer, _ in states:
        hook = input_quantizer(layer)
        out.append(None if hook is None or hook.quantizer is None else hook.quantizer.ranges())
    return out


def set_activation_ranges(model: nn.Module, ranges: list[tuple | None]) -> None:
    """Fix the input ranges of a quantized model (e.g. rank 0's, broadcast under DDP)."""
    states = list(iter_states(model))
    if not states:
        raise ValueError(f"{type(model).__name__} is not quantized by vquant_pl")
    if len(ranges) != len(states):
        raise ValueError(f"{len(ranges)} ranges for {len(states)} quantized layers")
    for (_, layer, state), r in zip(states, ranges):
        hook = input_quantizer(layer)
        if hook is None or r is None:
            continue
        hook.quantizer = (ChannelActivationQuantizer(*r, dim=hook.channel_dim) if isinstance(r[0], Tensor)
                          else ActivationQuantizer(*r))
        _fill_row(state.row, hook.quantizer)


def quantization_report(model: nn.Module) -> QuantReport | None:
    """The report of the run that quantized `model` (read from its layers), or None."""
    states = list(iter_states(model))
    if not states:
        return None
    run = states[0][2].run
    return QuantReport(run.config, run.backend, [s.row for _, _, s in states], run.weight_time_s,
                       run.probe_time_s, run.probe, run.bit_budget)


# -- helpers -------------------------------------------------------------------------------
@torch.no_grad()
def _run(model: nn.Module, x: Tensor) -> None:
    modes = {m: m.training for m in model.modules()}  # each module's own flag back (a frozen BatchNorm stays so)
    model.eval()
    try:
        model(x)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _progress(items: list, desc: str, progress: bool | None):
    if progress is False:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=None if progress is None else False, leave=False, unit="layer")


def _layer_progress(layers: list, desc: str, progress: bool | None) -> list:
    """A bar advanced by each layer's forward during one pass; returns the hook handles."""
    if progress is False:
        return []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(layers), desc=desc, disable=None if progress is None else False, leave=False,
               unit="layer")
    handles = [layer.register_forward_pre_hook(_Tick(bar, len(layers))) for _, layer in layers]

    class _Close:
        def remove(self) -> None:
            bar.close()
    return handles + [_Close()]


class _Tick:
    def __init__(self, bar, total: int):
        self.bar, self.total = bar, total

    def __call__(self, module, args) -> None:
        if self.bar.n < self.total:
            self.bar.update(1)
