// SQuant rounding on the GPU, all levels on the device with no host round trip:
//   kernel 1: one thread per (oc, ic) kernel: initial rounding, K-level flips, boundary mark;
//   kernel 2: one block per output channel: C-level flips by block-wide selection of the
//             k highest priorities (stable order), then the clamp.
// Built by nvcc for the GPU, and for the CPU under the CUDA emulation (cuda_compat.h).
#include <cfloat>

#include "cuda_compat.h"
#include "squant_common.h"

namespace vquant {
namespace {

constexpr int kBlock = 256;

// Initial rounding (and the K-level when k_level) of the kernel (oc, ic) = group g.
__global__ void kernel_level(const float* __restrict__ x, float* __restrict__ number,
                             float* __restrict__ error, float* __restrict__ up_prio,
                             float* __restrict__ down_prio, long groups, long ks, float t_min,
                             float t_max, bool k_level) {
  const long g = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const long o = g * ks;
  double s = 0.0;
  for (long i = 0; i < ks; ++i) {
    const float xi = x[o + i];
    const float r = round_half_even(xi);
    number[o + i] = r;
    error[o + i] = r - xi;
    up_prio[o + i] = initial_priority(xi, true, t_min, t_max);
    down_prio[o + i] = initial_priority(xi, false, t_min, t_max);
    s += (double)(r - xi);
  }
  if (!k_level) return;
  const bool go_up = s < 0.0;
  const double abs_s = fabs(s);
  const double k_real = rint(abs_s);
  const bool over = k_real >= abs_s;
  const long k_full = (long)k_real;
  const long k = k_full < ks ? k_full : ks;
  float* prio = go_up ? up_prio + o : down_prio + o;
  const long pos = (((over ? k_full - 1 : k_full) % ks) + ks) % ks;
  // Selection in stable order: `taken` elements get priority -1 (all real ones are >= 0).
  // Remember the original priorities of the taken ones only to find the boundary.
  long boundary = -1;
  const long rounds = (pos + 1 > k) ? pos + 1 : k;
  for (long j = 0; j < rounds; ++j) {
    long best = -1;
    float best_p = -1.f;
    for (long i = 0; i < ks; ++i) {
      if (prio[i] >= 0.f && (best < 0 || before(prio[i], i, best_p, best))) {
        best = i;
        best_p = prio[i];
      }
    }
    if (j < k) {
      const Element t = flip_target(x[o + best], go_up, t_min, t_max);
      number[o + best] = t.number;
      error[o + best] = t.error;
    }
    if (j == pos) boundary = best;
    prio[best] = -1.f;
  }
  for (long i = 0; i < ks; ++i) {
    up_prio[o + i] = 0.f;
    down_prio[o + i] = 0.f;
  }
  (go_up != over ? up_prio : down_prio)[o + boundary] = fabsf(error[o + boundary]);
}

struct Pick {
  float p;
  long i;
};

__device__ Pick better(Pick a, Pick b) {
  if (a.i < 0) return b;
  if (b.i < 0) return a;
  return before(a.p, a.i, b.p, b.i) ? a : b;
}

// C-level on channel blockIdx.x (row of `row` elements), then clamp into `out`.
__global__ void channel_level(const float* __restrict__ x, const float* __restrict__ number,
                              float* __restrict__ error, float* __restrict__ up_prio,
                              float* __restrict__ down_prio, float* __restrict__ out, long row,
                              float t_min, float t_max, bool c_level) {
  __shared__ double sums[kBlock];
  __shared__ Pick picks[kBlock];
  const long base = blockIdx.x * row;
  const float* xr = x + base;
  float* er = error + base;
  float* orow = out + base;
  for (long i = threadIdx.x; i < row; i += blockDim.x) orow[i] = number[base + i];
  if (c_level) {
    // Sequential per thread, then a fixed tree: deterministic for a given launch shape.
    double s = 0.0;
    for (long i = threadIdx.x; i < row; i += blockDim.x) s += (double)er[i];
    sums[threadIdx.x] = s;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w /= 2) {
      if (threadIdx.x < w) sums[threadIdx.x] += sums[threadIdx.x + w];
      __syncthreads();
    }
    const double total = sums[0];
    const bool go_up = total < 0.0;
    const double abs_s = fabs(total);
    const double k_real = rint(abs_s);
    const long k = (long)k_real < row ? (long)k_real : row;
    float* prio = (go_up ? up_prio : down_prio) + base;
    for (long j = 0; j < k; ++j) {
      Pick mine{-1.f, -1};
      for (long i = threadIdx.x; i < row; i += blockDim.x)
        if (prio[i] >= 0.f) mine = better(mine, Pick{prio[i], i});
      picks[threadIdx.x] = mine;
      __syncthreads();
      for (int w = blockDim.x / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) picks[threadIdx.x] = better(picks[threadIdx.x], picks[threadIdx.x + w]);
        __syncthreads();
      }
      if (threadIdx.x == 0) {
        const long b = picks[0].i;
        const Element t = flip_target(xr[b], go_up, t_min, t_max);
        orow[b] = t.number;
        er[b] = t.error;
        prio[b] = -1.f;
      }
      __syncthreads();
    }
  }
  for (long i = threadIdx.x; i < row; i += blockDim.x)
    orow[i] = fminf(fmaxf(orow[i], t_min), t_max);
}

}  // namespace

at::Tensor squant_round_cuda(const at::Tensor& codes, int64_t bits, bool k_level, bool c_level) {
  VQ_DEVICE_CHECK(codes, "vquant::squant_round: codes");
  TORCH_CHECK(codes.scalar_type() == at::kFloat, "vquant::squant_round: codes must be float32, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 3, "vquant::squant_round: codes must be [OC, IC, K], got ", codes.dim(), " dims");
  TORCH_CHECK(bits >= 1 && bits <= 16, "vquant::squant_round: bits must lie in 1..16, got ", bits);
  VQ_DEVICE_GUARD(codes);
  auto x = codes.contiguous();
  const long oc = x.size(0), ic = x.size(1), ks = x.size(2);
  auto number = at::empty_like(x), error = at::empty_like(x);
  auto up_prio = at::empty_like(x), down_prio = at::empty_like(x), out = at::empty_like(x);
  const float n = (float)(1L << (bits - 1));
  auto stream = VQ_STREAM;
  const long groups = oc * ic;
  if (groups > 0 && ks > 0) {
    VQ_LAUNCH(kernel_level, (groups + kBlock - 1) / kBlock, kBlock, stream)(
        x.data_ptr<float>(), number.data_ptr<float>(), error.data_ptr<float>(),
        up_prio.data_ptr<float>(), down_prio.data_ptr<float>(), groups, ks, -n, n - 1.f,
        k_level && ks > 1);
    VQ_LAUNCH_CHECK();
    VQ_LAUNCH(channel_level, oc, kBlock, stream)(
        x.data_ptr<float>(), number.data_ptr<float>(), error.data_ptr<float>(),
        up_prio.data_ptr<float>(), down_prio.data_ptr<float>(), out.data_ptr<float>(), ic * ks,
        -n, n - 1.f, c_level);
    VQ_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace vquant
