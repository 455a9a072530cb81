// Schemas of the vquant operators, shared by the native library (ops.cpp), the CUDA emulation
// (cuda_emulation_build.cpp) and, read by vquant_pl/ops/kernels.py, the pure-PyTorch fallback.
#pragma once

// codes: real weight codes [OC, IC, K] (float32); returns the SQuant-rounded codes clamped to [-n, n-1].
#define VQ_SCHEMA_SQUANT_ROUND "squant_round(Tensor codes, int bits, bool k_level, bool c_level) -> Tensor"
// Per-tensor affine fake quantization (docs/quantization-rules.md rule 3); float32 math, result in x's dtype and layout.
#define VQ_SCHEMA_FAKE_QUANT "fake_quant(Tensor x, float scale, float zero_point, int q_min, int q_max) -> Tensor"
// weight: float32 [OC, IC, K]; per output channel the affine codes (vquant_pl/ops/affine.py), SQuant
// rounding as squant_round, and the dequantized weight (q + zero_point) / scale, float32 [OC, IC, K].
#define VQ_SCHEMA_SQUANT_WEIGHT "squant_weight(Tensor weight, int bits, bool k_level, bool c_level) -> Tensor"
