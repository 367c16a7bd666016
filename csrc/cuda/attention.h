// Host entry points of the attention family's CUDA kernels (attention_fwd.cu, attention_bwd.cu,
// attention_bwd_dq.cu) and the argument checks they share. Layout as the other backends: q (B, Nq, H, D), k / v (B, Nk, H, D),
// any strides along B / N / H with unit stride along D; lse (B, H, Nq) float32 contiguous,
// natural log, -inf for rows with no attendable key. fp16 / bf16 only (fp32 runs on Triton).
// Each launches on the given stream and never synchronises.
#pragma once
#include <cstdint>
#include <string>

#include "../common/tensor.h"

namespace fluid {
namespace cuda {

// key_padding_mask: optional (B, Nk) bool, true = may attend; tile_any: optional (B, ceil(Nk/64))
// bool, tile t of batch b holds an attendable key (computed on the device by the caller; tiles
// with false are skipped, so it must be exact). seqlens_k: optional (B,) int32, valid key length
// per batch (KV cache; values are clamped to [0, Nk] on the device); causal is bottom-right
// relative to it.
void attention_fwd(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView* key_padding_mask, const TensorView* tile_any,
                   const TensorView* seqlens_k, const TensorView& o, const TensorView& lse,
                   bool causal, float softmax_scale, uintptr_t stream);

// dq, dk, dv (shapes and dtype of q, k, v) from dout, o and lse; delta / lse2 are (B, H, Nq)
// float32 contiguous workspaces. dq_accum == nullptr: deterministic (no atomics; a dk/dv pass per
// key tile and a dq pass per query tile). dq_accum given ((B, Nq, H, D) float32 contiguous,
// zeroed by the caller): the dk/dv pass adds dq (scale included) into it with atomics and dq is not written.
void attention_bwd(const TensorView& dout, const TensorView& q, const TensorView& k,
                   const TensorView& v, const TensorView& o, const TensorView& lse,
                   const TensorView* key_padding_mask, const TensorView* tile_any,
                   const TensorView& dq, const TensorView& dk, const TensorView& dv,
                   const TensorView& delta, const TensorView& lse2, const TensorView* dq_accum,
                   bool causal, float softmax_scale, uintptr_t stream);

constexpr int kAttnTileN = 64;  // key-tile width of tile_any (attn::kBlockN)

struct AttnShape {
  int64_t b, nq, nk, h, d;
};

// 16-byte aligned rows: cp.async moves 16-byte chunks, so the pointer and every stride of a dim
// with more than one entry must be a multiple of 8 elements (fp16 / bf16).
inline void check_attention_rows(const TensorView& t, const char* name) {
  FLUID_CHECK(t.ndim == 4, std::string(name) + " must have 4 dims (B, N, H, D), got " + std::to_string(t.ndim));
  FLUID_CHECK(t.dtype == DType::F16 || t.dtype == DType::BF16,
              std::string(name) + " must be float16 or bfloat16 (the CUDA attention kernels), got " +
                  dtype_name(t.dtype));
  FLUID_CHECK(t.shape[3] <= 1 || t.stride[3] == 1, std::string(name) + " must have unit stride along D");
  FLUID_CHECK(reinterpret_cast<uintptr_t>(t.data) % 16 == 0,
              std::string(name) + " must be 16-byte aligned");
  for (int i = 0; i < 3; ++i)
    FLUID_CHECK(t.shape[i] <= 1 || t.stride[i] % 8 == 0,
                std::string(name) + " strides along B, N, H must be multiples of 8 elements, got " +
                    std::to_string(t.stride[i]) + " along dim " + std::to_string(i));
  for (int i = 0; i < 4; ++i)
    FLUID_CHECK(t.shape[i] >= 0 && t.stride[i] >= 0, std::string(name) + " has a negative size or stride");
}

inline void check_attention_out(const TensorView& t, const TensorView& like, const char* name) {
  check_attention_rows(t, name);
  FLUID_CHECK(t.dtype == like.dtype, std::string(name) + " must have the dtype of its input");
  for (int i = 0; i < 4; ++i)
    FLUID_CHECK(t.shape[i] == like.shape[i], std::string(name) + " has a shape different from its input");
}

inline void check_flags(const TensorView& t, int64_t rows, int64_t cols, const char* name) {
  FLUID_CHECK(t.ndim == 2 && t.shape[0] == rows && t.shape[1] == cols,
              std::string(name) + " must have shape (" + std::to_string(rows) + ", " + std::to_string(cols) + ")");
  FLUID_CHECK(t.dtype == DType::BOOL || t.dtype == DType::U8, std::string(name) + " must be bool");
  FLUID_CHECK(t.stride[0] >= 0 && t.stride[1] >= 0, std::string(name) + " has a negative stride");
}

inline AttnShape check_attention_args(const TensorView& q, const TensorView& k, const TensorView& v,
                                      const TensorView* mask, const TensorView* tile_any, const char* op) {
  check_attention_rows(q, "q");
  check_attention_rows(k, "k");
  check_attention_rows(v, "v");
  AttnShape s{q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3]};
  FLUID_CHECK(s.d == 32 || s.d == 64 || s.d == 80 || s.d == 96 || s.d == 128,
              std::string(op) + ": unsupported head dim " + std::to_string(s.d));
  for (const TensorView* t : {&k, &v}) {
    FLUID_CHECK(t->dtype == q.dtype, "k and v must have q's dtype");
    FLUID_CHECK(t->shape[0] == s.b && t->shape[2] == s.h && t->shape[3] == s.d,
                "k and v must have q's batch, heads and head dim");
  }
  FLUID_CHECK(v.shape[1] == s.nk, "v has a shape different from k");
  FLUID_CHECK(s.nq < (int64_t{1} << 30) && s.nk < (int64_t{1} << 30), "sequence length too long (>= 2^30)");
  FLUID_CHECK(s.b <= 65535 && s.h <= 65535, "B and H must each be <= 65535 (grid limits)");
  if (mask != nullptr) check_flags(*mask, s.b, s.nk, "key_padding_mask");
  if (tile_any != nullptr) {
    FLUID_CHECK(mask != nullptr, "tile_any is given without key_padding_mask");
    check_flags(*tile_any, s.b, (s.nk + kAttnTileN - 1) / kAttnTileN, "tile_any");
    FLUID_CHECK(tile_any->shape[1] <= 1 || tile_any->stride[1] == 1, "tile_any must have unit stride along its tiles");
  }
  return s;
}

}  // namespace cuda
}  // namespace fluid
