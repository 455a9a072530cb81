"""DFQ activation ranges from BatchNorm parameters alone (Nagel et al. 2019): no probe, no data.

The model is traced with torch.fx (quantizable layers kept as leaves). For each layer input
the producing BatchNorm's per-channel output distribution `(mean = beta, std = |gamma|)` is
carried through ReLU/ReLU6 (clip), pooling, identity/dropout/flatten/view, residual add (sum
of means, root-sum-square of stds) and channel concat. The range is
`[max(lo_clip, beta - k|gamma|), min(hi_clip, beta + k|gamma|)]` per channel, widest channel
for the tensor. A BatchNorm that applies an activation itself (timm's `BatchNormAct2d`) is
clipped as by a following ReLU / ReLU6 / Hardtanh module; any other activation inside it
gives a reason. Where the trace or the propagation fails, the layer gets a reason instead.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..layers import BATCHNORMS, QUANTIZABLE

#: Default k (in standard deviations) per activation bit width.
DEFAULT_BN_K = {2: 3.0, 3: 3.0, 4: 3.0, 5: 4.0, 6: 4.0, 7: 6.0, 8: 6.0}

_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
                 nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.ZeroPad2d)
_PASS_FUNCTIONS = {torch.flatten, nn.functional.adaptive_avg_pool2d, nn.functional.avg_pool2d,
                   nn.functional.max_pool2d, nn.functional.dropout, torch.nn.functional.adaptive_max_pool2d}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "clone"}


@dataclass
class ChannelStats:
    mean: Tensor
    std: Tensor
    lo: float = -math.inf
    hi: float = math.inf

    def clipped(self, lo: float, hi: float) -> "ChannelStats":
        return ChannelStats(self.mean, self.std, max(self.lo, lo), min(self.hi, hi))


def bn_activation(bn: nn.Module) -> tuple[float, float] | str | None:
    """What a BatchNorm module applies after normalizing: None for nothing (torch's own forward,
    or Identity / Dropout as timm's `BatchNormAct2d` `.drop` and `.act`), the (lo, hi) of a
    ReLU / ReLU6 / Hardtanh `.act` (a clip), else the reason (naming the activation) that it
    is neither."""
    if type(bn).forward.__module__.startswith("torch.nn."):
        return None
    parts = [getattr(bn, a) for a in ("drop", "act") if isinstance(getattr(bn, a, None), nn.Module)]
    if not parts:
        return "has a forward of its own"
    lo, hi = -math.inf, math.inf
    for part in parts:
        if isinstance(part, nn.ReLU):
            lo = max(lo, 0.0)
        elif isinstance(part, nn.Hardtanh):  # ReLU6 included
            lo, hi = max(lo, float(part.min_val)), min(hi, float(part.max_val))
        elif not isinstance(part, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
            return f"applies {type(part).__name__} after normalizing"
    return None if (lo, hi) == (-math.inf, math.inf) else (lo, hi)


class LeafTracer(fx.Tracer):
    def __init__(self, leaves: tuple):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _stats(node, modules, memo):
    if node in memo:
        return memo[node]
    memo[node] = None  # guards cycles
    result = None
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, BATCHNORMS):
            gamma = m.weight.detach().float() if m.affine else torch.ones(m.num_features)
            beta = m.bias.detach().float() if m.affine else torch.zeros(m.num_features)
            after = bn_activation(m)
            if isinstance(after, str):
                result = f"its BatchNorm {node.target!r} ({type(m).__name__}) {after}"
            else:
                result = ChannelStats(beta, gamma.abs())
                result = result if after is None else result.clipped(*after)
        elif isinstance(m, nn.ReLU6):
            result = _clip(first, modules, memo, 0.0, 6.0)
        elif isinstance(m, nn.ReLU):
            result = _clip(first, modules, memo, 0.0, math.inf)
        elif isinstance(m, nn.Hardtanh):
            result = _clip(first, modules, memo, m.min_val, m.max_val)
        elif isinstance(m, _PASS_MODULES) and first is not None:
            result = _stats(first, modules, memo)
    elif node.op == "call_function":
        if node.target in (torch.relu, nn.functional.relu):
            result = _clip(first, modules, memo, 0.0, math.inf)
        elif node.target is nn.functional.relu6:
            result = _clip(first, modules, memo, 0.0, 6.0)
        elif node.target in (operator.add, operator.iadd, torch.add) and len(node.args) >= 2:
            a, b = (_stats(n, modules, memo) if isinstance(n, fx.Node) else None for n in node.args[:2])
            if isinstance(a, ChannelStats) and isinstance(b, ChannelStats) and a.mean.shape == b.mean.shape:
                result = ChannelStats(a.mean + b.mean, torch.sqrt(a.std ** 2 + b.std ** 2),
                                      a.lo + b.lo, a.hi + b.hi)
            else:
                result = _reason(a, b)
        elif node.target is torch.cat:
            parts = [_stats(n, modules, memo) for n in node.args[0]]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim == 1 and all(isinstance(p, ChannelStats) for p in parts):
                result = ChannelStats(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]),
                                      min(p.lo for p in parts), max(p.hi for p in parts))
            elif dim == 1:
                result = _reason(*parts)
        elif node.target in _PASS_FUNCTIONS and first is not None:
            result = _stats(first, modules, memo)
    elif node.op == "call_method":
        if node.target in _PASS_METHODS and first is not None:
            result = _stats(first, modules, memo)
        elif node.target in ("relu", "relu_") and first is not None:
            result = _clip(first, modules, memo, 0.0, math.inf)
    memo[node] = result
    return result


def _clip(node, modules, memo, lo, hi):
    s = _stats(node, modules, memo) if node is not None else None
    return s.clipped(lo, hi) if isinstance(s, ChannelStats) else s


def _reason(*parts) -> str | None:
    """The first reason among the inputs of a node that gets no statistics."""
    return next((p for p in parts if isinstance(p, str)), None)


def stats_range(s: ChannelStats, k: float) -> tuple[float, float, bool]:
    lo = float(torch.clamp(s.mean - k * s.std, min=s.lo).min())
    hi = float(torch.clamp(s.mean + k * s.std, max=s.hi).max())
    if lo >= 0:
        return 0.0, hi, False
    alpha = max(-lo, hi)
    return -alpha, alpha, True


def bn_call_stats(model: nn.Module, layer_names: list[str],
                  leaves: tuple = QUANTIZABLE) -> dict[str, list[ChannelStats | str] | str]:
    """For each layer name, one entry per call of the layer in the traced forward (a shared
    block is called more than once): the per-channel statistics of that call's input carried
    from BatchNorm, or the reason there are none; a reason for the layer when the trace fails."""
    try:  # BatchNorm subclasses stay leaves too: `bn_activation` reads what they apply
        graph = LeafTracer(leaves + BATCHNORMS).trace(model)
    except Exception as err:
        return {name: f"fx trace failed ({type(err).__name__})" for name in layer_names}
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    memo: dict = {}
    out: dict[str, list[ChannelStats | str] | str] = {}
    for name in layer_names:
        nodes = calls.get(name)
        if not nodes:
            out[name] = "not a call in the traced graph"
            continue
        out[name] = []
        for node in nodes:
            s = _stats(node.args[0], modules, memo) if node.args and isinstance(node.args[0], fx.Node) else None
            out[name].append("input not produced by a BatchNorm" if s is None else s)  # or the reason
    return out


def bn_stats(model: nn.Module, layer_names: list[str], leaves: tuple = QUANTIZABLE) -> dict[str, ChannelStats | str]:
    """For each layer name: the per-channel statistics of its input carried from BatchNorm,
    or the reason there are none (also for a layer called more than once in one forward,
    whose input has more than one distribution)."""
    out: dict[str, ChannelStats | str] = {}
    for name, calls in bn_call_stats(model, layer_names, leaves).items():
        if isinstance(calls, str) or len(calls) == 1:
            out[name] = calls if isinstance(calls, str) else calls[0]
        else:
            out[name] = f"called {len(calls)} times in one forward"
    return out

