// Per-tensor affine fake quantization in one pass on the GPU (DESIGN.md rule 3); the
// _rn intrinsics keep nvcc from contracting scale * x - zp into a fused multiply-add.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace vquant {
namespace {

__global__ void fake_quant_kernel(const float* __restrict__ x, float* __restrict__ out, long n, float scale,
                                  float zp, float q_min, float q_max) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
    const float q = fminf(fmaxf(rintf(__fsub_rn(__fmul_rn(scale, x[i]), zp)), q_min), q_max);
    out[i] = __fdiv_rn(__fadd_rn(q, zp), scale);
  }
}

}  // namespace

torch::Tensor fake_quant_cuda(torch::Tensor x, double scale, double zp, int64_t q_min, int64_t q_max) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kFloat32, "fake_quant_cuda: float32 CUDA tensor expected");
  const c10::cuda::CUDAGuard guard(x.device());
  auto in = x.contiguous();
  auto out = torch::empty_like(in);
  const long n = in.numel();
  if (n == 0) return out;
  const int threads = 256;
  const long blocks = std::min<long>((n + threads - 1) / threads, 65535L * 8);
  fake_quant_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      in.data_ptr<float>(), out.data_ptr<float>(), n, (float)scale, (float)zp, (float)q_min, (float)q_max);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace vquant
