// CPU attention: argument checks, packing to fp32, the portable forward, the choice of SIMD
// forward at run time, and the backward. See attention.h for the contract.
#include "attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../common/dispatch.h"
#include "../common/half.h"
#include "../common/parallel.h"

namespace fluid {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Geometry shared by forward and backward.
struct Geometry {
  int64_t B, Nq, Nk, H, D;
  bool causal;
  const uint8_t* mask = nullptr;  // (B, Nk)
  int64_t mask_sb = 0, mask_sk = 0;
  const void* seqlens = nullptr;
  bool seqlens64 = true;

  int64_t key_len(int64_t b) const {
    if (!seqlens) return Nk;
    int64_t L = seqlens64 ? static_cast<const int64_t*>(seqlens)[b]
                          : static_cast<const int32_t*>(seqlens)[b];
    return std::max<int64_t>(0, std::min<int64_t>(L, Nk));
  }
  bool key_ok(int64_t b, int64_t j) const {
    return !mask || mask[b * mask_sb + j * mask_sk] != 0;
  }
};

void check_bshd(const TensorView& t, const char* name, int64_t B, int64_t N, int64_t H, int64_t D) {
  FLUID_CHECK(t.ndim == 4, std::string(name) + " must be 4-D (B, N, H, D)");
  FLUID_CHECK(t.size(0) == B && t.size(2) == H && t.size(3) == D && (N < 0 || t.size(1) == N),
              std::string(name) + " has a shape that does not match q / k");
  FLUID_CHECK(t.stride[3] == 1 || D <= 1, std::string(name) + " must have unit stride along D");
}

Geometry make_geometry(const TensorView& q, const TensorView& k, const TensorView& v,
                       const std::optional<TensorView>& mask, const std::optional<TensorView>& seqlens,
                       bool causal) {
  FLUID_CHECK(q.ndim == 4, "q must be 4-D (B, Nq, H, D)");
  Geometry g{q.size(0), q.size(1), k.ndim == 4 ? k.size(1) : 0, q.size(2), q.size(3), causal};
  check_float(q, "q");
  check_bshd(k, "k", g.B, -1, g.H, g.D);
  check_bshd(v, "v", g.B, g.Nk, g.H, g.D);
  FLUID_CHECK(q.stride[3] == 1 || g.D <= 1, "q must have unit stride along D");
  FLUID_CHECK(k.dtype == q.dtype && v.dtype == q.dtype, "k and v must have q's dtype");
  if (mask) {
    FLUID_CHECK(mask->dtype == DType::BOOL || mask->dtype == DType::U8, "key_padding_mask must be bool");
    FLUID_CHECK(mask->ndim == 2 && mask->size(0) == g.B && mask->size(1) == g.Nk,
                "key_padding_mask must be (B, Nk)");
    g.mask = mask->ptr<uint8_t>();
    g.mask_sb = mask->stride[0];
    g.mask_sk = mask->stride[1];
  }
  if (seqlens) {
    FLUID_CHECK(seqlens->ndim == 1 && seqlens->size(0) == g.B, "seqlens_k must be (B,)");
    FLUID_CHECK(seqlens->dtype == DType::I64 || seqlens->dtype == DType::I32, "seqlens_k must be int32 or int64");
    FLUID_CHECK(seqlens->stride[0] == 1 || g.B <= 1, "seqlens_k must be contiguous");
    g.seqlens = seqlens->data;
    g.seqlens64 = seqlens->dtype == DType::I64;
  }
  return g;
}

// Element (b, n, h, :) of a (B, N, H, D) view.
template <typename T>
inline const T* row_ptr(const TensorView& t, int64_t b, int64_t n, int64_t h) {
  return t.ptr<T>() + b * t.stride[0] + n * t.stride[1] + h * t.stride[2];
}
template <typename T>
inline T* row_ptr_mut(const TensorView& t, int64_t b, int64_t n, int64_t h) {
  return t.ptr<T>() + b * t.stride[0] + n * t.stride[1] + h * t.stride[2];
}

template <typename T>
inline void load_row(const T* src, int64_t d, float mul, float* dst) {
  for (int64_t e = 0; e < d; ++e) dst[e] = load_f32(src, e) * mul;
}
template <typename T>
inline void store_row(const float* src, int64_t d, T* dst) {
  for (int64_t e = 0; e < d; ++e) store_f32(dst, e, src[e]);
}

// Work is handed out one (batch, head[, query chunk]) task at a time from an atomic counter
// (parallel_for runs one chunk per thread): on a shared machine a thread that another process
// slows down takes fewer tasks instead of holding up the call. The order in which tasks are
// taken does not change any result: each task writes its own rows.

// Rows of a (B, N, H, D) tensor lie H*D elements apart, so walking one head's rows touches a new
// page every few rows and the hardware prefetcher does not follow; measured: without these
// software prefetches the packing loops took ~20% of the forward at B=8, H=8, N=256, D=64.
constexpr int64_t kPrefetchRows = 8;
template <typename T>
inline void prefetch_row(const T* p, int64_t d, bool for_write) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(T)); off += 64) {
    if (for_write) __builtin_prefetch(c + off, 1, 3);
    else __builtin_prefetch(c + off, 0, 3);
  }
}

// K into 16-key chunks (kt[(j / 16) * D * 16 + e * 16 + j % 16]), V into rows, and the key bias,
// for keys [0, L) of (b, h); zero / -inf up to nkp. vf may be null (rows not wanted). Each chunk's 16 rows are read into a small
// buffer first so that kt is written sequentially (a scatter with stride 16 into a kt larger than
// L1 was the costliest part of packing).
template <typename T>
void pack_keys(const Geometry& g, const TensorView& k, const TensorView& v, int64_t b, int64_t h, int64_t L,
               int64_t nkp, float* kt, float* vf, float* bias) {
  const int64_t D = g.D;
  float chunk[16 * 128];
  for (int64_t c0 = 0; c0 < nkp; c0 += 16) {
    float* dst = kt + c0 * D;
    if (c0 >= L) {
      std::fill(dst, dst + 16 * D, 0.0f);
      if (vf) std::fill(vf + c0 * D, vf + (c0 + 16) * D, 0.0f);
      continue;
    }
    const int64_t n = std::min<int64_t>(16, L - c0);
    for (int64_t jj = 0; jj < n; ++jj) {
      const int64_t j = c0 + jj;
      if (j + kPrefetchRows < L) {
        prefetch_row(row_ptr<T>(k, b, j + kPrefetchRows, h), D, false);
        if (vf) prefetch_row(row_ptr<T>(v, b, j + kPrefetchRows, h), D, false);
      }
      load_row(row_ptr<T>(k, b, j, h), D, 1.0f, chunk + jj * D);
      if (vf) load_row(row_ptr<T>(v, b, j, h), D, 1.0f, vf + j * D);
      bias[j] = g.key_ok(b, j) ? 0.0f : kNegInf;
    }
    std::fill(chunk + n * D, chunk + 16 * D, 0.0f);
    if (vf) std::fill(vf + (c0 + n) * D, vf + (c0 + 16) * D, 0.0f);
    for (int64_t e = 0; e < D; ++e)
      for (int64_t jj = 0; jj < 16; ++jj) dst[e * 16 + jj] = chunk[jj * D + e];
  }
}

// ---- forward ---------------------------------------------------------------------------------

// Portable path: one query row at a time, online softmax over blocks of 64 keys, fp32.
template <typename T>
void forward_portable(const Geometry& g, const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& o, float* lse, float scale, int nthreads) {
  const int64_t D = g.D;
  std::atomic<int64_t> next{0};
  const int64_t ntasks = g.B * g.H;
  parallel_for(std::min<int64_t>(ntasks, nthreads), nthreads, [&](int64_t, int64_t) {
    std::vector<float> kf(g.Nk * D), vf(g.Nk * D), qf(D), acc(D), s(64);
    std::vector<uint8_t> ok(g.Nk);
    for (int64_t t = next++; t < ntasks; t = next++) {
      const int64_t b = t / g.H, h = t % g.H;
      const int64_t L = g.key_len(b);
      for (int64_t j = 0; j < L; ++j) {
        load_row(row_ptr<T>(k, b, j, h), D, 1.0f, &kf[j * D]);
        load_row(row_ptr<T>(v, b, j, h), D, 1.0f, &vf[j * D]);
        ok[j] = g.key_ok(b, j);
      }
      for (int64_t i = 0; i < g.Nq; ++i) {
        load_row(row_ptr<T>(q, b, i, h), D, scale, qf.data());
        std::fill(acc.begin(), acc.end(), 0.0f);
        float m = kNegInf, l = 0.0f;
        const int64_t jend = g.causal ? std::min<int64_t>(L, std::max<int64_t>(0, i + L - g.Nq + 1)) : L;
        for (int64_t j0 = 0; j0 < jend; j0 += 64) {
          const int64_t nj = std::min<int64_t>(64, jend - j0);
          float bm = kNegInf;
          for (int64_t jj = 0; jj < nj; ++jj) {
            float x = kNegInf;
            if (ok[j0 + jj]) {
              x = 0.0f;
              const float* kr = &kf[(j0 + jj) * D];
              for (int64_t e = 0; e < D; ++e) x += qf[e] * kr[e];
            }
            s[jj] = x;
            bm = std::max(bm, x);
          }
          if (bm == kNegInf) continue;
          const float mnew = std::max(m, bm);
          const float alpha = std::exp(m - mnew);
          for (int64_t e = 0; e < D; ++e) acc[e] *= alpha;
          l *= alpha;
          m = mnew;
          for (int64_t jj = 0; jj < nj; ++jj) {
            if (s[jj] == kNegInf) continue;
            const float p = std::exp(s[jj] - m);
            l += p;
            const float* vr = &vf[(j0 + jj) * D];
            for (int64_t e = 0; e < D; ++e) acc[e] += p * vr[e];
          }
        }
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t e = 0; e < D; ++e) acc[e] *= inv;
        store_row(acc.data(), D, row_ptr_mut<T>(o, b, i, h));
        lse[(b * g.H + h) * g.Nq + i] = l > 0.0f ? m + std::log(l) : kNegInf;
      }
    }
  });
}

// Per key block of kBlock: the index after its last key that may be attended (0: none) and
// whether every key in it may be, read from the packed bias (0 = may attend, -inf = masked).
static void mark_key_blocks(const std::vector<float>& bias, int64_t nkp, std::vector<int32_t>& block_end,
                            std::vector<uint8_t>& block_full) {
  using attn::kBlock;
  const int64_t nb = nkp / kBlock;
  block_end.assign(nb, 0);
  block_full.assign(nb, 0);
  for (int64_t kb = 0; kb < nb; ++kb) {
    bool full = true;
    for (int64_t jj = 0; jj < kBlock; ++jj) {
      if (bias[kb * kBlock + jj] == 0.0f) block_end[kb] = static_cast<int32_t>(jj + 1);
      else full = false;
    }
    block_full[kb] = full;
  }
}

// The SIMD forwards' work split (fp32 and native bf16 alike): tasks of (batch, head, query chunk),
// queries split when there are fewer (batch, head) pairs than 4 x threads to keep every thread
// busy. Each thread makes its buffers once (make_state) and calls
// task(state, b, h, L, nkp, i0, i1, repack); repack: the (batch, head) changed since the thread's
// last task, so its packed keys are stale.
template <class MakeState, class Task>
void forward_tasks(const Geometry& g, int nthreads, MakeState make_state, Task task) {
  using attn::kBlock;
  const int64_t bh = g.B * g.H;
  int64_t qsplit = 1;
  if (bh < 4 * nthreads) qsplit = std::max<int64_t>(1, std::min<int64_t>((4 * nthreads + bh - 1) / bh, g.Nq / 32));
  const int64_t qchunk = (g.Nq + qsplit - 1) / qsplit;
  std::atomic<int64_t> next{0};
  const int64_t ntasks = bh * qsplit;
  parallel_for(std::min<int64_t>(ntasks, nthreads), nthreads, [&](int64_t, int64_t) {
    auto state = make_state();
    int64_t packed_for = -1;
    for (int64_t t = next++; t < ntasks; t = next++) {
      const int64_t bhi = t / qsplit, qc = t % qsplit;
      const int64_t b = bhi / g.H, h = bhi % g.H;
      const int64_t L = g.key_len(b);
      const int64_t i0 = qc * qchunk, i1 = std::min(g.Nq, i0 + qchunk);
      if (i0 >= i1) continue;
      const int64_t nkp = std::max<int64_t>(kBlock, (L + kBlock - 1) / kBlock * kBlock);
      task(state, b, h, L, nkp, i0, i1, packed_for != bhi);
      packed_for = bhi;
    }
  });
}

// The forwards' fp32 rows of o and base-2 lse of rows [i0, i0 + nq) of (b, h) to the outputs.
template <typename T>
void forward_store(const Geometry& g, const float* of, const float* lse2, int64_t b, int64_t h, int64_t i0,
                   int64_t nq, const TensorView& o, float* lse) {
  const int64_t D = g.D;
  for (int64_t i = 0; i < nq; ++i) {
    if (i + kPrefetchRows < nq) prefetch_row(row_ptr<T>(o, b, i0 + i + kPrefetchRows, h), D, true);
    store_row(&of[i * D], D, row_ptr_mut<T>(o, b, i0 + i, h));
    lse[(b * g.H + h) * g.Nq + i0 + i] = lse2[i] * kLn2;
  }
}

struct FwdBuffers {
  std::vector<float> bias, of, lse2;
  std::vector<int32_t> block_end;
  std::vector<uint8_t> block_full;
};

// SIMD path: per (batch, head, query chunk) pack K (in chunks of 16 keys), V and the key bias to
// fp32 once, then run the kernel over the chunk's query rows.
template <typename T>
void forward_simd(attn::FwdKernel kernel, const Geometry& g, const TensorView& q, const TensorView& k,
                  const TensorView& v, const TensorView& o, float* lse, float scale, int nthreads) {
  using namespace attn;
  const int64_t D = g.D;
  struct State : FwdBuffers {
    std::vector<float> kt, vf, qf, scratch = std::vector<float>(kScratchFloats);
  };
  forward_tasks(g, nthreads, [] { return State(); },
                [&](State& st, int64_t b, int64_t h, int64_t L, int64_t nkp, int64_t i0, int64_t i1, bool repack) {
    if (repack) {
      st.kt.resize(nkp * D);
      st.vf.resize(nkp * D);
      st.bias.assign(nkp, kNegInf);
      pack_keys<T>(g, k, v, b, h, L, nkp, st.kt.data(), st.vf.data(), st.bias.data());
      mark_key_blocks(st.bias, nkp, st.block_end, st.block_full);
    }
    const int64_t nq = i1 - i0;
    st.qf.resize(nq * D);
    st.of.resize(nq * D);
    st.lse2.resize(nq);
    for (int64_t i = 0; i < nq; ++i) {
      if (i + kPrefetchRows < nq) prefetch_row(row_ptr<T>(q, b, i0 + i + kPrefetchRows, h), D, false);
      load_row(row_ptr<T>(q, b, i0 + i, h), D, scale * kLog2e, &st.qf[i * D]);
    }
    FwdItem it{st.qf.data(), st.kt.data(), st.vf.data(), st.bias.data(), st.block_end.data(), st.block_full.data(),
               nq, nkp, D, g.causal, i0 + L - g.Nq, st.of.data(), st.lse2.data(), st.scratch.data()};
    kernel(it);
    forward_store<T>(g, st.of.data(), st.lse2.data(), b, h, i0, nq, o, lse);
  });
}

// Native-bf16 paths (bf16 inputs, AVX512_BF16): K, V, Q (and the backward's dO) keep their bf16
// bits, only rearranged into the pair layouts of attn::FwdItemBf16 / BwdItemBf16 (no conversion,
// no scaling). Rows [0, L) of (b, h) of t in 16-row chunks with dims in pairs
// (dst[(j / 16) * D * 16 + (e / 2) * 32 + (j % 16) * 2 + e % 2]), zero up to n; bias (when given)
// gets each row's key-padding bias.
void pack_chunks_bf16(const Geometry& g, const TensorView& t, int64_t b, int64_t h, int64_t L, int64_t n,
                      uint16_t* dst, float* bias) {
  const int64_t D = g.D;
  for (int64_t c0 = 0; c0 < n; c0 += 16) {
    uint16_t* chunk = dst + c0 * D;
    const int64_t m = std::max<int64_t>(0, std::min<int64_t>(16, L - c0));
    if (m < 16) std::fill(chunk, chunk + 16 * D, uint16_t(0));
    for (int64_t jj = 0; jj < m; ++jj) {
      const int64_t j = c0 + jj;
      if (j + kPrefetchRows < L) prefetch_row(row_ptr<bf16_t>(t, b, j + kPrefetchRows, h), D, false);
      const uint16_t* src = &row_ptr<bf16_t>(t, b, j, h)->bits;
      for (int64_t p = 0; p < D / 2; ++p) std::memcpy(chunk + p * 32 + jj * 2, src + 2 * p, 2 * sizeof(uint16_t));
      if (bias) bias[j] = g.key_ok(b, j) ? 0.0f : kNegInf;
    }
  }
}

// Rows [0, L) of (b, h) of t in pairs (dst[(j / 2) * D * 2 + e * 2 + j % 2]), zero up to n (even).
void pack_pairs_bf16(const Geometry& g, const TensorView& t, int64_t b, int64_t h, int64_t L, int64_t n,
                     uint16_t* dst) {
  const int64_t D = g.D;
  for (int64_t j = 0; j < n; j += 2) {
    uint16_t* pair = dst + j * D;  // (j / 2) * D * 2
    for (int64_t jj = 0; jj < 2; ++jj) {
      if (j + jj >= L) {
        for (int64_t e = 0; e < D; ++e) pair[e * 2 + jj] = 0;
        continue;
      }
      if (j + jj + kPrefetchRows < L) prefetch_row(row_ptr<bf16_t>(t, b, j + jj + kPrefetchRows, h), D, false);
      const uint16_t* src = &row_ptr<bf16_t>(t, b, j + jj, h)->bits;
      for (int64_t e = 0; e < D; ++e) pair[e * 2 + jj] = src[e];
    }
  }
}

// Rows [0, n) of (b, h) of t as (n, D) bf16 rows.
void copy_rows_bf16(const Geometry& g, const TensorView& t, int64_t b, int64_t h, int64_t i0, int64_t n,
                    uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    if (i + kPrefetchRows < n) prefetch_row(row_ptr<bf16_t>(t, b, i0 + i + kPrefetchRows, h), g.D, false);
    std::memcpy(dst + i * g.D, &row_ptr<bf16_t>(t, b, i0 + i, h)->bits, g.D * sizeof(uint16_t));
  }
}

void forward_native_bf16(attn::FwdKernelBf16 kernel, const Geometry& g, const TensorView& q, const TensorView& k,
                         const TensorView& v, const TensorView& o, float* lse, float scale, int nthreads) {
  using namespace attn;
  const int64_t D = g.D;
  struct State : FwdBuffers {
    std::vector<uint16_t> kt, v2, qb;
  };
  forward_tasks(g, nthreads, [] { return State(); },
                [&](State& st, int64_t b, int64_t h, int64_t L, int64_t nkp, int64_t i0, int64_t i1, bool repack) {
    if (repack) {
      st.kt.resize(nkp * D);
      st.v2.resize(nkp * D);
      st.bias.assign(nkp, kNegInf);
      pack_chunks_bf16(g, k, b, h, L, nkp, st.kt.data(), st.bias.data());
      pack_pairs_bf16(g, v, b, h, L, nkp, st.v2.data());
      mark_key_blocks(st.bias, nkp, st.block_end, st.block_full);
    }
    const int64_t nq = i1 - i0;
    st.qb.resize(nq * D);
    st.of.resize(nq * D);
    st.lse2.resize(nq);
    copy_rows_bf16(g, q, b, h, i0, nq, st.qb.data());
    FwdItemBf16 it{st.qb.data(), st.kt.data(), st.v2.data(), st.bias.data(), st.block_end.data(),
                   st.block_full.data(), nq, nkp, D, g.causal, i0 + L - g.Nq, scale * kLog2e, st.of.data(),
                   st.lse2.data()};
    kernel(it);
    forward_store<bf16_t>(g, st.of.data(), st.lse2.data(), b, h, i0, nq, o, lse);
  });
}

bool cpu_has_avx512() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && attn::fwd_kernel_avx512();
#else
  return false;
#endif
}

// AVX512_BF16 on top of the AVX-512 set (its kernel also uses BW / VL).
bool cpu_has_avx512bf16() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16") && attn::fwd_kernel_avx512bf16();
#else
  return false;
#endif
}

attn::FwdKernel pick_kernel(const char** name) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (cpu_has_avx512()) {
    *name = cpu_has_avx512bf16() ? "avx512bf16" : "avx512";
    return attn::fwd_kernel_avx512();
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && attn::fwd_kernel_avx2()) {
    *name = "avx2";
    return attn::fwd_kernel_avx2();
  }
#endif
  *name = "portable";
  return nullptr;
}

struct KernelChoice {
  const char* name = "portable";
  attn::FwdKernel fn = nullptr;
  KernelChoice() { fn = pick_kernel(&name); }
};
const KernelChoice& kernel_choice() {
  static KernelChoice c;
  return c;
}

// ---- backward --------------------------------------------------------------------------------

// Per (batch, head), sequentially (deterministic): for each query row i with finite lse,
// p_ij = exp(s_ij - lse_i), dv_j += p dO_i, dp = dO_i . v_j, ds = p (dp - delta_i),
// dq_i += scale ds k_j, dk_j += scale ds q_i, with delta_i = dO_i . O_i.
template <typename T>
void backward_impl(const Geometry& g, const TensorView& dout, const TensorView& q, const TensorView& k,
                   const TensorView& v, const TensorView& o, const float* lse, const TensorView& dq,
                   const TensorView& dk, const TensorView& dv, float scale, int nthreads) {
  const int64_t D = g.D;
  std::atomic<int64_t> next{0};
  const int64_t ntasks = g.B * g.H;
  parallel_for(std::min<int64_t>(ntasks, nthreads), nthreads, [&](int64_t, int64_t) {
    std::vector<float> kf(g.Nk * D), vf(g.Nk * D), dkf(g.Nk * D), dvf(g.Nk * D);
    std::vector<float> qf(D), dof(D), of(D), dqf(D), p(g.Nk), dp(g.Nk);
    std::vector<uint8_t> ok(g.Nk);
    for (int64_t t = next++; t < ntasks; t = next++) {
      const int64_t b = t / g.H, h = t % g.H;
      const int64_t L = g.Nk;
      for (int64_t j = 0; j < L; ++j) {
        load_row(row_ptr<T>(k, b, j, h), D, 1.0f, &kf[j * D]);
        load_row(row_ptr<T>(v, b, j, h), D, 1.0f, &vf[j * D]);
        ok[j] = g.key_ok(b, j);
      }
      std::fill(dkf.begin(), dkf.end(), 0.0f);
      std::fill(dvf.begin(), dvf.end(), 0.0f);
      for (int64_t i = 0; i < g.Nq; ++i) {
        const float li = lse[(b * g.H + h) * g.Nq + i];
        std::fill(dqf.begin(), dqf.end(), 0.0f);
        const int64_t jend = g.causal ? std::min<int64_t>(L, std::max<int64_t>(0, i + L - g.Nq + 1)) : L;
        if (std::isfinite(li) && jend > 0) {
          load_row(row_ptr<T>(q, b, i, h), D, 1.0f, qf.data());
          load_row(row_ptr<T>(dout, b, i, h), D, 1.0f, dof.data());
          load_row(row_ptr<T>(o, b, i, h), D, 1.0f, of.data());
          float delta = 0.0f;
          for (int64_t e = 0; e < D; ++e) delta += dof[e] * of[e];
          for (int64_t j = 0; j < jend; ++j) {
            if (!ok[j]) { p[j] = 0.0f; continue; }
            const float* kr = &kf[j * D];
            const float* vr = &vf[j * D];
            float s = 0.0f, d = 0.0f;
            for (int64_t e = 0; e < D; ++e) { s += qf[e] * kr[e]; d += dof[e] * vr[e]; }
            const float pj = std::exp(s * scale - li);
            p[j] = pj;
            dp[j] = pj * (d - delta) * scale;  // ds * scale
          }
          for (int64_t j = 0; j < jend; ++j) {
            if (!ok[j]) continue;
            const float pj = p[j], dsj = dp[j];
            const float* kr = &kf[j * D];
            float* dvr = &dvf[j * D];
            float* dkr = &dkf[j * D];
            for (int64_t e = 0; e < D; ++e) {
              dvr[e] += pj * dof[e];
              dkr[e] += dsj * qf[e];
              dqf[e] += dsj * kr[e];
            }
          }
        }
        store_row(dqf.data(), D, row_ptr_mut<T>(dq, b, i, h));
      }
      for (int64_t j = 0; j < L; ++j) {
        store_row(&dkf[j * D], D, row_ptr_mut<T>(dk, b, j, h));
        store_row(&dvf[j * D], D, row_ptr_mut<T>(dv, b, j, h));
      }
    }
  });
}

// The per-(batch, head) parts the fp32 SIMD and native-bf16 backwards share.
// Row i's dO as fp32 into dorow, delta = rowsum(dO * O) in fp32, and the base-2 lse with +inf
// for a row that attends nothing (so P = exp2(S - lse2) = 0 there).
template <typename T>
inline void bwd_row_stats(const Geometry& g, const TensorView& dout, const TensorView& o, const float* lse,
                          int64_t b, int64_t h, int64_t i, float* dorow, float* delta, float* lse2) {
  const int64_t D = g.D;
  if (i + kPrefetchRows < g.Nq) {
    prefetch_row(row_ptr<T>(dout, b, i + kPrefetchRows, h), D, false);
    prefetch_row(row_ptr<T>(o, b, i + kPrefetchRows, h), D, false);
  }
  float orow[128];
  load_row(row_ptr<T>(dout, b, i, h), D, 1.0f, dorow);
  load_row(row_ptr<T>(o, b, i, h), D, 1.0f, orow);
  float dl = 0.0f;
  for (int64_t e = 0; e < D; ++e) dl += dorow[e] * orow[e];
  delta[i] = dl;
  const float li = lse[(b * g.H + h) * g.Nq + i];
  lse2[i] = std::isfinite(li) ? li * kLog2e : std::numeric_limits<float>::infinity();
}

// The fp32 accumulators dq (Nq, D), dk / dv (>= Nk, D) of (b, h) to the outputs.
template <typename T>
void bwd_store(const Geometry& g, const float* dqf, const float* dkf, const float* dvf, const TensorView& dq,
               const TensorView& dk, const TensorView& dv, int64_t b, int64_t h) {
  const int64_t D = g.D;
  for (int64_t i = 0; i < g.Nq; ++i) store_row(&dqf[i * D], D, row_ptr_mut<T>(dq, b, i, h));
  for (int64_t j = 0; j < g.Nk; ++j) {
    store_row(&dkf[j * D], D, row_ptr_mut<T>(dk, b, j, h));
    store_row(&dvf[j * D], D, row_ptr_mut<T>(dv, b, j, h));
  }
}

// SIMD backward: per (batch, head), pack everything to fp32 (see attn::BwdItem), run the kernel,
// store dq / dk / dv. One thread per (batch, head): deterministic.
template <typename T>
void backward_simd(attn::BwdKernel kernel, const Geometry& g, const TensorView& dout, const TensorView& q,
                   const TensorView& k, const TensorView& v, const TensorView& o, const float* lse,
                   const TensorView& dq, const TensorView& dk, const TensorView& dv, float scale, int nthreads) {
  using namespace attn;
  const int64_t D = g.D, L = g.Nk, Nq = g.Nq;
  const int64_t nkp = std::max<int64_t>(kBlock, (L + kBlock - 1) / kBlock * kBlock);
  std::atomic<int64_t> next{0};
  const int64_t ntasks = g.B * g.H;
  parallel_for(std::min<int64_t>(ntasks, nthreads), nthreads, [&](int64_t, int64_t) {
    std::vector<float> qs(Nq * D), qf(Nq * D), dof(Nq * D), lse2(Nq), delta(Nq), dqf(Nq * D);
    std::vector<float> kt(nkp * D), vt(nkp * D), kf(nkp * D), bias(nkp), dkf(nkp * D), dvf(nkp * D);
    std::vector<int32_t> block_end(nkp / kBlock);
    std::vector<uint8_t> block_full(nkp / kBlock);
    std::vector<float> scratch(kBwdScratchFloats);
    for (int64_t t = next++; t < ntasks; t = next++) {
      const int64_t b = t / g.H, h = t % g.H;
      std::fill(bias.begin(), bias.end(), kNegInf);
      pack_keys<T>(g, k, v, b, h, L, nkp, kt.data(), nullptr, bias.data());  // K chunks
      pack_keys<T>(g, v, k, b, h, L, nkp, vt.data(), kf.data(), bias.data());  // V chunks, K rows
      mark_key_blocks(bias, nkp, block_end, block_full);
      for (int64_t i = 0; i < Nq; ++i) {
        if (i + kPrefetchRows < Nq) prefetch_row(row_ptr<T>(q, b, i + kPrefetchRows, h), D, false);
        load_row(row_ptr<T>(q, b, i, h), D, 1.0f, &qf[i * D]);
        for (int64_t e = 0; e < D; ++e) qs[i * D + e] = qf[i * D + e] * (scale * kLog2e);
        bwd_row_stats<T>(g, dout, o, lse, b, h, i, &dof[i * D], delta.data(), lse2.data());
      }
      std::fill(dqf.begin(), dqf.end(), 0.0f);
      std::fill(dkf.begin(), dkf.end(), 0.0f);
      std::fill(dvf.begin(), dvf.end(), 0.0f);
      BwdItem it{qs.data(), qf.data(), dof.data(), lse2.data(), delta.data(), kt.data(), vt.data(), kf.data(),
                 bias.data(), block_end.data(), block_full.data(), Nq, nkp, D, g.causal, L - Nq, scale,
                 dqf.data(), dkf.data(), dvf.data(), scratch.data()};
      kernel(it);
      bwd_store<T>(g, dqf.data(), dkf.data(), dvf.data(), dq, dk, dv, b, h);
    }
  });
}

// Native-bf16 backward (bf16 inputs, AVX512_BF16): as backward_simd, but Q, dO, K, V keep their
// bf16 bits in the pair layouts of attn::BwdItemBf16; delta, lse2 and the accumulators are fp32.
void backward_native_bf16(attn::BwdKernelBf16 kernel, const Geometry& g, const TensorView& dout,
                          const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& o,
                          const float* lse, const TensorView& dq, const TensorView& dk, const TensorView& dv,
                          float scale, int nthreads) {
  using namespace attn;
  const int64_t D = g.D, L = g.Nk, Nq = g.Nq;
  const int64_t nkp = std::max<int64_t>(kBlock, (L + kBlock - 1) / kBlock * kBlock);
  const int64_t nqp = (Nq + 1) / 2 * 2;  // q2 / do2 in whole pairs
  std::atomic<int64_t> next{0};
  const int64_t ntasks = g.B * g.H;
  parallel_for(std::min<int64_t>(ntasks, nthreads), nthreads, [&](int64_t, int64_t) {
    std::vector<uint16_t> qb(Nq * D), dob(Nq * D), q2(nqp * D), do2(nqp * D), kt(nkp * D), vt(nkp * D),
        k2(nkp * D);
    std::vector<float> dorow(D), lse2(Nq), delta(Nq), dqf(Nq * D), bias(nkp), dkf(nkp * D), dvf(nkp * D);
    std::vector<int32_t> block_end;
    std::vector<uint8_t> block_full;
    for (int64_t t = next++; t < ntasks; t = next++) {
      const int64_t b = t / g.H, h = t % g.H;
      std::fill(bias.begin(), bias.end(), kNegInf);
      pack_chunks_bf16(g, k, b, h, L, nkp, kt.data(), bias.data());
      pack_chunks_bf16(g, v, b, h, L, nkp, vt.data(), nullptr);
      pack_pairs_bf16(g, k, b, h, L, nkp, k2.data());
      mark_key_blocks(bias, nkp, block_end, block_full);
      copy_rows_bf16(g, q, b, h, 0, Nq, qb.data());
      copy_rows_bf16(g, dout, b, h, 0, Nq, dob.data());
      pack_pairs_bf16(g, q, b, h, Nq, nqp, q2.data());
      pack_pairs_bf16(g, dout, b, h, Nq, nqp, do2.data());
      for (int64_t i = 0; i < Nq; ++i) bwd_row_stats<bf16_t>(g, dout, o, lse, b, h, i, dorow.data(), delta.data(), lse2.data());
      std::fill(dqf.begin(), dqf.end(), 0.0f);
      std::fill(dkf.begin(), dkf.end(), 0.0f);
      std::fill(dvf.begin(), dvf.end(), 0.0f);
      BwdItemBf16 it{qb.data(), dob.data(), q2.data(), do2.data(), kt.data(), vt.data(), k2.data(), lse2.data(),
                     delta.data(), bias.data(), block_end.data(), block_full.data(), Nq, nkp, D, g.causal,
                     L - Nq, scale * kLog2e, scale, dqf.data(), dkf.data(), dvf.data()};
      kernel(it);
      bwd_store<bf16_t>(g, dqf.data(), dkf.data(), dvf.data(), dq, dk, dv, b, h);
    }
  });
}

}  // namespace

const char* attention_fwd_isa() { return kernel_choice().name; }

std::vector<std::string> attention_fwd_isas() {
  std::vector<std::string> out{"portable"};
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && attn::fwd_kernel_avx2())
    out.push_back("avx2");
  if (cpu_has_avx512()) out.push_back("avx512");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && attn::fwd_kernel_avx2_w16())
    out.push_back("avx2_w16");
  if (cpu_has_avx512bf16()) out.push_back("avx512bf16");
#endif
  return out;
}

namespace {
// A runtime ISA choice, not a FLUID_DISPATCH case list: each impl names a kernel file.
const char* isa_of_impl(int impl) {
  switch (impl) {
    case 0: return kernel_choice().name;
    case 1: return "portable";
    case 2: return "avx2";
    case 3: return "avx512";
    case 4: return "avx2_w16";
    case 5: return "avx512bf16";
  }
  throw CheckError("impl must be 0 (fastest), 1 (portable), 2 (avx2), 3 (avx512), 4 (avx2_w16) or 5 (avx512bf16)");
}
void check_isa(const std::string& isa) {
  const auto have = attention_fwd_isas();
  FLUID_CHECK(std::find(have.begin(), have.end(), isa) != have.end(),
              "the " + isa + " attention kernels are not available on this CPU / build");
}
// Where the native-bf16 kernels run (forward and backward alike): the avx512bf16 set (checked by
// check_isa), bf16 inputs, and an even head dim (they read D in bf16 pairs); elsewhere the
// set's fp32 kernels.
bool native_bf16_path(const std::string& isa, DType dtype, int64_t d) {
  return isa == "avx512bf16" && dtype == DType::BF16 && d % 2 == 0;
}
}  // namespace

std::string attention_bwd_isa(const std::string& dtype, int64_t d, int impl) {
  const std::string isa = isa_of_impl(impl);
  if (isa != "portable") check_isa(isa);
  FLUID_CHECK(dtype == "float32" || dtype == "float16" || dtype == "bfloat16",
              "dtype must be float32, float16 or bfloat16");
  FLUID_DISPATCH_HEAD_DIM(d, kD, { (void)kD; });  // the dims a call admits
  if (isa == "avx512bf16" && !native_bf16_path(isa, dtype == "bfloat16" ? DType::BF16 : DType::F32, d))
    return "avx512";  // the same kernel set, fp32 arithmetic
  return isa;
}

void attention_fwd(const TensorView& q, const TensorView& k, const TensorView& v,
                   const std::optional<TensorView>& key_padding_mask,
                   const std::optional<TensorView>& seqlens_k, const TensorView& o,
                   const TensorView& lse, bool causal, float softmax_scale, int nthreads, int impl) {
  Geometry g = make_geometry(q, k, v, key_padding_mask, seqlens_k, causal);
  check_bshd(o, "o", g.B, g.Nq, g.H, g.D);
  FLUID_CHECK(o.dtype == q.dtype, "o must have q's dtype");
  check_dtype(lse, DType::F32, "lse");
  FLUID_CHECK(lse.ndim == 3 && lse.size(0) == g.B && lse.size(1) == g.H && lse.size(2) == g.Nq,
              "lse must be (B, H, Nq)");
  check_contiguous(lse, "lse");
  FLUID_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0.0f, "softmax_scale must be finite and > 0");
  if (g.B * g.H * g.Nq == 0) return;
  FLUID_DISPATCH_HEAD_DIM(g.D, kD, { (void)kD; });
  float* lsep = lse.ptr<float>();
  const std::string isa = isa_of_impl(impl);
  attn::FwdKernel kernel = nullptr;
  if (isa != "portable") {
    check_isa(isa);
    kernel = isa == "avx2" ? attn::fwd_kernel_avx2()
             : (isa == "avx512" || isa == "avx512bf16") ? attn::fwd_kernel_avx512()
                                                        : attn::fwd_kernel_avx2_w16();
  }
  if (native_bf16_path(isa, q.dtype, g.D)) {
    forward_native_bf16(attn::fwd_kernel_avx512bf16(), g, q, k, v, o, lsep, softmax_scale, nthreads);
    return;
  }
  FLUID_DISPATCH_FLOAT(q.dtype, T, {
    if (kernel) forward_simd<T>(kernel, g, q, k, v, o, lsep, softmax_scale, nthreads);
    else forward_portable<T>(g, q, k, v, o, lsep, softmax_scale, nthreads);
  });
}

void attention_bwd(const TensorView& dout, const TensorView& q, const TensorView& k,
                   const TensorView& v, const TensorView& o, const TensorView& lse,
                   const std::optional<TensorView>& key_padding_mask, const TensorView& dq,
                   const TensorView& dk, const TensorView& dv, bool causal, float softmax_scale,
                   int nthreads, int impl) {
  Geometry g = make_geometry(q, k, v, key_padding_mask, std::nullopt, causal);
  check_bshd(o, "o", g.B, g.Nq, g.H, g.D);
  check_bshd(dout, "dout", g.B, g.Nq, g.H, g.D);
  check_bshd(dq, "dq", g.B, g.Nq, g.H, g.D);
  check_bshd(dk, "dk", g.B, g.Nk, g.H, g.D);
  check_bshd(dv, "dv", g.B, g.Nk, g.H, g.D);
  for (const TensorView* t : {&o, &dout, &dq, &dk, &dv})
    FLUID_CHECK(t->dtype == q.dtype, "o, dout, dq, dk, dv must have q's dtype");
  check_dtype(lse, DType::F32, "lse");
  FLUID_CHECK(lse.ndim == 3 && lse.size(0) == g.B && lse.size(1) == g.H && lse.size(2) == g.Nq,
              "lse must be (B, H, Nq)");
  check_contiguous(lse, "lse");
  FLUID_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0.0f, "softmax_scale must be finite and > 0");
  if (g.B * g.H == 0) return;
  FLUID_DISPATCH_HEAD_DIM(g.D, kD, { (void)kD; });
  const float* lsep = lse.ptr<float>();
  const std::string isa = isa_of_impl(impl);
  attn::BwdKernel kernel = nullptr;
  if (isa != "portable") {
    check_isa(isa);
    kernel = isa == "avx2" ? attn::bwd_kernel_avx2()
             : (isa == "avx512" || isa == "avx512bf16") ? attn::bwd_kernel_avx512()
                                                        : attn::bwd_kernel_avx2_w16();
  }
  if (native_bf16_path(isa, q.dtype, g.D)) {
    backward_native_bf16(attn::bwd_kernel_avx512bf16(), g, dout, q, k, v, o, lsep, dq, dk, dv, softmax_scale,
                         nthreads);
    return;
  }
  FLUID_DISPATCH_FLOAT(q.dtype, T, {
    if (kernel) backward_simd<T>(kernel, g, dout, q, k, v, o, lsep, dq, dk, dv, softmax_scale, nthreads);
    else backward_impl<T>(g, dout, q, k, v, o, lsep, dq, dk, dv, softmax_scale, nthreads);
  });
}

}  // namespace cpu
}  // namespace fluid
