// Per-tensor affine fake quantization in one pass on the GPU (docs/quantization-rules.md rule 3): float32
// math on float32, float64, float16 or bfloat16 input, result in the input's dtype and layout
// (a dense input is processed in memory order, so channels_last stays channels_last). The _rn
// intrinsics keep nvcc from contracting scale * x - zp into a fused multiply-add.
// Built by nvcc for the GPU, and for the CPU under the CUDA emulation (cuda_compat.h).
#include <ATen/Dispatch.h>

#include <algorithm>

#include "cuda_compat.h"

namespace vquant {
namespace {

template <typename T>
__global__ void fake_quant_kernel(const T* __restrict__ x, T* __restrict__ out, long n, float scale,
                                  float zp, float q_min, float q_max) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
    const float q = fminf(fmaxf(rintf(__fsub_rn(__fmul_rn(scale, static_cast<float>(x[i])), zp)), q_min), q_max);
    out[i] = static_cast<T>(__fdiv_rn(__fadd_rn(q, zp), scale));
  }
}

}  // namespace

at::Tensor fake_quant_cuda(const at::Tensor& x, double scale, double zero_point, int64_t q_min, int64_t q_max) {
  VQ_DEVICE_CHECK(x, "vquant::fake_quant: x");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "vquant::fake_quant: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(q_min <= q_max, "vquant::fake_quant: q_min ", q_min, " > q_max ", q_max);
  VQ_DEVICE_GUARD(x);
  at::Tensor out = at::empty_like(x);  // preserves the memory format
  at::Tensor in = x;
  if (!(x.is_non_overlapping_and_dense() && x.strides() == out.strides())) in = out.copy_(x);
  const long n = x.numel();
  if (n == 0) return out;
  const int threads = 256;
  const long blocks = std::min<long>((n + threads - 1) / threads, 65535L * 8);
  auto stream = VQ_STREAM;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vquant_fake_quant_cuda", [&] {
    VQ_LAUNCH(fake_quant_kernel<scalar_t>, blocks, threads, stream)(
        in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, (float)scale, (float)zero_point,
        (float)q_min, (float)q_max);
    VQ_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace vquant
