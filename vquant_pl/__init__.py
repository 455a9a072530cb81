"""vquant-pl: training-free, data-free quantization and evaluation of image classifiers."""
from .ops.affine import fake_quant_activation
from .config import QuantConfig, default_sigma
from .probe import Probe
from .state import save_original
from .layers import QUANTIZABLE, quantizable_layers
from .quantize import (activation_ranges, is_quantized, quantization_report, quantize_model, restore_model,
                       set_activation_ranges)
from .methods.sigma import sigma_range
from .report import LayerReport, QuantReport
from .ops.weights import quantize_weight

from .methods.aciq import aciq_range, allocate_bits, bias_correct
from .nvidia.quant_modules import (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, TensorQuantizer, calibrate,
                            quantized_layers)
from .nvidia.tensor_quant import QuantDescriptor, fake_tensor_quant, tensor_quant
from .models import Preprocessing, create_model

__version__ = "0.1.0"


_LAZY = {  # the Lightning-dependent names load on first use: `import vquant_pl` stays fast
    "ImageClassifier": "vquant_pl.classifier", "VQuantCallback": "vquant_pl.callbacks",
    "ImageNetDataModule": "vquant_pl.datamodules",
    "export_onnx": "vquant_pl.export",  # ONNX QDQ export (the `export` extra)
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vquant_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "QUANTIZABLE", "QuantConfig", "save_original", "ImageClassifier", "ImageNetDataModule", "LayerReport", "Preprocessing", "Probe",
    "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantDescriptor", "QuantLinear", "QuantReport",
    "TensorQuantizer", "VQuantCallback", "aciq_range", "activation_ranges", "allocate_bits", "bias_correct",
    "calibrate", "create_model", "default_sigma", "export_onnx", "fake_quant_activation", "fake_tensor_quant",
    "is_quantized", "quantizable_layers", "quantization_report", "quantize_model", "quantize_weight",
    "quantized_layers", "restore_model", "set_activation_ranges", "sigma_range", "tensor_quant",
]
