// The SIMD forward kernel of attention, written once over a vector type V and instantiated by
// attention_avx2.cpp (8 lanes) and attention_avx512.cpp (16 lanes) after their ISA setup.
// Everything here is a template on V, so the two instantiations never share a symbol (no
// AVX-512 code can be picked by the linker for a caller on a CPU without it).
//
// V provides: kW (lanes), zero(), set1(f), load(p), store(p, v), add, sub, mul, max,
// fmadd(a, b, c) = a*b + c, hmax(v), hsum(v), exp2z(x) = 2^x for x <= 0 and 0 for x < -126.
//
// Per item: for a tile of MR query rows, S = Q Kᵀ over a key block as MR x (2 vectors) register
// accumulators (broadcast q, two K vectors from the packed chunks), then the online softmax
// update (max, exp2, rescale), then O += P V as MR x (2 vectors of D) accumulators.
#pragma once
#include "../common/dispatch.h"
#include "attention.h"

namespace fluid {
namespace cpu {
namespace attn {
namespace simd {

// S[r][j] for j in [0, ncols) of the block starting at key j0 (ncols a multiple of 2 * kW).
template <class V, int MR, int64_t d>
inline void scores_tile(const float* q, const float* kt, int64_t j0, int64_t ncols, float* s) {
  constexpr int W = V::kW;
  for (int64_t jj = 0; jj < ncols; jj += 2 * W) {
    const int64_t j = j0 + jj;
    const float* k0 = kt + (j / 16) * d * 16 + (j % 16);
    const float* k1 = kt + ((j + W) / 16) * d * 16 + ((j + W) % 16);
    typename V::T acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = V::zero();
    for (int64_t e = 0; e < d; ++e) {
      auto kv0 = V::load(k0 + e * 16);
      auto kv1 = V::load(k1 + e * 16);
      for (int r = 0; r < MR; ++r) {
        auto qb = V::set1(q[r * d + e]);
        acc[r][0] = V::fmadd(qb, kv0, acc[r][0]);
        acc[r][1] = V::fmadd(qb, kv1, acc[r][1]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      V::store(s + r * kBlock + jj, acc[r][0]);
      V::store(s + r * kBlock + jj + W, acc[r][1]);
    }
  }
}

// O[r][e0 .. e0 + NV*W) += sum_j P[r][j] V[j0 + j][...] for j < nj, with P[r][j] at
// p[r * pstride + j], or at p[r + j * pstride] when TRANS (the backward's Pᵀ / dSᵀ, read in place).
template <class V, int MR, int NV, int64_t d, bool TRANS>
inline void pv_tile(const float* p, int64_t pstride, const float* v, int64_t j0, int64_t nj, int64_t e0,
                    float* o) {
  constexpr int W = V::kW;
  typename V::T acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = V::load(o + r * d + e0 + c * W);
  const float* vp = v + j0 * d + e0;
  for (int64_t j = 0; j < nj; ++j) {
    typename V::T vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = V::load(vp + j * d + c * W);
    for (int r = 0; r < MR; ++r) {
      auto pb = V::set1(TRANS ? p[r + j * pstride] : p[r * pstride + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = V::fmadd(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) V::store(o + r * d + e0 + c * W, acc[r][c]);
}

// O rows [0, MR) (stride d) += P (MR x nj, see pv_tile) times rows [j0, j0 + nj) of v.
template <class V, int MR, int64_t d, bool TRANS = false>
inline void pv_rows(const float* p, int64_t pstride, const float* v, int64_t j0, int64_t nj, float* o) {
  constexpr int W = V::kW;
  int64_t e0 = 0;
  for (; e0 + 2 * W <= d; e0 += 2 * W) pv_tile<V, MR, 2, d, TRANS>(p, pstride, v, j0, nj, e0, o);
  if (e0 < d) pv_tile<V, MR, 1, d, TRANS>(p, pstride, v, j0, nj, e0, o);
}

// pv_rows for n <= MR rows (remainder tiles).
template <class V, int MR, int64_t d, bool TRANS = false>
inline void pv_rows_n(int64_t n, const float* p, int64_t pstride, const float* v, int64_t j0, int64_t nj,
                      float* o) {
  if constexpr (MR > 0) {
    if (n == MR) return pv_rows<V, MR, d, TRANS>(p, pstride, v, j0, nj, o);
    return pv_rows_n<V, MR - 1, d, TRANS>(n, p, pstride, v, j0, nj, o);
  }
}

template <class V, int MR, int64_t d>
inline void rows_tile(const FwdItem& it, int64_t r0) {
  constexpr int W = V::kW;
  const float* q = it.q + r0 * d;
  float* s = it.scratch;                  // MR x kBlock scores / probabilities
  float* o = it.scratch + kMaxRows * kBlock;  // MR x d accumulators (d <= 128)
  float m[MR], l[MR];
  for (int r = 0; r < MR; ++r) {
    m[r] = -__builtin_inff();
    l[r] = 0.0f;
    for (int64_t e = 0; e < d; ++e) o[r * d + e] = 0.0f;
  }
  // causal: row r attends keys j <= r0 + r + diag
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
    const int64_t ncols = (nj + 2 * W - 1) / (2 * W) * (2 * W);
    scores_tile<V, MR, d>(q, it.kt, j0, ncols, s);
    if (!it.block_full[kb] || ncols != nj) {
      for (int r = 0; r < MR; ++r)
        for (int64_t jj = 0; jj < ncols; jj += W)
          V::store(s + r * kBlock + jj,
                   V::add(V::load(s + r * kBlock + jj), V::load(it.kbias + j0 + jj)));
    }
    if (it.causal && j0 + ncols - 1 > lim_lo) {
      for (int r = 0; r < MR; ++r) {
        int64_t first_bad = r0 + r + it.diag + 1 - j0;  // first masked column of this row
        if (first_bad < 0) first_bad = 0;
        for (int64_t jj = first_bad; jj < ncols; ++jj) s[r * kBlock + jj] = -__builtin_inff();
      }
    }
    for (int r = 0; r < MR; ++r) {
      float* sr = s + r * kBlock;
      auto mv = V::load(sr);
      for (int64_t jj = W; jj < ncols; jj += W) mv = V::max(mv, V::load(sr + jj));
      const float bm = V::hmax(mv);
      const float mnew = bm > m[r] ? bm : m[r];
      if (mnew == -__builtin_inff()) {  // nothing attendable yet in this row
        for (int64_t jj = 0; jj < ncols; jj += W) V::store(sr + jj, V::zero());
        continue;
      }
      const auto mb = V::set1(mnew);
      auto sum = V::zero();
      for (int64_t jj = 0; jj < ncols; jj += W) {
        auto p = V::exp2z(V::sub(V::load(sr + jj), mb));
        V::store(sr + jj, p);
        sum = V::add(sum, p);
      }
      if (mnew != m[r]) {
        const float alpha = __builtin_exp2f(m[r] - mnew);  // 0 when m[r] = -inf
        const auto ab = V::set1(alpha);
        for (int64_t e = 0; e < d; e += W) V::store(o + r * d + e, V::mul(V::load(o + r * d + e), ab));
        l[r] *= alpha;
        m[r] = mnew;
      }
      l[r] += V::hsum(sum);
    }
    pv_rows<V, MR, d>(s, kBlock, it.v, j0, nj, o);
  }
  for (int r = 0; r < MR; ++r) {
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    const auto ib = V::set1(inv);
    float* dst = it.o + (r0 + r) * d;
    for (int64_t e = 0; e < d; e += W) V::store(dst + e, V::mul(V::load(o + r * d + e), ib));
    it.lse2[r0 + r] = l[r] > 0.0f ? m[r] + __builtin_log2f(l[r]) : -__builtin_inff();
  }
}

template <class V, int MR, int64_t d>
inline void rows_tail(const FwdItem& it, int64_t r0, int64_t n) {
  if constexpr (MR > 0) {
    if (n == MR) return rows_tile<V, MR, d>(it, r0);
    return rows_tail<V, MR - 1, d>(it, r0, n);
  }
}

template <class V, int MR, int64_t d>
void forward_d(const FwdItem& it) {
  int64_t r0 = 0;
  for (; r0 + MR <= it.nq; r0 += MR) rows_tile<V, MR, d>(it, r0);
  if (r0 < it.nq) rows_tail<V, MR - 1, d>(it, r0, it.nq - r0);
}

// The head dim is a compile-time constant inside the kernels (fixed trip counts and offsets).
// NOTHROW: this header is built with AVX2 / AVX-512 enabled; attention.cpp admits only these dims.
template <class V, int MR>
void forward(const FwdItem& it) {
  FLUID_DISPATCH_HEAD_DIM_NOTHROW(it.d, kD, forward_d<V, MR, kD>(it));
}

// ---- backward ------------------------------------------------------------------------------
// For a group of up to kBwdGroup query rows and one key block: P = exp2(S2 - lse2) and
// dS = P (dP - delta) scale tile by tile (S2 = qs Kᵀ, dP = dO Vᵀ, both with scores_tile), dQ rows
// += dS K (pv_rows); then dV += Pᵀ dO and dK += dSᵀ Q run as the same register-tiled kernel with
// keys as rows and the group's query rows as the sum, reading P and dS transposed in place.
template <class V, int MR, int64_t d>
inline void bwd_subtile(const BwdItem& it, int64_t r0, int64_t g0, int64_t j0, int64_t nj, int64_t ncols,
                        bool full, float* pbuf, float* dsbuf) {
  constexpr int W = V::kW;
  float* p = pbuf + (r0 - g0) * kBlock;
  float* ds = dsbuf + (r0 - g0) * kBlock;
  if (it.causal && j0 > r0 + MR - 1 + it.diag) {  // no row of this tile sees the block
    for (int r = 0; r < MR; ++r)
      for (int64_t jj = 0; jj < ncols; jj += W) {
        V::store(p + r * kBlock + jj, V::zero());
        V::store(ds + r * kBlock + jj, V::zero());
      }
    return;
  }
  scores_tile<V, MR, d>(it.qs + r0 * d, it.kt, j0, ncols, p);
  scores_tile<V, MR, d>(it.dout + r0 * d, it.vt, j0, ncols, ds);
  if (!full) {
    for (int r = 0; r < MR; ++r)
      for (int64_t jj = 0; jj < ncols; jj += W)
        V::store(p + r * kBlock + jj, V::add(V::load(p + r * kBlock + jj), V::load(it.kbias + j0 + jj)));
  }
  if (it.causal && j0 + ncols - 1 > r0 + it.diag) {
    for (int r = 0; r < MR; ++r) {
      int64_t first_bad = r0 + r + it.diag + 1 - j0;
      if (first_bad < 0) first_bad = 0;
      for (int64_t jj = first_bad; jj < ncols; ++jj) p[r * kBlock + jj] = -__builtin_inff();
    }
  }
  const auto sc = V::set1(it.scale);
  for (int r = 0; r < MR; ++r) {
    const auto lb = V::set1(it.lse2[r0 + r]);
    const auto db = V::set1(it.delta[r0 + r]);
    for (int64_t jj = 0; jj < ncols; jj += W) {
      auto pv = V::exp2z(V::sub(V::load(p + r * kBlock + jj), lb));
      V::store(p + r * kBlock + jj, pv);
      V::store(ds + r * kBlock + jj, V::mul(V::mul(pv, V::sub(V::load(ds + r * kBlock + jj), db)), sc));
    }
  }
  pv_rows<V, MR, d>(ds, kBlock, it.k, j0, nj, it.dq + r0 * d);
}

template <class V, int MR, int64_t d>
inline void bwd_subtile_n(int64_t n, const BwdItem& it, int64_t r0, int64_t g0, int64_t j0, int64_t nj,
                          int64_t ncols, bool full, float* pbuf, float* dsbuf) {
  if constexpr (MR > 0) {
    if (n == MR) return bwd_subtile<V, MR, d>(it, r0, g0, j0, nj, ncols, full, pbuf, dsbuf);
    return bwd_subtile_n<V, MR - 1, d>(n, it, r0, g0, j0, nj, ncols, full, pbuf, dsbuf);
  }
}

template <class V, int MR, int64_t d>
void backward_d(const BwdItem& it) {
  constexpr int W = V::kW;
  float* pbuf = it.scratch;
  float* dsbuf = pbuf + kBwdGroup * kBlock;
  const int64_t nblocks = it.nkp / kBlock;
  for (int64_t g0 = 0; g0 < it.nq; g0 += kBwdGroup) {
    const int64_t g1 = g0 + kBwdGroup < it.nq ? g0 + kBwdGroup : it.nq;
    const int64_t ng = g1 - g0;
    const int64_t lim_hi = g1 - 1 + it.diag;
    for (int64_t kb = 0; kb < nblocks; ++kb) {
      const int64_t j0 = kb * kBlock;
      int64_t nj = it.block_end[kb];
      if (nj == 0) continue;
      if (it.causal) {
        if (j0 > lim_hi) break;
        if (j0 + nj - 1 > lim_hi) nj = lim_hi - j0 + 1;
      }
      const int64_t ncols = (nj + 2 * W - 1) / (2 * W) * (2 * W);
      const bool full = it.block_full[kb] && ncols == nj;
      for (int64_t r0 = g0; r0 < g1; r0 += MR) {
        const int64_t n = g1 - r0 < MR ? g1 - r0 : MR;
        bwd_subtile_n<V, MR, d>(n, it, r0, g0, j0, nj, ncols, full, pbuf, dsbuf);
      }
      for (int64_t k0 = 0; k0 < nj; k0 += MR) {
        const int64_t n = nj - k0 < MR ? nj - k0 : MR;
        pv_rows_n<V, MR, d, true>(n, pbuf + k0, kBlock, it.dout, g0, ng, it.dv + (j0 + k0) * d);
        pv_rows_n<V, MR, d, true>(n, dsbuf + k0, kBlock, it.q, g0, ng, it.dk + (j0 + k0) * d);
      }
    }
  }
}

template <class V, int MR>
void backward(const BwdItem& it) {
  FLUID_DISPATCH_HEAD_DIM_NOTHROW(it.d, kD, backward_d<V, MR, kD>(it));
}

}  // namespace simd
}  // namespace attn
}  // namespace cpu
}  // namespace fluid
