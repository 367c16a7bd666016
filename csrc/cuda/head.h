// Host entry points of the head family: the fused diffusion-head GEMMs (head.cu). Each validates its
// views (throws fluid::CheckError naming the argument), launches on the given stream and never
// synchronises. Contract and design: the header comment of head.cu.
#pragma once
#include <cstdint>

#include "../common/tensor.h"

namespace fluid {
namespace cuda {

// out = epilogue(prologue(A) @ W^T) for W (N, K) in bf16 / fp16 (K contiguous), fp32
// accumulation on tensor cores (mma.sync m16n8k16). The GEMM dtype T is W's dtype.
//
// Prologue (which one: the optional arguments given):
//   none:        A (M, K) in T;
//   SiLU-add:    `c` given: A = SiLU(a + c), a (M, K) fp32, c (M, K) or (1, K) fp32 (one row
//                broadcast to all rows);
//   LN-modulate: `scale` given: A = (LN(a) * lnw + lnb) * (1 + scale) + shift, a (M, K) fp32 (the
//                residual stream), LN over K with eps, statistics computed in the kernel (two
//                passes: mean, then the mean of centred squares); lnw / lnb (K,) fp32 and shift
//                are optional, shift / scale (M, K) in T.
// Epilogue, in this order: + bias (N,) in T, + rbias (M, N) in T, SiLU if `silu`; then either
//   store:           out (M, N) in T, or
//   gated residual:  `gate` (M, N) in T given: out (M, N) fp32 is the residual stream, updated in
//                    place: out += gate * acc (each element read and written by one thread).
// Requirements (checked): K % 8 == 0; every (M, K) / (N, K) operand read in 16-byte vectors
// (A, c, shift, scale, lnw, lnb, W) has unit column stride, a row stride that is a multiple of
// 16 bytes' worth of elements, and a 16-byte aligned base; the (M, N) epilogue operands have
// unit column stride (any row stride); M, N, K < 2^31 - 256.
void head_linear(const TensorView& a, const TensorView* c, const TensorView* lnw,
                 const TensorView* lnb, const TensorView* shift, const TensorView* scale,
                 float eps, const TensorView& w, const TensorView* bias, const TensorView* rbias,
                 bool silu, const TensorView* gate, const TensorView& out, uintptr_t stream);

// out (M, N) fp32 = x[r % R0] @ W^T + bias for x (R0, K) fp32, W (N, K) fp32, bias (N,) fp32
// (optional): the head's input projection (K = in_channels, tiny), in fp32 on CUDA cores; rows
// read modulo R0 give CFG's [x; x] without a copy. Any strides.
void head_input_proj(const TensorView& x, const TensorView& w, const TensorView* bias,
                     const TensorView& out, uintptr_t stream);

// out (M, K) = SiLU(a + c) for a (M, K) fp32, c (M, K) or (1, K) fp32; out fp32 / fp16 / bf16.
// Unit column strides. The "split" prologue mode's row kernel for the adaLN GEMM's input.
void head_silu_add(const TensorView& a, const TensorView& c, const TensorView& out,
                   uintptr_t stream);

// The (BM, BN, warps) tile head_linear uses for M rows (fixed per shape class, see head.cu).
void head_gemm_tile(int64_t m, int* bm, int* bn, int* warps);

}  // namespace cuda
}  // namespace fluid
