"""Published numbers: SQuant (ICLR 2022) ImageNet top-1 of pytorchcv models."""
from __future__ import annotations

#: top-1 (%) by pytorchcv model name and setting ("fp32", "w4a4", "w6a6", "w8a8").
SQUANT_TOP1: dict[str, dict[str, float]] = {
    "resnet18": {"fp32": 71.47, "w4a4": 66.14, "w6a6": 70.74, "w8a8": 71.47},
    "resnet50": {"fp32": 77.74, "w4a4": 70.80, "w6a6": 77.05, "w8a8": 77.71},
    "inceptionv3": {"fp32": 78.81, "w4a4": 73.26, "w6a6": 78.30, "w8a8": 78.79},
    "sqnxt23_w2": {"fp32": 69.38, "w4a4": 43.45, "w6a6": 67.34, "w8a8": 69.22},
    "shufflenet_g1_w1": {"fp32": 65.07, "w6a6": 60.25, "w8a8": 64.68},
}


def paper_top1(model_spec: str, weight_bits: int | None, act_bits: int | None, rounding: str = "squant") -> float | None:
    """The paper's top-1 (%) for a model spec and setting, or None when it reports none."""
    source, _, name = model_spec.partition(":")
    if source != "pytorchcv" or name not in SQUANT_TOP1:
        return None
    if weight_bits is None:
        return SQUANT_TOP1[name]["fp32"]
    if rounding != "squant" or act_bits != weight_bits:
        return None
    return SQUANT_TOP1[name].get(f"w{weight_bits}a{act_bits}")
