"""Per-layer sensitivity: where does a quantization setting lose its accuracy?

For a model, a batch of images and a setting (the keyword arguments of `quantize_model`,
plus the pre-quantization transforms of `vquant_pl.cli.recipes`), the model is quantized once
to learn every layer's quantized weight and input range; then, on the float model, only
one layer's weights, or only one layer's input, is quantized at a time and the damage is
measured against the float model: KL divergence of the softmax outputs (the sort key, it
resolves small differences that top-1 on a few images cannot), agreement of the top-1
predictions, and top-1 when labels are given. Each row also carries the weight's relative
error `||Wq - W|| / ||W||` and, for the input, the fraction of values outside the range
(clipping) as the float model sees them.

    vquant analyze efficientnet_lite:lite0 --images runs/recipes/lite0_imagenet-sample.pt --num 32 \
        --weight-bits 4 --act-bits 4 --act-range bn --out runs/analyze/lite0_w4a4
"""
from __future__ import annotations

import argparse
import csv
import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import input_channel_dim

__all__ = ["ErrorKind", "LayerSensitivity", "SensitivityReport", "analyze", "error_kinds", "kinds_table", "plot_kinds",
           "layer_kind", "main"]


@dataclass
class LayerSensitivity:
    """One layer: the damage when only its weights (`weight_*`) or only its input (`input_*`)
    is quantized; `None` where its input stays float (the first layer)."""

    index: int
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_kl: float
    weight_agreement: float
    weight_top1: float | None
    weight_rel_error: float
    input_kl: float | None = None
    input_agreement: float | None = None
    input_top1: float | None = None
    act_bits: int | None = None
    act_lo: float | None = None
    act_hi: float | None = None
    clip_fraction: float | None = None  # share of input values outside [lo, hi]

    @property
    def damage(self) -> float:
        """The larger of the two KL divergences: the sort key."""
        return max(self.weight_kl, self.input_kl or 0.0)


@dataclass
class SensitivityReport:
    """All layers of one analysis, with the float and fully quantized scores; `setting` is the
    setting that ran, every `QuantConfig` field (defaults included, sigma resolved)."""

    setting: dict
    num_images: int
    float_top1: float | None
    full_top1: float | None
    full_agreement: float
    full_kl: float
    layers: list[LayerSensitivity] = field(default_factory=list)

    def sorted(self, key: str = "damage") -> list[LayerSensitivity]:
        """Layers, most damaging first (`key`: `damage`, `weight_kl` or `input_kl`)."""
        return sorted(self.layers, key=lambda r: -(getattr(r, key) or 0.0))

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Sum of weight and input KL per layer kind (stem, expand, depthwise, ...)."""
        out: dict[str, dict[str, float]] = {}
        for r in self.layers:
            d = out.setdefault(r.kind, {"layers": 0, "weight_kl": 0.0, "input_kl": 0.0})
            d["layers"] += 1
            d["weight_kl"] += r.weight_kl
            d["input_kl"] += r.input_kl or 0.0
        return out

    def table(self, top: int | None = None) -> str:
        """A Markdown table, sorted by damage (the `top` rows only if given)."""
        head = ("| # | layer | kind | W KL | W agree | W rel err | in KL | in agree | in range | clipped |\n"
                "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
        rows = []
        for r in self.sorted()[:top]:
            rng = "float" if r.act_bits is None else f"{r.act_bits}b [{r.act_lo:.3g}, {r.act_hi:.3g}]"
            rows.append(f"| {r.index} | {r.name} | {r.kind} | {r.weight_kl:.4f} | {r.weight_agreement:.2f} | "
                        f"{r.weight_rel_error:.3f} | {_fmt(r.input_kl, '.4f')} | {_fmt(r.input_agreement, '.2f')} | "
                        f"{rng} | {_fmt(r.clip_fraction, '.2e')} |")
        summary = (f"float top-1 {_fmt(self.float_top1, '.3f')}, fully quantized top-1 {_fmt(self.full_top1, '.3f')}, "
                   f"agreement {self.full_agreement:.3f}, KL {self.full_kl:.4f} ({self.num_images} images)")
        return "\n".join([summary, "", head, *rows])

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items()}, indent=1)

    def write_csv(self, path: str | Path) -> None:
        rows = [asdict(r) for r in self.sorted()]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def plot(self, path: str | Path, top: int = 30) -> None:
        """A horizontal bar figure of the `top` most damaging layers (weight and input KL)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.sorted()[:top][::-1]
        y = range(len(rows))
        fig, ax = plt.subplots(figsize=(8, 0.25 * len(rows) + 1.5))
        ax.barh([i + 0.2 for i in y], [r.weight_kl for r in rows], height=0.4, label="only weights quantized")
        ax.barh([i - 0.2 for i in y], [r.input_kl or 0.0 for r in rows], height=0.4, label="only input quantized")
        ax.set_yticks(list(y), [f"{r.name} ({r.kind})" for r in rows], fontsize=7)
        ax.set_xlabel("KL(float || quantized), mean over images")
        s = self.setting
        act = s.get("act_bits")
        ax.set_title(f"W{s.get('weight_bits')}A{'float' if act is None else act} {s.get('act_range', '')}: "
                     f"full top-1 {_fmt(self.full_top1, '.2f')} vs float {_fmt(self.float_top1, '.2f')}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def layer_kind(name: str, layer: nn.Module, index: int, count: int) -> str:
    """`stem` (first), `fc` (last Linear), `depthwise`, `expand`/`project`/`head` by name, else
    `conv`/`linear`."""
    if index == 0:
        return "stem"
    if isinstance(layer, nn.Linear):
        return "fc" if index == count - 1 else "linear"
    if getattr(layer, "groups", 1) > 1 and layer.groups == layer.in_channels:
        return "depthwise"
    low = name.lower()
    for word in ("expand", "project", "head", "se_reduce", "se_expand"):
        if word in low:
            return word
    return "conv"


@torch.no_grad()
def _logits(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _scores(logits: Tensor, ref_logp: Tensor, labels: Tensor | None) -> tuple[float, float, float | None]:
    logp = F.log_softmax(logits.float(), 1)
    kl = max(float((ref_logp.exp() * (ref_logp - logp)).sum(1).mean()), 0.0)  # >= 0; rounding gives -1e-7
    agreement = float((logits.argmax(1) == ref_logp.argmax(1)).float().mean())
    top1 = None if labels is None else float((logits.argmax(1) == labels).float().mean())
    return kl, agreement, top1


@torch.no_grad()
def _transformed_copy(model: nn.Module, images: Tensor, labels: Tensor | None, settings: dict):
    """Checked inputs; a copy of `model` with the config's pre-quantization transforms applied
    for good (the float reference is the transformed model), the config without them, and
    the copy's quantizable layers. Under `mixed_precision`, `weight_clip` stays in the config
    (each layer is clipped for the bits it is given, as `quantize_model` does), so the float
    reference is the equalized, unclipped model."""
    from .. import quantize as qz
    from ..config import QuantConfig
    from ..state import copy_model

    if images.dim() < 2 or len(images) == 0:
        raise ValueError(f"images must be a non-empty batch, got shape {tuple(images.shape)}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    work = copy_model(model).eval()  # deepcopy, also of a pruned layer whose weight has autograd history
    config = QuantConfig.from_kwargs(**settings)
    keep_clip = config.mixed_precision is not None and config.weight_clip
    qz.apply_transforms(work, config.replace(weight_clip=config.weight_clip and not keep_clip),
                        save=lambda module, name: True)
    return work, config.without_equalize().replace(weight_clip=keep_clip), qz.quantizable_layers(work)


@torch.no_grad()
def analyze(model: nn.Module, images: Tensor, labels: Tensor | None = None, batch_size: int = 32,
            **settings) -> SensitivityReport:
    """Measure each layer's sensitivity to quantization, one layer at a time.

    Args:
        model: a float classifier; it is not modified (the analysis runs on a deep copy).
        images: evaluation inputs `[N, C, H, W]` (a few dozen are enough for KL).
        labels: optional class indices, for top-1 columns.
        batch_size: images per forward.
        **settings: the setting, as for `quantize_model` (`QuantConfig` fields).
            Pre-quantization transforms are applied to the copy first: the float reference is
            the transformed model. Post-quantization corrections count in the full score only.

    Returns:
        A `SensitivityReport`; `.table()`, `.plot(path)`, `.sorted()`.

    Raises:
        ValueError: on an empty image batch or mismatched labels.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
        >>> rep = analyze(net, torch.rand(16, 3, 16, 16), weight_bits=4, act_bits=4)
        >>> sorted(r.name for r in rep.sorted())  # print(rep.table(top=10)) shows the worst layers first
        ['0', '3']
    """
    from .. import quantize as qz

    from ..config import QuantConfig

    setting = QuantConfig.from_kwargs(**settings).to_dict(resolved=True)  # what runs, defaults included
    work, config, layers = _transformed_copy(model, images, labels, settings)
    # where the forward reads each weight from: `weight`, or `weight_orig` of a pruned layer
    # (its pre-hook recomputes `weight = weight_orig * mask` before every forward)
    sources = [qz.weight_source(name, layer) for name, layer in layers]
    float_logits = _logits(work, images, batch_size)
    ref_logp = F.log_softmax(float_logits.float(), 1)
    float_top1 = None if labels is None else float((float_logits.argmax(1) == labels).float().mean())
    floats = [getattr(layer, src).detach().clone() for (_, layer), src in zip(layers, sources)]
    float_used = [layer.weight.detach().clone() for _, layer in layers]  # what the forward multiplies by

    qz.quantize_model(work, config=config)
    try:
        full_kl, full_agree, full_top1 = _scores(_logits(work, images, batch_size), ref_logp, labels)
        quantized = [getattr(layer, src).detach().clone() for (_, layer), src in zip(layers, sources)]
        quantized_used = [layer.weight.detach().clone() for _, layer in layers]
        ranges = qz.activation_ranges(work)
    finally:
        qz.restore_model(work)
    for (_, layer), src, w in zip(layers, sources, floats):  # the transformed float weights, whatever restore did
        getattr(layer, src).copy_(w)

    quantizers = [None if r is None else _make_quantizer(r, layer) for r, (_, layer) in zip(ranges, layers)]
    clipped = _clip_fractions(work, layers, quantizers, images, batch_size)
    report = SensitivityReport(setting, len(images), float_top1, full_top1, full_agree, full_kl)
    for i, (name, layer) in enumerate(layers):
        target = getattr(layer, sources[i])
        target.copy_(quantized[i])
        try:
            w_kl, w_agree, w_top1 = _scores(_logits(work, images, batch_size), ref_logp, labels)
        finally:
            target.copy_(floats[i])
        w, q = float_used[i].float(), quantized_used[i].float()
        rel = float((q - w).norm() / w.norm().clamp_min(1e-12))
        row = LayerSensitivity(i, name, layer_kind(name, layer, i, len(layers)), tuple(layer.weight.shape),
                               w_kl, w_agree, w_top1, rel)
        q = quantizers[i]
        if q is not None:
            handle = layer.register_forward_pre_hook(lambda m, a, q=q: (q(a[0]), *a[1:]))
            try:
                row.input_kl, row.input_agreement, row.input_top1 = _scores(
                    _logits(work, images, batch_size), ref_logp, labels)
            finally:
                handle.remove()
            row.act_bits, row.act_lo, row.act_hi = q.bits, q.lo, q.hi
            row.clip_fraction = clipped[i]
        report.layers.append(row)
    return report


def _make_quantizer(r: tuple, layer: nn.Module):
    from ..ops.affine import ActivationQuantizer, ChannelActivationQuantizer

    if isinstance(r[0], Tensor):
        return ChannelActivationQuantizer(*r, dim=input_channel_dim(layer))
    return ActivationQuantizer(*r)


@torch.no_grad()
def _clip_fractions(model, layers, quantizers, images, batch_size) -> list[float | None]:
    """Per layer, the share of its (float) input values outside the quantizer's range."""
    counts = [[0, 0] for _ in layers]
    handles = []
    for i, ((_, layer), q) in enumerate(zip(layers, quantizers)):
        if q is None:
            continue

        def hook(m, a, i=i, q=q):
            x = a[0]
            lo, hi = (q.channel_lo, q.channel_hi) if hasattr(q, "channel_lo") else (q.lo, q.hi)
            if isinstance(lo, Tensor):
                shape = [1] * x.dim()
                shape[q.dim % x.dim()] = -1
                lo, hi = lo.view(shape), hi.view(shape)
            counts[i][0] += int(((x < lo) | (x > hi)).sum())
            counts[i][1] += x.numel()
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        _logits(model, images, batch_size)
    finally:
        for h in handles:
            h.remove()
    return [None if q is None else c[0] / max(c[1], 1) for q, c in zip(quantizers, counts)]


# -- which kind of error: the whole model with one kind of error at a time -------------------
@dataclass
class ErrorKind:
    """The model with only one kind of quantization error (`what`), scored against float."""

    what: str
    kl: float
    agreement: float
    top1: float | None


def _round_only(q):
    """The input grid of `q` without its clamp: the rounding error alone."""
    scale, zp = float(q.scale), float(q.zero_point)
    return lambda x: (torch.round(x * scale - zp) + zp) / scale


def _clip_only(q):
    """The clamp to `[lo, hi]` of `q` without rounding: the clipping error alone."""
    return lambda x: x.clamp(q.lo, q.hi)


@torch.no_grad()
def error_kinds(model: nn.Module, images: Tensor, labels: Tensor | None = None, batch_size: int = 32,
                **settings) -> list[ErrorKind]:
    """Split the damage of a setting by kind of error, each applied to the whole model alone.

    Rows: the full setting; the weights alone (the run's bias correction of the weight error
    included, inputs float); all inputs alone; all inputs clipped only (no rounding); all
    inputs rounded only (no clamp); then per layer kind (`layer_kind`), that kind's inputs
    alone, per tensor as the run does and with per-channel BatchNorm ranges at the same bits
    (where BatchNorm feeds the input): the cost of one range for channels that differ.

    Args:
        model: a float classifier (not modified: the analysis runs on a deep copy).
        images, labels, batch_size, settings: as for `analyze`.

    Returns:
        A list of `ErrorKind` rows.

    Raises:
        ValueError: on an empty image batch or mismatched labels.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
        >>> rows = error_kinds(net, torch.rand(16, 3, 16, 16), weight_bits=4, act_bits=4)
        >>> rows[0].what, rows[1].what  # then each kind of error alone; row.kl is its KL to float
        ('full setting', 'weights only (bias-corrected)')
    """
    from .. import quantize as qz
    from ..config import QuantConfig
    from ..layers import QUANTIZABLE, in_channels, input_channel_dim
    from ..methods.bn_graph import DEFAULT_BN_K, bn_stats
    from ..methods.channels import bn_channel_quantizer
    from ..ops.affine import ActivationQuantizer

    work, config, layers = _transformed_copy(model, images, labels, settings)
    ref_logp = F.log_softmax(_logits(work, images, batch_size).float(), 1)
    rows: list[ErrorKind] = []

    def score(what: str) -> None:
        rows.append(ErrorKind(what, *_scores(_logits(work, images, batch_size), ref_logp, labels)))

    qz.quantize_model(work, config=config)
    try:
        score("full setting")
        ranges = qz.activation_ranges(work)
    finally:
        qz.restore_model(work)
    if config.weight_bits is not None:
        default = QuantConfig()  # float inputs draw no probe: its settings at their defaults say so
        qz.quantize_model(work, config=config.without_activations().replace(probe_seed=default.probe_seed,
                                                                           probe_shape=default.probe_shape))
        try:
            score("weights only (bias-corrected)" if config.bn_bias_correction else "weights only")
        finally:
            qz.restore_model(work)
    quantizers = {i: _make_quantizer(r, layer) for i, (r, (_, layer)) in enumerate(zip(ranges, layers))
                  if r is not None}
    per_tensor = {i: q for i, q in quantizers.items() if isinstance(q, ActivationQuantizer)}
    kinds = [layer_kind(name, layer, i, len(layers)) for i, (name, layer) in enumerate(layers)]
    stats = bn_stats(work, [name for name, _ in layers], QUANTIZABLE)

    def inputs(fns: dict, what: str) -> None:
        handles = [layers[i][1].register_forward_pre_hook(lambda m, a, f=f: (f(a[0]), *a[1:]))
                   for i, f in fns.items()]
        try:
            score(what)
        finally:
            for h in handles:
                h.remove()

    inputs(quantizers, "inputs only")
    inputs({i: _clip_only(q) for i, q in per_tensor.items()}, "inputs only, clipping only")
    inputs({i: _round_only(q) for i, q in per_tensor.items()}, "inputs only, rounding only")
    for kind in dict.fromkeys(kinds):
        chosen = {i: q for i, q in quantizers.items() if kinds[i] == kind}
        if not chosen:
            continue
        inputs(chosen, f"{kind} inputs only")
        channel = {}
        for i in chosen:
            name, layer = layers[i]
            s = stats.get(name)
            if s is None or isinstance(s, str) or s.mean.numel() != in_channels(layer):
                continue
            bits = chosen[i].bits
            k = config.bn_k or DEFAULT_BN_K[bits]
            channel[i] = bn_channel_quantizer(s, lambda b, k=k: k, bits, input_channel_dim(layer), allocate=False)
        if channel:
            inputs(channel, f"{kind} inputs only, per-channel BN ranges ({len(channel)} of {len(chosen)} layers)")
    return rows


def plot_kinds(rows: list[ErrorKind], path: str | Path, title: str = "") -> None:
    """A horizontal bar figure of `error_kinds` (KL to float per row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r.kl for r in rows], color=["C1" if "per-channel" in r.what else "C0" for r in rows])
    ax.set_yticks(range(len(rows)), [r.what for r in rows], fontsize=7)
    ax.set_xlabel("KL(float || quantized), mean over images")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kinds_table(rows: list[ErrorKind], num_images: int) -> str:
    """`error_kinds` as a Markdown table."""
    head = f"| error kind ({num_images} images) | KL | agreement | top-1 |\n| --- | ---: | ---: | ---: |"
    return "\n".join([head] + [f"| {r.what} | {r.kl:.4f} | {r.agreement:.3f} | {_fmt(r.top1, '.3f')} |"
                                for r in rows])


def main(argv: list[str] | None = None) -> int:
    """`vquant analyze MODEL --images FILE [...]`: print the table, write CSV, JSON and a PNG.

    `--images` is a `.pt` file holding a tensor or a dict with `images` (and `labels`).
    Returns the exit status (0 on success, 2 on a bad argument).
    """
    p = argparse.ArgumentParser(prog="vquant analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a create_model spec, e.g. efficientnet_lite:lite0")
    p.add_argument("--images", required=True, help=".pt file: a tensor, or a dict with 'images' and 'labels'")
    p.add_argument("--num", type=int, default=32, help="images used (first N; default 32)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weight-bits", type=int, default=None, help="default: the recipe's, else QuantConfig's (4)")
    p.add_argument("--act-bits", type=int, default=None, help="default: the recipe's, else QuantConfig's (4)")
    p.add_argument("--act-range", default=None, help="default: the recipe's, else QuantConfig's")
    p.add_argument("--rounding", default=None, help="default: the recipe's, else QuantConfig's")
    p.add_argument("--recipe", default=None, help="a recipe name (configs/recipes/: vquant, squant, bn, ...) or a "
                   "YAML file with quant:; the flags given (--weight-bits etc.) override it")
    p.add_argument("--top", type=int, default=None, help="rows printed (default 20; all are written to CSV); "
                   "not with --kinds, which prints every kind")
    p.add_argument("--out", default=None, help="output prefix: PREFIX.csv, PREFIX.json and PREFIX.png, the suffix "
                   "added to the whole prefix (never overwritten)")
    p.add_argument("--allow-pickle", action="store_true", help="MODEL is a whole pickled model you trust")
    p.add_argument("--kinds", action="store_true", help="instead: the error split by kind (weights, input "
                   "clipping, input rounding, per-tensor ranges per layer kind; `error_kinds`)")
    args = p.parse_args(argv)
    for flag, value in (("--num", args.num), ("--batch-size", args.batch_size), ("--top", args.top)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.kinds and args.top is not None:
        p.error("--top selects rows of the per-layer table; --kinds prints every error kind: drop --top")
    top = 20 if args.top is None else args.top
    suffixes = [".png"] if args.kinds else [".csv", ".json", ".png"]
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix in (".csv", ".json", ".png"):  # a file name given: its prefix
        out = out.with_suffix("")
    # appended to the whole prefix: `--out run_v1.5` writes run_v1.5.csv, not run_v1.csv
    targets = [out.with_name(out.name + x) for x in suffixes] if out else []
    taken = [str(t) for t in targets if t.exists()]
    if taken:  # refused before any work: no file of yours is overwritten
        p.error(f"--out {args.out}: {', '.join(taken)} would be overwritten; choose another --out")
    from ..config import QuantConfig
    from .files import load_tensors
    from .recipes import load_recipe

    try:
        data = load_tensors(args.images, "--images")
        quant = load_recipe(args.recipe) if args.recipe else {}
    except (FileNotFoundError, ValueError, pickle.UnpicklingError) as err:
        p.error(str(err))
    images, labels = (data.get("images"), data.get("labels")) if isinstance(data, dict) else (data, None)
    if not isinstance(images, Tensor) or not (labels is None or isinstance(labels, Tensor)):
        p.error(f"--images {args.images} holds no image tensor (a tensor, or a dict with 'images' and 'labels')")
    if images.dim() < 2 or len(images) == 0:
        p.error(f"--images {args.images}: the images must be a non-empty batch, got shape {tuple(images.shape)}")
    images = images[:args.num]
    labels = None if labels is None else labels[:args.num]
    if labels is not None and len(labels) != len(images):
        p.error(f"--images {args.images}: {len(labels)} labels for {len(images)} images")
    quant.update({k: v for k, v in (("weight_bits", args.weight_bits), ("act_bits", args.act_bits),
                                    ("act_range", args.act_range), ("rounding", args.rounding)) if v is not None})
    try:  # the setting is checked before the model is built
        QuantConfig.from_kwargs(**quant)
    except (TypeError, ValueError) as err:
        p.error(str(err))
    from ..models import MissingExtra, UnsafeFile, WeightsUnavailable, create_model

    try:
        model, _ = create_model(args.model, allow_pickle=args.allow_pickle)
    except (FileNotFoundError, IsADirectoryError, UnsafeFile, MissingExtra, WeightsUnavailable, ValueError) as err:
        p.error(str(err))
    if args.kinds:
        rows = error_kinds(model.eval(), images, labels, args.batch_size, **quant)
        print(kinds_table(rows, len(images)))
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            plot_kinds(rows, targets[0], f"{args.model}: error by kind ({len(images)} images)")
            print(f"wrote {targets[0]}")
        return 0
    report = analyze(model.eval(), images, labels, args.batch_size, **quant)
    print(report.table(top))
    print("\nby kind (sum of KL):")
    for kind, d in sorted(report.by_kind().items(), key=lambda kv: -kv[1]["weight_kl"] - kv[1]["input_kl"]):
        print(f"  {kind:10s} {int(d['layers']):3d} layers  weight {d['weight_kl']:.4f}  input {d['input_kl']:.4f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        csv_path, json_path, png_path = targets
        report.write_csv(csv_path)
        json_path.write_text(report.to_json())
        report.plot(png_path)
        print(f"wrote {', '.join(map(str, targets))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
