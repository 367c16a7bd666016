// Attention forward on tensor cores (docs/contracts.md §2.1), incl. the KV-cache path (per-batch key length).
//
// One block of 4 warps per (64-query tile, head, batch); warp w owns query rows 16w .. 16w+15 of
// the tile. Q is staged through shared memory once and kept as mma A fragments in registers;
// K / V tiles of 64 keys stream through shared memory with cp.async (the next K tile is fetched
// while the softmax and P V of the current one run, the next V tile while the next Q Kᵀ runs).
// S = Q Kᵀ and O += P V use mma.sync m16n8k16 (fp32 accumulate); the online softmax lives in
// registers, in base 2 (scores pre-multiplied by scale * log2 e, exp2f). P is rounded to the
// input dtype for P V (as flash-attn); l is summed from the unrounded fp32 probabilities.
//
// Skipped work: key tiles past the causal diagonal (bottom-right, j <= i + Lk - Nq) or past the
// valid length are never visited; with a key-padding mask, tiles whose tile_any entry is false
// (the host computes (B, ceil(Nk/64)) any() once per call, on the device) are never loaded.
// Element-wise masking runs only on tiles that need it (padding, ragged end, diagonal).
// Rows with no attendable key: o = 0, lse = -inf.
//
// Template instantiations: head dim {32, 64, 80, 96, 128} x {fp16, bf16} = 10; causal / mask /
// seqlens are runtime flags. fp32 inputs are declined by the Python supports hook (Triton runs them).
#include <cmath>

#include "../common/dispatch.h"
#include "attention_common.cuh"
#include "attention.h"

namespace fluid {
namespace cuda {
namespace attn {
namespace {

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const FwdParams p) {
  constexpr int LDS = D + 8;
  constexpr int BM = kBlockM, BN = kBlockN;
  __shared__ __align__(16) T sK[BN * LDS];
  __shared__ __align__(16) T sV[BN * LDS];  // also stages Q before the key loop

  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int nq = p.nq;
  int lk = p.nk;
  if (p.seqlens_k != nullptr) lk = min(max(p.seqlens_k[b], 0), p.nk);  // clamp: never read past Nk
  const int diag = lk - nq;  // query i may attend key j iff j <= i + diag (when causal)

  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const uint8_t* mrow = p.mask != nullptr ? p.mask + b * p.m_sb : nullptr;
  const uint8_t* trow = p.tile_any != nullptr ? p.tile_any + b * p.t_sb : nullptr;

  // keys [0, kend) can matter to this tile
  int kend = lk;
  if (p.causal) kend = min(kend, min(m0 + BM, nq) + diag);
  const int n_tiles = kend > 0 ? (kend + BN - 1) / BN : 0;
  auto next_tile = [&](int j) {
    if (trow != nullptr)
      while (j < n_tiles && trow[j] == 0) ++j;
    return j;
  };

  // Q -> registers (A fragments, one set of 4 regs per 16 columns of D)
  load_tile<T, D, BM>(sV, qb, p.q_sn, m0, nq, tid);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], sV + a_offset<LDS>(warp * 16, kk * 16, lane));
  __syncthreads();

  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
  const int row_r[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

  int j = next_tile(0);
  if (j < n_tiles) {
    load_tile<T, D, BN>(sK, kb, p.k_sn, j * BN, lk, tid);
    cp_async_commit();
    load_tile<T, D, BN>(sV, vb, p.v_sn, j * BN, lk, tid);
    cp_async_commit();
  }
  // Invariant at the loop top: the groups in flight are K_j then V_j (wait_group 1 -> K_j landed).
  while (j < n_tiles) {
    cp_async_wait<1>();
    __syncthreads();
    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bf[4];
        ldsm_x4(bf, sK + bnk_offset<LDS>(np * 16, kk * 16, lane));
        Mma<T>::run(s[2 * np], qf[kk], bf[0], bf[1]);
        Mma<T>::run(s[2 * np + 1], qf[kk], bf[2], bf[3]);
      }
    }
    __syncthreads();  // every warp is done with sK
    const int jn = next_tile(j + 1);
    if (jn < n_tiles) load_tile<T, D, BN>(sK, kb, p.k_sn, jn * BN, lk, tid);
    cp_async_commit();  // possibly empty group: keeps the wait_group counts uniform

    // scale (base 2) and mask
    const int n0 = j * BN;
    const bool need_mask = mrow != nullptr || n0 + BN > lk || (p.causal && n0 + BN - 1 > m0 + diag);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (need_mask) {
          const int col = n0 + nt * 8 + t4 * 2 + (e & 1);
          const int row = row_r[e >> 1];
          bool ok = col < lk;
          if (ok && mrow != nullptr) ok = mrow[col * p.m_sn] != 0;
          if (ok && p.causal) ok = col <= row + diag;
          if (!ok) x = -INFINITY;
        }
        s[nt][e] = x;
      }
    }
    // online softmax: rows g (r = 0: regs 0, 1) and g + 8 (r = 1: regs 2, 3)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = quad_max(mx);
      const float m_new = fmaxf(m_r[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // all -inf so far: exp2(-inf - 0) = 0
      const float alpha = exp2f(m_r[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        const float p0 = exp2f(s[nt][2 * r] - m_use), p1 = exp2f(s[nt][2 * r + 1] - m_use);
        s[nt][2 * r] = p0;
        s[nt][2 * r + 1] = p1;
        sum += p0 + p1;
      }
      l_r[r] = l_r[r] * alpha + sum;  // per-thread partial; the quad sums it at the end
      m_r[r] = m_new;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        acc[dt][2 * r] *= alpha;
        acc[dt][2 * r + 1] *= alpha;
      }
    }

    cp_async_wait<1>();  // in flight: V_j, K_jn -> V_j landed
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a[4] = {Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]), Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                             Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bf[4];
        ldsm_x4_trans(bf, sV + bkn_offset<LDS>(kk * 16, dp * 16, lane));
        Mma<T>::run(acc[2 * dp], a, bf[0], bf[1]);
        Mma<T>::run(acc[2 * dp + 1], a, bf[2], bf[3]);
      }
    }
    __syncthreads();  // every warp is done with sV
    if (jn < n_tiles) load_tile<T, D, BN>(sV, vb, p.v_sn, jn * BN, lk, tid);
    cp_async_commit();
    j = jn;
  }
  cp_async_wait<0>();

  // epilogue: o = acc / l (0 for rows with no key), lse = (m + log2 l) * ln 2 (-inf likewise)
  T* ob = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_r[r]);
    const int row = row_r[r];
    if (row >= nq) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* orow = ob + static_cast<int64_t>(row) * p.o_sn;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      store2<T>(orow + dt * 8 + t4 * 2, acc[dt][2 * r] * inv, acc[dt][2 * r + 1] * inv);
    if (t4 == 0)
      p.lse[(static_cast<int64_t>(b) * p.h + h) * nq + row] = l > 0.f ? (m_r[r] + log2f(l)) * kLn2 : -INFINITY;
  }
}

template <typename T, int D>
void launch_fwd(const FwdParams& p, int b, cudaStream_t stream) {
  const dim3 grid((p.nq + kBlockM - 1) / kBlockM, p.h, b);
  attn_fwd_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
}

template <typename T>
void dispatch_fwd(const FwdParams& p, int d, int b, cudaStream_t stream) {
  FLUID_DISPATCH_HEAD_DIM(d, kD, launch_fwd<T, kD>(p, b, stream));
}

}  // namespace
}  // namespace attn

void attention_fwd(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView* key_padding_mask, const TensorView* tile_any,
                   const TensorView* seqlens_k, const TensorView& o, const TensorView& lse,
                   bool causal, float softmax_scale, uintptr_t stream) {
  const AttnShape s = check_attention_args(q, k, v, key_padding_mask, tile_any, "attention_fwd");
  check_attention_out(o, q, "o");
  FLUID_CHECK(lse.ndim == 3 && lse.shape[0] == s.b && lse.shape[1] == s.h && lse.shape[2] == s.nq &&
                  lse.is_contiguous(),
              "lse must be a contiguous (B, H, Nq) tensor");
  check_dtype(lse, DType::F32, "lse");
  if (seqlens_k != nullptr) {
    check_dtype(*seqlens_k, DType::I32, "seqlens_k");
    FLUID_CHECK(seqlens_k->ndim == 1 && seqlens_k->shape[0] == s.b && seqlens_k->is_contiguous(),
                "seqlens_k must be a contiguous (B,) int32 tensor");
  }
  FLUID_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0.f, "softmax_scale must be finite and > 0");
  if (s.b == 0 || s.nq == 0 || s.h == 0) return;

  attn::FwdParams p{};
  p.q = q.data; p.k = k.data; p.v = v.data; p.o = o.data; p.lse = lse.ptr<float>();
  p.mask = key_padding_mask ? key_padding_mask->ptr<const uint8_t>() : nullptr;
  p.tile_any = tile_any ? tile_any->ptr<const uint8_t>() : nullptr;
  p.seqlens_k = seqlens_k ? seqlens_k->ptr<const int32_t>() : nullptr;
  p.q_sb = q.stride[0]; p.q_sn = q.stride[1]; p.q_sh = q.stride[2];
  p.k_sb = k.stride[0]; p.k_sn = k.stride[1]; p.k_sh = k.stride[2];
  p.v_sb = v.stride[0]; p.v_sn = v.stride[1]; p.v_sh = v.stride[2];
  p.o_sb = o.stride[0]; p.o_sn = o.stride[1]; p.o_sh = o.stride[2];
  p.m_sb = key_padding_mask ? key_padding_mask->stride[0] : 0;
  p.m_sn = key_padding_mask ? key_padding_mask->stride[1] : 0;
  p.t_sb = tile_any ? tile_any->stride[0] : 0;
  p.nq = static_cast<int>(s.nq); p.nk = static_cast<int>(s.nk); p.h = static_cast<int>(s.h);
  p.scale_log2 = softmax_scale * attn::kLog2e;
  p.causal = causal;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  FLUID_DISPATCH_CUDA_HALF(q.dtype, T, attn::dispatch_fwd<T>(p, static_cast<int>(s.d), static_cast<int>(s.b), st));
  check_launch("attention_fwd");
}

}  // namespace cuda
}  // namespace fluid
