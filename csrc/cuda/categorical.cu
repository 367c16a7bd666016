// Categorical sampling with temperature, top-k and top-p on the GPU (docs/contracts.md §2.4).
//
// The algorithm, tie rules included, is defined in fluid_ops/reference/categorical.py; the step
// numbers below are its numbers. One thread block per row; the row is re-read from global
// memory (L2) on every pass instead of being sorted:
//  * s_i = (x_i - m) / T in float32 with IEEE division, so s is bit-identical to the reference's;
//    every s <= 0, so the integer bits of |s| order the tokens (larger s = smaller bits) and a
//    threshold "s >= t" is "bits(|s|) <= bits(|t|)".
//  * top-k: the k-th largest s is the smallest bit pattern A with #{bits <= A} >= k, found by
//    bisection over [0, bits(+inf)] (at most 31 passes, each a block-wide count). Ties at the
//    threshold are all kept, as in the reference.
//  * top-p: the smallest A <= top-k threshold whose kept weight sum reaches p * Z1, by the same
//    bisection over float64 sums. The mass only steps up at bit patterns present in the row, so
//    A is the |s| of a token: the reference's sort-and-cumsum cut, ties of the last one kept.
//  * the inverse CDF walks the row in index order, chunk by chunk, with a block-wide inclusive
//    scan of the float64 weights; Z is the total of the same scan, so C_{V-1} == Z exactly.
// Weights and sums are float64 as in the reference; only the order of the float64 sums differs,
// so indices agree unless a uniform (or the top-p target) lies within ~1e-15 of a boundary.
// exp(double) is libdevice's, as in the Triton backend.
//
// One kernel for every dtype (a runtime dtype switch on the load): one instantiation keeps the
// build small; the kernel is bound by its passes over the row, not by the switch.
#include <cfloat>
#include <climits>
#include <cmath>

#include "common.cuh"
#include "categorical.h"

namespace fluid {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kInfBits = 0x7f800000;  // bits of +inf: a threshold that keeps every token

struct Shared {
  double d[kWarps];
  int64_t i[kWarps];
  float f[kWarps];
  double scalar;
};

// Block-wide sum; every thread gets the same value (warp totals summed in one fixed order).
__device__ double block_sum(double v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // the previous reader of sh.d is done
  if ((threadIdx.x & 31) == 0) sh.d[threadIdx.x >> 5] = v;
  __syncthreads();
  double t = 0.0;
  for (int w = 0; w < kWarps; ++w) t += sh.d[w];
  return t;
}

__device__ int64_t block_count(int64_t v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh.i[threadIdx.x >> 5] = v;
  __syncthreads();
  int64_t t = 0;
  for (int w = 0; w < kWarps; ++w) t += sh.i[w];
  return t;
}

__device__ int64_t block_min_i64(int64_t v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, v, o)));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh.i[threadIdx.x >> 5] = v;
  __syncthreads();
  int64_t t = sh.i[0];
  for (int w = 1; w < kWarps; ++w) t = min(t, sh.i[w]);
  return t;
}

__device__ int64_t block_max_i64(int64_t v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, v, o)));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh.i[threadIdx.x >> 5] = v;
  __syncthreads();
  int64_t t = sh.i[0];
  for (int w = 1; w < kWarps; ++w) t = max(t, sh.i[w]);
  return t;
}

// (max, first index of the max) over the block.
__device__ void block_argmax(float& m, int64_t& arg, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, m, o);
    const int64_t oa = __shfl_xor_sync(0xffffffffu, arg, o);
    if (om > m || (om == m && oa < arg)) { m = om; arg = oa; }
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) { sh.f[threadIdx.x >> 5] = m; sh.i[threadIdx.x >> 5] = arg; }
  __syncthreads();
  m = sh.f[0];
  arg = sh.i[0];
  for (int w = 1; w < kWarps; ++w) {
    if (sh.f[w] > m || (sh.f[w] == m && sh.i[w] < arg)) { m = sh.f[w]; arg = sh.i[w]; }
  }
}

// Inclusive scan of v over the block (thread order); *total gets the last element's value.
__device__ double block_inclusive_scan(double v, Shared& sh, double* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const double up = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += up;
  }
  __syncthreads();
  if (lane == 31) sh.d[warp] = v;
  __syncthreads();
  double offset = 0.0;
  for (int w = 0; w < warp; ++w) offset += sh.d[w];
  v += offset;
  if (threadIdx.x == kThreads - 1) sh.scalar = v;
  __syncthreads();
  *total = sh.scalar;
  return v;
}

struct Row {
  const void* base;
  DType dt;
  int64_t v;
  float m, temp;

  // Step 3: s = (x - m) / T in float32, IEEE division.
  __device__ float s(int64_t i) const { return __fdiv_rn(load_as_f32(base, dt, i) - m, temp); }
  __device__ static int bits(float s) { return __float_as_int(s) & 0x7fffffff; }
};

// Number of tokens with bits(|s|) <= bound.
__device__ int64_t count_below(const Row& row, int bound, Shared& sh) {
  int64_t c = 0;
  for (int64_t i = threadIdx.x; i < row.v; i += kThreads) c += Row::bits(row.s(i)) <= bound;
  return block_count(c, sh);
}

// Step 4: float64 weight sum of the tokens with bits(|s|) <= bound.
__device__ double mass_below(const Row& row, int bound, Shared& sh) {
  double c = 0.0;
  for (int64_t i = threadIdx.x; i < row.v; i += kThreads) {
    const float s = row.s(i);
    if (Row::bits(s) <= bound) c += exp(static_cast<double>(s));
  }
  return block_sum(c, sh);
}

__global__ void __launch_bounds__(kThreads)
categorical_kernel(const void* __restrict__ logits, DType dt, int64_t stride_row, int64_t v,
                   const double* __restrict__ uniform, float temp, int64_t top_k, double top_p,
                   int64_t* __restrict__ out) {
  __shared__ Shared sh;
  const int64_t r = blockIdx.x;
  const char* base = static_cast<const char*>(logits);
  const int esize = dt == DType::F32 ? 4 : 2;
  Row row{base + r * stride_row * esize, dt, v, 0.0f, temp};

  // Steps 1-2: max and its first index.
  float m = -INFINITY;
  int64_t arg = LLONG_MAX;
  for (int64_t i = threadIdx.x; i < v; i += kThreads) {
    const float x = load_as_f32(row.base, dt, i);
    // a thread's indices increase: strict > keeps the first of equal maxima
    if (x > m || arg == LLONG_MAX) { m = x; arg = i; }
  }
  block_argmax(m, arg, sh);
  if (temp == 0.0f) {
    if (threadIdx.x == 0) out[r] = arg;
    return;
  }
  row.m = m;

  // Step 5: top-k threshold.
  int thr = kInfBits;
  if (top_k > 0 && top_k < v) {
    int lo = 0, hi = kInfBits;
    while (lo < hi) {  // lo, hi are block-uniform
      const int mid = lo + (hi - lo) / 2;
      if (count_below(row, mid, sh) >= top_k) hi = mid; else lo = mid + 1;
    }
    thr = hi;
  }
  // Step 6: top-p threshold within the top-k survivors.
  if (top_p < 1.0) {
    const double target = top_p * mass_below(row, thr, sh);
    int lo = 0, hi = thr;
    while (lo < hi) {
      const int mid = lo + (hi - lo) / 2;
      if (mass_below(row, mid, sh) >= target) hi = mid; else lo = mid + 1;
    }
    thr = hi;  // if rounding kept every partial sum below the target: hi stayed thr (K2 = K1)
  }

  // Step 7: inverse CDF in index order over the kept tokens.
  double z = 0.0, chunk = 0.0;
  int64_t last_pos = -1;
  for (int64_t c0 = 0; c0 < v; c0 += kThreads) {
    const int64_t i = c0 + threadIdx.x;
    double w = 0.0;
    if (i < v) {
      const float s = row.s(i);
      if (Row::bits(s) <= thr) w = exp(static_cast<double>(s));
    }
    if (w > 0.0) last_pos = i;
    block_inclusive_scan(w, sh, &chunk);
    z += chunk;
  }
  last_pos = block_max_i64(last_pos, sh);
  const double target = uniform[r] * z;
  double running = 0.0;
  int64_t pick = LLONG_MAX;
  for (int64_t c0 = 0; c0 < v && pick == LLONG_MAX; c0 += kThreads) {
    const int64_t i = c0 + threadIdx.x;
    double w = 0.0;
    if (i < v) {
      const float s = row.s(i);
      if (Row::bits(s) <= thr) w = exp(static_cast<double>(s));
    }
    const double cdf = running + block_inclusive_scan(w, sh, &chunk);
    pick = block_min_i64(i < v && cdf > target ? i : LLONG_MAX, sh);
    running += chunk;
  }
  // rounding can leave u * Z at Z: then the last kept token with weight
  if (threadIdx.x == 0) out[r] = pick != LLONG_MAX ? pick : last_pos;
}

}  // namespace

void sample_categorical(const TensorView& logits, const TensorView& uniform, double temperature,
                        int64_t top_k, double top_p, const TensorView& out, uintptr_t stream) {
  FLUID_CHECK(logits.ndim == 2, "logits must be 2-D (N, V)");
  const int64_t n = logits.size(0), v = logits.size(1);
  FLUID_CHECK(v >= 1, "logits must have at least one category");
  FLUID_CHECK(v == 1 || logits.stride[1] == 1, "logits must have unit stride along V");
  FLUID_CHECK(uniform.ndim == 1 && uniform.size(0) == n, "uniform must be (N,)");
  FLUID_CHECK(out.ndim == 1 && out.size(0) == n, "out must be (N,)");
  check_float(logits, "logits");
  check_dtype(uniform, DType::F64, "uniform");
  check_dtype(out, DType::I64, "out");
  check_contiguous(uniform, "uniform");
  check_contiguous(out, "out");
  FLUID_CHECK(temperature >= 0.0 && temperature <= FLT_MAX, "temperature must be in [0, float32 max]");
  FLUID_CHECK(top_k >= 0 && top_k <= v, "top_k must be in [0, V] (0: none)");
  FLUID_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1]");
  FLUID_CHECK(n <= INT_MAX, "at most 2^31 - 1 rows");
  if (n == 0) return;
  // The reference rounds T to float32 first; a T that rounds to 0 means argmax.
  const float temp = static_cast<float>(temperature);
  categorical_kernel<<<static_cast<unsigned>(n), kThreads, 0,
                       reinterpret_cast<cudaStream_t>(stream)>>>(
      logits.data, logits.dtype, logits.stride[0], v, uniform.ptr<double>(), temp, top_k, top_p,
      out.ptr<int64_t>());
  check_launch("sample_categorical");
}

}  // namespace cuda
}  // namespace fluid
