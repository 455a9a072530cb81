// SQuant rounding on the CPU (docs/kernels.md): one output channel at a time, the K-level and
// the C-level of a channel only touch that channel.
//
// - Element pass: round half to even without a library call (squant_common.h), vectorized.
// - K-level, per kernel of K elements: the flips and the boundary need only the first
//   max(k, pos + 1) places of the stable descending order, and k <= K/2 (every initial error is
//   at most 1/2): a selection of that many maxima, no index vector, no sort; a full sort only
//   for the one case that wants the last place (an error sum of exactly 0).
// - C-level: after a K-level only the boundary elements have a priority (at most one per
//   kernel), without one only the candidates of the chosen direction: the k first places are
//   a partial sort of that short list, then the zero priorities in index order.
// - squant_weight also computes the affine codes and dequantizes in the same pass per channel.
// - Work split: channels are handed out in small chunks from an atomic counter; the calling
//   thread works too and waits only for chunks a helper has started, so a helper that does not
//   get a core (a busy machine) costs at most one chunk, not its whole static share.
// No trapping math: lets the compiler turn the selects of the element loops into vector blends
// (it changes no result: there is no reassociation, no fused multiply-add, -ffp-contract=off).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "squant_common.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace vquant {
namespace {

struct Pick {
  float p;
  long i;
};

// Stable descending priority order.
inline bool pick_before(const Pick& a, const Pick& b) { return before(a.p, a.i, b.p, b.i); }

struct Limits {
  float t_min, t_max;
};

// Priority of an element (initial error e, code x) in direction `up`: the initial priority,
// |e| for a candidate, else 0 (a select, not a branch: candidates come at random).
inline float priority(float e, float x, bool up, Limits t) {
  const float toward = up ? -e : e;
  const bool inside = up ? x < t.t_max : x > t.t_min;
  return (toward > 0.f && inside) ? toward : 0.f;
}

// What a K-level leaves for the C-level of its kernel: the boundary element (index in the
// row), its priority and direction.
struct Mark {
  long i;
  float value;
  bool up;
};

struct Scratch {
  std::vector<float> x, error, prio, down_prio;
  std::vector<double> sums;
  std::vector<long> order;
  std::vector<Mark> marks;
  std::vector<Pick> picks;
};

struct Decision {
  bool up, over;
  long k_full, k, pos;
};

// The flip decision of a group of `len` elements with error sum s (docs/quantization-rules.md).
inline Decision decide(double s, long len) {
  Decision d;
  d.up = s < 0.0;
  const double abs_s = std::fabs(s);
  const double k_real = round_half_even_nonneg(abs_s);
  d.over = k_real >= abs_s;
  d.k_full = static_cast<long>(k_real);
  d.k = std::min(d.k_full, len);
  const long pos = d.over ? d.k_full - 1 : d.k_full;  // -1 wraps to the last; no division here
  d.pos = pos < 0 ? len - 1 : (pos < len ? pos : pos % len);
  return d;
}

// K-level on one kernel [0, len) of codes x with numbers/errors (updated in place), error sum
// s, and the initial priorities of both directions; `mark` receives the boundary (index
// relative to the kernel).
template <long Fixed>
void k_level_group(const float* x, float* number, float* error, const float* up_prio, const float* down_prio,
                     long len_arg, double s, Limits t, Mark& mark, Scratch& ws) {
  const long len = Fixed > 0 ? Fixed : len_arg;
  const Decision d = decide(s, len);
  const float* prio = d.up ? up_prio : down_prio;
  const long need = std::max(d.k, d.pos + 1);
  long picked[8];
  const long* order = picked;
  if (Fixed > 0 && Fixed <= 32 && need <= 8) {
    // `need` rounds of "first maximum among the rest" (a taken one gets -1, below all: p >= 0).
    float p[Fixed > 0 ? Fixed : 1];
    for (long i = 0; i < len; ++i) p[i] = prio[i];
    for (long j = 0; j < need; ++j) {
      float m = p[0];
      for (long i = 1; i < len; ++i) m = std::max(m, p[i]);
      uint32_t at = 0;  // bit i: p[i] is the maximum; the lowest such i wins the tie
      for (long i = 0; i < len; ++i) at |= static_cast<uint32_t>(p[i] == m) << i;
      const long i = __builtin_ctz(at);
      picked[j] = i;
      p[i] = -1.f;
    }
  } else {  // the last place (error sum exactly 0), a long kernel: a sort
    ws.order.resize(len);
    for (long i = 0; i < len; ++i) ws.order[i] = i;
    if (need < len)
      std::partial_sort(ws.order.begin(), ws.order.begin() + need, ws.order.end(),
                        [prio](long a, long b) { return before(prio[a], a, prio[b], b); });
    else
      std::sort(ws.order.begin(), ws.order.end(), [prio](long a, long b) { return before(prio[a], a, prio[b], b); });
    order = ws.order.data();
  }
  const long boundary = order[d.pos];
  for (long j = 0; j < d.k; ++j) {
    const long i = order[j];
    const Element e = flip_target(x[i], d.up, t.t_min, t.t_max);
    number[i] = e.number;
    error[i] = e.error;
  }
  mark = Mark{boundary, std::fabs(error[boundary]), d.up != d.over};
}

// The C-level of one row: flips the first k places of the stable order of `picks` (the
// positive priorities of direction up, ascending index), then zero priorities by index.
void c_level_row(const float* x, float* number, long row, double s, Pick* picks, long count, Limits t) {
  const Decision d = decide(s, row);
  long k = d.k;
  if (k == 0) return;
  auto flip = [&](long i) { number[i] = flip_target(x[i], d.up, t.t_min, t.t_max).number; };
  if (count >= k) {
    std::partial_sort(picks, picks + k, picks + count, pick_before);
    for (long j = 0; j < k; ++j) flip(picks[j].i);
    return;
  }
  for (long j = 0; j < count; ++j) flip(picks[j].i);  // all positive ones, then the first zeros by index
  k -= count;
  long next_positive = 0;
  for (long i = 0; i < row && k > 0; ++i) {
    if (next_positive < count && picks[next_positive].i == i) {
      ++next_positive;
      continue;
    }
    flip(i);
    --k;
  }
}

// Sum of a row's errors in double, four partial sums (the additions overlap). Any order gives
// the same decisions: the float errors add up exactly in double (as the reference assumes too).
double error_sum(const float* error, long row) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  long i = 0;
  for (; i + 4 <= row; i += 4)
    for (int j = 0; j < 4; ++j) acc[j] += static_cast<double>(error[i + j]);
  for (; i < row; ++i) acc[0] += static_cast<double>(error[i]);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

constexpr long kSmallK = 32;  // up to this many C-level flips: a scan with a short sorted list

// SQuant rounding of one channel: codes x[row] -> number[row] (clamped).
void round_channel(const float* x, float* number, long ic, long ks, Limits t, bool run_k, bool c_level,
                   Scratch& ws) {
  const long row = ic * ks;
  float* error = ws.error.data();
  for (long i = 0; i < row; ++i) {
    const float r = round_half_even(x[i]);
    number[i] = r;
    error[i] = r - x[i];
  }
  if (run_k || c_level) {
    double total = 0.0;
    Pick* picks = ws.picks.data();
    long count = 0;
    if (run_k) {
      double* sums = ws.sums.data();  // in a loop of their own: the groups' additions overlap
      for (long g = 0; g < ic; ++g) {
        double s = 0.0;
        for (long i = g * ks; i < (g + 1) * ks; ++i) s += static_cast<double>(error[i]);
        sums[g] = s;
      }
      float* up_prio = ws.prio.data();  // both directions' priorities, in loops that vectorize
      float* down_prio = ws.down_prio.data();
      for (long i = 0; i < row; ++i) up_prio[i] = priority(error[i], x[i], true, t);
      for (long i = 0; i < row; ++i) down_prio[i] = priority(error[i], x[i], false, t);
      for (long g = 0; g < ic; ++g) {
        const long o = g * ks;
        Mark m;
        const double s = sums[g];
        switch (ks) {  // the usual kernel sizes get unrolled loops
          case 9: k_level_group<9>(x + o, number + o, error + o, up_prio + o, down_prio + o, ks, s, t, m, ws); break;
          case 3: k_level_group<3>(x + o, number + o, error + o, up_prio + o, down_prio + o, ks, s, t, m, ws); break;
          case 5: k_level_group<5>(x + o, number + o, error + o, up_prio + o, down_prio + o, ks, s, t, m, ws); break;
          case 7: k_level_group<7>(x + o, number + o, error + o, up_prio + o, down_prio + o, ks, s, t, m, ws); break;
          case 25: k_level_group<25>(x + o, number + o, error + o, up_prio + o, down_prio + o, ks, s, t, m, ws); break;
          default: k_level_group<0>(x + o, number + o, error + o, up_prio + o, down_prio + o, ks, s, t, m, ws);
        }
        ws.marks[g] = Mark{o + m.i, m.value, m.up};
      }
      if (c_level) {
        total = error_sum(error, row);
        const bool up = total < 0.0;
        for (long g = 0; g < ic; ++g)
          if (ws.marks[g].up == up && ws.marks[g].value > 0.f) picks[count++] = Pick{ws.marks[g].value, ws.marks[g].i};
      }
    } else {
      total = error_sum(error, row);
      const Decision d = decide(total, row);
      if (d.k > 0 && d.k <= kSmallK) {  // the k first places, kept while scanning in index order
        float* prio = ws.prio.data();  // first all priorities (a loop that vectorizes), then the scan
        if (d.up) {
          for (long j = 0; j < row; ++j) prio[j] = priority(error[j], x[j], true, t);
        } else {
          for (long j = 0; j < row; ++j) prio[j] = priority(error[j], x[j], false, t);
        }
        float enter = 0.f;  // a priority enters when above this (the last place's, once full)
        for (long j = 0; j < row; ++j) {
          const float p = prio[j];
          if (p > enter) {  // rare once full: the branch is predicted
            long place = count < d.k ? count++ : d.k - 1;
            for (; place > 0 && picks[place - 1].p < p; --place) picks[place] = picks[place - 1];
            picks[place] = Pick{p, j};
            if (count == d.k) enter = picks[d.k - 1].p;
          }
        }
        if (count < d.k) std::sort(picks, picks + count, [](const Pick& a, const Pick& b) { return a.i < b.i; });
      } else if (d.k > 0) {
        for (long j = 0; j < row; ++j) {  // no branch: half of the elements are candidates, at random
          const float p = priority(error[j], x[j], d.up, t);
          picks[count] = Pick{p, j};
          count += p > 0.f;
        }
      }
    }
    if (c_level) c_level_row(x, number, row, total, picks, count, t);
  }
  for (long i = 0; i < row; ++i) number[i] = std::min(std::max(number[i], t.t_min), t.t_max);
}

// Runs body(begin, end, scratch) over channel chunks of [0, oc) on the calling thread and up to
// at::get_num_threads() - 1 helpers (ATen's inter-op pool); returns when every chunk is done.
// A helper only touches the caller's data after claiming a chunk, and the caller waits for
// every helper that may hold one, so a helper that starts late (a busy machine) finds no work.
struct Shared {
  std::atomic<long> next{0};
  std::atomic<int> active{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
};

template <typename Body>
void for_channels(long oc, long row, long ic, const Body& body) {
  constexpr long kChunkElements = 16384;  // tens of microseconds of work
  const long chunk = std::max(1L, kChunkElements / std::max(row, 1L));
  const long chunks = (oc + chunk - 1) / chunk;
  // Helpers only for layers of 8 chunks or more: for less, waking one costs about what it saves.
  constexpr long kMinChunks = 8;
  const long helpers = (at::in_parallel_region() || chunks < kMinChunks) ? 0 : std::min<long>(at::get_num_threads(), chunks / 4) - 1;
  std::vector<Scratch> slots(std::max(helpers, 0L) + 1);  // one per participating thread
  for (auto& ws : slots) {
    ws.error.resize(row);
    ws.prio.resize(row);
    ws.down_prio.resize(row);
    ws.marks.resize(ic);
    ws.sums.resize(ic);
    ws.picks.resize(row);
  }
  if (helpers <= 0) {
    body(0, oc, slots[0]);
    return;
  }
  auto state = std::make_shared<Shared>();
  const std::function<void(Scratch&)> run = [&](Scratch& ws) {
    for (long c = state->next.fetch_add(1); c < chunks; c = state->next.fetch_add(1))
      body(c * chunk, std::min(oc, (c + 1) * chunk), ws);
  };
  for (long h = 1; h <= helpers; ++h) {
    at::launch([st = state, fn = &run, ws = &slots[h], chunks] {
      st->active.fetch_add(1);
      // A chunk can be claimed only before the caller saw the counter run out, and then the
      // caller waits for `active` to drop to 0: `fn` and `ws` are alive whenever used here.
      if (st->next.load() < chunks) {
        try {
          (*fn)(*ws);
        } catch (...) {
          if (!st->failed.exchange(true)) st->error = std::current_exception();
        }
      }
      st->active.fetch_sub(1);
    });
  }
  try {
    run(slots[0]);
  } catch (...) {
    if (!state->failed.exchange(true)) state->error = std::current_exception();
    state->next.store(chunks);  // the helpers stop at their next claim
  }
  while (state->active.load() != 0) std::this_thread::yield();
  if (state->failed.load()) std::rethrow_exception(state->error);
}

// Minimum and maximum of w[0, n); false when w holds a NaN or an infinity.
bool channel_range(const float* w, long n, float& lo, float& hi) {
  long i = 0;
  float lo_s = w[0], hi_s = w[0];
  bool finite = true;
#if defined(__SSE2__)
  if (n >= 4) {
    __m128 vlo = _mm_loadu_ps(w), vhi = vlo, vnan = _mm_setzero_ps();
    const __m128 zero = _mm_setzero_ps();
    for (; i + 4 <= n; i += 4) {
      const __m128 v = _mm_loadu_ps(w + i);
      vlo = _mm_min_ps(vlo, v);
      vhi = _mm_max_ps(vhi, v);
      vnan = _mm_add_ps(vnan, _mm_mul_ps(v, zero));  // NaN from then on if v is NaN or infinite
    }
    alignas(16) float l[4], h[4], z[4];
    _mm_store_ps(l, vlo);
    _mm_store_ps(h, vhi);
    _mm_store_ps(z, vnan);
    for (int j = 0; j < 4; ++j) {
      lo_s = std::min(lo_s, l[j]);
      hi_s = std::max(hi_s, h[j]);
      finite = finite && z[j] == 0.f;
    }
  }
#endif
  for (; i < n; ++i) {
    lo_s = std::min(lo_s, w[i]);
    hi_s = std::max(hi_s, w[i]);
    finite = finite && std::isfinite(w[i]);
  }
  lo = lo_s;
  hi = hi_s;
  return finite && std::isfinite(w[0]);
}

void check_codes(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "vquant::", op, " (CPU): ", what, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "vquant::", op, ": ", what, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3, "vquant::", op, ": ", what, " must be [OC, IC, K], got ", t.dim(), " dims");
}

}  // namespace

// codes: [OC, IC, K] float32. Returns the rounded codes clamped to [-n, n-1].
at::Tensor squant_round_cpu(const at::Tensor& codes, int64_t bits, bool k_level, bool c_level) {
  check_codes(codes, "squant_round", "codes");
  TORCH_CHECK(bits >= 1 && bits <= 16, "vquant::squant_round: bits must lie in 1..16, got ", bits);
  auto x_t = codes.contiguous();
  const long oc = x_t.size(0), ic = x_t.size(1), ks = x_t.size(2), row = ic * ks;
  auto out = at::empty_like(x_t);
  if (x_t.numel() == 0) return out;
  const float n = static_cast<float>(1L << (bits - 1));
  const Limits t{-n, n - 1.f};
  const float* x_all = x_t.data_ptr<float>();
  float* out_all = out.data_ptr<float>();
  const bool run_k = k_level && ks > 1;
  for_channels(oc, row, ic, [&](long begin, long end, Scratch& ws) {
    for (long c = begin; c < end; ++c) round_channel(x_all + c * row, out_all + c * row, ic, ks, t, run_k, c_level, ws);
  });
  return out;
}

// weight: [OC, IC, K] float32. Per output channel: the affine codes of vquant_pl.ops.affine
// (scale = (2^b - 1) / max(hi - lo, 1e-8), zero point round(scale * lo) + 2^(b-1),
// codes scale * w - zero point), SQuant rounding, dequantization (q + zero point) / scale.
at::Tensor squant_weight_cpu(const at::Tensor& weight, int64_t bits, bool k_level, bool c_level) {
  check_codes(weight, "squant_weight", "weight");
  TORCH_CHECK(bits >= 1 && bits <= 16, "vquant::squant_weight: bits must lie in 1..16, got ", bits);
  auto w_t = weight.contiguous();
  const long oc = w_t.size(0), ic = w_t.size(1), ks = w_t.size(2), row = ic * ks;
  auto out = at::empty_like(w_t);
  if (w_t.numel() == 0) return out;
  const float n = static_cast<float>(1L << (bits - 1));
  const float levels = static_cast<float>((1L << bits) - 1);
  const Limits t{-n, n - 1.f};
  const float* w_all = w_t.data_ptr<float>();
  float* out_all = out.data_ptr<float>();
  const bool run_k = k_level && ks > 1;
  for_channels(oc, row, ic, [&](long begin, long end, Scratch& ws) {
    ws.x.resize(row);
    float* x = ws.x.data();
    for (long c = begin; c < end; ++c) {
      const float* w = w_all + c * row;
      float* q = out_all + c * row;
      float lo, hi;
      TORCH_CHECK_VALUE(channel_range(w, row, lo, hi), "weight holds NaN or infinite values (output channel ", c,
                        ", in vquant::squant_weight)");
      const float scale = levels / std::max(hi - lo, 1e-8f);
      const float zero_point = round_half_even(scale * lo) + n;
      for (long i = 0; i < row; ++i) x[i] = scale * w[i] - zero_point;
      round_channel(x, q, ic, ks, t, run_k, c_level, ws);
      for (long i = 0; i < row; ++i) q[i] = (q[i] + zero_point) / scale;
    }
  });
  return out;
}

}  // namespace vquant
