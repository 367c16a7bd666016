// Host entry point of the categorical family's CUDA kernel (categorical.cu). Launches on the
// given stream and never synchronises.
#pragma once
#include <cstdint>

#include "../common/tensor.h"

namespace fluid {
namespace cuda {

// Categorical sampling, the algorithm of fluid_ops/reference/categorical.py: logits (N, V)
// float32/float16/bfloat16 with unit column stride; uniform (N,) float64 in [0, 1); out (N,)
// int64. temperature >= 0 (rounded to float32; 0: argmax), top_k in [1, V] or 0 for none,
// top_p in (0, 1] (1: none). One thread block per row.
void sample_categorical(const TensorView& logits, const TensorView& uniform, double temperature,
                        int64_t top_k, double top_p, const TensorView& out, uintptr_t stream);

}  // namespace cuda
}  // namespace fluid
