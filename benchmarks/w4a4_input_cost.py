"""Which data-free estimate says which layer inputs cost the most at W4A4 (issue 22)?

    python benchmarks/w4a4_input_cost.py efficientnet_lite:lite0 --images runs/recipes/lite0_imagenet-sample.pt --num 50 \
        --out docs/w4a4_input_cost_lite0

For every layer input of the default recipe at W4A4, three numbers:

- measured: `vquant analyze`'s KL to the float outputs with only that input quantized, on
  the images given (the truth both estimates are judged against; nothing is chosen from it);
- own NSR: the noise-to-signal ratio quantization adds at the layer's own output, from
  BatchNorm statistics (what `mixed_precision="all"` used before);
- output noise: `methods.bit_budget`'s cost, the BatchNorm-derived rounding error of each
  input channel times the squared Jacobian of the outputs with respect to it
  (`output_gains`, on 32 samples of the seeded noise probe).

Prints a Markdown table, the Spearman rank correlation of each estimate with the measured
KL, and (with --out and matplotlib) a log-log figure. Accuracy is not timed here.
"""
from __future__ import annotations

import argparse

import torch

from vquant_pl.cli.analyze import analyze
from vquant_pl.cli.files import load_tensors
from vquant_pl.layers import quantizable_layers
from vquant_pl.methods import bit_budget
from vquant_pl.methods.bn_graph import DEFAULT_BN_K, bn_stats, stats_range
from vquant_pl.models import create_model
from vquant_pl.probe import Probe, default_probe_shape, make_probe


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(torch.tensor(a)), _ranks(torch.tensor(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def own_nsr(layer, stats, bits: int) -> float:
    """Input-quantization noise over signal at the layer's own output (BatchNorm moments)."""
    e = bit_budget.input_noise(stats, lambda b: stats_range(stats, DEFAULT_BN_K[b]), (bits,))[0]
    mean, var = bit_budget._input_moments(layer, stats)
    w = layer.weight.detach().float()
    w2 = w.reshape(w.shape[0], w.shape[1] if w.dim() > 1 else 1, -1).pow(2).sum(2)
    signal = bit_budget._signal(w, layer, mean, var).clamp_min(1e-30)
    return float(((w2 * bit_budget._per_pair(w, layer, e)).sum(1) / signal).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--images", required=True, help=".pt file with 'images' (and 'labels')")
    p.add_argument("--num", type=int, default=50)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--out", default=None, help="prefix for the .png figure")
    args = p.parse_args(argv)
    data = load_tensors(args.images, "images file")
    images = data["images"][:args.num] if isinstance(data, dict) else data[:args.num]
    labels = data.get("labels")[:args.num] if isinstance(data, dict) and "labels" in data else None
    model, _ = create_model(args.model)
    model.eval()
    report = analyze(model, images, labels, batch_size=50, weight_bits=args.bits, act_bits=args.bits)
    layers = quantizable_layers(model)
    stats = bn_stats(model, [n for n, _ in layers])
    first = layers[0][1]
    probe = make_probe(Probe(0, (bit_budget.GAIN_PROBES, *default_probe_shape(model, first)[1:])), model, first,
                       first.weight.device)
    rows = [r for r in report.layers if r.input_kl is not None and r.act_bits == args.bits
            and not isinstance(stats.get(r.name), str)]
    chosen = [(n, m) for n, m in layers if n in {r.name for r in rows}]
    gains = bit_budget.output_gains(model, chosen, probe)
    modules = dict(layers)
    table = []
    for r in rows:
        s = stats[r.name]
        e = bit_budget.input_noise(s, lambda b: stats_range(s, DEFAULT_BN_K[b]), (args.bits,))[0]
        table.append((r.name, r.input_kl, own_nsr(modules[r.name], s, args.bits),
                      float(e.double() @ gains[r.name].double())))
    print(f"{args.model}, W{args.bits}A{args.bits} default recipe, measured on {len(images)} images\n")
    print("| layer | measured KL | own NSR | output noise |\n| --- | ---: | ---: | ---: |")
    for name, kl, nsr, cost in table:
        print(f"| {name} | {kl:.4f} | {nsr:.4f} | {cost:.4g} |")
    measured = [t[1] for t in table]
    rho_nsr, rho_cost = spearman(measured, [t[2] for t in table]), spearman(measured, [t[3] for t in table])
    print(f"\nSpearman rank correlation with the measured KL ({len(table)} inputs): own NSR {rho_nsr:.2f}, "
          f"output noise {rho_cost:.2f}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for ax, col, label, rho in ((axes[0], 2, "own NSR (BatchNorm)", rho_nsr),
                                    (axes[1], 3, "output noise (BatchNorm x probe Jacobian)", rho_cost)):
            ax.loglog([t[col] for t in table], measured, "o", ms=4)
            ax.set_xlabel(f"{label}, data-free")
            ax.set_ylabel(f"measured KL, that input alone ({len(images)} images)")
            ax.set_title(f"Spearman {rho:.2f}", fontsize=9)
        fig.suptitle(f"{args.model} W{args.bits}A{args.bits}: what one layer input's rounding costs", fontsize=10)
        fig.tight_layout()
        fig.savefig(f"{args.out}.png", dpi=110)
        print(f"figure: {args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
