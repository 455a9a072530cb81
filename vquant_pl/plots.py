"""Figures: the sweep's accuracy plot and the per-layer picture of one quantization run.

Both return a `matplotlib.figure.Figure` built without pyplot (no global state, no
display needed); `save(fig, path)` writes it.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

#: How to install what the figures need (matplotlib is an extra: a user with their own
#: model and no plots does not need it).
EXTRA = 'pip install "vquant-pl[plots]"'


def available(what: str = "") -> bool:
    """Whether matplotlib is installed; if not and `what` is given, warn that `what` is skipped."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    if what:
        warnings.warn(f"vquant: {what} skipped: matplotlib is not installed ({EXTRA})", stacklevel=2)
    return False


def _figure(width: float, height: float):
    if not available():
        raise ModuleNotFoundError(f"vquant's figures need matplotlib, which is not installed: {EXTRA}")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write `fig` (PNG by the suffix) and return the path."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def _bits_label(bits: int) -> str:
    return "FP32" if bits >= 32 else f"W{bits}"


def _act_bits(row: Mapping[str, Any]) -> int | None:
    """A row's activation bits: `_act_bits`, else read from its `bits` (`W4A8`, `W4Afp`)."""
    if "_act_bits" in row:
        return row["_act_bits"]
    bits = str(row.get("bits") or "")
    digits = bits.partition("A")[2].split(" ")[0]
    return int(digits) if digits.isdigit() else None


def _series(row: Mapping[str, Any]) -> str:
    """The activations of a row's line: `WxAx` (act bits equal to weight bits), `A8` (fixed), `A float`."""
    act = _act_bits(row)
    if act is None:
        return "A float"
    return "WxAx" if act == row["_weight_bits"] else f"A{act}"


#: The y-axis of each way a row is scored (`scored_by`).
SCORED_BY = {"labels": "top-1 (%)", "float agreement": "top-1 agreement with float (%)"}


def sweep_figure(rows: Sequence[Mapping[str, Any]]):
    """Top-1 against weight bits, one line per model, method and activation bits, each line
    ending at its model's FP32 point (the row whose method is `float`) when the sweep has one.

    A line holds rows of one model and method whose activations are alike: as many bits as
    the weights (`WxAx`: W4A4, W6A6, W8A8 on one line), a fixed width (`A8`: W4A8, W6A8) or
    float (`A float`); so W4A4 and W4A8 are never one line. Rows scored against the labels
    (top-1) and rows scored against the float model (agreement) are not one quantity: each
    kind gets its own axis (side by side, each labelled), and a line ends at the FP32 point
    of its own kind. Two rows of one line at the same weight bits (e.g. two checkpoints of a
    model) become separate lines, named by their configs.

    Args:
        rows: sweep rows with `model`, `method`, `top1`, `_weight_bits` (None for float),
            `_act_bits` (or `bits`, e.g. `W4A8`) and `scored_by` (default `labels`); failed
            rows (`status` other than `ok`) are left out.

    Example:
        >>> fig = sweep_figure([{"model": "m", "method": "float", "top1": 70.0, "_weight_bits": None},
        ...                     {"model": "m", "method": "squant/sigma", "top1": 60.0, "_weight_bits": 4,
        ...                      "bits": "W4A4"}])
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['m squant/sigma WxAx', 'm FP32']
    """
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("top1") is not None]
    kinds = [k for k in dict.fromkeys(r.get("scored_by") or "labels" for r in ok)] or ["labels"]
    bits = sorted({r["_weight_bits"] for r in ok if r.get("_weight_bits") is not None})
    position = {b: i for i, b in enumerate(bits)}
    position[32] = len(bits)  # the FP32 column right of the lowest precision
    fig = _figure(7 * len(kinds), 4.2)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        mine = [r for r in ok if (r.get("scored_by") or "labels") == kind]
        fp32 = {r["model"]: r["top1"] for r in mine if r.get("_weight_bits") is None}
        groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
        for r in mine:
            if r.get("_weight_bits") is not None:
                groups.setdefault((r["model"], r["method"], _series(r)), []).append(r)
        lines: list[tuple[str, str, list[tuple[int, float]]]] = []
        for (model, method, acts), members in groups.items():
            label = f"{model} {method} {acts}"
            if len({r["_weight_bits"] for r in members}) < len(members):  # one line, one point per bit width
                lines += [(model, f"{label} ({r.get('config', i)})", [(r["_weight_bits"], r["top1"])])
                          for i, r in enumerate(members)]
            else:
                lines.append((model, label, [(r["_weight_bits"], r["top1"]) for r in members]))
        for model, label, points in lines:
            points = sorted(points)
            if model in fp32:
                points.append((32, fp32[model]))
            ax.plot([position[b] for b, _ in points], [t for _, t in points], marker="o", label=label)
        for model, top1 in fp32.items():
            ax.plot([position[32]], [top1], marker="*", markersize=12, linestyle="none", color="black",
                    label=f"{model} FP32")
        ax.set_xticks(range(len(position)), [_bits_label(b) for b in sorted(position)])
        ax.set_xlabel("weight bits (activations: as in the line's name)")
        ax.set_ylabel(SCORED_BY.get(kind, f"top-1 ({kind})"))
        ax.set_title(f"scored by {kind}: one line per model, method and activation bits" if len(kinds) > 1 else
                     "accuracy against bit width, one line per model, method and activation bits", fontsize=9)
        ax.grid(alpha=0.3)
        if mine:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _get(obj: Any, name: str, default=None):
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def layer_figure(report: Any):
    """The per-layer picture of a quantization run: weight error, activation range and bits
    by layer (in quantization order).

    Args:
        report: a `QuantReport`, or its `to_dict()` (e.g. a loaded `vquant_report.json`).

    Example:
        >>> import torch, vquant_pl as vq
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> fig = layer_figure(vq.quantize_model(net, 4, 4, probe=torch.rand(16, 8)))
        >>> [ax.get_ylabel() for ax in fig.axes]
        ['weight MSE', 'input range', 'bits']
    """
    layers = list(_get(report, "layers", []))
    config = _get(report, "config", None)
    settings = config if isinstance(config, Mapping) else report if isinstance(report, Mapping) else None

    def setting(name):
        return settings.get(name) if settings is not None else _get(report, name)

    index = list(range(len(layers)))
    fig = _figure(max(6.0, 0.14 * len(layers) + 3), 7)
    ax_err, ax_rng, ax_bits = fig.subplots(3, 1, sharex=True)
    mse = [max(float(_get(l, "weight_mse", 0.0) or 0.0), 1e-12) for l in layers]
    ax_err.bar(index, mse, color="tab:red")
    ax_err.set_yscale("log")
    ax_err.set_ylabel("weight MSE")
    for i, layer in enumerate(layers):
        lo, hi = _get(layer, "act_lo"), _get(layer, "act_hi")
        if hi is None or lo is None or not all(map(math.isfinite, (lo, hi))):
            ax_rng.plot([i], [0], marker="x", color="gray")  # input kept float
            continue
        ax_rng.vlines(i, lo, hi, color="tab:blue", linewidth=3)
    ax_rng.axhline(0, color="black", linewidth=0.5)
    ax_rng.set_ylabel("input range")
    wbits = [_get(l, "weight_bits") for l in layers]
    abits = [_get(l, "act_bits") for l in layers]
    ax_bits.plot(index, wbits, marker="o", linestyle="none", label="weights")
    ax_bits.plot([i for i, b in zip(index, abits) if b is not None], [b for b in abits if b is not None],
                 marker="s", markerfacecolor="none", linestyle="none", label="input (x: float)")
    ax_bits.plot([i for i, b in zip(index, abits) if b is None], [0] * sum(b is None for b in abits),
                 marker="x", color="gray", linestyle="none")
    ax_bits.set_ylim(-0.5, 8.8)
    ax_bits.set_ylabel("bits")
    ax_bits.set_xlabel("layer (quantization order)")
    ax_bits.legend(fontsize=7, loc="lower right")
    if len(layers) <= 30:
        ax_bits.set_xticks(index, [str(_get(l, "name", i))[-18:] for i, l in enumerate(layers)], rotation=90,
                           fontsize=6)
    act_bits = setting("act_bits")
    fig.suptitle(f"{len(layers)} layers, W{setting('weight_bits')}A{act_bits if act_bits else 'float'} "
                 f"{setting('rounding')} / {setting('act_range')}", fontsize=10)
    for ax in (ax_err, ax_rng, ax_bits):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
