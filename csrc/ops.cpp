// The vquant operators: schemas (TORCH_LIBRARY) and CPU implementations. The CUDA
// implementations register from the CUDA library (register_cuda.cpp); the fake (meta)
// implementations for torch.compile live in Python (vquant_pl/ops/kernels.py).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ops_schema.h"

namespace vquant {
at::Tensor squant_round_cpu(const at::Tensor& codes, int64_t bits, bool k_level, bool c_level);
at::Tensor squant_weight_cpu(const at::Tensor& weight, int64_t bits, bool k_level, bool c_level);
at::Tensor fake_quant_cpu(const at::Tensor& x, double scale, double zero_point, int64_t q_min, int64_t q_max);
}  // namespace vquant

TORCH_LIBRARY(vquant, m) {
  m.set_python_module("vquant_pl.ops.kernels");
  m.def(VQ_SCHEMA_SQUANT_ROUND, {at::Tag::pt2_compliant_tag});
  m.def(VQ_SCHEMA_FAKE_QUANT, {at::Tag::pt2_compliant_tag});
  m.def(VQ_SCHEMA_SQUANT_WEIGHT, {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(vquant, CPU, m) {
  m.impl("squant_round", &vquant::squant_round_cpu);
  m.impl("fake_quant", &vquant::fake_quant_cpu);
  m.impl("squant_weight", &vquant::squant_weight_cpu);
}
