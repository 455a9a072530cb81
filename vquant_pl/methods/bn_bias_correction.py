"""Analytic bias correction from BatchNorm statistics (DFQ, extended to activations).

Quantization shifts each layer's expected output: the weight error `Wq - W` meets the
input's mean, and a coarse activation grid rounds narrow channels to a biased value (a
channel of mean 0.1 on a step of 0.4 reads as 0). With the input modelled per channel by
the BatchNorm-derived distribution (`bn_ranges`; a clipped normal, seeded samples from
`act_mse`), the expected output of output channel `o` is, ignoring borders,

    E[y_o] = sum_i W[o, i, :].sum() * E[x_i]   (float)   vs   sum_i Wq[o, i, :].sum() * E[Q(x_i)]

and the difference is added to the layer's bias, or, for a layer without bias feeding a
BatchNorm, subtracted from that BatchNorm's running mean (state_dict keys never change).
Each changed tensor is saved first, so `restore_model` undoes it.
"""
from __future__ import annotations

import warnings
from collections import Counter

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..layers import BATCHNORMS, QUANTIZABLE, groups, in_channels
from ..state import SaveFn, save_original
from .bn_graph import LeafTracer, bn_stats
from .bn_mse import sample_stats

__all__ = ["Corrections", "correct_bias", "expected_shift"]



def _per_input_sum(weight: Tensor, layer: nn.Module) -> Tensor:
    """`W[o, i, :].sum()` as `[O, I/groups]`."""
    return weight.detach().float().reshape(weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1).sum(2)


def expected_shift(layer: nn.Module, float_weight: Tensor, quant_weight: Tensor, mean_float: Tensor,
                   mean_quant: Tensor) -> Tensor:
    """`E[y_quant] - E[y_float]` per output channel, given the input means per channel."""
    g = groups(layer)
    wf, wq = _per_input_sum(float_weight, layer), _per_input_sum(quant_weight, layer)
    out, ipg = wf.shape
    mf, mq = mean_float.float().view(g, 1, ipg), mean_quant.float().view(g, 1, ipg)
    yf = (wf.view(g, out // g, ipg) * mf).sum(2).flatten()
    yq = (wq.view(g, out // g, ipg) * mq).sum(2).flatten()
    return yq - yf


def _following_bn(graph: fx.Graph, modules: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(layer name -> the BatchNorm that is its only user and is called once, layer name -> why
    not, where that BatchNorm is called more than once: a running_mean shift would reach every call)."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    following, blocked = {}, {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], QUANTIZABLE) and len(node.users) == 1:
            (user,) = node.users
            if user.op == "call_module" and isinstance(modules[user.target], BATCHNORMS) and user.args[:1] == (node,):
                if calls[user.target] == 1:
                    following[node.target] = user.target
                else:
                    blocked[node.target] = (f"its BatchNorm {user.target!r} is called {calls[user.target]} times "
                                            "in one forward (a running_mean shift would reach every call)")
    return following, blocked


class Corrections(dict[str, Tensor]):
    """`{layer name: the correction subtracted from its output}`; `skipped`: `{layer name: why}`
    for each layer without a bias whose correction had nowhere to go."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, str] = {}


@torch.no_grad()
def correct_bias(model: nn.Module, float_weights: dict[str, Tensor], quantizers: dict[str, object],
                 activations: bool = True, save: SaveFn | None = None, samples: int = 256) -> Corrections:
    """Remove the expected output shift of each quantized layer, in place.

    Args:
        model: the model with quantized weights in place (BatchNorm gamma/beta still float).
        float_weights: layer name -> its float weight (before quantization).
        quantizers: layer name -> the callable fake-quantizing its input (None or absent: float input).
        activations: also correct the shift of the input quantization (else weights only, DFQ).
        save: called before a tensor changes (default `vquant_pl.state.save_original`).
        samples: seeded draws per channel for the expectations.

    Returns:
        `{layer name: the correction subtracted from its output}` for every corrected layer
        (a `Corrections`); its `skipped` maps each layer without a bias whose correction had
        nowhere to go to the reason, and one warning names them. A layer without a bias whose
        BatchNorm is called more than once per forward (shared by several paths) is skipped.

    Example:
        >>> import torch, vquant_pl as vq
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                             torch.nn.Conv2d(8, 4, 1)).eval()
        >>> from vquant_pl.state import input_quantizer, originals
        >>> _ = vq.quantize_model(model, 4, 4, act_range="bn", bn_bias_correction=None)
        >>> floats = {n: originals(l)["weight"] for n, l in vq.quantizable_layers(model)}
        >>> hooks = {n: input_quantizer(l) for n, l in vq.quantizable_layers(model)}
        >>> sorted(correct_bias(model, floats, {n: h.quantizer for n, h in hooks.items() if h is not None}))
        ['3']
        >>> vq.restore_model(model)
    """

    save = save or save_original
    modules = dict(model.named_modules())
    names = [n for n in float_weights if n in modules]
    stats = bn_stats(model, names, QUANTIZABLE)
    done = Corrections()
    try:
        graph = LeafTracer(QUANTIZABLE + BATCHNORMS).trace(model)
    except Exception:
        return done
    following, blocked = _following_bn(graph, modules)
    for name in names:
        layer, s = modules[name], stats.get(name)
        if s is None or isinstance(s, str):
            continue
        if s.mean.numel() != in_channels(layer):
            continue
        x = sample_stats(s, samples, 0)
        mean_float = x.mean(1)
        q = quantizers.get(name) if activations else None
        mean_quant = mean_float if q is None else _quantize_channels(q, x).mean(1)
        shift = expected_shift(layer, float_weights[name], layer.weight, mean_float, mean_quant)
        bn = modules[following[name]] if name in following else None
        if getattr(layer, "bias", None) is not None:
            save(layer, "bias")
            layer.bias.sub_(shift.to(layer.bias.dtype))
        elif bn is not None and bn.running_mean is not None:
            save(bn, "running_mean")
            bn.running_mean.add_(shift.to(bn.running_mean.dtype))
        else:
            if name in blocked:
                done.skipped[name] = f"no bias, and {blocked[name]}"
            continue
        done[name] = shift
    if done.skipped:
        warnings.warn("bias correction skipped layer(s) " + "; ".join(f"{n!r}: {why}" for n, why in done.skipped.items()),
                      stacklevel=3)
    return done


def _quantize_channels(q, x: Tensor) -> Tensor:
    """Apply an input quantizer to samples `[C, n]` laid out as a `[n, C]` batch."""
    return q(x.t().contiguous()).t()
