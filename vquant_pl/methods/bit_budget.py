"""Mixed precision on a fixed bit budget: per-layer weight and input bits from BatchNorm statistics.

Each quantized layer's output noise-to-signal ratio (NSR) is estimated data-free, for every
candidate bit width, from the weights and the per-channel input distribution that BatchNorm
statistics carry to the layer (`bn_graph.bn_stats`: mean `mu_i`, std `s_i`, clipped by ReLU):

    signal_o  = (sum_i W[o, i, :].sum() mu_i)^2 + sum_i ||W[o, i, :]||^2 s_i^2
    weights:  noise_o = sum_i ||Wq[o, i, :] - W[o, i, :]||^2 s_i^2   (the mean part is bias-corrected)
    inputs:   noise_o = sum_i ||W[o, i, :]||^2 E[(Q_b(x_i) - x_i)^2]  (x_i sampled from the BN normal)
    NSR(b)    = mean_o noise_o / signal_o

and, as for layers in series the output NSR is about the sum of the layers' NSRs, the bits
minimize `sum_l NSR_l(b_l)` under the budget `sum_l n_l b_l <= target * sum_l n_l`, with
`n_l` the layer's parameter count (weights) or its input's element count per image
(activations): a greedy on the marginal NSR gain per budget bit, from `min_bits` up, which
spends the budget to within one layer's smallest step. Layers whose input bits are fixed by
the rules (the first layer's float input, the last layer's 8 bits) or that no BatchNorm
feeds keep their bits and are outside the activation budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layers import groups, in_channels
from ..ops.affine import ActivationQuantizer
from ..ops.weights import quantize_weight
from .bn_graph import ChannelStats
from .bn_mse import sample_stats

__all__ = ["Allocation", "allocate", "weight_nsr", "input_nsr", "greedy_bits"]

#: The candidate bit widths.
CANDIDATE_BITS = tuple(range(2, 9))


@dataclass
class Allocation:
    """Per-layer bits and what they cost.

    `weight_bits[l]`/`act_bits[l]` per layer (act None where the input stays float);
    `weight_average`/`act_average` the budget-weighted means actually reached (at most
    the target); `params`/`elements` the weights' parameter counts and the inputs'
    element counts per image."""

    weight_bits: list[int]
    act_bits: list[int | None]
    weight_average: float
    act_average: float | None
    params: list[int]
    elements: list[int]


def _input_moments(layer: nn.Module, stats: ChannelStats | None, samples: int = 512) -> tuple[Tensor, Tensor]:
    """Per input channel (mean, variance) of the layer input; (0, 1) without statistics."""
    c = in_channels(layer)
    if stats is None or stats.mean.numel() != c:
        return torch.zeros(c), torch.ones(c)
    x = sample_stats(stats, samples, 0)
    return x.mean(1), x.var(1, unbiased=False)


def _per_pair(weight: Tensor, layer: nn.Module, per_channel: Tensor) -> Tensor:
    """`per_channel[input channel of (o, j)]` as `[O, I/groups]`."""
    o, ipg = weight.shape[0], (weight.shape[1] if weight.dim() > 1 else 1)
    g = groups(layer)
    idx = (torch.arange(o) // (o // g)).view(-1, 1) * ipg + torch.arange(ipg).view(1, -1)
    return per_channel.float()[idx]


def _signal(weight: Tensor, layer: nn.Module, mean: Tensor, var: Tensor) -> Tensor:
    w = weight.detach().float().reshape(weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1)
    mu, v = _per_pair(weight, layer, mean), _per_pair(weight, layer, var)
    return (w.sum(2) * mu).sum(1) ** 2 + (w.pow(2).sum(2) * v).sum(1)


def weight_nsr(layer: nn.Module, stats: ChannelStats | None, bits: tuple[int, ...] = CANDIDATE_BITS,
               rounding: str = "squant", backend: str | None = None) -> Tensor:
    """The layer's output NSR from weight quantization at each of `bits` (see the module docstring)."""
    weight = layer.weight.detach()
    mean, var = _input_moments(layer, stats)
    signal = _signal(weight, layer, mean, var).clamp_min(1e-30)
    v = _per_pair(weight, layer, var)
    out = []
    for b in bits:
        d = (quantize_weight(weight, b, rounding, backend) - weight).float().reshape(weight.shape[0], v.shape[1], -1)
        out.append(float(((d.pow(2).sum(2) * v).sum(1) / signal).mean()))
    return torch.tensor(out, dtype=torch.float64)


def input_nsr(layer: nn.Module, stats: ChannelStats, range_fn, bits: tuple[int, ...] = CANDIDATE_BITS,
              samples: int = 512) -> Tensor:
    """The layer's output NSR from quantizing its input at each of `bits`; `range_fn(bits)`
    gives the `(lo, hi, signed)` the run would use."""
    weight = layer.weight.detach()
    mean, var = _input_moments(layer, stats)
    signal = _signal(weight, layer, mean, var).clamp_min(1e-30)
    x = sample_stats(stats, samples, 0)  # [C, n]
    w2 = weight.float().reshape(weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1).pow(2).sum(2)
    out = []
    for b in bits:
        q = ActivationQuantizer(b, *range_fn(b))(x)
        e = _per_pair(weight, layer, (q - x).pow(2).mean(1))
        out.append(float(((w2 * e).sum(1) / signal).mean()))
    return torch.tensor(out, dtype=torch.float64)


def greedy_bits(nsr: Tensor, costs: list[int], target: int, min_bits: int,
                bits: tuple[int, ...] = CANDIDATE_BITS) -> list[int]:
    """Bits per row of `nsr [L, len(bits)]` minimizing the NSR sum with `sum cost * bits <=
    target * sum cost`, each from `min_bits` up.

    Raises:
        ValueError: `min_bits` above `target`, or not a candidate.

    Example:
        >>> greedy_bits(torch.tensor([[4., 1., .25], [64., 16., 4.]]), [1, 1], 3, 2, (2, 3, 4))
        [2, 4]
    """
    if min_bits not in bits or min_bits > target:
        raise ValueError(f"min_bits {min_bits} must be a candidate bit width and at most the target {target}")
    pos = [bits.index(min_bits)] * len(costs)
    left = target * sum(costs) - min_bits * sum(costs)
    while True:
        best, gain = None, 0.0
        for l, c in enumerate(costs):
            p = pos[l]
            if p + 1 >= len(bits) or c * (bits[p + 1] - bits[p]) > left:
                continue
            g = float(nsr[l, p] - nsr[l, p + 1]) / (c * (bits[p + 1] - bits[p]))
            if best is None or g > gain:
                best, gain = l, g
        if best is None:
            return [bits[p] for p in pos]
        left -= costs[best] * (bits[pos[best] + 1] - bits[pos[best]])
        pos[best] += 1


def _input_elements(model: nn.Module, layers: list[tuple[str, nn.Module]], example: Tensor) -> list[int]:
    """Elements per sample of each layer's input, from one forward of `example` (zeros: shapes only)."""
    sizes = [0] * len(layers)
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: sizes.__setitem__(i, a[0][:1].numel()))
               for i, (_, layer) in enumerate(layers)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return sizes


@torch.no_grad()
def allocate(model: nn.Module, layers: list[tuple[str, nn.Module]], stats: dict, weight_bits: int,
             act_bits: list[int | None], act_target: int | None, range_fn, example: Tensor,
             min_bits: int = 3, rounding: str = "squant", backend: str | None = None) -> Allocation:
    """Per-layer weight and input bits on the budgets `weight_bits` and `act_target`.

    Args:
        model: the float model.
        layers: its quantized layers `(name, layer)`, in order.
        stats: layer name -> `ChannelStats` of its input, or a reason string (no BatchNorm).
        weight_bits: the weights' average bits (weighted by parameter count).
        act_bits: each layer's input bits under the uniform rules (None: float). Layers whose
            bits differ from `act_target` (the rules' first/last layer) or without statistics
            keep theirs.
        act_target: the inputs' average bits (weighted by elements per image); None: no
            activation allocation.
        range_fn: `(stats, bits, layer) -> (lo, hi, signed)`: the run's range rule.
        example: an input batch for the shape-only forward (zeros are enough).
        min_bits: the fewest bits a layer gets.

    Returns:
        An `Allocation`.

    Example:
        >>> from vquant_pl.layers import quantizable_layers
        >>> from vquant_pl.methods.bn_graph import bn_stats, stats_range
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 64, 1),
        ...                     nn.BatchNorm2d(64), nn.ReLU6(), nn.Flatten(), nn.Linear(64 * 36, 10)).eval()
        >>> layers = quantizable_layers(net)
        >>> alloc = allocate(net, layers, bn_stats(net, [n for n, _ in layers]), 4, [None, 4, 8], None,
        ...                  lambda s, b, layer: stats_range(s, 3.0), torch.zeros(1, 3, 8, 8))
        >>> alloc.weight_average <= 4, alloc.act_bits
        (True, [None, 4, 8])
    """
    params = [int(layer.weight.numel()) for _, layer in layers]
    elements = _input_elements(model, layers, example)
    good = lambda name: not isinstance(stats.get(name), (str, type(None)))  # noqa: E731
    w_nsr = torch.stack([weight_nsr(layer, stats[name] if good(name) else None, rounding=rounding, backend=backend)
                         for name, layer in layers])
    w_out = greedy_bits(w_nsr, params, weight_bits, min(min_bits, weight_bits))
    a_out = list(act_bits)
    a_avg = None
    if act_target is not None:
        free = [i for i, (name, _) in enumerate(layers) if act_bits[i] == act_target and good(name)]
        if free:
            a_nsr = torch.stack([input_nsr(layers[i][1], stats[layers[i][0]],
                                           lambda b, i=i: range_fn(stats[layers[i][0]], b, layers[i][1]))
                                 for i in free])
            chosen = greedy_bits(a_nsr, [elements[i] for i in free], act_target, min(min_bits, act_target))
            for i, b in zip(free, chosen):
                a_out[i] = b
            a_avg = sum(elements[i] * a_out[i] for i in free) / sum(elements[i] for i in free)
    w_avg = sum(p * b for p, b in zip(params, w_out)) / sum(params)
    return Allocation(w_out, a_out, w_avg, a_avg, params, elements)
