"""Tensor numerics and the native operators: the affine rules (affine), SQuant rounding in
PyTorch (squant), the weight quantizer (weights), backend choice (backends), and the
TORCH_LIBRARY operators with their build (kernels)."""
