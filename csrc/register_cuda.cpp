// CUDA implementations of the vquant operators (schemas: ops.cpp, loaded first).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace vquant {
at::Tensor squant_round_cuda(const at::Tensor& codes, int64_t bits, bool k_level, bool c_level);
at::Tensor squant_weight_cuda(const at::Tensor& weight, int64_t bits, bool k_level, bool c_level);
at::Tensor fake_quant_cuda(const at::Tensor& x, double scale, double zero_point, int64_t q_min, int64_t q_max);
}  // namespace vquant

TORCH_LIBRARY_IMPL(vquant, CUDA, m) {
  m.impl("squant_round", &vquant::squant_round_cuda);
  m.impl("fake_quant", &vquant::fake_quant_cuda);
  m.impl("squant_weight", &vquant::squant_weight_cuda);
}
