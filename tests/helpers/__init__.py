"""Shared test helpers: paths of the optional reference data in ../shared, small models."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("VQUANT_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden" / "squant_golden.pt"
SAMPLE = SHARED / "data" / "imagenet-sample"
SYNSETS = SHARED / "data" / "imagenet_synsets.txt"


#: Consistent configs, each listing every QuantConfig field, that between them give every
#: field a non-default value (one config cannot: `bn_k` is read only by `bn` ranges,
#: `percentile` only by the percentile calibrator, ...). The tests that hold quantize_model,
#: the callback and the CLI to the dataclass use them, and fail when a field is added to
#: QuantConfig without a value here.
NON_DEFAULT = dict(weight_bits=6, act_bits=6, rounding="squant-k", act_range="aciq-laplace", sigma=None, bn_k=None,
                   aciq_stats="bn", bias_correction=True, bit_allocation=True, act_bit_allocation=True,
                   bn_bias_correction="all", equalize=True, equalize_alpha=0.3, equalize_k=3.0, weight_clip=True,
                   percentile=99.99, calib_batches=8, probe_seed=7, probe_shape=(2, 3, 8, 8), backend="torch",
                   act_per_channel=True, bit_allocation_rule="exact", bias_correction_rule="mean-std", aciq_cap=True,
                   mixed_precision="all", mixed_min_bits=2)
NON_DEFAULTS = [
    NON_DEFAULT,
    NON_DEFAULT | dict(act_range="bn", sigma=9.0, bn_k=2.5, aciq_stats="probe", aciq_cap=False),
    NON_DEFAULT | dict(act_range="percentile", percentile=99.0, calib_batches=3, aciq_stats="probe", aciq_cap=False,
                       act_bit_allocation=False, act_per_channel=False, mixed_precision="weights"),
]


def small_cli_config(path: Path, *, limit: int = 4, batch_size: int = 2, checkpoint: Path | None = None,
                     extra: str = "") -> Path:
    """A CLI YAML for a random-init pytorchcv ResNet10 at W8A8 on `limit` sample images (CPU, no
    logger, no progress bar); `extra` adds lines to the `quant:` group."""
    model = "" if checkpoint is None else f"\n  checkpoint: {checkpoint}"
    path.write_text(f"""model:
  model: pytorchcv:resnet10
  pretrained: false{model}
data:
  root: {SAMPLE}
  limit: {limit}
  batch_size: {batch_size}
  num_workers: 0
quant:
  weight_bits: 8
  act_bits: 8
  probe_shape: [2, 3, 224, 224]
  verbose: false
{extra}trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
""")
    return path
