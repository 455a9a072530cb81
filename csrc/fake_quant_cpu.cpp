// Per-tensor affine fake quantization in one pass (docs/quantization-rules.md rule 3), bit-exact with
//   q = clamp(round(scale * float(x) - zp), q_min, q_max);  out = dtype((q + zp) / scale)
// for float32, float64, float16 and bfloat16 inputs (computed in float32, returned in the
// input's dtype). The output has the input's layout (channels_last stays channels_last):
// a dense input is read in memory order; any other is first copied into the output's layout.
// Rounding half to even uses (v + 1.5 * 2^23) - 1.5 * 2^23, exact for |v| < 2^22 and
// vectorizable without SSE4.1; v is first clamped to [q_min - 1, q_max + 1], which does
// not change the clamped result. Compiled with -ffp-contract=off: no fused multiply-add.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace vquant {
namespace {

template <typename T>
void fake_quant_loop(const T* src, T* dst, int64_t n, float scale, float zp, float lo, float hi) {
  const float pre_lo = lo - 1.f, pre_hi = hi + 1.f, magic = 12582912.f;  // 1.5 * 2^23
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float v = scale * static_cast<float>(src[i]) - zp;
      v = std::min(std::max(v, pre_lo), pre_hi);
      float q = (v + magic) - magic;  // not folded: no -ffast-math
      q = std::min(std::max(q, lo), hi);
      dst[i] = static_cast<T>((q + zp) / scale);
    }
  });
}

}  // namespace

at::Tensor fake_quant_cpu(const at::Tensor& x, double scale, double zero_point, int64_t q_min, int64_t q_max) {
  TORCH_CHECK(x.device().is_cpu(), "vquant::fake_quant (CPU): x must be on the CPU, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "vquant::fake_quant: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(q_min <= q_max, "vquant::fake_quant: q_min ", q_min, " > q_max ", q_max);
  at::Tensor out = at::empty_like(x);  // preserves the memory format
  at::Tensor in = x;
  if (!(x.is_non_overlapping_and_dense() && x.strides() == out.strides())) in = out.copy_(x);
  if (x.numel() == 0) return out;
  const float s = static_cast<float>(scale), zp = static_cast<float>(zero_point);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vquant_fake_quant_cpu", [&] {
    fake_quant_loop<scalar_t>(in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.numel(), s, zp,
                              static_cast<float>(q_min), static_cast<float>(q_max));
  });
  return out;
}

}  // namespace vquant
