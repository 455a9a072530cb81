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
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
import torch
import torch.fx as fx
from torch import Tensor, nn

from ..layers import BATCHNORMS, QUANTIZABLE, is_depthwise, per_input_channel
from ..state import SaveFn, save_original
from .bn_graph import LeafTracer

__all__ = ["EqualizationGroup", "equalize", "find_groups"]

_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class EqualizationGroup:
    """BatchNorm producers whose (summed) output channels feed only `consumers`; `clip` is
    the (lo, hi) of the activation in between, or None for a linear stream."""

    producers: list[str]
    consumers: list[str]
    clip: tuple[float, float] | None = None
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


def find_groups(model: nn.Module) -> list[EqualizationGroup]:
    """Every equalizable group of `model` (see the module docstring), in graph order.

    Raises:
        RuntimeError: when torch.fx cannot trace the model.
    """
    try:
        graph = LeafTracer(QUANTIZABLE + BATCHNORMS).trace(model)
    except Exception as err:
        raise RuntimeError(f"equalization needs a torch.fx trace of {type(model).__name__}: {err}") from err
    modules = dict(model.named_modules())
    groups, done = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BATCHNORMS) or node in done:
            continue
        bn = modules[node.target]
        if not bn.affine or bn.weight is None:
            continue
        found = _stream(node, modules)
        if found is not None:
            producers, consumers = found
            done.update(n for n in graph.nodes if n.op == "call_module" and n.target in producers)
            if consumers and all(modules[p].affine for p in producers):
                groups.append(EqualizationGroup(producers, sorted(set(consumers), key=consumers.index)))
            continue
        users = list(node.users)
        if len(users) != 1 or _clip_of(users[0], modules) is None:
            continue
        act = users[0]
        if act.users and all(_consumer(act, u, modules) for u in act.users):
            groups.append(EqualizationGroup([node.target], [u.target for u in act.users], _clip_of(act, modules)))
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
        The groups, each with its per-channel `scales` (activation multiplied by them).

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
    return groups
