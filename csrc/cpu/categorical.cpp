// Categorical sampling on the CPU: one row per task, rows split across threads.
// The algorithm (and the reason every weight and sum is float64) is defined in
// fluid_ops/reference/categorical.py; the steps below carry its numbers.
#include "categorical.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../common/dispatch.h"
#include "../common/half.h"
#include "../common/parallel.h"

namespace fluid {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Scratch space of one thread, reused for all of its rows.
struct RowScratch {
  std::vector<float> s;                     // scaled logits
  std::vector<double> w;                    // weights exp(s)
  std::vector<float> sel;                   // nth_element buffer for top-k
  std::vector<std::pair<float, double>> kw;  // (s, w) of the top-k survivors, for top-p
  std::vector<std::pair<float, double>> tmp;  // radix sort buffer
  explicit RowScratch(int64_t v) : s(v), w(v) {}
};

// Orders kw[begin, end) by decreasing s with an LSD radix sort (3 passes of 11 bits). Every s
// is <= 0 (max subtracted) and not NaN, so decreasing s is increasing |s|, whose float bits
// sort as unsigned integers; -0 and +0 share the key 0 (equal s, equal w: any order is fine).
void radix_sort_desc(std::vector<std::pair<float, double>>& kw, size_t begin, size_t end,
                     std::vector<std::pair<float, double>>& tmp) {
  const size_t n = end - begin;
  tmp.resize(n);
  auto key = [](float s) {
    uint32_t b;
    std::memcpy(&b, &s, 4);
    return b & 0x7fffffffu;
  };
  std::pair<float, double>* src = kw.data() + begin;
  std::pair<float, double>* dst = tmp.data();
  bool in_tmp = false;
  for (int shift = 0; shift < 33; shift += 11) {
    size_t count[2048] = {0};
    for (size_t i = 0; i < n; ++i) ++count[(key(src[i].first) >> shift) & 2047u];
    if (count[(key(src[0].first) >> shift) & 2047u] == n) continue;  // one digit: pass not needed
    size_t sum = 0;
    for (size_t& c : count) { const size_t t = c; c = sum; sum += t; }
    for (size_t i = 0; i < n; ++i) dst[count[(key(src[i].first) >> shift) & 2047u]++] = src[i];
    std::swap(src, dst);
    in_tmp = !in_tmp;
  }
  if (in_tmp) std::copy(tmp.begin(), tmp.begin() + n, kw.begin() + begin);
}

// Step 6: t_p for top-p over the tokens with s >= thr (fills their weights w). Sorts only as
// much of the descending order as it needs: the best `chunk` survivors are selected with
// nth_element and sorted, the running sum continues over them, and the chunk doubles until the
// sum reaches p * Z1. More than 2048 survivors are radix sorted in one go instead.
float top_p_threshold(RowScratch& sc, int64_t v, float thr, double p) {
  auto& kw = sc.kw;
  kw.clear();
  double z1 = 0.0;  // index order, as the reference's cumsum
  for (int64_t i = 0; i < v; ++i) {
    if (sc.s[i] >= thr) {
      sc.w[i] = std::exp(static_cast<double>(sc.s[i]));
      z1 += sc.w[i];
      kw.emplace_back(sc.s[i], sc.w[i]);
    }
  }
  const double target = p * z1;
  auto desc = [](const std::pair<float, double>& a, const std::pair<float, double>& b) {
    return a.first > b.first;
  };
  const size_t n = kw.size();
  size_t begin = 0, chunk = 32;
  double c = 0.0;
  while (begin < n) {
    size_t end = std::min(n, begin + chunk);
    if (n - begin > 2048) {  // radix beats rounds of nth_element over thousands of tokens
      radix_sort_desc(kw, begin, n, sc.tmp);
      end = n;
    } else {
      if (end < n) std::nth_element(kw.begin() + begin, kw.begin() + end, kw.end(), desc);
      std::sort(kw.begin() + begin, kw.begin() + end, desc);
    }
    for (size_t j = begin; j < end; ++j) {
      c += kw[j].second;
      if (c >= target) return std::max(thr, kw[j].first);
    }
    begin = end;
    chunk *= 2;
  }
  return thr;  // rounding kept the sum below p * Z1: keep every top-k survivor
}

template <typename T>
int64_t sample_row(const T* row, int64_t v, float temp, int64_t top_k, double top_p, double u,
                   RowScratch& sc) {
  // Steps 1-2: load as float32, max (first index among equal maxima).
  float m = load_f32(row, 0);
  int64_t arg = 0;
  bool bad = std::isnan(m);
  for (int64_t i = 0; i < v; ++i) {
    const float x = load_f32(row, i);
    sc.s[i] = x;
    if (x > m) { m = x; arg = i; }
    bad |= std::isnan(x);
  }
  FLUID_CHECK(!bad && std::isfinite(m),
              "each row of logits needs finite values or -inf and at least one finite value");
  if (temp == 0.0f) return arg;
  // Step 3: scale. The weights of step 4 are computed only for tokens that survive top-k.
  for (int64_t i = 0; i < v; ++i) sc.s[i] = (sc.s[i] - m) / temp;
  // Step 5: top-k threshold, the k-th largest s.
  float thr = kNegInf;
  if (top_k > 0 && top_k < v) {
    sc.sel.assign(sc.s.begin(), sc.s.begin() + v);
    std::nth_element(sc.sel.begin(), sc.sel.begin() + (top_k - 1), sc.sel.end(),
                     [](float a, float b) { return a > b; });
    thr = sc.sel[top_k - 1];
  }
  // Step 6: top-p threshold.
  const bool weighed = top_p < 1.0;  // top-p filled w over the top-k survivors, a superset
  if (weighed) thr = top_p_threshold(sc, v, thr, top_p);
  // Step 7: inverse CDF in index order over the kept tokens.
  double z = 0.0;
  int64_t last_positive = arg;
  for (int64_t i = 0; i < v; ++i) {
    if (sc.s[i] >= thr) {
      if (!weighed) sc.w[i] = std::exp(static_cast<double>(sc.s[i]));
      z += sc.w[i];
      if (sc.w[i] > 0.0) last_positive = i;
    }
  }
  const double target = u * z;
  double c = 0.0;
  for (int64_t i = 0; i < v; ++i) {
    if (sc.s[i] >= thr) {
      c += sc.w[i];
      if (c > target) return i;
    }
  }
  return last_positive;
}

}  // namespace

void sample_categorical(const TensorView& logits, const TensorView& uniform, double temperature,
                        int64_t top_k, double top_p, const TensorView& out, int nthreads) {
  FLUID_CHECK(logits.ndim == 2, "logits must be 2-D (N, V)");
  const int64_t n = logits.size(0), v = logits.size(1);
  FLUID_CHECK(v >= 1, "logits must have at least one category");
  FLUID_CHECK(uniform.ndim == 1 && uniform.size(0) == n, "uniform must be (N,)");
  FLUID_CHECK(out.ndim == 1 && out.size(0) == n, "out must be (N,)");
  check_float(logits, "logits");
  check_dtype(uniform, DType::F64, "uniform");
  check_dtype(out, DType::I64, "out");
  check_contiguous(logits, "logits");
  check_contiguous(uniform, "uniform");
  check_contiguous(out, "out");
  // (beyond float32's range, T would round to inf and -inf / inf would put NaN into the sort)
  FLUID_CHECK(temperature >= 0.0 && temperature <= std::numeric_limits<float>::max(),
              "temperature must be in [0, float32 max]");
  FLUID_CHECK(top_k >= 0 && top_k <= v, "top_k must be in [0, V] (0: none)");
  FLUID_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1]");
  // The reference rounds T to float32 first; a T that rounds to 0 means argmax.
  const float temp = static_cast<float>(temperature);
  const double* up = uniform.ptr<double>();
  int64_t* op = out.ptr<int64_t>();
  FLUID_DISPATCH_FLOAT(logits.dtype, TL, {
    const TL* lp = logits.ptr<TL>();
    parallel_for(n, nthreads, [&](int64_t r0, int64_t r1) {
      RowScratch sc(v);
      for (int64_t r = r0; r < r1; ++r) {
        const double u = up[r];
        FLUID_CHECK(u >= 0.0 && u < 1.0, "uniform values must be in [0, 1)");
        op[r] = sample_row(lp + r * v, v, temp, top_k, top_p, u, sc);
      }
    });
  });
}

}  // namespace cpu
}  // namespace fluid
