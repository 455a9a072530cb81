"""The pytorch-quantization-style API, laid out as NVIDIA lays out its own: tensor_quant,
calib, quant_modules (TensorQuantizer, QuantConv*/QuantLinear, the layer swap) and utils."""
