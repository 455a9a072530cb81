"""Data-free equalization of activation channel ranges into the weights (DFQ-style).

A per-tensor activation quantizer spends its levels on the widest channel; narrow channels
round to a few levels. Scaling a channel up where it is produced (a BatchNorm's gamma and
beta) and down where it is consumed (the consumer layers' input-channel weights) leaves the
float network unchanged and moves the range into the weights. Two patterns are found by
torch.fx, with quantizable layers as leaves:

- **streams** (exact): BatchNorm outputs, alone or summed by residual adds, whose every
  other user is a quantizable layer (an inverted-residual stream feeding expand and head
  convs);
- **clipped pairs**: BatchNorm -> ReLU / ReLU6 / Hardtanh(0, H) -> quantizable layers. ReLU
  commutes with any positive scale; for an upper clip H a channel is scaled only when its
  BatchNorm upper value `beta + k|gamma|` lies below H, and at most up to H, so it clips at
  H / f >= `beta + k|gamma|` (a k-sigma tail; the only approximation).

Per channel, with `a_i` the channel's BN-derived range (k standard deviations) and `w_i`
its consumers' input-channel weight range (each consumer normalized by its largest
weight), the scale is `f_i ∝ w_i^(1 - alpha) / a_i^alpha` (`alpha = 0.5` is DFQ's
cross-layer equalization), normalized so that the widest channel keeps its range. When
every consumer is depthwise (its per-channel weight quantization is scale-invariant) the
activation is fully equalized (`alpha = 1`).

A BatchNorm that applies an activation itself (timm's `BatchNormAct2d`) is a producer when
its `.act` is Identity or ReLU (a stream), or ReLU / ReLU6 / Hardtanh(0, H) (a clipped pair,
as with the separate module). A group is found but skipped (`EqualizationGroup.skipped`
says why, and `equalize` warns) when scaling it would change the float network or would not
last: any other activation inside a producer, a producer or consumer called more than once
per forward, a tensor it scales that shares memory with another tensor of the model, one
recomputed on access (pruning, a parametrization), or a Linear consumer that does not read
the BatchNorm's channel dimension.
"""
from __future__ import annotations

import math
import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..layers import BATCHNORMS, QUANTIZABLE, is_depthwise, per_input_channel, recomputed_by
from ..state import SaveFn, byte_range, save_original, storage_of
from .bn_graph import LeafTracer, bn_activation

__all__ = ["EqualizationGroup", "equalize", "find_groups"]

_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class EqualizationGroup:
    """BatchNorm producers whose (summed) output channels feed only `consumers`; `clip` is
    the (lo, hi) of the activation in between, or None for a linear stream; `skipped` the
    reason it is left unequalized, or None."""

    producers: list[str]
    consumers: list[str]
    clip: tuple[float, float] | None = None
    skipped: str | None = None
    scales: Tensor | None = field(default=None, repr=False)  # set by `equalize`


def _clip_of(node: fx.Node, modules: dict) -> tuple[float, float] | None:
    """The (lo, hi) of a ReLU-like node with lo == 0, else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU6):
            return 0.0, 6.0
        if isinstance(m, nn.ReLU):
            return 0.0, math.inf
        if isinstance(m, nn.Hardtanh) and m.min_val == 0:
            return 0.0, float(m.max_val)
    elif node.op == "call_function":
        if node.target in (torch.relu, nn.functional.relu):
            return 0.0, math.inf
        if node.target is nn.functional.relu6:
            return 0.0, 6.0
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        return 0.0, math.inf
    return None


def _consumer(node: fx.Node, user: fx.Node, modules: dict) -> bool:
    """Whether `user` is a quantizable layer taking `node` as its only tensor input."""
    return (user.op == "call_module" and isinstance(modules[user.target], QUANTIZABLE)
            and user.args[:1] == (node,) and node not in user.args[1:] and node not in user.kwargs.values())


def _stream(start: fx.Node, modules: dict) -> tuple[list[str], list[str]] | None:
    """BN producers and layer consumers of the add-connected component of `start`, or None
    when a node of it has a user that is neither an add of the component nor a layer."""
    seen, todo, producers, consumers = {start}, [start], [], []
    while todo:
        n = todo.pop()
        if n.op == "call_module" and isinstance(modules[n.target], BATCHNORMS):
            producers.append(n.target)
        elif not (n.op == "call_function" and n.target in _ADDS):
            return None
        else:
            for a in n.args[:2]:
                if not isinstance(a, fx.Node):
                    return None
                if a not in seen:
                    seen.add(a)
                    todo.append(a)
        for u in n.users:
            if u.op == "call_function" and u.target in _ADDS and len(u.args) == 2 and not u.kwargs:
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
            elif _consumer(n, u, modules):
                consumers.append(u.target)
            else:
                return None
    return producers, consumers


def _memory(model: nn.Module) -> dict[tuple, list[tuple[str, int, int]]]:
    """(device, storage) -> (name, first byte, end byte) of every parameter and buffer of `model`."""
    out: dict[tuple, list[tuple[str, int, int]]] = {}
    for owner, module in model.named_modules():
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None:
                out.setdefault(storage_of(t), []).append((f"{owner}.{name}" if owner else name, *byte_range(t)))
    return out


def _after(bn: nn.Module) -> tuple[float, float] | str | None:
    """`bn_activation`, with a LeakyReLU (timm's CSP and DarkNet `BatchNormAct2d`) as nothing:
    it commutes with a positive per-channel scale, as a linear stream does."""
    after = bn_activation(bn)
    act = getattr(bn, "act", None)
    if isinstance(after, str) and isinstance(act, nn.LeakyReLU) and act.negative_slope >= 0 and \
            isinstance(getattr(bn, "drop", nn.Identity()), (nn.Identity, nn.Dropout)):
        return None
    return after


def _why_skipped(group: EqualizationGroup, modules: dict, calls: Counter, memory: dict) -> str | None:
    """Why scaling `group` would change the float network or would not last, naming the layers; None if safe."""
    for name in group.producers:  # what a BatchNorm applies itself: nothing, ReLU, or the group's clip from 0
        after = _after(modules[name])
        if after is None or after == (0.0, math.inf) or (after == group.clip and after[0] == 0.0):
            continue
        what = after if isinstance(after, str) else f"clips to [{after[0]}, {after[1]}] after normalizing"
        return f"BatchNorm {name!r} ({type(modules[name]).__name__}) {what}"
    for name in group.producers + group.consumers:
        if calls[name] > 1:
            return f"{name!r} is called {calls[name]} times in one forward"
    for name in group.consumers:
        layer = modules[name]
        if isinstance(layer, nn.Linear) and not all(isinstance(modules[p], nn.BatchNorm1d) and
                                                    modules[p].num_features == layer.in_features
                                                    for p in group.producers):
            return f"Linear {name!r} reads its input's last dimension, BatchNorm(s) {group.producers} scale dimension 1"
    tensors = [(p, a) for p in group.producers for a in ("weight", "bias")] + [(c, "weight") for c in group.consumers]
    for name, attr in tensors:
        by = recomputed_by(modules[name], attr)
        if by is not None:
            return f"'{name}.{attr}' is recomputed on access ({by})"
        t = getattr(modules[name], attr)
        start, end = byte_range(t)
        shared = [other for other, lo, hi in memory.get(storage_of(t), [])
                  if other != f"{name}.{attr}" and lo < end and start < hi]
        if shared:
            return f"'{name}.{attr}' shares memory with {shared}"
    return None


def find_groups(model: nn.Module) -> list[EqualizationGroup]:
    """Every equalizable group of `model` (see the module docstring), in graph order; a group
    that is found but unsafe to scale carries the reason in `skipped`.

    Raises:
        RuntimeError: when torch.fx cannot trace the model.
    """
    try:
        graph = LeafTracer(QUANTIZABLE + BATCHNORMS).trace(model)
    except Exception as err:
        raise RuntimeError(f"equalization needs a torch.fx trace of {type(model).__name__}: {err}") from err
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    memory = _memory(model)
    groups, done = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BATCHNORMS) or node.target in done:
            continue
        bn = modules[node.target]
        if not bn.affine or bn.weight is None:
            continue
        group = None
        found = _stream(node, modules)
        if found is not None:
            producers, consumers = found
            done.update(producers)
            after = _after(bn) if len(producers) == 1 else None
            if consumers and all(modules[p].affine for p in producers):
                group = EqualizationGroup(producers, sorted(set(consumers), key=consumers.index),
                                          after if isinstance(after, tuple) else None)
        elif _after(bn) is None:
            users = list(node.users)
            act = users[0] if len(users) == 1 and _clip_of(users[0], modules) is not None else None
            if act is not None and act.users and all(_consumer(act, u, modules) for u in act.users):
                group = EqualizationGroup([node.target], [u.target for u in act.users], _clip_of(act, modules))
        if group is not None:
            done.update(group.producers)
            group.skipped = _why_skipped(group, modules, calls, memory)
            groups.append(group)
    return groups


def _input_view(layer: nn.Module, scale: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """`scale` per input channel, broadcast onto `layer.weight` (grouped convs included)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return scale.view(1, -1), tuple(w.shape)
    g = layer.groups
    opg, ipg = w.shape[0] // g, w.shape[1]
    return scale.view(g, 1, ipg, *([1] * (w.dim() - 2))), (g, opg, ipg, *w.shape[2:])


def _input_ranges(layer: nn.Module) -> Tensor:
    """max |W| per input channel, over the layer's (group's) output channels, normalized by max |W|."""
    r = per_input_channel(layer, layer.weight.detach().float().abs(), torch.amax)
    return r / r.max().clamp_min(1e-12)


@torch.no_grad()
def equalize(model: nn.Module, alpha: float = 0.5, k: float = 4.0, max_scale: float = 64.0,
             clip_k: float = 8.0, save: SaveFn | None = None, groups: list[EqualizationGroup] | None = None) -> list[EqualizationGroup]:
    """Equalize activation channel ranges into the consumers' weights, in place.

    Args:
        model: a float model with BatchNorm layers (eval statistics are used).
        alpha: migration strength in [0, 1]: 0.5 is DFQ's cross-layer equalization, 1 makes
            every channel of the activation as wide as the widest (depthwise-only consumers
            always get 1).
        k: standard deviations of the BN-derived channel distribution taken as its range.
        clip_k: before an upper clip H, a channel is scaled only if `beta + clip_k |gamma|`
            (its safe upper value u) is below H, and by at most H / u.
        max_scale: bound on a channel's scale factor f and on 1/f.
        save: called as `save(module, name)` before a tensor is changed (default
            `vquant_pl.state.save_original`, so that `restore_model` undoes it).
        groups: the groups to equalize (default `find_groups(model)`).

    Returns:
        The groups, each with its per-channel `scales` (activation multiplied by them), or
        with `skipped` set (and `scales` None) where it was left unequalized. One warning
        names the skipped groups and their reasons, and says why when nothing was equalized.

    Raises:
        ValueError: on alpha outside [0, 1] or non-positive k / max_scale.

    Example:
        >>> import torch, vquant_pl as vq
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                             torch.nn.Conv2d(8, 4, 1)).eval()
        >>> [(g.producers, g.consumers) for g in equalize(model, alpha=0.5)]
        [(['1'], ['3'])]
        >>> vq.restore_model(model)  # the scales were saved: the float model is back
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if not k > 0 or not max_scale >= 1:
        raise ValueError(f"k must be > 0 and max_scale >= 1, got k={k!r}, max_scale={max_scale!r}")
    save = save or save_original
    modules = dict(model.named_modules())
    groups = find_groups(model) if groups is None else groups
    for group in groups:
        if group.skipped is not None:
            continue
        bns = [modules[p] for p in group.producers]
        layers = [modules[c] for c in group.consumers]
        mean = sum(bn.bias.detach().float() for bn in bns)
        std = torch.sqrt(sum(bn.weight.detach().float() ** 2 for bn in bns))
        if group.clip is None:
            a = torch.maximum((mean - k * std).abs(), (mean + k * std).abs())
            free = torch.ones_like(a, dtype=torch.bool)
            cap = torch.full_like(a, max_scale)
        else:
            upper, safe = mean + k * std, mean + clip_k * std
            hi = group.clip[1]
            free = (upper > 0) & (safe <= hi) if math.isfinite(hi) else upper > 0
            a = torch.where(free, upper, torch.full_like(upper, min(hi, float(upper.max()))))
            cap = torch.clamp(hi / safe.clamp_min(1e-12), max=max_scale) if math.isfinite(hi) else \
                torch.full_like(a, max_scale)
        a = a.clamp_min(1e-8)
        if all(is_depthwise(m) for m in layers):
            f = 1.0 / a
        else:
            w = torch.stack([_input_ranges(m) for m in layers]).amax(0).clamp_min(1e-8)
            f = w ** (1 - alpha) / a ** alpha
        f = f * (a.max() / (a * f).max())  # the widest channel keeps its range
        f = torch.where(free, torch.minimum(torch.clamp(f, 1 / max_scale, max_scale), cap), torch.ones_like(f))
        for bn in bns:
            for name in ("weight", "bias"):
                save(bn, name)
                t = getattr(bn, name)
                t.copy_((t.float() * f).to(t.dtype))
        for layer in layers:
            save(layer, "weight")
            view, shape = _input_view(layer, f)
            w = layer.weight
            w.copy_((w.float().reshape(shape) / view).reshape(w.shape).to(w.dtype))
        group.scales = f
    _warn_skipped(model, groups, modules)
    return groups


def _warn_skipped(model: nn.Module, groups: list[EqualizationGroup], modules: dict) -> None:
    """One warning naming every skipped group and its reason, and why nothing was equalized."""
    skipped = "; ".join(f"{g.producers} -> {g.consumers}: {g.skipped}" for g in groups if g.skipped is not None)
    if any(g.scales is not None for g in groups):
        if skipped:
            warnings.warn(f"equalize skipped {sum(g.skipped is not None for g in groups)} of {len(groups)} "
                          f"group(s): {skipped}", stacklevel=4)
        return
    if skipped:
        why = f"every group was skipped: {skipped}"
    elif not any(isinstance(m, BATCHNORMS) and m.affine for m in modules.values()):
        why = "it has no affine BatchNorm"
    else:
        why = ("no BatchNorm output feeds only quantizable layers (directly, through residual adds, or through "
               "one ReLU / ReLU6 / Hardtanh(0, H))")
    warnings.warn(f"equalize changed nothing in {type(model).__name__}: {why}", stacklevel=4)
