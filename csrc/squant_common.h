// SQuant rounding: the per-element rules shared by the CPU and CUDA implementations.
// Semantics: docs/quantization-rules.md "SQuant rounding" (bit-exact with the vectorized PyTorch reference).
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define VQ_HD __host__ __device__ __forceinline__
#else
#define VQ_HD inline
#endif

namespace vquant {

// Initial rounding of one code: round half to even; flip targets from it.
struct Element {
  float number, error;
};

// Round half to even, as std::nearbyint in the default rounding mode, without a library call
// on the host (it vectorizes): below 2^23, |x| + 2^23 lands where the float spacing is 1, so
// the addition itself rounds |x| to an integer, half to even; from 2^23 on every float is an
// integer. The sign is put back with copysign (-0.3 -> -0, as nearbyint), NaN stays NaN.
// Needs IEEE float arithmetic as written (no -ffast-math: the sum must not be folded away).
VQ_HD float round_half_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  const float two23 = 8388608.f, a = std::fabs(x);
  return std::copysign(a < two23 ? (a + two23) - two23 : a, x);
#endif
}

// The same for a double >= 0 or NaN (the size of an error sum): 2^52 is where doubles are integers.
VQ_HD double round_half_even_nonneg(double a) {
  const double two52 = 4503599627370496.0;
  return a < two52 ? (a + two52) - two52 : a;
}

// The (number, error) a flip in direction `up` writes: (r+1, e+1) for an up candidate,
// (r-1, e-1) for a down candidate, (r, 0) otherwise.
VQ_HD Element flip_target(float x, bool up, float t_min, float t_max) {
  const float r = round_half_even(x);
  const float e = r - x;
  if (up) return (e < 0.f && x < t_max) ? Element{r + 1.f, e + 1.f} : Element{r, 0.f};
  return (e > 0.f && x > t_min) ? Element{r - 1.f, e - 1.f} : Element{r, 0.f};
}

// Initial priority of an element in direction `up` (0 for non-candidates).
VQ_HD float initial_priority(float x, bool up, float t_min, float t_max) {
  const float e = round_half_even(x) - x;
  if (up) return (e < 0.f && x < t_max) ? fabsf(e) : 0.f;
  return (e > 0.f && x > t_min) ? fabsf(e) : 0.f;
}

// Stable descending priority order: a before b.
VQ_HD bool before(float pa, long a, float pb, long b) { return pa > pb || (pa == pb && a < b); }

}  // namespace vquant
