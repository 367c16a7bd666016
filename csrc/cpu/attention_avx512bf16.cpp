// Attention forward for bf16 inputs with native bf16 dot products (AVX512_BF16 vdpbf16ps): Q Kᵀ
// and P V both run as bf16 x bf16 -> fp32 pair products, the softmax in fp32. CMake compiles this
// file (csrc/cpu/*_avx512bf16.cpp) with -mavx512f/bw/vl/dq/bf16; attention.cpp calls in only after
// __builtin_cpu_supports("avx512bf16"), so _C still loads and runs on CPUs without it.
//
// Per item (attention.h, FwdItemBf16): for a tile of 8 query rows, S = Q Kᵀ over a key block as
// 8 x 2 zmm accumulators (a broadcast pair of q dims, two 16-key chunks of packed K pairs), the
// online softmax update on S * qk_scale (base 2), P rounded to bf16, then O += P V as 8 x (2 zmm
// of D) accumulators over pairs of keys.
#include <cstdint>
#include <cstring>

#include "../common/dispatch.h"
#include "attention.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

namespace fluid {
namespace cpu {
namespace attn {
namespace {

constexpr int kMR = 8;

inline __m512bh bh(__m512i x) { return (__m512bh)x; }

inline uint32_t pair_at(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

// 2^x for x <= 0, 0 below -126 (the polynomial of attention_avx512.cpp).
inline __m512 exp2z(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-126.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5252733804059841e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428441e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

// s[r][jj] = qk_scale * (q_r . k_{j0 + jj}) for jj in [0, ncols), ncols a multiple of 32, j0 of 128.
template <int MR, int64_t d>
inline void scores_tile(const uint16_t* q, const uint16_t* kt, int64_t j0, int64_t ncols, float qk_scale, float* s) {
  const __m512 sc = _mm512_set1_ps(qk_scale);
  for (int64_t jj = 0; jj < ncols; jj += 32) {
    const uint16_t* k0 = kt + ((j0 + jj) / 16) * d * 16;
    const uint16_t* k1 = k0 + d * 16;
    __m512 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < d / 2; ++p) {
      const __m512bh kv0 = bh(_mm512_loadu_si512(k0 + p * 32));
      const __m512bh kv1 = bh(_mm512_loadu_si512(k1 + p * 32));
      for (int r = 0; r < MR; ++r) {
        const __m512bh qb = bh(_mm512_set1_epi32(static_cast<int>(pair_at(q + r * d + 2 * p))));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, kv0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, kv1);
      }
    }
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(s + r * kBlock + jj, _mm512_mul_ps(acc[r][0], sc));
      _mm512_storeu_ps(s + r * kBlock + jj + 16, _mm512_mul_ps(acc[r][1], sc));
    }
  }
}

// O[r][e0 .. e0 + 16 NV) += sum over pairs p in [0, npairs) of the pair products of P's row r,
// pair p (the bf16 pair at pb + r * RS + p * PS) with the pair rows of v2 (v2 + p * d * 2, as
// FwdItemBf16::v). Row-major P (the forward's P, the backward's dS for dQ): RS = kBlock, PS = 2;
// row-pair interleaved (the backward's P and dS read as Pᵀ for dV and dK): RS = 2, PS = 2 kBlock.
template <int MR, int NV, int64_t d, int64_t RS, int64_t PS>
inline void pv_tile(const uint16_t* pb, const uint16_t* v2, int64_t npairs, int64_t e0, float* o) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * d + e0 + c * 16);
  const uint16_t* vp = v2 + e0 * 2;
  for (int64_t p = 0; p < npairs; ++p) {
    __m512bh vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = bh(_mm512_loadu_si512(vp + p * d * 2 + c * 32));
    for (int r = 0; r < MR; ++r) {
      const __m512bh pr = bh(_mm512_set1_epi32(static_cast<int>(pair_at(pb + r * RS + p * PS))));
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pr, vv[c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * d + e0 + c * 16, acc[r][c]);
}

template <int MR, int64_t d, int64_t RS = kBlock, int64_t PS = 2>
inline void pv_rows(const uint16_t* pb, const uint16_t* v2, int64_t npairs, float* o) {
  int64_t e0 = 0;
  for (; e0 + 32 <= d; e0 += 32) pv_tile<MR, 2, d, RS, PS>(pb, v2, npairs, e0, o);
  if (e0 < d) pv_tile<MR, 1, d, RS, PS>(pb, v2, npairs, e0, o);
}

// pv_rows for n <= MR rows (remainder tiles).
template <int MR, int64_t d, int64_t RS, int64_t PS>
inline void pv_rows_n(int64_t n, const uint16_t* pb, const uint16_t* v2, int64_t npairs, float* o) {
  if constexpr (MR > 0) {
    if (n == MR) return pv_rows<MR, d, RS, PS>(pb, v2, npairs, o);
    return pv_rows_n<MR - 1, d, RS, PS>(n, pb, v2, npairs, o);
  }
}

template <int MR, int64_t d>
inline void rows_tile(const FwdItemBf16& it, int64_t r0) {
  alignas(64) float s[MR * kBlock];
  alignas(64) uint16_t pb[MR * kBlock];
  alignas(64) float o[MR * d];
  const uint16_t* q = it.q + r0 * d;
  float m[MR], l[MR];
  for (int r = 0; r < MR; ++r) {
    m[r] = -__builtin_inff();
    l[r] = 0.0f;
  }
  for (int64_t e = 0; e < MR * d; ++e) o[e] = 0.0f;
  const int64_t lim_lo = r0 + it.diag, lim_hi = r0 + MR - 1 + it.diag;
  const int64_t nblocks = it.nkp / kBlock;
  for (int64_t kb = 0; kb < nblocks; ++kb) {
    const int64_t j0 = kb * kBlock;
    int64_t nj = it.block_end[kb];
    if (nj == 0) continue;
    if (it.causal) {
      if (j0 > lim_hi) break;
      if (j0 + nj - 1 > lim_hi) nj = lim_hi - j0 + 1;
    }
    const int64_t ncols = (nj + 31) / 32 * 32;
    scores_tile<MR, d>(q, it.kt, j0, ncols, it.qk_scale, s);
    if (!it.block_full[kb] || ncols != nj) {
      for (int r = 0; r < MR; ++r)
        for (int64_t jj = 0; jj < ncols; jj += 16)
          _mm512_storeu_ps(s + r * kBlock + jj,
                           _mm512_add_ps(_mm512_loadu_ps(s + r * kBlock + jj), _mm512_loadu_ps(it.kbias + j0 + jj)));
    }
    if (it.causal && j0 + ncols - 1 > lim_lo) {
      for (int r = 0; r < MR; ++r) {
        int64_t first_bad = r0 + r + it.diag + 1 - j0;
        if (first_bad < 0) first_bad = 0;
        for (int64_t jj = first_bad; jj < ncols; ++jj) s[r * kBlock + jj] = -__builtin_inff();
      }
    }
    for (int r = 0; r < MR; ++r) {
      float* sr = s + r * kBlock;
      uint16_t* pr = pb + r * kBlock;
      __m512 mv = _mm512_loadu_ps(sr);
      for (int64_t jj = 16; jj < ncols; jj += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sr + jj));
      const float bm = _mm512_reduce_max_ps(mv);
      const float mnew = bm > m[r] ? bm : m[r];
      if (mnew == -__builtin_inff()) {  // nothing attendable yet in this row
        std::memset(pr, 0, ncols * sizeof(uint16_t));
        continue;
      }
      const __m512 mb = _mm512_set1_ps(mnew);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t jj = 0; jj < ncols; jj += 16) {
        const __m256bh p16 = _mm512_cvtneps_pbh(exp2z(_mm512_sub_ps(_mm512_loadu_ps(sr + jj), mb)));
        const __m256i bits = (__m256i)p16;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + jj), bits);
        // the row sum over the rounded P, so the weights P V uses sum to 1 after normalising
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
      }
      if (mnew != m[r]) {
        const float alpha = __builtin_exp2f(m[r] - mnew);  // 0 when m[r] = -inf
        const __m512 ab = _mm512_set1_ps(alpha);
        for (int64_t e = 0; e < d; e += 16)
          _mm512_storeu_ps(o + r * d + e, _mm512_mul_ps(_mm512_loadu_ps(o + r * d + e), ab));
        l[r] *= alpha;
        m[r] = mnew;
      }
      l[r] += _mm512_reduce_add_ps(sum);
    }
    // P is 0 in columns [nj, ncols): an odd nj rounds up to a pair with a zero weight
    pv_rows<MR, d>(pb, it.v + j0 * d, (nj + 1) / 2, o);
  }
  for (int r = 0; r < MR; ++r) {
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    const __m512 ib = _mm512_set1_ps(inv);
    float* dst = it.o + (r0 + r) * d;
    for (int64_t e = 0; e < d; e += 16) _mm512_storeu_ps(dst + e, _mm512_mul_ps(_mm512_loadu_ps(o + r * d + e), ib));
    it.lse2[r0 + r] = l[r] > 0.0f ? m[r] + __builtin_log2f(l[r]) : -__builtin_inff();
  }
}

template <int MR, int64_t d>
inline void rows_tail(const FwdItemBf16& it, int64_t r0, int64_t n) {
  if constexpr (MR > 0) {
    if (n == MR) return rows_tile<MR, d>(it, r0);
    return rows_tail<MR - 1, d>(it, r0, n);
  }
}

template <int64_t d>
void forward_d(const FwdItemBf16& it) {
  int64_t r0 = 0;
  for (; r0 + kMR <= it.nq; r0 += kMR) rows_tile<kMR, d>(it, r0);
  if (r0 < it.nq) rows_tail<kMR - 1, d>(it, r0, it.nq - r0);
}

// NOTHROW: this file is built with AVX-512 enabled; attention.cpp admits only these dims.
void forward_avx512bf16(const FwdItemBf16& it) { FLUID_DISPATCH_HEAD_DIM_NOTHROW(it.d, kD, forward_d<kD>(it)); }

// ---- backward ------------------------------------------------------------------------------
// Query rows in groups of kGroup (even, so row pairs never straddle groups); per group and key
// block: for each tile of MR rows S and dP (8 x 2 zmm accumulators each, as the forward's scores),
// P = exp2(S - lse2) and dS = P (dP - delta) scale in fp32, dQ rows += dS K at once; P and dS go
// to the group's buffers rounded to bf16 with rows interleaved in pairs, so that dV += Pᵀ dO and
// dK += dSᵀ Q run as the same pair-product tiles with keys as rows: a key's (row i, row i + 1)
// pair is one 32-bit broadcast, no transpose.
constexpr int64_t kGroup = 64;

// 16 lanes of two rows as 32-bit words (lo = row r's bf16 bits, hi = row r + 1's).
inline __m512i pair_words(__m256i lo, __m256i hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}

template <int MR, int64_t d>
inline void bwd_subtile(const BwdItemBf16& it, int64_t r0, int64_t g0, int64_t j0, int64_t nj, int64_t ncols,
                        bool full, uint16_t* pp, uint16_t* dsp) {
  alignas(64) float s[MR * kBlock];
  alignas(64) float dp[MR * kBlock];
  alignas(64) uint16_t dsr[MR * kBlock];
  // the row pairs of this tile in the group's interleaved buffers (r0 - g0 is even)
  uint16_t* ppt = pp + (r0 - g0) * kBlock;
  uint16_t* dspt = dsp + (r0 - g0) * kBlock;
  constexpr int kPairs = (MR + 1) / 2;
  if (it.causal && j0 > r0 + MR - 1 + it.diag) {  // no row of this tile sees the block
    std::memset(ppt, 0, kPairs * 2 * kBlock * sizeof(uint16_t));
    std::memset(dspt, 0, kPairs * 2 * kBlock * sizeof(uint16_t));
    return;
  }
  scores_tile<MR, d>(it.q + r0 * d, it.kt, j0, ncols, it.qk_scale, s);
  scores_tile<MR, d>(it.dout + r0 * d, it.vt, j0, ncols, 1.0f, dp);
  if (!full) {
    for (int r = 0; r < MR; ++r)
      for (int64_t jj = 0; jj < ncols; jj += 16)
        _mm512_storeu_ps(s + r * kBlock + jj,
                         _mm512_add_ps(_mm512_loadu_ps(s + r * kBlock + jj), _mm512_loadu_ps(it.kbias + j0 + jj)));
  }
  if (it.causal && j0 + ncols - 1 > r0 + it.diag) {
    for (int r = 0; r < MR; ++r) {
      int64_t first_bad = r0 + r + it.diag + 1 - j0;
      if (first_bad < 0) first_bad = 0;
      for (int64_t jj = first_bad; jj < ncols; ++jj) s[r * kBlock + jj] = -__builtin_inff();
    }
  }
  const __m512 sc = _mm512_set1_ps(it.scale);
  for (int r = 0; r < MR; r += 2) {
    __m256i pbits[2], dbits[2];
    for (int64_t jj = 0; jj < ncols; jj += 16) {
      for (int h = 0; h < 2; ++h) {
        if (r + h >= MR) {  // the partner of an odd tile's last row: weight 0
          pbits[h] = dbits[h] = _mm256_setzero_si256();
          continue;
        }
        const int64_t off = (r + h) * kBlock + jj;
        const __m512 p = exp2z(_mm512_sub_ps(_mm512_loadu_ps(s + off), _mm512_set1_ps(it.lse2[r0 + r + h])));
        const __m512 dsv = _mm512_mul_ps(
            _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + off), _mm512_set1_ps(it.delta[r0 + r + h]))), sc);
        pbits[h] = (__m256i)_mm512_cvtneps_pbh(p);
        dbits[h] = (__m256i)_mm512_cvtneps_pbh(dsv);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsr + off), dbits[h]);
      }
      _mm512_storeu_si512(ppt + (r / 2) * 2 * kBlock + 2 * jj, pair_words(pbits[0], pbits[1]));
      _mm512_storeu_si512(dspt + (r / 2) * 2 * kBlock + 2 * jj, pair_words(dbits[0], dbits[1]));
    }
  }
  // dS is 0 in columns [nj, ncols) (masked), so an odd nj rounds up to a pair with a zero weight
  pv_rows<MR, d>(dsr, it.k2 + j0 * d, (nj + 1) / 2, it.dq + r0 * d);
}

template <int MR, int64_t d>
inline void bwd_subtile_n(int64_t n, const BwdItemBf16& it, int64_t r0, int64_t g0, int64_t j0, int64_t nj,
                          int64_t ncols, bool full, uint16_t* pp, uint16_t* dsp) {
  if constexpr (MR > 0) {
    if (n == MR) return bwd_subtile<MR, d>(it, r0, g0, j0, nj, ncols, full, pp, dsp);
    return bwd_subtile_n<MR - 1, d>(n, it, r0, g0, j0, nj, ncols, full, pp, dsp);
  }
}

template <int64_t d>
void backward_d(const BwdItemBf16& it) {
  alignas(64) uint16_t pp[kGroup * kBlock];   // P, rows interleaved in pairs
  alignas(64) uint16_t dsp[kGroup * kBlock];  // dS, likewise
  const int64_t nblocks = it.nkp / kBlock;
  for (int64_t g0 = 0; g0 < it.nq; g0 += kGroup) {
    const int64_t g1 = g0 + kGroup < it.nq ? g0 + kGroup : it.nq;
    const int64_t npairs = (g1 - g0 + 1) / 2;  // an odd last row pairs with q2 / do2's zero row
    const int64_t lim_hi = g1 - 1 + it.diag;
    for (int64_t kb = 0; kb < nblocks; ++kb) {
      const int64_t j0 = kb * kBlock;
      int64_t nj = it.block_end[kb];
      if (nj == 0) continue;
      if (it.causal) {
        if (j0 > lim_hi) break;
        if (j0 + nj - 1 > lim_hi) nj = lim_hi - j0 + 1;
      }
      const int64_t ncols = (nj + 31) / 32 * 32;
      const bool full = it.block_full[kb] && ncols == nj;
      for (int64_t r0 = g0; r0 < g1; r0 += kMR) {
        const int64_t n = g1 - r0 < kMR ? g1 - r0 : kMR;
        bwd_subtile_n<kMR, d>(n, it, r0, g0, j0, nj, ncols, full, pp, dsp);
      }
      for (int64_t k0 = 0; k0 < nj; k0 += kMR) {
        const int64_t n = nj - k0 < kMR ? nj - k0 : kMR;
        pv_rows_n<kMR, d, 2, 2 * kBlock>(n, pp + 2 * k0, it.do2 + g0 * d, npairs, it.dv + (j0 + k0) * d);
        pv_rows_n<kMR, d, 2, 2 * kBlock>(n, dsp + 2 * k0, it.q2 + g0 * d, npairs, it.dk + (j0 + k0) * d);
      }
    }
  }
}

void backward_avx512bf16(const BwdItemBf16& it) { FLUID_DISPATCH_HEAD_DIM_NOTHROW(it.d, kD, backward_d<kD>(it)); }

}  // namespace

FwdKernelBf16 fwd_kernel_avx512bf16() { return &forward_avx512bf16; }
BwdKernelBf16 bwd_kernel_avx512bf16() { return &backward_avx512bf16; }

}  // namespace attn
}  // namespace cpu
}  // namespace fluid

#else
namespace fluid { namespace cpu { namespace attn {
FwdKernelBf16 fwd_kernel_avx512bf16() { return nullptr; }
BwdKernelBf16 bwd_kernel_avx512bf16() { return nullptr; }
}}}  // namespace fluid::cpu::attn
#endif
