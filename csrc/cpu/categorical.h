// CPU kernel of categorical sampling with temperature, top-k and top-p (docs/contracts.md §2.4).
// The algorithm is defined in fluid_ops/reference/categorical.py; this file reproduces it
// index for index (float32 scaling, float64 weights and sums in the same order).
#pragma once
#include "../common/tensor.h"

namespace fluid {
namespace cpu {

// logits (N, V) float32/float16/bfloat16, contiguous; uniform (N,) float64 in [0, 1);
// out (N,) int64. temperature >= 0 (0: argmax); top_k in [1, V] or 0 for none;
// top_p in (0, 1] (1: none). Rows run in parallel on `nthreads` threads.
void sample_categorical(const TensorView& logits, const TensorView& uniform, double temperature,
                        int64_t top_k, double top_p, const TensorView& out, int nthreads);

}  // namespace cpu
}  // namespace fluid
