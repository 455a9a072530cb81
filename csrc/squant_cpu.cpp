// SQuant rounding on the CPU: one task per output channel (ATen parallel_for); the
// K-level and the C-level of a channel only touch that channel, so nothing is shared.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "squant_common.h"

namespace vquant {
namespace {

struct Workspace {
  std::vector<float> up_prio, down_prio;
  std::vector<long> order;
};

// One level on the group [begin, begin + len) of a channel; when `mark`, clear the
// group's priorities and set the boundary element's (K-level).
void flip_group(const float* x, float* number, float* error, float* up_prio, float* down_prio,
                long len, float t_min, float t_max, bool mark, std::vector<long>& order) {
  double s = 0.0;
  for (long i = 0; i < len; ++i) s += static_cast<double>(error[i]);
  const bool go_up = s < 0.0;
  const double abs_s = std::fabs(s);
  const double k_real = std::nearbyint(abs_s);
  const bool over = k_real >= abs_s;
  const long k_full = static_cast<long>(k_real);
  const long k = std::min(k_full, len);
  const float* prio = go_up ? up_prio : down_prio;
  auto cmp = [prio](long a, long b) { return before(prio[a], a, prio[b], b); };

  // Boundary position in the stable order: k-1 when overshooting (-1 wraps to the last), else k.
  const long pos = (((over ? k_full - 1 : k_full) % len) + len) % len;
  const long need = mark ? std::max(k, pos + 1) : k;  // the C-level needs no boundary
  order.resize(len);
  std::iota(order.begin(), order.end(), 0L);
  std::partial_sort(order.begin(), order.begin() + need, order.end(), cmp);
  for (long j = 0; j < k; ++j) {
    const long i = order[j];
    const Element t = flip_target(x[i], go_up, t_min, t_max);
    number[i] = t.number;
    error[i] = t.error;
  }
  if (!mark) return;
  const long b = order[pos];
  const float value = std::fabs(error[b]);
  std::fill(up_prio, up_prio + len, 0.f);
  std::fill(down_prio, down_prio + len, 0.f);
  (go_up != over ? up_prio : down_prio)[b] = value;
}

}  // namespace

// codes: [OC, IC, K] float32, contiguous. Returns the rounded codes clamped to [-n, n-1].
at::Tensor squant_round_cpu(const at::Tensor& codes, int64_t bits, bool k_level, bool c_level) {
  TORCH_CHECK(codes.device().is_cpu(), "vquant::squant_round (CPU): codes must be on the CPU, got ", codes.device());
  TORCH_CHECK(codes.scalar_type() == at::kFloat, "vquant::squant_round: codes must be float32, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 3, "vquant::squant_round: codes must be [OC, IC, K], got ", codes.dim(), " dims");
  TORCH_CHECK(bits >= 1 && bits <= 16, "vquant::squant_round: bits must lie in 1..16, got ", bits);
  auto x_t = codes.contiguous();
  const long oc = x_t.size(0), ic = x_t.size(1), ks = x_t.size(2), row = ic * ks;
  auto out = at::empty_like(x_t);
  const float n = static_cast<float>(1L << (bits - 1));
  const float t_min = -n, t_max = n - 1.f;
  const float* x_all = x_t.data_ptr<float>();
  float* out_all = out.data_ptr<float>();
  const bool run_k = k_level && ks > 1;

  at::parallel_for(0, oc, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> error(row), up_prio(row), down_prio(row);
    std::vector<long> order;
    for (int64_t c = begin; c < end; ++c) {
      const float* x = x_all + c * row;
      float* number = out_all + c * row;
      for (long i = 0; i < row; ++i) {
        number[i] = round_half_even(x[i]);
        error[i] = number[i] - x[i];
        up_prio[i] = initial_priority(x[i], true, t_min, t_max);
        down_prio[i] = initial_priority(x[i], false, t_min, t_max);
      }
      if (run_k) {
        for (long g = 0; g < ic; ++g) {
          const long o = g * ks;
          flip_group(x + o, number + o, error.data() + o, up_prio.data() + o, down_prio.data() + o,
                     ks, t_min, t_max, true, order);
        }
      }
      if (c_level) {
        flip_group(x, number, error.data(), up_prio.data(), down_prio.data(), row, t_min, t_max,
                   false, order);
      }
      for (long i = 0; i < row; ++i) number[i] = std::min(std::max(number[i], t_min), t_max);
    }
  });
  return out;
}

}  // namespace vquant
