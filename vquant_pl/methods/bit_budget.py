"""Mixed precision on a fixed bit budget: per-layer weight and input bits, data-free.

Weights: each quantized layer's output noise-to-signal ratio (NSR) is estimated, for every
candidate bit width, from the weights and the per-channel input distribution that BatchNorm
statistics carry to the layer (`bn_graph.bn_stats`: mean `mu_i`, std `s_i`, clipped by ReLU):

    signal_o  = (sum_i W[o, i, :].sum() mu_i)^2 + sum_i ||W[o, i, :]||^2 s_i^2
    noise_o   = sum_i ||Wq[o, i, :] - W[o, i, :]||^2 s_i^2   (the mean part is bias-corrected)
    NSR(b)    = mean_o noise_o / signal_o

Inputs: a layer's own NSR does not say what its input noise does to the outputs (noise
on the first blocks' inputs reaches the logits hundreds of times more strongly than its
NSR says, noise near the head about as strongly). The cost of quantizing input channel `c`
of layer `l` at `b` bits is the noise it adds to the outputs,

    cost_l(b) = sum_c G_lc * E[(Q_b(x_c) - x_c)^2]

with `E[...]` from the BatchNorm normal of `x_c` (`input_noise`) and `G_lc` the summed
squared Jacobian of the outputs with respect to that channel (`output_gains`, Hutchinson's
estimator on the run's probe: seeded uniform noise, no dataset information).

The bits minimize the summed cost under the budget `sum_l n_l b_l = target * sum_l n_l`,
with `n_l` the layer's parameter count (weights) or its input's element count per image
(activations): a greedy on the marginal gain per budget bit, from `min_bits` up, then the
cheapest moves of at most two steps per layer that spend the rest exactly (`exact_fill`, a
dynamic program; a warning where none exist). A weight tied to several layers counts once
and gives them one width. Layers whose input bits are fixed by the rules (the first layer's
float input, the last layer's 8 bits) or that no BatchNorm feeds keep their bits and are
outside the activation budget.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layers import groups, in_channels, input_channel_dim
from ..ops.affine import ActivationQuantizer
from ..ops.weights import quantize_weight
from ..state import storage_key
from .bn_graph import ChannelStats
from .bn_mse import sample_stats

__all__ = ["Allocation", "allocate", "exact_fill", "greedy_bits", "input_noise", "output_gains", "weight_nsr"]

#: The candidate bit widths.
CANDIDATE_BITS = tuple(range(2, 9))
#: Probe samples on which `output_gains` is estimated (measured: 32 and 64 give the same
#: allocation quality on EfficientNet-Lite0; docs/w4a4.md).
GAIN_PROBES = 32
#: Steps (candidate widths) one layer may move from the greedy's bits to spend a budget
#: exactly (`exact_fill`; 2 and 3 give the same allocations on EfficientNet-Lite0, docs/w4a4.md).
FILL_REACH = 2
#: The most entries of `exact_fill`'s table (the running sums kept, summed over the layers):
#: 32 MB of int8 choices.
FILL_CELLS = 1 << 25


@dataclass
class Allocation:
    """Per-layer bits and what they cost.

    `weight_bits[l]`/`act_bits[l]` per layer (act None where the input stays float);
    `weight_average`/`act_average` the budget-weighted means actually reached (the
    target, unless a warning said the budget could not be spent exactly); `params`/`elements`
    the weights' parameter counts and the inputs' element counts per image; `act_budget` the elements per image of the inputs inside the
    budget (the others keep the rules' bits); `weight_budget` the parameters, a weight tied
    to several layers counted once (those layers share its bits)."""

    weight_bits: list[int]
    act_bits: list[int | None]
    weight_average: float
    act_average: float | None
    params: list[int]
    elements: list[int]
    act_budget: int = 0
    weight_budget: int = 0


def _input_moments(layer: nn.Module, stats: ChannelStats | None, samples: int = 512) -> tuple[Tensor, Tensor]:
    """Per input channel (mean, variance) of the layer input; (0, 1) without statistics."""
    c = in_channels(layer)
    if stats is None or stats.mean.numel() != c:
        return torch.zeros(c, device=layer.weight.device), torch.ones(c, device=layer.weight.device)
    x = sample_stats(stats, samples, 0)
    return x.mean(1), x.var(1, unbiased=False)


def _per_pair(weight: Tensor, layer: nn.Module, per_channel: Tensor) -> Tensor:
    """`per_channel[input channel of (o, j)]` as `[O, I/groups]`."""
    o, ipg = weight.shape[0], (weight.shape[1] if weight.dim() > 1 else 1)
    g = groups(layer)
    idx = (torch.arange(o) // (o // g)).view(-1, 1) * ipg + torch.arange(ipg).view(1, -1)
    return per_channel.float()[idx.to(per_channel.device)]


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


def input_noise(stats: ChannelStats, range_fn, bits: tuple[int, ...] = CANDIDATE_BITS,
                samples: int = 512) -> Tensor:
    """`[len(bits), C]`: per input channel, the mean squared error of quantizing the input
    at each of `bits` (x sampled from the BatchNorm normal; `range_fn(bits)` gives the
    `(lo, hi, signed)` the run would use)."""
    x = sample_stats(stats, samples, 0)  # [C, n]
    return torch.stack([(ActivationQuantizer(b, *range_fn(b))(x) - x).pow(2).mean(1) for b in bits])


def output_gains(model: nn.Module, layers: list[tuple[str, nn.Module]], probe: Tensor,
                 chunk: int = 8, seed: int = 0) -> dict[str, Tensor]:
    """Per layer, per input channel: how much a unit of independent noise variance on every
    element of that channel of *this layer's* input adds to the summed variance of the
    model's outputs (other consumers of the same tensor, a residual path, see it clean, as
    they do under the layer's input quantizer).

    That is the diagonal of `J^T J` (J the Jacobian of the outputs with respect to the
    layer input) summed over the channel's positions, estimated with Hutchinson's
    estimator: the gradient of `<outputs, v>` for a random sign vector `v` per sample has
    that second moment. The model is evaluated on `probe` (no dataset information: the
    run's seeded uniform noise); a layer called more than once per forward adds its calls.
    Layers whose first positional input the outputs do not depend on are missing. Half
    precision models are measured on a float32 copy; the gains are on the CPU.

    Raises:
        ValueError: the model's forward returns something other than one tensor.
    """
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        import copy  # half precision underflows the squared gradients: measured on a float32 copy

        names = [name for name, _ in layers]
        model = copy.deepcopy(model).float()
        layers = [(name, model.get_submodule(name)) for name in names]
        probe = probe.float()
    grads: dict[str, Tensor] = {}
    inputs: list[tuple[str, nn.Module, Tensor]] = []

    def own_input(name):
        def hook(module, args):
            if args and isinstance(args[0], Tensor) and args[0].requires_grad:
                mine = args[0].view_as(args[0])  # this layer's own node: its gradient is this layer's alone
                inputs.append((name, module, mine))
                return (mine, *args[1:])
            return None
        return hook

    generator = torch.Generator().manual_seed(seed)
    handles = [layer.register_forward_pre_hook(own_input(name)) for name, layer in layers]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():  # also inside Lightning's test loop
            for start in range(0, len(probe), chunk):
                inputs.clear()
                x = probe[start:start + chunk].clone().requires_grad_(True)  # a normal tensor, not an inference one
                out = model(x)
                if not isinstance(out, Tensor):
                    raise ValueError(f"mixed_precision='all' measures the output gains of the inputs on the probe: it "
                                     f"needs a model whose forward returns one tensor, got {type(out).__name__} (wrap "
                                     "the model so that it returns the logits, or use mixed_precision='weights')")
                v = (torch.randint(0, 2, out.shape, generator=generator, dtype=torch.int8) * 2 - 1).to(out)
                found = torch.autograd.grad((out * v).sum(), [t for _, _, t in inputs], allow_unused=True)
                for (name, layer, _), g in zip(inputs, found):
                    if g is not None:
                        g2 = g.detach().float().pow(2).movedim(input_channel_dim(layer), 0)
                        grads[name] = grads.get(name, 0) + g2.reshape(g2.shape[0], -1).sum(1)
    finally:
        for m, mode in modes.items():
            m.training = mode
        for h in handles:
            h.remove()
    return {name: (g / len(probe)).cpu() for name, g in grads.items()}


def _warn(message: str) -> None:
    """`warnings.warn` attributed to the first caller outside vquant_pl, torch and Lightning."""
    import sys

    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _INSIDE:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


_INSIDE = ("vquant_pl", "torch", "lightning", "pytorch_lightning")


def greedy_bits(nsr: Tensor, costs: list[int], target: int, min_bits: int,
                bits: tuple[int, ...] = CANDIDATE_BITS, what: str = "budget") -> list[int]:
    """Bits per row of `nsr [L, len(bits)]` minimizing the NSR sum with `sum cost * bits <=
    target * sum cost`, each from `min_bits` up: a greedy on the NSR gain per budget bit,
    then `exact_fill` to spend what is left exactly (a warning, naming `what`, where it cannot).

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
            break
        left -= costs[best] * (bits[pos[best] + 1] - bits[pos[best]])
        pos[best] += 1
    filled = exact_fill(nsr, pos, costs, left, bits.index(min_bits), widths=bits)
    spent = sum(c * (bits[f] - bits[p]) for c, f, p in zip(costs, filled, pos))
    if spent != left:
        steps = f"{FILL_REACH} step{'s' * (FILL_REACH != 1)}"
        _warn(f"mixed precision, {what}: exact_fill found no moves of at most {steps} per layer that spend the "
              f"last {left} of {target * sum(costs)} budget bits exactly; the average is "
              f"{target - left / sum(costs):.5f}, not {target}")
    return [bits[p] for p in filled]


def exact_fill(nsr: Tensor, pos: list[int], costs: list[int], left: int, lowest: int, reach: int | None = None,
               widths: tuple[int, ...] | None = None) -> list[int]:
    """Positions (indices into the candidate widths) that spend `left` more budget exactly (0:
    moves that only trade bits between layers) and add the least summed NSR, each layer moved
    at most `reach` (default `FILL_REACH`) steps up or down from `pos`, never below `lowest`.

    `widths` are the candidate bit widths (default: consecutive, one bit per step); a step of
    layer `l` spends `costs[l]` per bit. Dynamic programming over the budget spent, in units of
    the costs' greatest common divisor, layer by layer (smallest first), over every running
    sum from which `left` can still be reached: exact within `reach`. Where that table would
    exceed `FILL_CELLS` entries, the running sums are kept within the widest band around
    `[0, left]` that fits (a search, no longer exhaustive). The fill is taken even where it
    raises the summed NSR: the budget is the contract; `pos` comes back unchanged where
    nothing found spends `left` exactly.

    Example:
        >>> exact_fill(torch.tensor([[2., 1., .5], [2., 1., .5]]), [1, 0], [3, 5], 2, 0)  # +5 -3
        [0, 1]
    """
    reach = FILL_REACH if reach is None else reach
    widths = tuple(range(nsr.shape[1])) if widths is None else widths
    if not costs:
        return []
    unit = math.gcd(left, *costs)
    moves = []  # per layer: (step, budget units, NSR change), step 0 first (ties keep the bits)
    for l, (c, p) in enumerate(zip(costs, pos)):
        steps = [s for s in range(-reach, reach + 1) if s == 0 or lowest <= p + s < len(widths)]
        moves.append([(s, c // unit * (widths[p + s] - widths[p]), float(nsr[l, p + s] - nsr[l, p]))
                      for s in sorted(steps, key=abs)])
    order = sorted(range(len(costs)), key=lambda l: costs[l])
    target = left // unit
    windows = _fill_windows([moves[l] for l in order], target)
    if windows is None:
        return list(pos)
    if sum(hi - lo + 1 for lo, hi in windows) > FILL_CELLS:
        windows = _fit_band(windows, target)
        if windows is None:
            return list(pos)
    lo, best = 0, torch.zeros(1, dtype=torch.float64)
    picks = []
    for l, (new_lo, new_hi) in zip(order, windows):
        new = torch.full((new_hi - new_lo + 1,), math.inf, dtype=torch.float64)
        pick = torch.zeros(new_hi - new_lo + 1, dtype=torch.int8)
        hi = lo + len(best) - 1
        for step, spend, added in moves[l]:
            t0, t1 = max(new_lo, lo + spend), min(new_hi, hi + spend)  # running sums t reached from t - spend
            if t0 > t1:
                continue
            cand = best[t0 - spend - lo:t1 - spend - lo + 1] + added
            better = cand < new[t0 - new_lo:t1 - new_lo + 1]
            new[t0 - new_lo:t1 - new_lo + 1][better] = cand[better]
            pick[t0 - new_lo:t1 - new_lo + 1][better] = step
        lo, best = new_lo, new
        picks.append(pick)
    if not math.isfinite(float(best[target - lo])):
        return list(pos)
    out, at = list(pos), target
    for l, pick, (w_lo, _) in zip(reversed(order), reversed(picks), reversed(windows)):
        step = int(pick[at - w_lo])
        at -= next(spend for s, spend, _ in moves[l] if s == step)
        out[l] += step
    return out


def _fill_windows(moves: list[list[tuple]], target: int) -> list[tuple[int, int]] | None:
    """For each layer of `exact_fill`'s table, the running sums after it that the moves so far
    can reach and from which the rest can still reach `target`; None where `target` is out of reach."""
    low = [min(m[1] for m in ms) for ms in moves]
    high = [max(m[1] for m in ms) for ms in moves]
    rest_low, rest_high = sum(low), sum(high)
    done_low = done_high = 0
    windows = []
    for a, b in zip(low, high):
        done_low, done_high = done_low + a, done_high + b
        rest_low, rest_high = rest_low - a, rest_high - b
        lo, hi = max(done_low, target - rest_high), min(done_high, target - rest_low)
        if lo > hi:
            return None
        windows.append((lo, hi))
    return windows


def _fit_band(windows: list[tuple[int, int]], target: int) -> list[tuple[int, int]] | None:
    """`windows` clipped to the widest band `[-b, target + b]` whose table fits in `FILL_CELLS`
    entries (a binary search: the size grows with `b`); None where not even `b = 0` fits."""
    size = lambda b: sum(max(0, min(hi, target + b) - max(lo, -b) + 1) for lo, hi in windows)  # noqa: E731
    low, high = 0, max(max(abs(lo), abs(hi - target)) for lo, hi in windows)
    while low < high:
        band = (low + high + 1) // 2
        low, high = (band, high) if size(band) <= FILL_CELLS else (low, band - 1)
    clipped = [(max(lo, -low), min(hi, target + low)) for lo, hi in windows]
    return None if size(low) > FILL_CELLS or any(lo > hi for lo, hi in clipped) else clipped


def _input_elements(model: nn.Module, layers: list[tuple[str, nn.Module]], example: Tensor) -> list[int]:
    """Elements per sample of each layer's first positional input (0: called by keyword only, or
    never), from one forward of `example` (zeros: shapes only).

    Raises:
        ValueError: the forward fails on `example` (its shape named).
    """
    sizes = [0] * len(layers)

    def hook(i):
        def record(module, args):
            if args and isinstance(args[0], Tensor):
                sizes[i] = args[0][:1].numel()
        return record

    handles = [layer.register_forward_pre_hook(hook(i)) for i, (_, layer) in enumerate(layers)]
    modes = {m: m.training for m in model.modules()}  # each module's own mode back (frozen BatchNorms stay so)
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    except Exception as err:
        raise ValueError(f"mixed_precision='all' counts each input's elements with one forward of shape "
                         f"{tuple(example.shape)}, which failed (pass probe_shape= the input shape the model takes): "
                         f"{err}") from err
    finally:
        for m, mode in modes.items():
            m.training = mode
        for h in handles:
            h.remove()
    return sizes


@torch.no_grad()
def allocate(model: nn.Module, layers: list[tuple[str, nn.Module]], stats: dict, weight_bits: int,
             act_bits: list[int | None], act_target: int | None, range_fn, example: Tensor | None,
             min_bits: int = 3, rounding: str = "squant", backend: str | None = None,
             probe: Tensor | None = None) -> Allocation:
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
        example: with `act_target`, an input batch for the shape-only forward that counts the
            inputs' elements (zeros are enough).
        min_bits: the fewest bits a layer gets.
        probe: the inputs on which `output_gains` evaluates the model (needed with `act_target`).

    Returns:
        An `Allocation` (`elements` empty without `act_target`).

    Raises:
        ValueError: with `act_target`, no layer input can be allocated (none has BatchNorm
            statistics over its own channels), or the shape-only forward fails.

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
    elements = _input_elements(model, layers, example) if act_target is not None else []
    good = lambda name: not isinstance(stats.get(name), (str, type(None)))  # noqa: E731
    keys = [storage_key(layer.weight) for _, layer in layers]
    own = [i for i, k in enumerate(keys) if keys.index(k) == i]  # a weight tied to several layers counts once
    nsr = [weight_nsr(layer, stats[name] if good(name) else None, rounding=rounding, backend=backend)
           for name, layer in layers]
    w_nsr = torch.stack([sum(nsr[j] for j, k in enumerate(keys) if k == keys[i]) for i in own])  # over the ties
    w_own = greedy_bits(w_nsr, [params[i] for i in own], weight_bits, min(min_bits, weight_bits),
                        what="weights")
    w_out = [w_own[own.index(keys.index(k))] for k in keys]  # the tied layers: their owner's bits
    a_out = list(act_bits)
    a_avg, a_budget = None, 0
    if act_target is not None:
        if probe is None:
            raise ValueError("allocating input bits needs the probe on which the output gains are measured")
        free = [i for i, (name, layer) in enumerate(layers) if act_bits[i] == act_target and good(name)
                and stats[name].mean.numel() == in_channels(layer)]
        if not free:
            raise ValueError(f"mixed_precision='all': no layer input can take part in the input budget (the first "
                             f"layer's input stays float and the last one's is 8 bits; of the others, none at "
                             f"{act_target} bits has BatchNorm statistics over its own channels, as a Linear after a "
                             "Flatten has not); use mixed_precision='weights'")
        gains = output_gains(model, [layers[i] for i in free if elements[i] > 0], probe)
        lost = [layers[i][0] for i in free if layers[i][0] not in gains]
        if lost:
            _warn(f"mixed_precision='all': the outputs on the probe do not depend on the first positional input of "
                  f"{', '.join(lost)} (called with keyword arguments, or never called): "
                  f"{'it keeps' if len(lost) == 1 else 'they keep'} {act_target} bits, outside the budget")
        free = [i for i in free if layers[i][0] in gains]
        if free:
            cost = torch.stack([input_noise(stats[layers[i][0]],
                                            lambda b, i=i: range_fn(stats[layers[i][0]], b, layers[i][1]))
                                .double().cpu() @ gains[layers[i][0]].double().cpu() for i in free])
            chosen = greedy_bits(cost, [elements[i] for i in free], act_target, min(min_bits, act_target),
                                 what="inputs")
            for i, b in zip(free, chosen):
                a_out[i] = b
            a_budget = sum(elements[i] for i in free)
            a_avg = sum(elements[i] * a_out[i] for i in free) / a_budget
    w_budget = sum(params[i] for i in own)
    w_avg = sum(params[i] * w_out[i] for i in own) / w_budget
    return Allocation(w_out, a_out, w_avg, a_avg, params, elements, a_budget, w_budget)
