// The diffusion head's fused GEMM family on CUDA (docs/contracts.md §2.2): C = epilogue(prologue(A) @ W^T).
//
// Why hand-written mma.sync, not CUTLASS / CuTe or cuBLASLt: the point of these GEMMs is what
// sits around them (LayerNorm + modulate and SiLU(c + t) applied while A is loaded, bias / SiLU /
// the in-place gated residual applied to the accumulators), which cuBLASLt cannot take (its
// epilogues stop at bias + activation and it has no prologue), and the package must build and
// import without a GPU and without extra libraries (no cuBLAS link, no CUTLASS checkout in the
// build). The shapes are few and regular (K = the head width, 1024 / 1280 / 1536; N = width or
// the concatenated adaLN width), so one plainly pipelined kernel covers them.
//
// Mirrors fluid_ops/triton/denoiser.py's `_head_linear_kernel` (same prologues / epilogues, so a
// sampler step is 3 + 2 * blocks launches: all adaLN linears, the input projection, fc1 + fc2
// per block, the final linear), with one difference: the LN-modulate prologue computes each
// row's mean / rstd itself (two passes over the CTA's BM rows of the fp32 residual stream before
// the main loop: mean, then mean of centred squares, as the reference does), instead of combining
// per-tile (mean, M2) partials written by the producer's epilogue. That costs an extra read of
// the CTA's A rows (from L2) but couples no two kernels through a statistics buffer.
//
// Kernel structure (`head_gemm_kernel<T, BM, BN, WM, WN, PRO, GATED>`):
// * T = __nv_bfloat16 or __half (the GEMM dtype: W's dtype); fp32 accumulation. fp32 GEMMs are
//   declined (the host says so): the Triton head serves them.
// * CTA tile BM x BN, k-stage BK = 32, WM x WN warps, warp tile (BM/WM) x (BN/WN) made of
//   m16n8k16 mma tiles. Tiles are fixed per shape class (`pick_tile`): up to 1024 rows 64 x 64
//   with 4 warps (the sampling sizes: weight-bound, more CTAs to stream the weights), else
//   128 x 128 with 8 warps. CTAs that share a weight tile are adjacent in the grid
//   (blockIdx.x = pid_n * num_m + pid_m), as in the Triton kernel.
// * Pipeline: global -> registers (prologue math applied on the way) -> shared memory, two smem
//   stages: while stage kt is multiplied, stage kt + 1's global loads are in flight in registers;
//   one __syncthreads per stage (the buffer written in iteration kt was last read in iteration
//   kt - 1, before that iteration's barrier).
// * Bounds: rows >= M and columns >= N load zeros and store nothing; K may end inside a stage
//   (K % 8 == 0 is required and checked, so a 16-byte chunk of 8 elements is wholly in or out).
//
// Fragment layouts relied on (PTX ISA, "Matrix Fragments for mma.m16n8k16" with .bf16 / .f16;
// g = lane / 4, q = lane % 4; each .b32 register holds 2 consecutive-column elements, the lower
// column in the low 16 bits):
//   A 16x16 (row-major): a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B 16x8 (.col, i.e. indexed [n][k] = W's row-major (N, K) layout): b0 = (k 2q..2q+1, n g),
//      b1 = (k 2q+8.., n g)
//   C 16x8 fp32: c0, c1 = (g, 2q), (g, 2q+1); c2, c3 = (g+8, 2q), (g+8, 2q+1).
// ldmatrix.m8n8.x4 (non-transposed): lanes 8j..8j+7 give the row addresses of matrix j, and
// register j of lane l receives row l / 4, elements 2 (l % 4) .. +1 of matrix j. So
//   A: lane l addresses row (l % 16), column k0 + (l / 16) * 8  -> registers a0..a3 directly;
//   B: lane l addresses W row n0 + (l % 8) + (l / 16) * 8, column k0 + ((l / 8) % 2) * 8
//      -> registers (b0, b1) of n-tile n0 and (b0, b1) of n-tile n0 + 8.
// Shared memory: rows of BK = 32 elements padded to a pitch of 40 (80 bytes = 5 x 16-byte
// chunks). The 8 row addresses of one ldmatrix phase (8 consecutive rows, same column) then fall
// in 16-byte chunks 5r mod 8 = {0, 5, 2, 7, 4, 1, 6, 3}: all 32 banks, no conflict; every
// address stays 16-byte aligned (80 r + 16 j). The 16-byte register -> smem stores of one
// 8-thread phase cover 2 rows x 4 chunks: at most a 2-way conflict.
//
// In-place gated residual: the output tiles partition (M, N) and there is no split-K, so each
// element of the residual stream is read and written by exactly one thread of one CTA.
//
// Build cost: 16 GEMM instantiations (2 dtypes x 4 prologue / epilogue combinations x 2 tiles)
// plus 2 small kernels; for the default arch list (80-real;89-real;90a-real;90-virtual) this file
// took 27-29 s of CPU (69-84 s wall with the 2-core build machine at load 7-11), so every arch
// is kept.
//
// UNPROVEN until run on a GPU (this file was written and compiled on a machine without one; the
// index logic of load / ldmatrix / mma / epilogue was checked only by a numpy transcription). A
// GPU run must check first, in this order: tests/test_cuda_head.py::test_plain_gemm_matches_torch
// (the mma / ldmatrix fragment mapping: a wrong lane mapping gives garbage, a swapped k half
// gives plausible-but-wrong values), then ::test_head_linear_chain (each prologue / epilogue),
// then the rest of that file, then compute-sanitizer (memcheck, racecheck) over it.
#include <algorithm>
#include <climits>

#include "../common/dispatch.h"
#include "common.cuh"
#include "head.h"

namespace fluid {
namespace cuda {
namespace {

constexpr int PRO_NONE = 0, PRO_SILU_ADD = 1, PRO_LN = 2;
constexpr int BK = 32;         // k extent of one pipeline stage: two mma k-steps
constexpr int PITCH = BK + 8;  // smem row pitch in 16-bit elements (80 bytes; see above)

struct Params {
  const void* a; int64_t a_rs;                    // A (M, K): T (no prologue) or fp32
  const float* c; int64_t c_rs;                   // SiLU-add: (M | 1, K) fp32, row stride 0 = broadcast
  const float* lnw; const float* lnb; float eps;  // LN: (K,) fp32, optional
  const void* shift; int64_t shift_rs;            // LN: (M, K) in T, optional
  const void* scale; int64_t scale_rs;            // LN: (M, K) in T
  const void* w; int64_t w_rs;                    // W (N, K) in T
  const void* bias;                               // (N,) in T, optional
  const void* rbias; int64_t rb_rs;               // (M, N) in T, optional
  const void* gate; int64_t gate_rs;              // gated residual: (M, N) in T
  void* out; int64_t out_rs;                      // (M, N): T, or fp32 residual (gated)
  int M, N, K, silu;
};

// ---- dtype traits: packing, conversions, the mma instruction -------------------------------
template <typename T> struct Tr;

template <> struct Tr<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
  }
  static __device__ __forceinline__ float lo(uint32_t u) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(u & 0xffffu)));
  }
  static __device__ __forceinline__ float hi(uint32_t u) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(u >> 16)));
  }
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <> struct Tr<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
  }
  static __device__ __forceinline__ float lo(uint32_t u) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
  }
  static __device__ __forceinline__ float hi(uint32_t u) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
  }
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ uint4 ld16(const void* p) { return *static_cast<const uint4*>(p); }
__device__ __forceinline__ float4 ldf4(const float* p) { return *reinterpret_cast<const float4*>(p); }

__device__ __forceinline__ float silu(float v) { return v / (1.0f + __expf(-v)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- one pipeline stage: the registers a thread holds between its global loads and its smem
// stores (CHA chunks of A, CHB chunks of W; a chunk is 8 consecutive k of one row) -------------
template <int PRO, int CHA, int CHB>
struct Stage {
  uint4 a[CHA];      // no prologue: A's chunk in T
  float4 x[CHA][2];  // SiLU-add / LN: A's chunk in fp32
  float4 c[CHA][2];  // SiLU-add: c's chunk
  uint4 sh[CHA];     // LN: shift's chunk in T
  uint4 sc[CHA];     // LN: scale's chunk in T
  uint4 b[CHB];      // W's chunk in T
};

template <typename T, int BM, int BN, int THREADS, int PRO, int CHA, int CHB>
__device__ __forceinline__ void load_stage(const Params& p, int64_t m0, int64_t n0, int kt, int tid,
                                           Stage<PRO, CHA, CHB>& s) {
  constexpr int CPR = BK / 8;
  const int64_t k0 = static_cast<int64_t>(kt) * BK;
  const uint4 z4 = make_uint4(0u, 0u, 0u, 0u);
  const float4 zf = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int i = 0; i < CHA; ++i) {
    const int ch = tid + i * THREADS, r = ch / CPR, kc = (ch % CPR) * 8;
    const int64_t row = m0 + r, k = k0 + kc;
    const bool ok = row < p.M && k < p.K;
    if constexpr (PRO == PRO_NONE) {
      s.a[i] = ok ? ld16(static_cast<const T*>(p.a) + row * p.a_rs + k) : z4;
    } else {
      if (ok) {
        const float* x = static_cast<const float*>(p.a) + row * p.a_rs + k;
        s.x[i][0] = ldf4(x);
        s.x[i][1] = ldf4(x + 4);
      } else {
        s.x[i][0] = s.x[i][1] = zf;
      }
      if constexpr (PRO == PRO_SILU_ADD) {
        if (ok) {
          const float* c = p.c + row * p.c_rs + k;
          s.c[i][0] = ldf4(c);
          s.c[i][1] = ldf4(c + 4);
        } else {
          s.c[i][0] = s.c[i][1] = zf;
        }
      } else {
        s.sc[i] = ok ? ld16(static_cast<const T*>(p.scale) + row * p.scale_rs + k) : z4;
        s.sh[i] = (ok && p.shift) ? ld16(static_cast<const T*>(p.shift) + row * p.shift_rs + k) : z4;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < CHB; ++i) {
    const int ch = tid + i * THREADS, r = ch / CPR, kc = (ch % CPR) * 8;
    const int64_t n = n0 + r, k = k0 + kc;
    s.b[i] = (n < p.N && k < p.K) ? ld16(static_cast<const T*>(p.w) + n * p.w_rs + k) : z4;
  }
}

__device__ __forceinline__ void unpack8(const float4 (&v)[2], float* f) {
  f[0] = v[0].x; f[1] = v[0].y; f[2] = v[0].z; f[3] = v[0].w;
  f[4] = v[1].x; f[5] = v[1].y; f[6] = v[1].z; f[7] = v[1].w;
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
  f[0] = Tr<T>::lo(v.x); f[1] = Tr<T>::hi(v.x); f[2] = Tr<T>::lo(v.y); f[3] = Tr<T>::hi(v.y);
  f[4] = Tr<T>::lo(v.z); f[5] = Tr<T>::hi(v.z); f[6] = Tr<T>::lo(v.w); f[7] = Tr<T>::hi(v.w);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float* f) {
  return make_uint4(Tr<T>::pack(f[0], f[1]), Tr<T>::pack(f[2], f[3]), Tr<T>::pack(f[4], f[5]),
                    Tr<T>::pack(f[6], f[7]));
}

template <typename T, int BM, int BN, int THREADS, int PRO, int CHA, int CHB>
__device__ __forceinline__ void store_stage(const Params& p, int64_t m0, int kt, int tid,
                                            const Stage<PRO, CHA, CHB>& s, uint16_t* sa,
                                            uint16_t* sb, const float* s_mean,
                                            const float* s_rstd) {
  constexpr int CPR = BK / 8;
#pragma unroll
  for (int i = 0; i < CHA; ++i) {
    const int ch = tid + i * THREADS, r = ch / CPR, kc = (ch % CPR) * 8;
    uint4 v;
    if constexpr (PRO == PRO_NONE) {
      v = s.a[i];
    } else {
      float f[8];
      unpack8(s.x[i], f);
      if constexpr (PRO == PRO_SILU_ADD) {
        float g[8];
        unpack8(s.c[i], g);
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = silu(f[j] + g[j]);  // zeros stay zeros: SiLU(0) = 0
      } else {
        const int64_t row = m0 + r, k = static_cast<int64_t>(kt) * BK + kc;
        if (row < p.M && k < p.K) {
          const float mean = s_mean[r], rstd = s_rstd[r];
          float sc[8], sh[8];
          unpack8<T>(s.sc[i], sc);
          unpack8<T>(s.sh[i], sh);
          float lw[8] = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
          float lb[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          if (p.lnw) {
            const float4 w2[2] = {ldf4(p.lnw + k), ldf4(p.lnw + k + 4)};
            unpack8(w2, lw);
          }
          if (p.lnb) {
            const float4 b2[2] = {ldf4(p.lnb + k), ldf4(p.lnb + k + 4)};
            unpack8(b2, lb);
          }
#pragma unroll
          for (int j = 0; j < 8; ++j)
            f[j] = ((f[j] - mean) * rstd * lw[j] + lb[j]) * (1.0f + sc[j]) + sh[j];
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) f[j] = 0.f;  // padding must be 0, not the LN of 0
        }
      }
      v = pack8<T>(f);
    }
    *reinterpret_cast<uint4*>(sa + r * PITCH + kc) = v;
  }
#pragma unroll
  for (int i = 0; i < CHB; ++i) {
    const int ch = tid + i * THREADS, r = ch / CPR, kc = (ch % CPR) * 8;
    *reinterpret_cast<uint4*>(sb + r * PITCH + kc) = s.b[i];
  }
}

template <typename T, int BM, int BN, int WM, int WN, int PRO, bool GATED>
__global__ void __launch_bounds__(WM * WN * 32) head_gemm_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 / fp16 mma.sync m16n8k16 needs sm_80 (the host checks the device first)
#else
  constexpr int NWARPS = WM * WN, THREADS = NWARPS * 32;
  constexpr int WTM = BM / WM, WTN = BN / WN, MI = WTM / 16, NI = WTN / 8;
  constexpr int CPR = BK / 8, CHA = BM * CPR / THREADS, CHB = BN * CPR / THREADS;
  static_assert(MI >= 1 && WTM % 16 == 0 && NI >= 2 && NI % 2 == 0, "warp tile");
  static_assert(CHA >= 1 && CHA * THREADS == BM * CPR && CHB >= 1 && CHB * THREADS == BN * CPR,
                "tile loads must divide evenly over the threads");

  __shared__ __align__(16) uint16_t sA[2][BM * PITCH];
  __shared__ __align__(16) uint16_t sB[2][BN * PITCH];
  __shared__ float s_mean[PRO == PRO_LN ? BM : 1], s_rstd[PRO == PRO_LN ? BM : 1];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int num_m = (p.M + BM - 1) / BM;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x % num_m) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / num_m) * BN;

  if constexpr (PRO == PRO_LN) {
    // Row statistics of this CTA's BM rows, one warp per row, 16-byte loads (K % 8 == 0).
    const float* A = static_cast<const float*>(p.a);
    for (int r = warp; r < BM; r += NWARPS) {
      const int64_t row = m0 + r;
      float mean = 0.f, rstd = 0.f;
      if (row < p.M) {  // warp-uniform
        const float* x = A + row * p.a_rs;
        float s = 0.f;
        for (int k = lane * 4; k < p.K; k += 128) {
          const float4 v = ldf4(x + k);
          s += (v.x + v.y) + (v.z + v.w);
        }
        mean = warp_sum(s) / static_cast<float>(p.K);
        float q = 0.f;
        for (int k = lane * 4; k < p.K; k += 128) {
          const float4 v = ldf4(x + k);
          const float d0 = v.x - mean, d1 = v.y - mean, d2 = v.z - mean, d3 = v.w - mean;
          q += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
        rstd = rsqrtf(warp_sum(q) / static_cast<float>(p.K) + p.eps);
      }
      if (lane == 0) {
        s_mean[r] = mean;
        s_rstd[r] = rstd;
      }
    }
    __syncthreads();
  }

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.f;

  const int KT = (p.K + BK - 1) / BK;
  Stage<PRO, CHA, CHB> st;
  load_stage<T, BM, BN, THREADS>(p, m0, n0, 0, tid, st);
  store_stage<T, BM, BN, THREADS>(p, m0, 0, tid, st, sA[0], sB[0], s_mean, s_rstd);
  __syncthreads();

  for (int kt = 0; kt < KT; ++kt) {
    const int buf = kt & 1;
    if (kt + 1 < KT) load_stage<T, BM, BN, THREADS>(p, m0, n0, kt + 1, tid, st);
    const uint16_t* sa = sA[buf];
    const uint16_t* sb = sB[buf];
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[MI][4], bfr[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldsm_x4(af[mi], sa + (wm * WTM + mi * 16 + (lane & 15)) * PITCH + kk + (lane >> 4) * 8);
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        uint32_t r4[4];
        ldsm_x4(r4, sb + (wn * WTN + nj * 16 + (lane & 7) + (lane >> 4) * 8) * PITCH + kk +
                        ((lane >> 3) & 1) * 8);
        bfr[2 * nj][0] = r4[0];
        bfr[2 * nj][1] = r4[1];
        bfr[2 * nj + 1][0] = r4[2];
        bfr[2 * nj + 1][1] = r4[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) Tr<T>::mma(acc[mi][ni], af[mi], bfr[ni]);
    }
    if (kt + 1 < KT)
      store_stage<T, BM, BN, THREADS>(p, m0, kt + 1, tid, st, sA[buf ^ 1], sB[buf ^ 1], s_mean,
                                      s_rstd);
    __syncthreads();
  }

  // Epilogue straight from the accumulators (C fragment layout above): bias, row bias, SiLU,
  // then store in T or update the fp32 residual in place.
  const T* bias = static_cast<const T*>(p.bias);
  const T* rbias = static_cast<const T*>(p.rbias);
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int64_t row = m0 + wm * WTM + mi * 16 + (lane >> 2) + hh * 8;
      if (row >= p.M) continue;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t col = n0 + wn * WTN + ni * 8 + (lane & 3) * 2 + j;
          if (col >= p.N) continue;
          float v = acc[mi][ni][hh * 2 + j];
          if (bias) v += Tr<T>::to_f(bias[col]);
          if (rbias) v += Tr<T>::to_f(rbias[row * p.rb_rs + col]);
          if (p.silu) v = silu(v);
          if constexpr (GATED) {
            float* res = static_cast<float*>(p.out) + row * p.out_rs + col;
            const float g = Tr<T>::to_f(static_cast<const T*>(p.gate)[row * p.gate_rs + col]);
            *res = fmaf(g, v, *res);
          } else {
            static_cast<T*>(p.out)[row * p.out_rs + col] = Tr<T>::from_f(v);
          }
        }
      }
    }
  }
#endif
}

// ---- the small kernels around the GEMMs -----------------------------------------------------
struct ProjArgs {
  const float* x; int64_t x_rs, x_cs, x_rows;
  const float* w; int64_t w_rs, w_cs;
  const float* bias; int64_t b_s;
  float* out; int64_t o_rs, o_cs;
};

// One output element per thread (grid-stride): K = in_channels is tiny, so this is a few MFLOP.
__global__ void input_proj_kernel(ProjArgs a, int64_t m, int64_t n, int64_t k) {
  const int64_t total = m * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, c = i - r * n;
    const float* x = a.x + (r % a.x_rows) * a.x_rs;
    const float* w = a.w + c * a.w_rs;
    float acc = 0.f;
    for (int64_t j = 0; j < k; ++j) acc = fmaf(x[j * a.x_cs], w[j * a.w_cs], acc);
    if (a.bias) acc += a.bias[c * a.b_s];
    a.out[r * a.o_rs + c * a.o_cs] = acc;
  }
}

__global__ void silu_add_kernel(const float* a, int64_t a_rs, const float* c, int64_t c_rs,
                                void* out, int64_t o_rs, DType ot, int64_t m, int64_t k) {
  const int64_t total = m * k;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k, j = i - r * k;
    store_from_f32(out, ot, r * o_rs + j, silu(a[r * a_rs + j] + c[r * c_rs + j]));
  }
}

// ---- host side --------------------------------------------------------------------------------
struct Tile { int bm, bn, warps; };

Tile pick_tile(int64_t m) {
  // Sampling sizes (64-512 tokens, x2 with CFG) are weight-bound: 64 x 64 tiles give more CTAs to
  // stream the weights with. Above, 128 x 128 x 8 warps (compute-bound). A guess from the Triton
  // head's configs, not a measurement: tune on a GPU with benchmarks/denoiser.py.
  return m <= 1024 ? Tile{64, 64, 4} : Tile{128, 128, 8};
}

std::string shape_str(const TensorView& t) {
  std::string s = "(";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + (t.ndim == 1 ? ",)" : ")");
}

void check_shape2(const TensorView& t, const char* name, int64_t rows, int64_t cols,
                  bool row_broadcast = false) {
  FLUID_CHECK(t.ndim == 2, std::string(name) + " must be 2-D, got shape " + shape_str(t));
  const bool rows_ok = t.shape[0] == rows || (row_broadcast && t.shape[0] == 1);
  FLUID_CHECK(rows_ok && t.shape[1] == cols,
              std::string(name) + " must have shape (" + std::to_string(rows) + ", " +
                  std::to_string(cols) + ")" + (row_broadcast ? " or (1, " + std::to_string(cols) + ")" : "") +
                  ", got " + shape_str(t));
  FLUID_CHECK(t.shape[1] <= 1 || t.stride[1] == 1,
              std::string(name) + " must have unit column stride, got stride " +
                  std::to_string(t.stride[1]));
  FLUID_CHECK(t.stride[0] >= 0, std::string(name) + " must have a non-negative row stride");
}

// An operand the GEMM reads in 16-byte vectors along K.
void check_vec_operand(const TensorView& t, const char* name, DType dt, int64_t rows, int64_t cols,
                       bool row_broadcast = false) {
  check_shape2(t, name, rows, cols, row_broadcast);
  FLUID_CHECK(t.dtype == dt, std::string(name) + " must be " + dtype_name(dt) + ", got " +
                                 dtype_name(t.dtype));
  const int64_t vec = 16 / dtype_size(dt);
  FLUID_CHECK(t.shape[0] == 1 || t.stride[0] % vec == 0,
              std::string(name) + ": row stride must be a multiple of " + std::to_string(vec) +
                  " elements (16 bytes) for vector loads, got " + std::to_string(t.stride[0]));
  FLUID_CHECK(reinterpret_cast<uintptr_t>(t.data) % 16 == 0,
              std::string(name) + ": data pointer must be 16-byte aligned");
}

void check_vector(const TensorView& t, const char* name, DType dt, int64_t n, bool aligned16) {
  FLUID_CHECK(t.ndim == 1 && t.shape[0] == n, std::string(name) + " must have shape (" +
                                                  std::to_string(n) + ",), got " + shape_str(t));
  FLUID_CHECK(t.dtype == dt, std::string(name) + " must be " + dtype_name(dt) + ", got " +
                                 dtype_name(t.dtype));
  FLUID_CHECK(n <= 1 || t.stride[0] == 1, std::string(name) + " must be contiguous");
  FLUID_CHECK(!aligned16 || reinterpret_cast<uintptr_t>(t.data) % 16 == 0,
              std::string(name) + ": data pointer must be 16-byte aligned");
}

template <typename T, int BM, int BN, int WM, int WN>
void launch_tile(const Params& p, int pro, bool gated, cudaStream_t stream) {
  const int64_t ctas = ((p.M + BM - 1) / BM) * static_cast<int64_t>((p.N + BN - 1) / BN);
  FLUID_CHECK(ctas <= INT_MAX, "too many tiles for one launch");
  const dim3 grid(static_cast<unsigned>(ctas)), block(WM * WN * 32);
  // Not a FLUID_DISPATCH macro: four (prologue, epilogue) pairs are built, not their product.
  if (gated) {
    head_gemm_kernel<T, BM, BN, WM, WN, PRO_NONE, true><<<grid, block, 0, stream>>>(p);
  } else if (pro == PRO_NONE) {
    head_gemm_kernel<T, BM, BN, WM, WN, PRO_NONE, false><<<grid, block, 0, stream>>>(p);
  } else if (pro == PRO_SILU_ADD) {
    head_gemm_kernel<T, BM, BN, WM, WN, PRO_SILU_ADD, false><<<grid, block, 0, stream>>>(p);
  } else {
    head_gemm_kernel<T, BM, BN, WM, WN, PRO_LN, false><<<grid, block, 0, stream>>>(p);
  }
}

template <typename T>
void launch_typed(const Params& p, int pro, bool gated, cudaStream_t stream) {
  const Tile t = pick_tile(p.M);
  // Not a FLUID_DISPATCH macro: the two tiles of pick_tile, a choice of this family alone.
  if (t.bm == 64)
    launch_tile<T, 64, 64, 2, 2>(p, pro, gated, stream);
  else
    launch_tile<T, 128, 128, 2, 4>(p, pro, gated, stream);
}

}  // namespace

void head_gemm_tile(int64_t m, int* bm, int* bn, int* warps) {
  const Tile t = pick_tile(m);
  *bm = t.bm;
  *bn = t.bn;
  *warps = t.warps;
}

void head_linear(const TensorView& a, const TensorView* c, const TensorView* lnw,
                 const TensorView* lnb, const TensorView* shift, const TensorView* scale,
                 float eps, const TensorView& w, const TensorView* bias, const TensorView* rbias,
                 bool silu, const TensorView* gate, const TensorView& out, uintptr_t stream) {
  FLUID_CHECK(w.ndim == 2, "w must be 2-D (N, K), got shape " + shape_str(w));
  FLUID_CHECK(w.dtype == DType::BF16 || w.dtype == DType::F16,
              std::string("w must be bfloat16 or float16 (the tensor-core GEMM dtype), got ") +
                  dtype_name(w.dtype) + "; fp32 GEMMs run on the Triton head");
  const DType T = w.dtype;
  const int64_t n = w.shape[0], k = w.shape[1];
  FLUID_CHECK(out.ndim == 2, "out must be 2-D (M, N), got shape " + shape_str(out));
  const int64_t m = out.shape[0];
  FLUID_CHECK(m < INT_MAX - 256 && n < INT_MAX - 256 && k < INT_MAX - 256,
              "M, N and K must be below 2^31 - 256");
  FLUID_CHECK(k > 0 && k % 8 == 0,
              "K (w.shape[1]) must be a positive multiple of 8, got " + std::to_string(k));
  FLUID_CHECK(c == nullptr || scale == nullptr,
              "give c (SiLU-add prologue) or scale (LN-modulate prologue), not both");
  FLUID_CHECK(scale != nullptr || (shift == nullptr && lnw == nullptr && lnb == nullptr),
              "shift / lnw / lnb belong to the LN-modulate prologue: scale is missing");
  const int pro = c ? PRO_SILU_ADD : (scale ? PRO_LN : PRO_NONE);
  const bool gated = gate != nullptr;
  FLUID_CHECK(!gated || pro == PRO_NONE,
              "the gated-residual epilogue is built without a prologue (fc2 reads u as is)");

  check_vec_operand(w, "w", T, n, k);
  check_vec_operand(a, "a", pro == PRO_NONE ? T : DType::F32, m, k);
  if (c) check_vec_operand(*c, "c", DType::F32, m, k, /*row_broadcast=*/true);
  if (scale) check_vec_operand(*scale, "scale", T, m, k);
  if (shift) check_vec_operand(*shift, "shift", T, m, k);
  if (lnw) check_vector(*lnw, "lnw", DType::F32, k, true);
  if (lnb) check_vector(*lnb, "lnb", DType::F32, k, true);
  if (bias) check_vector(*bias, "bias", T, n, false);
  if (rbias) {
    check_shape2(*rbias, "rbias", m, n);
    FLUID_CHECK(rbias->dtype == T, std::string("rbias must be ") + dtype_name(T));
  }
  if (gated) {
    check_shape2(*gate, "gate", m, n);
    FLUID_CHECK(gate->dtype == T, std::string("gate must be ") + dtype_name(T));
  }
  check_shape2(out, "out", m, n);
  const DType ot = gated ? DType::F32 : T;
  FLUID_CHECK(out.dtype == ot, std::string("out must be ") + dtype_name(ot) +
                                   (gated ? " (the residual stream, updated in place)" : "") +
                                   ", got " + dtype_name(out.dtype));
  if (m == 0 || n == 0) return;

  Params p{};
  p.a = a.data; p.a_rs = a.stride[0];
  p.c = c ? static_cast<const float*>(c->data) : nullptr;
  p.c_rs = c ? (c->shape[0] == 1 ? 0 : c->stride[0]) : 0;
  p.lnw = lnw ? static_cast<const float*>(lnw->data) : nullptr;
  p.lnb = lnb ? static_cast<const float*>(lnb->data) : nullptr;
  p.eps = eps;
  p.shift = shift ? shift->data : nullptr; p.shift_rs = shift ? shift->stride[0] : 0;
  p.scale = scale ? scale->data : nullptr; p.scale_rs = scale ? scale->stride[0] : 0;
  p.w = w.data; p.w_rs = w.stride[0];
  p.bias = bias ? bias->data : nullptr;
  p.rbias = rbias ? rbias->data : nullptr; p.rb_rs = rbias ? rbias->stride[0] : 0;
  p.gate = gated ? gate->data : nullptr; p.gate_rs = gated ? gate->stride[0] : 0;
  p.out = out.data; p.out_rs = out.stride[0];
  p.M = static_cast<int>(m); p.N = static_cast<int>(n); p.K = static_cast<int>(k);
  p.silu = silu ? 1 : 0;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  FLUID_DISPATCH_CUDA_HALF(T, GemmT, launch_typed<GemmT>(p, pro, gated, s));
  check_launch("head_linear");
}

void head_input_proj(const TensorView& x, const TensorView& w, const TensorView* bias,
                     const TensorView& out, uintptr_t stream) {
  FLUID_CHECK(x.ndim == 2 && w.ndim == 2 && out.ndim == 2,
              "x, w and out must be 2-D, got " + shape_str(x) + ", " + shape_str(w) + ", " +
                  shape_str(out));
  check_dtype(x, DType::F32, "x");
  check_dtype(w, DType::F32, "w");
  check_dtype(out, DType::F32, "out");
  const int64_t m = out.shape[0], n = out.shape[1], k = x.shape[1];
  FLUID_CHECK(w.shape[0] == n && w.shape[1] == k,
              "w must have shape (" + std::to_string(n) + ", " + std::to_string(k) + "), got " +
                  shape_str(w));
  FLUID_CHECK(m == 0 || x.shape[0] > 0, "x has no rows to repeat into out's rows");
  if (bias) {
    FLUID_CHECK(bias->ndim == 1 && bias->shape[0] == n,
                "bias must have shape (" + std::to_string(n) + ",), got " + shape_str(*bias));
    check_dtype(*bias, DType::F32, "bias");
  }
  if (m == 0 || n == 0) return;
  ProjArgs a{static_cast<const float*>(x.data), x.stride[0], x.stride[1], x.shape[0],
             static_cast<const float*>(w.data), w.stride[0], w.stride[1],
             bias ? static_cast<const float*>(bias->data) : nullptr, bias ? bias->stride[0] : 0,
             static_cast<float*>(out.data), out.stride[0], out.stride[1]};
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((m * n + threads - 1) / threads, 65535 * 8);
  input_proj_kernel<<<static_cast<unsigned>(blocks), threads, 0,
                      reinterpret_cast<cudaStream_t>(stream)>>>(a, m, n, k);
  check_launch("head_input_proj");
}

void head_silu_add(const TensorView& a, const TensorView& c, const TensorView& out,
                   uintptr_t stream) {
  FLUID_CHECK(out.ndim == 2, "out must be 2-D, got shape " + shape_str(out));
  const int64_t m = out.shape[0], k = out.shape[1];
  check_shape2(a, "a", m, k);
  check_shape2(c, "c", m, k, /*row_broadcast=*/true);
  check_shape2(out, "out", m, k);
  check_dtype(a, DType::F32, "a");
  check_dtype(c, DType::F32, "c");
  check_float(out, "out");
  if (m == 0 || k == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((m * k + threads - 1) / threads, 65535 * 8);
  silu_add_kernel<<<static_cast<unsigned>(blocks), threads, 0,
                    reinterpret_cast<cudaStream_t>(stream)>>>(
      static_cast<const float*>(a.data), a.stride[0], static_cast<const float*>(c.data),
      c.shape[0] == 1 ? 0 : c.stride[0], out.data, out.stride[0], out.dtype, m, k);
  check_launch("head_silu_add");
}

}  // namespace cuda
}  // namespace fluid
