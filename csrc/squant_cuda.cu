// SQuant rounding on the GPU, all levels on the device with no host round trip:
//   kernel 0 (squant_weight only): one block per output channel: channel min and max, scale,
//             zero point and the affine codes (vquant_pl/ops/affine.py), in one launch;
//   kernel 1: one thread per (oc, ic) kernel: initial rounding, K-level flips, boundary mark;
//   kernel 2: one block per output channel: C-level flips by block-wide selection of the
//             k highest priorities (stable order), then the clamp (and, for squant_weight,
//             the dequantization (q + zero point) / scale).
// squant_weight thus takes 3 launches per layer where codes, rounding and dequantization as
// separate PyTorch ops took 10 (benchmarks/README.md, GPU cost model).
// Built by nvcc for the GPU, and for the CPU under the CUDA emulation (cuda_compat.h).
#include <ATen/ops/empty.h>

#include <cfloat>

#include "cuda_compat.h"
#include "squant_common.h"

namespace vquant {
namespace {

constexpr int kBlock = 256;

// Affine codes of channel blockIdx.x (row of `row` weights): x = scale * w - zero_point with
// scale = levels / max(hi - lo, 1e-8), zero_point = round(scale * lo) + n (float32, no fma).
__global__ void channel_codes(const float* __restrict__ w, float* __restrict__ x, float* __restrict__ scale_out,
                              float* __restrict__ zero_point_out, long row, float levels, float n) {
  __shared__ float lo_s[kBlock], hi_s[kBlock];
  const long base = blockIdx.x * row;
  float lo = w[base], hi = w[base];
  for (long i = threadIdx.x; i < row; i += blockDim.x) {
    lo = fminf(lo, w[base + i]);
    hi = fmaxf(hi, w[base + i]);
  }
  lo_s[threadIdx.x] = lo;
  hi_s[threadIdx.x] = hi;
  __syncthreads();
  for (int step = blockDim.x / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) {
      lo_s[threadIdx.x] = fminf(lo_s[threadIdx.x], lo_s[threadIdx.x + step]);
      hi_s[threadIdx.x] = fmaxf(hi_s[threadIdx.x], hi_s[threadIdx.x + step]);
    }
    __syncthreads();
  }
  const float scale = levels / fmaxf(hi_s[0] - lo_s[0], 1e-8f);
  const float zero_point = round_half_even(scale * lo_s[0]) + n;
  for (long i = threadIdx.x; i < row; i += blockDim.x) x[base + i] = scale * w[base + i] - zero_point;
  if (threadIdx.x == 0) {
    scale_out[blockIdx.x] = scale;
    zero_point_out[blockIdx.x] = zero_point;
  }
}

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

// C-level on channel blockIdx.x (row of `row` elements), then clamp into `out`; with `scale`
// (squant_weight), dequantize too: out = (q + zero_point) / scale.
__global__ void channel_level(const float* __restrict__ x, const float* __restrict__ number,
                              float* __restrict__ error, float* __restrict__ up_prio,
                              float* __restrict__ down_prio, float* __restrict__ out, long row,
                              float t_min, float t_max, bool c_level, const float* __restrict__ scale,
                              const float* __restrict__ zero_point) {
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
  if (scale != nullptr) {
    const float s = scale[blockIdx.x], zp = zero_point[blockIdx.x];
    for (long i = threadIdx.x; i < row; i += blockDim.x) orow[i] = (orow[i] + zp) / s;
  }
}

void check_input(const at::Tensor& t, const char* what, int64_t bits) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "vquant::squant_round: ", what, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3, "vquant::squant_round: ", what, " must be [OC, IC, K], got ", t.dim(), " dims");
  TORCH_CHECK(bits >= 1 && bits <= 16, "vquant::squant_round: bits must lie in 1..16, got ", bits);
}

// Kernels 1 and 2 on codes x [OC, IC, K]; `scale`/`zero_point` [OC] to dequantize, or null.
at::Tensor round_codes(const at::Tensor& x, int64_t bits, bool k_level, bool c_level, const float* scale,
                       const float* zero_point) {
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
        -n, n - 1.f, c_level, scale, zero_point);
    VQ_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

at::Tensor squant_round_cuda(const at::Tensor& codes, int64_t bits, bool k_level, bool c_level) {
  VQ_DEVICE_CHECK(codes, "vquant::squant_round: codes");
  check_input(codes, "codes", bits);
  VQ_DEVICE_GUARD(codes);
  return round_codes(codes.contiguous(), bits, k_level, c_level, nullptr, nullptr);
}

// The weight [OC, IC, K] float32 (finite: the caller checks) -> dequantized SQuant weight.
at::Tensor squant_weight_cuda(const at::Tensor& weight, int64_t bits, bool k_level, bool c_level) {
  VQ_DEVICE_CHECK(weight, "vquant::squant_weight: weight");
  check_input(weight, "weight", bits);
  VQ_DEVICE_GUARD(weight);
  auto w = weight.contiguous();
  auto x = at::empty_like(w);
  const long oc = w.size(0), row = w.size(1) * w.size(2);
  if (oc == 0 || row == 0) return x;
  auto params = at::empty({2, oc}, w.options());
  float* scale = params.data_ptr<float>();
  float* zero_point = scale + oc;
  VQ_LAUNCH(channel_codes, oc, kBlock, VQ_STREAM)(
      w.data_ptr<float>(), x.data_ptr<float>(), scale, zero_point, row, (float)((1L << bits) - 1),
      (float)(1L << (bits - 1)));
  VQ_LAUNCH_CHECK();
  return round_codes(x, bits, k_level, c_level, scale, zero_point);
}

}  // namespace vquant
