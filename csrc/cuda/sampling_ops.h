// Host entry points of the CUDA sampling kernels added for issue 4 (ddpm_step with device-side
// temperature / cfg, categorical sampling). Each launches on the given stream and never
// synchronises.
#pragma once
#include <cstdint>

#include "../common/tensor.h"

namespace fluid {
namespace cuda {

// ddpm_step (ops.h) with temperature and cfg read by the kernel from `params`, a (2,) float32
// device tensor [temperature, cfg]: a CUDA graph captured once replays with any values.
void ddpm_step_params(const TensorView& x, const TensorView& model_out, const TensorView& noise,
                      const TensorView& table, int64_t step, const TensorView& params,
                      bool clip_denoised, const TensorView& out, uintptr_t stream);

// Categorical sampling, the algorithm of fluid_ops/reference/categorical.py: logits (N, V)
// float32/float16/bfloat16 with unit column stride; uniform (N,) float64 in [0, 1); out (N,)
// int64. temperature >= 0 (rounded to float32; 0: argmax), top_k in [1, V] or 0 for none,
// top_p in (0, 1] (1: none). One thread block per row.
void sample_categorical(const TensorView& logits, const TensorView& uniform, double temperature,
                        int64_t top_k, double top_p, const TensorView& out, uintptr_t stream);

}  // namespace cuda
}  // namespace fluid
