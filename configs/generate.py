"""Writes the YAML configs of the SQuant paper tables and ablations (run from the repo root:
`python configs/generate.py`). Every file runs alone: `vquant test --config FILE --data.root ...`."""
from pathlib import Path

from vquant_pl.config import PAPER_SIGMA

HERE = Path(__file__).parent
MODELS = {"resnet18": "ResNet18", "resnet50": "ResNet50", "inceptionv3": "InceptionV3 (299 px)",
          "sqnxt23_w2": "SqueezeNext", "shufflenet_g1_w1": "ShuffleNet"}
SIGMA = {bits: int(s) for bits, s in PAPER_SIGMA.items()}  # written once, in vquant_pl.config
DATA = """data:
  root: data/imagenet  # the folder holding val/; override with --data.root
  batch_size: 64
  num_workers: 8
trainer:
  accelerator: auto
  devices: 1
  logger: false
"""


#: The paper's rules exactly: sigma ranges on the probe, no correction (the defaults are the vquant recipe).
PAPER = "  act_range: sigma\n  bn_bias_correction: null\n"
METHODS = {"sigma": "  act_range: sigma\n", "bn": "  act_range: bn\n", "aciq-laplace": "  act_range: aciq-laplace\n",
           "aciq-gauss": "  act_range: aciq-gauss\n", "sigma+bias-corr": "  act_range: sigma\n  bias_correction: true\n",
           "sigma+bit-alloc": "  act_range: sigma\n  bit_allocation: true\n", "bn+bias-corr": "  act_range: bn\n  bias_correction: true\n",
           "bn+act-bit-alloc": "  act_range: bn\n  act_bit_allocation: true\n",
           # ACIQ as its authors' code computes it (docs/methods.md), per tensor, from BatchNorm statistics
           "aciq-laplace-bn": "  act_range: aciq-laplace\n  aciq_stats: bn\n",
           # the original's clip2max option (off in its runs): each range inside its input's observed one;
           # after a ReLU6 at most 6 (docs/methods.md: the faithful clip runs past 6 on Lite0)
           "aciq-laplace+cap": "  act_range: aciq-laplace\n  aciq_cap: true\n",
           "aciq-gauss+cap": "  act_range: aciq-gauss\n  aciq_cap: true\n",
           # the ACIQ repository's README recipe (-pcq_w -pcq_a -c laplace -baa -baw -bcw): per-channel
           # activation ranges, bits allocated to weights and activations (at 4 bits or fewer), mean correction
           "aciq-recipe-laplace-bn+act-per-channel+bit-alloc-wa+bias-corr-mean":
               "  act_range: aciq-laplace\n  aciq_stats: bn\n  act_per_channel: true\n  bit_allocation: true\n"
               "  act_bit_allocation: true\n  bias_correction: true\n",
           # the same with our exact-budget bit allocation (any bit width)
           "aciq-laplace-bn+act-per-channel+bit-alloc-wa-exact+bias-corr-mean":
               "  act_range: aciq-laplace\n  aciq_stats: bn\n  act_per_channel: true\n  bit_allocation: true\n"
               "  act_bit_allocation: true\n  bit_allocation_rule: exact\n  bias_correction: true\n"}
#: Rows of the method table that use the vquant recipe's BatchNorm bias correction (the others pin it off).
RECIPE_METHODS = {"vquant": "  act_range: bn\n  bn_bias_correction: weights\n"}


def write(path: Path, title: str, model: str, quant: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = model if ":" in model else f"pytorchcv:{model}"
    path.write_text(f"# {title}\nmodel:\n  model: {spec}\nquant:\n{quant}{DATA}")


def main() -> None:
    for model, title in MODELS.items():
        write(HERE / "paper" / f"{model}_fp32.yaml", f"{title}, float baseline", model, "  weight_bits: null\n")
        for bits in (4, 6, 8):
            if model == "shufflenet_g1_w1" and bits == 4:
                continue  # the paper has no W4A4 row for ShuffleNet
            write(HERE / "paper" / f"{model}_w{bits}a{bits}.yaml", f"{title}, SQuant W{bits}A{bits} (paper table)",
                  model, f"  weight_bits: {bits}\n  act_bits: {bits}\n  rounding: squant\n"
                  f"  # sigma: {SIGMA[bits]}, the paper's, is the default at {bits} bits (not pinned: a run that\n"
                  f"  # overrides act_range or act_bits would otherwise hold a setting it ignores)\n{PAPER}")
    for bits in (3, 4):
        for rounding in ("squant-e", "squant-k", "squant-c", "squant"):
            write(HERE / "ablation" / f"resnet18_{rounding}_w{bits}.yaml",
                  f"Ablation: ResNet18, {rounding} granularity, {bits}-bit weights, float activations",
                  "resnet18", f"  weight_bits: {bits}\n  act_bits: null\n  rounding: {rounding}\n{PAPER}")
    for bits in (4, 6, 8):
        for method, extra in [(m, e + "  bn_bias_correction: null\n") for m, e in METHODS.items()] + list(
                RECIPE_METHODS.items()):
            write(HERE / "methods" / f"lite0_{method}_w{bits}a{bits}.yaml",
                  f"Method comparison: EfficientNet-Lite0, SQuant weights, {method}, W{bits}A{bits}",
                  "efficientnet_lite:lite0", f"  weight_bits: {bits}\n  act_bits: {bits}\n{extra}  verbose: false\n")
    write(HERE / "ablation" / "resnet18_squant_w5.yaml",
          "Ablation: ResNet18, SQuant, 5-bit weights, float activations", "resnet18",
          "  weight_bits: 5\n  act_bits: null\n  rounding: squant\n" + PAPER)


if __name__ == "__main__":
    main()
