// Per-tensor affine fake quantization in one pass (DESIGN.md rule 3), bit-exact with
//   q = clamp(round(scale * x - zp), q_min, q_max);  out = (q + zp) / scale
// Rounding half to even uses (v + 1.5 * 2^23) - 1.5 * 2^23, exact for |v| < 2^22 and
// vectorizable without SSE4.1; v is first clamped to [q_min - 1, q_max + 1], which does
// not change the clamped result. Compiled with -ffp-contract=off: no fused multiply-add.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace vquant {

torch::Tensor fake_quant_cpu(torch::Tensor x, double scale_d, double zp_d, int64_t q_min, int64_t q_max) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "fake_quant_cpu: float32 CPU tensor expected");
  auto in = x.contiguous();
  auto out = torch::empty_like(in);
  const float scale = static_cast<float>(scale_d), zp = static_cast<float>(zp_d);
  const float lo = static_cast<float>(q_min), hi = static_cast<float>(q_max);
  const float pre_lo = lo - 1.f, pre_hi = hi + 1.f, magic = 12582912.f;  // 1.5 * 2^23
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, in.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float v = scale * src[i] - zp;
      v = std::min(std::max(v, pre_lo), pre_hi);
      float q = (v + magic) - magic;  // not folded: no -ffast-math
      q = std::min(std::max(q, lo), hi);
      dst[i] = (q + zp) / scale;
    }
  });
  return out;
}

}  // namespace vquant
