"""vquant-pl: training-free, data-free quantization and evaluation of image classifiers."""
from .affine import fake_quant_activation
from .probe import Probe
from .quantize import (QUANTIZABLE, is_quantized, quantizable_layers, quantization_report,
                       quantize_model, restore_model)
from .ranges import default_sigma, sigma_range
from .report import LayerReport, QuantReport
from .weights import quantize_weight

from .classifier import ImageClassifier
from .models import Preprocessing, create_model

__version__ = "0.1.0"


def __getattr__(name: str):
    # vquant_pl.callbacks / vquant_pl.datamodules import vquant_pl: resolve them lazily
    if name == "VQuantCallback":
        from .callbacks import VQuantCallback
        return VQuantCallback
    if name == "ImageNetDataModule":
        from .datamodules import ImageNetDataModule
        return ImageNetDataModule
    raise AttributeError(f"module 'vquant_pl' has no attribute {name!r}")

__all__ = [
    "ImageClassifier", "ImageNetDataModule", "Preprocessing", "VQuantCallback", "create_model", "QUANTIZABLE", "LayerReport", "Probe", "QuantReport", "default_sigma", "fake_quant_activation",
    "is_quantized", "quantizable_layers", "quantization_report", "quantize_model",
    "quantize_weight", "restore_model", "sigma_range",
]
