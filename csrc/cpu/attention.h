// CPU attention (docs/contracts.md §2.1): forward with online softmax over key blocks, backward from the saved
// log-sum-exp. Layout q (B, Nq, H, D), k / v (B, Nk, H, D), any strides with unit stride along D.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../common/tensor.h"

namespace fluid {
namespace cpu {

// o (B, Nq, H, D) in q's dtype (unit stride along D); lse (B, H, Nq) float32 contiguous, natural
// log, -inf for a row that may attend no key (its o row is 0).
// key_padding_mask: optional (B, Nk) bool, true = may attend. seqlens_k: optional (B,) int32/int64,
// the number of valid keys of each batch (a KV cache's filled length); causal is bottom-right
// relative to that length: query i attends key j iff j <= i + Lk_b - Nq.
// impl: 0 = fastest available, 1 = portable C++, 2 = AVX2, 3 = AVX-512, 4 = "avx2_w16" (test
// only: the AVX-512 kernels' 16-lane tiling on AVX2), 5 = "avx512bf16" (the AVX-512 kernels, and
// for bf16 inputs a forward and backward with native bf16 dot products, AVX512_BF16 vdpbf16ps). Tests run each
// one the CPU has; asking for one it lacks is an error.
void attention_fwd(const TensorView& q, const TensorView& k, const TensorView& v,
                   const std::optional<TensorView>& key_padding_mask,
                   const std::optional<TensorView>& seqlens_k, const TensorView& o,
                   const TensorView& lse, bool causal, float softmax_scale, int nthreads, int impl);

// dq, dk, dv (shapes of q, k, v, in their dtype, unit stride along D) from dout, the forward's o
// and lse. Deterministic: each (batch, head) is reduced by one thread in a fixed order.
// impl as for attention_fwd.
void attention_bwd(const TensorView& dout, const TensorView& q, const TensorView& k,
                   const TensorView& v, const TensorView& o, const TensorView& lse,
                   const std::optional<TensorView>& key_padding_mask, const TensorView& dq,
                   const TensorView& dk, const TensorView& dv, bool causal, float softmax_scale,
                   int nthreads, int impl);

// Which forward path impl=0 takes on this CPU: "avx512bf16", "avx512", "avx2" or "portable"
// ("avx512bf16" differs from "avx512" for bf16 inputs only).
const char* attention_fwd_isa();
// Which backward path a call takes: the kernel set of `impl` (0: this CPU's fastest) for inputs
// of `dtype` ("float32", "float16", "bfloat16") and head dim `d`, i.e. "avx512bf16" only where
// the native-bf16 backward runs (bf16, AVX512_BF16, even d); an impl this CPU lacks is an error.
std::string attention_bwd_isa(const std::string& dtype, int64_t d, int impl);
// Every forward / backward path this CPU and build can run, portable first.
std::vector<std::string> attention_fwd_isas();

namespace attn {

// One forward work item for the SIMD kernels, all fp32 and packed by attention.cpp:
//   q     (nq, d) query rows, pre-multiplied by softmax_scale * log2(e) (the kernels use exp2);
//   kt    keys in chunks of 16: kt[(j / 16) * d * 16 + e * 16 + j % 16] = k[j][e];
//   v     (nkp, d) values, rows >= the valid length are zero;
//   kbias (nkp) 0 for a key that may be attended, -inf for padding / masked / past the length;
//   block_end[kb] for each key block of kBlock keys: 1 + the last attendable key of the block
//         (relative to the block start), 0 when the whole block is masked (skipped);
//   block_full[kb]: every key of the block may be attended (kbias need not be added).
// Causal: row r (0-based in this item) may attend key j iff j <= r + diag.
// Outputs: o (nq, d) normalised rows (0 for rows with no key), lse2 (nq) base-2 log-sum-exp
// of the scaled scores (-inf for rows with no key). scratch: kScratchFloats floats.
constexpr int kBlock = 128;
constexpr int kMaxRows = 8;
constexpr int64_t kScratchFloats = kMaxRows * kBlock + kMaxRows * 128 + 64;

struct FwdItem {
  const float* q;
  const float* kt;
  const float* v;
  const float* kbias;
  const int32_t* block_end;
  const uint8_t* block_full;
  int64_t nq, nkp, d;
  bool causal;
  int64_t diag;
  float* o;
  float* lse2;
  float* scratch;
};

using FwdKernel = void (*)(const FwdItem&);

// One backward work item (one batch and head), fp32, packed by attention.cpp. kt, kbias,
// block_end, block_full as in FwdItem; vt = v packed like kt; k, q, dout, qs = q * scale * log2(e)
// as rows; lse2 base-2 lse with +inf for rows that attend nothing (so P = 0 there); delta =
// rowsum(dO * O). dq (nq, d), dk / dv (nkp, d) are zeroed fp32 accumulators (dS carries scale).
constexpr int64_t kBwdGroup = 48;
constexpr int64_t kBwdScratchFloats = 2 * kBwdGroup * kBlock;

struct BwdItem {
  const float* qs;
  const float* q;
  const float* dout;
  const float* lse2;
  const float* delta;
  const float* kt;
  const float* vt;
  const float* k;
  const float* kbias;
  const int32_t* block_end;
  const uint8_t* block_full;
  int64_t nq, nkp, d;
  bool causal;
  int64_t diag;
  float scale;
  float* dq;
  float* dk;
  float* dv;
  float* scratch;
};
using BwdKernel = void (*)(const BwdItem&);

// One forward work item for the native-bf16 kernel (attention_avx512bf16.cpp): the inputs' bf16
// bits, rearranged (not converted) by attention.cpp so that vdpbf16ps, which sums products of
// adjacent bf16 pairs into fp32 lanes, runs over D for Q Kᵀ and over keys for P V:
//   q   (nq, d) query rows as given (unscaled; qk_scale = softmax_scale * log2(e) multiplies the
//       fp32 scores);
//   kt  keys in chunks of 16, dims in pairs: kt[(j / 16) * d * 16 + (e / 2) * 32 + (j % 16) * 2 + e % 2];
//   v   values in pairs of keys: v[(j / 2) * d * 2 + e * 2 + j % 2] = v[j][e], zero past the length.
// kbias, block_end, block_full, causal, diag, o, lse2 as in FwdItem. P is rounded to bf16 for P V
// (as flash attention does on GPUs); its row sum is taken over the rounded values.
struct FwdItemBf16 {
  const uint16_t* q;
  const uint16_t* kt;
  const uint16_t* v;
  const float* kbias;
  const int32_t* block_end;
  const uint8_t* block_full;
  int64_t nq, nkp, d;
  bool causal;
  int64_t diag;
  float qk_scale;
  float* o;
  float* lse2;
};
using FwdKernelBf16 = void (*)(const FwdItemBf16&);

// One backward work item (one batch and head) for the native-bf16 kernel: bf16 bits rearranged by
// attention.cpp so that every product is a vdpbf16ps over its reduction dimension:
//   q, dout  (nq, d) rows (S = Q Kᵀ and dP = dO Vᵀ reduce over D);
//   q2, do2  rows in pairs: q2[(i / 2) * d * 2 + e * 2 + i % 2] = q[i][e], a zero row past nq
//            (dK += dSᵀ Q and dV += Pᵀ dO reduce over query rows);
//   kt, vt   keys / values in 16-key chunks, dims in pairs (FwdItemBf16::kt's layout);
//   k2       keys in pairs (FwdItemBf16::v's layout; dQ += dS K reduces over keys).
// lse2, delta, kbias, block_end, block_full, causal, diag, dq, dk, dv as in BwdItem; qk_scale =
// scale * log2(e) multiplies the fp32 scores. P and dS are computed in fp32 and rounded to bf16
// only as operands of the dV, dK and dQ products (what a bf16 GEMM would see, as flash attention's
// bf16 backward does); every sum is fp32.
struct BwdItemBf16 {
  const uint16_t* q;
  const uint16_t* dout;
  const uint16_t* q2;
  const uint16_t* do2;
  const uint16_t* kt;
  const uint16_t* vt;
  const uint16_t* k2;
  const float* lse2;
  const float* delta;
  const float* kbias;
  const int32_t* block_end;
  const uint8_t* block_full;
  int64_t nq, nkp, d;
  bool causal;
  int64_t diag;
  float qk_scale, scale;
  float* dq;
  float* dk;
  float* dv;
};
using BwdKernelBf16 = void (*)(const BwdItemBf16&);

// nullptr when attention_avx512bf16.cpp was not compiled for this target.
FwdKernelBf16 fwd_kernel_avx512bf16();
BwdKernelBf16 bwd_kernel_avx512bf16();
// Each returns nullptr when its file was not compiled for this target.
FwdKernel fwd_kernel_avx2();
FwdKernel fwd_kernel_avx512();
BwdKernel bwd_kernel_avx2();
// Test only: the 16-lane (AVX-512) tiling emulated with pairs of AVX2 registers.
FwdKernel fwd_kernel_avx2_w16();
BwdKernel bwd_kernel_avx2_w16();
BwdKernel bwd_kernel_avx512();

}  // namespace attn
}  // namespace cpu
}  // namespace fluid
