"""vquant-pl: training-free, data-free quantization and evaluation of image classifiers."""
from .affine import fake_quant_activation
from .probe import Probe
from .quantize import (QUANTIZABLE, is_quantized, quantizable_layers, quantization_report,
                       quantize_model, restore_model)
from .ranges import default_sigma, sigma_range
from .report import LayerReport, QuantReport
from .weights import quantize_weight

__version__ = "0.1.0"

__all__ = [
    "QUANTIZABLE", "LayerReport", "Probe", "QuantReport", "default_sigma", "fake_quant_activation",
    "is_quantized", "quantizable_layers", "quantization_report", "quantize_model",
    "quantize_weight", "restore_model", "sigma_range",
]
