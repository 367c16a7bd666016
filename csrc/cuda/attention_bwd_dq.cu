// Attention backward, the dq pass (deterministic: one block owns its 64 query rows; no atomics).
// One block of 4 warps per (64-query tile, head, batch), warp w owns rows 16w .. 16w+15. Q and dO
// stay in shared memory; K / V tiles of 64 keys stream through (the key range, causal limit and
// padding-tile skipping are those of the forward). Per tile: S = Q Kᵀ, dP = dO Vᵀ,
// P = exp2(S·scale·log2 e - lse2), dS = P ∘ (dP - delta) (both steps shared with the dk/dv pass:
// bwd_scores / bwd_probs of attention_common.cuh), dQ += dS K; dq = dQ · scale.
// Needs the preprocess of attention_bwd.cu (delta, lse2) to have run on the same stream.
#include "../common/dispatch.h"
#include "attention_common.cuh"
#include "attention.h"

namespace fluid {
namespace cuda {
namespace attn {
namespace {

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const BwdParams p) {
  constexpr int LDS = D + 8, BM = kBlockM, BN = kBlockN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * LDS;
  T* sK = sdO + BM * LDS;
  T* sV = sK + BN * LDS;

  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int nq = p.nq, nk = p.nk, diag = nk - nq;
  const int64_t bh = static_cast<int64_t>(b) * p.h + h;
  const uint8_t* mrow = p.mask != nullptr ? p.mask + b * p.m_sb : nullptr;
  const uint8_t* trow = p.tile_any != nullptr ? p.tile_any + b * p.t_sb : nullptr;
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* dob = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;

  const int row_r[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  float lse2_r[2], delta_r[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = row_r[r] < nq;
    lse2_r[r] = in ? p.lse2[bh * nq + row_r[r]] : INFINITY;
    delta_r[r] = in ? p.delta[bh * nq + row_r[r]] : 0.f;
  }

  int kend = nk;
  if (p.causal) kend = min(kend, min(m0 + BM, nq) + diag);
  const int n_tiles = kend > 0 ? (kend + BN - 1) / BN : 0;
  auto next_tile = [&](int j) {
    if (trow != nullptr)
      while (j < n_tiles && trow[j] == 0) ++j;
    return j;
  };

  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  int j = next_tile(0);
  if (j < n_tiles) {
    load_tile<T, D, BM>(sQ, qb, p.q_sn, m0, nq, tid);
    load_tile<T, D, BM>(sdO, dob, p.do_sn, m0, nq, tid);
    load_tile<T, D, BN>(sK, kb, p.k_sn, j * BN, nk, tid);
    load_tile<T, D, BN>(sV, vb, p.v_sn, j * BN, nk, tid);
    cp_async_commit();
  }
  while (j < n_tiles) {
    cp_async_wait<0>();
    __syncthreads();
    float s[BN / 8][4], dp[BN / 8][4];
    bwd_scores<T, D, BN>(s, dp, sQ, sdO, sK, sV, warp, lane);
    // P and dS (dS scaled at the end): rows are queries (row_r), columns keys (col)
    const int n0 = j * BN;
    bwd_probs(
        s, dp, p.scale_log2,
        [&](int nt, int e) {
          const int col = n0 + nt * 8 + t4 * 2 + (e & 1), r = e >> 1;
          bool ok = col < nk;
          if (ok && mrow != nullptr) ok = mrow[col * p.m_sn] != 0;
          if (ok && p.causal) ok = col <= row_r[r] + diag;
          return ok;
        },
        [&](int, int e) { return lse2_r[e >> 1]; }, [&](int, int e) { return delta_r[e >> 1]; });
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a[4] = {Mma<T>::pack(dp[2 * kk][0], dp[2 * kk][1]), Mma<T>::pack(dp[2 * kk][2], dp[2 * kk][3]),
                             Mma<T>::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                             Mma<T>::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        uint32_t bk[4];
        ldsm_x4_trans(bk, sK + bkn_offset<LDS>(kk * 16, dt * 16, lane));
        Mma<T>::run(dq[2 * dt], a, bk[0], bk[1]);
        Mma<T>::run(dq[2 * dt + 1], a, bk[2], bk[3]);
      }
    }
    __syncthreads();  // every warp is done with sK / sV
    const int jn = next_tile(j + 1);
    if (jn < n_tiles) {
      load_tile<T, D, BN>(sK, kb, p.k_sn, jn * BN, nk, tid);
      load_tile<T, D, BN>(sV, vb, p.v_sn, jn * BN, nk, tid);
      cp_async_commit();
    }
    j = jn;
  }

  T* dqb = static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row_r[r] >= nq) continue;
    T* row = dqb + static_cast<int64_t>(row_r[r]) * p.dq_sn;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      store2<T>(row + dt * 8 + t4 * 2, dq[dt][2 * r] * p.scale, dq[dt][2 * r + 1] * p.scale);
  }
}

template <typename T, int D>
void launch_dq(const BwdParams& p, int b, cudaStream_t stream) {
  constexpr int bytes = dq_smem_bytes<T, D>();
  set_dynamic_smem(reinterpret_cast<const void*>(&attn_bwd_dq_kernel<T, D>), bytes, "attention_bwd (dq)");
  const dim3 grid((p.nq + kBlockM - 1) / kBlockM, p.h, b);
  attn_bwd_dq_kernel<T, D><<<grid, kThreads, bytes, stream>>>(p);
}

template <typename T>
void dispatch_dq(const BwdParams& p, int d, int b, cudaStream_t stream) {
  FLUID_DISPATCH_HEAD_DIM(d, kD, launch_dq<T, kD>(p, b, stream));
}

}  // namespace

void launch_bwd_dq(const BwdParams& p, DType dtype, int d, int b, cudaStream_t stream) {
  FLUID_DISPATCH_CUDA_HALF(dtype, T, dispatch_dq<T>(p, d, b, stream));
}

}  // namespace attn
}  // namespace cuda
}  // namespace fluid
