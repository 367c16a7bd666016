// Attention backward on tensor cores (docs/contracts.md §2.1): the preprocess and the dk/dv pass, and the
// host entry point (the dq pass is in attention_bwd_dq.cu so the two compile in parallel).
//
// Two modes, chosen by the caller (fluid_ops/ops/attention.py, as the Triton backend chooses):
// * deterministic (default): dk/dv here, then the dq pass of attention_bwd_dq.cu; no atomics,
//   fixed reduction order, bit-reproducible;
// * atomic (dq_accum given): the dk/dv pass also stages dSᵀ in shared memory and adds its
//   dQ share, dS K, into an fp32 buffer with atomicAdd (no second pass: two fewer GEMMs per tile
//   pair, last-bit differences between runs).
//
// 1. preprocess, one warp per query row: delta = rowsum(dO * O) and lse2 = lse * log2 e (+inf
//    for rows with no key, so their probabilities recompute to exactly 0).
// 2. dk/dv: one block per (64-key tile, head, batch), warp w owns keys 16w .. 16w+15; K and V
//    stay in shared memory, query tiles of 32 rows stream through. Computed transposed so the
//    results land in the accumulators' layout: Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, Pᵀ = exp2(Sᵀ·scale·log2 e
//    - lse2), dSᵀ = Pᵀ ∘ (dPᵀ - delta) (bwd_scores / bwd_probs of attention_common.cuh, as the dq
//    pass), dV += Pᵀ dO, dK += dSᵀ Q (· scale at the end). Key tiles that are all padding write
//    zeros and load nothing; causal starts at the first query that sees the tile's first key.
// Pᵀ and dSᵀ are rounded to the input dtype for the two GEMMs that consume them (as flash-attn).
#include <cmath>

#include "../common/dispatch.h"
#include "attention_common.cuh"
#include "attention.h"

namespace fluid {
namespace cuda {
namespace attn {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_pre_kernel(const BwdParams p, int d, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int64_t i = row % p.nq, bh = row / p.nq;
  const int64_t hh = bh % p.h, bb = bh / p.h;
  const T* orow = static_cast<const T*>(p.o) + bb * p.o_sb + i * p.o_sn + hh * p.o_sh;
  const T* drow = static_cast<const T*>(p.dout) + bb * p.do_sb + i * p.do_sn + hh * p.do_sh;
  float acc = 0.f;
  for (int c = lane; c < d; c += 32) acc += static_cast<float>(orow[c]) * static_cast<float>(drow[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const float l = p.lse[row];  // (B, H, Nq) contiguous: row = (b * H + h) * Nq + i
    p.delta[row] = acc;
    p.lse2[row] = l == -INFINITY ? INFINITY : l * kLog2e;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(const BwdParams p) {
  constexpr int LDS = D + 8, BN = kBlockN, BQ = kBlockQ;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * LDS;
  T* sQ = sV + BN * LDS;
  T* sdO = sQ + BQ * LDS;
  float* sL = reinterpret_cast<float*>(sdO + BQ * LDS);
  float* sDl = sL + BQ;
  constexpr int LDSS = BQ + 8;  // pitch of the dSᵀ staging tile (atomic mode)
  T* sDS = reinterpret_cast<T*>(sDl + BQ);

  const int n0 = blockIdx.x * BN, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int nq = p.nq, nk = p.nk, diag = nk - nq;
  const int64_t bh = static_cast<int64_t>(b) * p.h + h;
  const uint8_t* mrow = p.mask != nullptr ? p.mask + b * p.m_sb : nullptr;

  const int key_r[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};
  bool key_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
    key_ok[r] = key_r[r] < nk && (mrow == nullptr || mrow[key_r[r] * p.m_sn] != 0);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  const int q_first = p.causal ? max(0, n0 - diag) : 0;  // the first query that may see key n0
  const bool tile_live = (p.tile_any == nullptr || p.tile_any[b * p.t_sb + blockIdx.x] != 0) && q_first < nq;
  if (tile_live) {
    const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
    const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
    const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
    const T* dob = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
    load_tile<T, D, BN>(sK, kb, p.k_sn, n0, nk, tid);
    load_tile<T, D, BN>(sV, vb, p.v_sn, n0, nk, tid);
    cp_async_commit();
    for (int q0 = (q_first / BQ) * BQ; q0 < nq; q0 += BQ) {
      load_tile<T, D, BQ>(sQ, qb, p.q_sn, q0, nq, tid);
      load_tile<T, D, BQ>(sdO, dob, p.do_sn, q0, nq, tid);
      cp_async_commit();
      if (tid < BQ) {
        const int i = q0 + tid;
        sL[tid] = i < nq ? p.lse2[bh * nq + i] : INFINITY;  // +inf: P = 0 for rows past Nq
        sDl[tid] = i < nq ? p.delta[bh * nq + i] : 0.f;
      }
      cp_async_wait<0>();
      __syncthreads();

      float st[BQ / 8][4], dpt[BQ / 8][4];
      bwd_scores<T, D, BQ>(st, dpt, sK, sV, sQ, sdO, warp, lane);
      // Pᵀ and dSᵀ: rows are keys (key_r), columns queries (q0 + 8 nt + 2 t4 + (e & 1))
      bwd_probs(
          st, dpt, p.scale_log2,
          [&](int nt, int e) {
            const int qi = q0 + nt * 8 + t4 * 2 + (e & 1), r = e >> 1;
            bool ok = key_ok[r] && qi < nq;
            if (p.causal) ok = ok && key_r[r] <= qi + diag;
            return ok;
          },
          [&](int nt, int e) { return sL[nt * 8 + t4 * 2 + (e & 1)]; },
          [&](int nt, int e) { return sDl[nt * 8 + t4 * 2 + (e & 1)]; });
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        const uint32_t ap[4] = {Mma<T>::pack(st[2 * kk][0], st[2 * kk][1]), Mma<T>::pack(st[2 * kk][2], st[2 * kk][3]),
                                Mma<T>::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                Mma<T>::pack(st[2 * kk + 1][2], st[2 * kk + 1][3])};
        const uint32_t as[4] = {Mma<T>::pack(dpt[2 * kk][0], dpt[2 * kk][1]),
                                Mma<T>::pack(dpt[2 * kk][2], dpt[2 * kk][3]),
                                Mma<T>::pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                Mma<T>::pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bd[4], bq[4];
          ldsm_x4_trans(bd, sdO + bkn_offset<LDS>(kk * 16, dp * 16, lane));
          Mma<T>::run(dv[2 * dp], ap, bd[0], bd[1]);
          Mma<T>::run(dv[2 * dp + 1], ap, bd[2], bd[3]);
          ldsm_x4_trans(bq, sQ + bkn_offset<LDS>(kk * 16, dp * 16, lane));
          Mma<T>::run(dk[2 * dp], as, bq[0], bq[1]);
          Mma<T>::run(dk[2 * dp + 1], as, bq[2], bq[3]);
        }
      }
      if (p.dq_accum != nullptr) {
        // atomic mode: dSᵀ (rounded to T, as for the dK GEMM) -> shared, then
        // dQ[q0 .. q0 + 32) += dS K · scale. Warp w: query rows 16 (w & 1) .., column pairs of
        // 16 with index = w >> 1 (mod 2). A = dS [query][key] is dSᵀ [key][query] read with
        // ldmatrix.trans in the [n][k] address pattern; B = K [key][d] with .trans.
#pragma unroll
        for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            store2<T>(sDS + (warp * 16 + g + 8 * r) * LDSS + nt * 8 + t4 * 2, dpt[nt][2 * r], dpt[nt][2 * r + 1]);
        __syncthreads();
        const int mt = warp & 1;
        float* dqa = p.dq_accum + b * p.dqa_sb + h * p.dqa_sh;
        for (int pp = warp >> 1; pp < D / 16; pp += 2) {
          float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4], bk[4];
            ldsm_x4_trans(a, sDS + bnk_offset<LDSS>(kk * 16, mt * 16, lane));
            ldsm_x4_trans(bk, sK + bkn_offset<LDS>(kk * 16, pp * 16, lane));
            Mma<T>::run(c[0], a, bk[0], bk[1]);
            Mma<T>::run(c[1], a, bk[2], bk[3]);
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int qi = q0 + mt * 16 + g + 8 * r;
            if (qi >= nq) continue;
            float* row = dqa + static_cast<int64_t>(qi) * p.dqa_sn + pp * 16 + t4 * 2;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              atomicAdd(row + half * 8, c[half][2 * r] * p.scale);
              atomicAdd(row + half * 8 + 1, c[half][2 * r + 1] * p.scale);
            }
          }
        }
      }
      __syncthreads();  // before the next query tile overwrites sQ / sdO / sL / sDl / sDS
    }
  }

  T* dkb = static_cast<T*>(p.dk) + b * p.dk_sb + h * p.dk_sh;
  T* dvb = static_cast<T*>(p.dv) + b * p.dv_sb + h * p.dv_sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key_r[r];
    if (key >= nk) continue;
    T* dkrow = dkb + static_cast<int64_t>(key) * p.dk_sn;
    T* dvrow = dvb + static_cast<int64_t>(key) * p.dv_sn;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      store2<T>(dkrow + dt * 8 + t4 * 2, dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
      store2<T>(dvrow + dt * 8 + t4 * 2, dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

template <typename T, int D>
void launch_dkdv(const BwdParams& p, int b, cudaStream_t stream) {
  constexpr int bytes = dkdv_smem_bytes<T, D>();
  set_dynamic_smem(reinterpret_cast<const void*>(&attn_bwd_dkdv_kernel<T, D>), bytes, "attention_bwd (dk/dv)");
  const dim3 grid((p.nk + kBlockN - 1) / kBlockN, p.h, b);
  attn_bwd_dkdv_kernel<T, D><<<grid, kThreads, bytes, stream>>>(p);
}

template <typename T>
void dispatch_dkdv(const BwdParams& p, int d, int b, cudaStream_t stream) {
  FLUID_DISPATCH_HEAD_DIM(d, kD, launch_dkdv<T, kD>(p, b, stream));
}

}  // namespace
}  // namespace attn

void attention_bwd(const TensorView& dout, const TensorView& q, const TensorView& k,
                   const TensorView& v, const TensorView& o, const TensorView& lse,
                   const TensorView* key_padding_mask, const TensorView* tile_any,
                   const TensorView& dq, const TensorView& dk, const TensorView& dv,
                   const TensorView& delta, const TensorView& lse2, const TensorView* dq_accum,
                   bool causal, float softmax_scale, uintptr_t stream) {
  const AttnShape s = check_attention_args(q, k, v, key_padding_mask, tile_any, "attention_bwd");
  if (dq_accum != nullptr) {
    check_dtype(*dq_accum, DType::F32, "dq_accum");
    FLUID_CHECK(dq_accum->ndim == 4 && dq_accum->shape[0] == s.b && dq_accum->shape[1] == s.nq &&
                    dq_accum->shape[2] == s.h && dq_accum->shape[3] == s.d && dq_accum->is_contiguous(),
                "dq_accum must be a contiguous float32 tensor of q's shape");
  }
  check_attention_out(dout, q, "dout");
  check_attention_out(o, q, "o");
  check_attention_out(dq, q, "dq");
  check_attention_out(dk, k, "dk");
  check_attention_out(dv, v, "dv");
  for (const auto& [t, name] : {std::pair<const TensorView*, const char*>{&lse, "lse"}, {&delta, "delta"}, {&lse2, "lse2"}}) {
    check_dtype(*t, DType::F32, name);
    FLUID_CHECK(t->ndim == 3 && t->shape[0] == s.b && t->shape[1] == s.h && t->shape[2] == s.nq && t->is_contiguous(),
                std::string(name) + " must be a contiguous (B, H, Nq) float32 tensor");
  }
  FLUID_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0.f, "softmax_scale must be finite and > 0");
  if (s.b == 0 || s.h == 0 || s.nq == 0 || s.nk == 0) return;  // the Python layer returns zeros for these

  attn::BwdParams p{};
  p.q = q.data; p.k = k.data; p.v = v.data; p.o = o.data; p.dout = dout.data; p.lse = lse.ptr<const float>();
  p.dq = dq.data; p.dk = dk.data; p.dv = dv.data; p.delta = delta.ptr<float>(); p.lse2 = lse2.ptr<float>();
  p.dq_accum = dq_accum != nullptr ? dq_accum->ptr<float>() : nullptr;
  if (dq_accum != nullptr) {
    p.dqa_sb = dq_accum->stride[0]; p.dqa_sn = dq_accum->stride[1]; p.dqa_sh = dq_accum->stride[2];
  }
  p.mask = key_padding_mask ? key_padding_mask->ptr<const uint8_t>() : nullptr;
  p.tile_any = tile_any ? tile_any->ptr<const uint8_t>() : nullptr;
  p.q_sb = q.stride[0]; p.q_sn = q.stride[1]; p.q_sh = q.stride[2];
  p.k_sb = k.stride[0]; p.k_sn = k.stride[1]; p.k_sh = k.stride[2];
  p.v_sb = v.stride[0]; p.v_sn = v.stride[1]; p.v_sh = v.stride[2];
  p.o_sb = o.stride[0]; p.o_sn = o.stride[1]; p.o_sh = o.stride[2];
  p.do_sb = dout.stride[0]; p.do_sn = dout.stride[1]; p.do_sh = dout.stride[2];
  p.dq_sb = dq.stride[0]; p.dq_sn = dq.stride[1]; p.dq_sh = dq.stride[2];
  p.dk_sb = dk.stride[0]; p.dk_sn = dk.stride[1]; p.dk_sh = dk.stride[2];
  p.dv_sb = dv.stride[0]; p.dv_sn = dv.stride[1]; p.dv_sh = dv.stride[2];
  p.m_sb = key_padding_mask ? key_padding_mask->stride[0] : 0;
  p.m_sn = key_padding_mask ? key_padding_mask->stride[1] : 0;
  p.t_sb = tile_any ? tile_any->stride[0] : 0;
  p.nq = static_cast<int>(s.nq); p.nk = static_cast<int>(s.nk); p.h = static_cast<int>(s.h);
  p.scale = softmax_scale;
  p.scale_log2 = softmax_scale * attn::kLog2e;
  p.causal = causal;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int d = static_cast<int>(s.d), b = static_cast<int>(s.b);

  const int64_t rows = s.b * s.h * s.nq;
  const int64_t pre_blocks = (rows + attn::kThreads / 32 - 1) / (attn::kThreads / 32);
  FLUID_CHECK(pre_blocks < (int64_t{1} << 31), "B * H * Nq too large");
  FLUID_DISPATCH_CUDA_HALF(q.dtype, T, {
    attn::attn_bwd_pre_kernel<T><<<static_cast<unsigned>(pre_blocks), attn::kThreads, 0, st>>>(p, d, rows);
    check_launch("attention_bwd (preprocess)");
    attn::dispatch_dkdv<T>(p, d, b, st);
  });
  check_launch("attention_bwd (dk/dv)");
  if (dq_accum == nullptr) {  // deterministic: the separate dq pass
    attn::launch_bwd_dq(p, q.dtype, d, b, st);
    check_launch("attention_bwd (dq)");
  }
}

}  // namespace cuda
}  // namespace fluid
