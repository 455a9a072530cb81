"""Shared test helpers: paths of the optional reference data in ../shared, small models."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("VQUANT_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden" / "squant_golden.pt"
SAMPLE = SHARED / "data" / "imagenet-sample"
SYNSETS = SHARED / "data" / "imagenet_synsets.txt"


#: One non-default value for every QuantConfig field (a consistent config): the tests that
#: hold quantize_model, the callback and the CLI to the dataclass all use it, and fail when a
#: field is added to QuantConfig without a value here.
NON_DEFAULT = dict(weight_bits=6, act_bits=6, rounding="squant-k", act_range="aciq-laplace", sigma=9.0, bn_k=2.5,
                   aciq_stats="bn", bias_correction=True, bit_allocation=True, act_bit_allocation=True,
                   bn_bias_correction="all", equalize=True, equalize_alpha=0.3, equalize_k=3.0, weight_clip=True,
                   percentile=99.0, calib_batches=3, probe_seed=7, probe_shape=(2, 3, 8, 8), backend="torch",
                   act_per_channel=True, bit_allocation_rule="exact", bias_correction_rule="mean-std", aciq_cap=True,
                   mixed_precision="all", mixed_min_bits=2)
