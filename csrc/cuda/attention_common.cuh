// Device helpers of the attention family's tensor-core kernels (attention_fwd.cu,
// attention_bwd.cu, attention_bwd_dq.cu): mma.sync m16n8k16 (fp16 / bf16 in, fp32 accumulate),
// ldmatrix, cp.async, tile loads, and the backward's score step (bwd_scores / bwd_probs), which
// both backward passes call. Host entry points: attention.h.
//
// Choice recorded here (issue 3): the kernels use mma.sync + ldmatrix + cp.async, which run on
// sm_80, sm_89 and sm_90 alike. No wgmma / TMA path for sm_90a was written: the mma.sync version
// had to come first and is itself unproven (written on a machine without a GPU).
//
// Fragment layouts relied on (PTX ISA, "Matrix Fragments for mma.m16n8k16", 16-bit A/B, fp32 C),
// with lane = threadIdx.x % 32, g = lane / 4 ("groupID"), t = lane % 4 ("threadID_in_group"):
//   A (16 x 16, row-major), 4 x .b32 regs of 2 elements each (lower column in the low 16 bits):
//     a0: (row g,     cols 2t, 2t+1)      a1: (row g + 8, cols 2t, 2t+1)
//     a2: (row g,     cols 2t+8, 2t+9)    a3: (row g + 8, cols 2t+8, 2t+9)
//   B (16 x 8, k x n), 2 regs:  b0: (k rows 2t, 2t+1, col g)   b1: (k rows 2t+8, 2t+9, col g)
//   C (16 x 8, fp32), 4 regs:   c0, c1: (row g, cols 2t, 2t+1)  c2, c3: (row g + 8, cols 2t, 2t+1)
// ldmatrix.x4: lanes 8i .. 8i+7 give the 8 row addresses (16 bytes each) of 8x8 matrix i, and
// register i of every lane receives matrix i: without .trans lane holds (row g, cols 2t, 2t+1)
// of it, with .trans (rows 2t, 2t+1, col g). Hence (see the three address helpers below):
//   * an A operand stored row-major [row][k]          -> ldmatrix, lane row (l%8) + 8((l/8)%2),
//                                                       col 8(l/16): regs = a0 a1 a2 a3;
//   * a B operand stored as [n][k] (K for Q Kᵀ)       -> ldmatrix, lane row (l%8) + 8(l/16),
//                                                       col 8((l/8)%2): regs = b0 b1 of n-tile 0,
//                                                       b0 b1 of n-tile 1 (16 n in all);
//   * a B operand stored as [k][n] (V for P V)        -> ldmatrix.trans, lane row (l%8) + 8((l/8)%2),
//                                                       col 8(l/16): regs = b0 b1 of n-tile 0,
//                                                       b0 b1 of n-tile 1.
//   * a C result reused as an A operand (P for P V): the C tiles 2kk and 2kk+1 (16 columns) give
//     a0 = pack(c[2kk][0..1]), a1 = pack(c[2kk][2..3]), a2 = pack(c[2kk+1][0..1]),
//     a3 = pack(c[2kk+1][2..3]).
// Shared-memory tiles are row-major with a row pitch of D + 8 elements (16 bytes of padding), so
// the 8 row addresses of one ldmatrix fall in distinct bank groups for every D in {32..128}.
#pragma once
#include <cstdint>

#include "common.cuh"

namespace fluid {
namespace cuda {
namespace attn {

constexpr int kThreads = 128;  // 4 warps, 16 rows each
constexpr int kBlockM = 64;    // query rows per forward / dq block
constexpr int kBlockN = 64;    // key tile; also the granularity of the per-(batch, tile) any() table
constexpr int kBlockQ = 32;    // query tile of the dk/dv pass (fewer live registers)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; valid == false zero-fills the destination, reading nothing.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <typename T>
__device__ __forceinline__ void store2(T* p, float a, float b);
template <>
__device__ __forceinline__ void store2<__half>(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
template <>
__device__ __forceinline__ void store2<__nv_bfloat16>(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// Element offsets (in a tile with pitch LDS) of this lane's ldmatrix row address; see the header.
template <int LDS>
__device__ __forceinline__ int a_offset(int row0, int col0, int lane) {  // A [row][k], no trans
  return (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + col0 + (lane >> 4) * 8;
}
template <int LDS>
__device__ __forceinline__ int bnk_offset(int n0, int k0, int lane) {  // B stored [n][k], no trans
  return (n0 + (lane & 7) + (lane >> 4) * 8) * LDS + k0 + ((lane >> 3) & 1) * 8;
}
template <int LDS>
__device__ __forceinline__ int bkn_offset(int k0, int n0, int lane) {  // B stored [k][n], .trans
  return (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + n0 + (lane >> 4) * 8;
}

// Async-load rows [row0, row0 + ROWS) x D of a (rows x D) slab with row stride `stride`
// (elements, unit stride along D) into smem (pitch D + 8). Rows >= n_rows are zero-filled, so
// partial last tiles compute on zeros (finite) and are masked afterwards. Needs 16-byte aligned
// rows: the host checks pointer and strides.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* smem, const T* base, int64_t stride, int row0, int n_rows, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kLds = D + 8;
  constexpr int kTotal = ROWS * kChunks;
#pragma unroll
  for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    if (kTotal % kThreads != 0 && c >= kTotal) break;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = row0 + r < n_rows;
    const T* src = valid ? base + static_cast<int64_t>(row0 + r) * stride + col : base;
    cp_async16(smem + r * kLds + col, src, valid);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- the backward's score step, shared by the dk/dv pass and the dq pass -------------------
// s = As Bsᵀ and dp = Ad Bdᵀ over D for this warp's 16 rows (16 warp ..) of the A tiles and all
// NB rows of the B tiles (smem, pitch D + 8), into fresh fp32 accumulators. The dq pass gives
// (Q, dO; K, V): S = Q Kᵀ, dP = dO Vᵀ. The dk/dv pass gives (K, V; Q, dO): Sᵀ and dPᵀ, which
// land in the accumulator layout of dK / dV.
template <typename T, int D, int NB>
__device__ __forceinline__ void bwd_scores(float (&s)[NB / 8][4], float (&dp)[NB / 8][4], const T* sAs,
                                           const T* sAd, const T* sBs, const T* sBd, int warp, int lane) {
  constexpr int LDS = D + 8;
#pragma unroll
  for (int i = 0; i < NB / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t as[4], ad[4];
    ldsm_x4(as, sAs + a_offset<LDS>(warp * 16, kk * 16, lane));
    ldsm_x4(ad, sAd + a_offset<LDS>(warp * 16, kk * 16, lane));
#pragma unroll
    for (int np = 0; np < NB / 16; ++np) {
      uint32_t bs[4], bd[4];
      ldsm_x4(bs, sBs + bnk_offset<LDS>(np * 16, kk * 16, lane));
      Mma<T>::run(s[2 * np], as, bs[0], bs[1]);
      Mma<T>::run(s[2 * np + 1], as, bs[2], bs[3]);
      ldsm_x4(bd, sBd + bnk_offset<LDS>(np * 16, kk * 16, lane));
      Mma<T>::run(dp[2 * np], ad, bd[0], bd[1]);
      Mma<T>::run(dp[2 * np + 1], ad, bd[2], bd[3]);
    }
  }
}

// In place on bwd_scores' fragments: s := P = exp2(s · scale_log2 - lse2) where allowed, else 0;
// dp := dS = P (dp - delta) (softmax scale applied by the caller at the end). allowed(nt, e),
// lse2(nt, e), delta(nt, e) describe element e of n-tile nt (C layout: row g + 8 (e >> 1),
// column 8 nt + 2 t4 + (e & 1)); the query is the column in the dk/dv pass, the row in the dq pass.
template <int NT, typename Allowed, typename Lse2, typename Delta>
__device__ __forceinline__ void bwd_probs(float (&s)[NT][4], float (&dp)[NT][4], float scale_log2,
                                          Allowed allowed, Lse2 lse2, Delta delta) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pv = allowed(nt, e) ? exp2f(s[nt][e] * scale_log2 - lse2(nt, e)) : 0.f;
      dp[nt][e] = pv * (dp[nt][e] - delta(nt, e));
      s[nt][e] = pv;
    }
  }
}

// ---- kernel arguments ------------------------------------------------------------------------
struct FwdParams {
  const void* q; const void* k; const void* v; void* o; float* lse;
  const uint8_t* mask;       // (B, Nk) bool or nullptr
  const uint8_t* tile_any;   // (B, ceil(Nk / kBlockN)) bool: tile holds an attendable key; with mask
  const int32_t* seqlens_k;  // (B,) valid key length per batch, or nullptr (then Nk)
  int64_t q_sb, q_sn, q_sh, k_sb, k_sn, k_sh, v_sb, v_sn, v_sh, o_sb, o_sn, o_sh;
  int64_t m_sb, m_sn, t_sb;
  int nq, nk, h;
  float scale_log2;  // softmax_scale * log2(e)
  bool causal;
};

struct BwdParams {
  const void* q; const void* k; const void* v; const void* o; const void* dout; const float* lse;
  void* dq; void* dk; void* dv;
  float* delta;  // (B, H, Nq) workspace: rowsum(dO * O)
  float* lse2;   // (B, H, Nq) workspace: lse * log2(e), +inf for rows with no key
  float* dq_accum;  // atomic mode: (B, Nq, H, D) fp32 contiguous, zeroed; nullptr: deterministic
  const uint8_t* mask; const uint8_t* tile_any;
  int64_t q_sb, q_sn, q_sh, k_sb, k_sn, k_sh, v_sb, v_sn, v_sh, o_sb, o_sn, o_sh, do_sb, do_sn, do_sh;
  int64_t dq_sb, dq_sn, dq_sh, dk_sb, dk_sn, dk_sh, dv_sb, dv_sn, dv_sh;
  int64_t m_sb, m_sn, t_sb;
  int64_t dqa_sb, dqa_sn, dqa_sh;
  int nq, nk, h;
  float scale, scale_log2;
  bool causal;
};

}  // namespace attn
}  // namespace cuda
}  // namespace fluid

namespace fluid {
namespace cuda {
namespace attn {

// Shared-memory bytes of the backward kernels (dynamic: above 48 KB for D = 128 they need the
// cudaFuncAttributeMaxDynamicSharedMemorySize opt-in, which the launchers set).
template <typename T, int D>
constexpr int dkdv_smem_bytes() {
  return (2 * kBlockN + 2 * kBlockQ) * (D + 8) * static_cast<int>(sizeof(T)) + 2 * kBlockQ * 4 +
         kBlockN * (kBlockQ + 8) * static_cast<int>(sizeof(T));  // + dSᵀ staging of the atomic mode
}
template <typename T, int D>
constexpr int dq_smem_bytes() {
  return (2 * kBlockM + 2 * kBlockN) * (D + 8) * static_cast<int>(sizeof(T));
}

// attention_bwd_dq.cu: the dq pass (p.dq written in the input dtype), after the preprocess.
void launch_bwd_dq(const BwdParams& p, DType dtype, int d, int b, cudaStream_t stream);

inline void set_dynamic_smem(const void* kernel, int bytes, const char* what) {
  if (bytes <= 48 * 1024) return;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": cannot opt in to " + std::to_string(bytes) +
                             " bytes of shared memory: " + cudaGetErrorString(err));
}

}  // namespace attn
}  // namespace cuda
}  // namespace fluid
