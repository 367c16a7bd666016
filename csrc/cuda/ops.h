// Host entry points of the CUDA kernels. Each launches on the given stream (the caller's
// current torch stream) and never synchronises.
#pragma once
#include <cstdint>

#include "../common/tensor.h"

namespace fluid {
namespace cuda {

// See csrc/cpu/sampling.h for the contract; the table stays on the device and the step index
// travels as a kernel argument, so a sampling loop does no host-to-device copy.
void ddpm_step(const TensorView& x, const TensorView& model_out, const TensorView& noise,
               const TensorView& table, int64_t step, float temperature, float cfg,
               bool clip_denoised, const TensorView& out, uintptr_t stream);

// out = LN(x) * (1 + scale) + shift, LN over the last dim with optional affine weight / bias.
// x, shift, scale, out: (R, D), unit stride along D, any row stride (shift / scale may be
// column chunks of one adaLN output, or broadcast rows with stride 0).
void layernorm_modulate(const TensorView& x, const TensorView* weight, const TensorView* bias,
                        const TensorView& shift, const TensorView& scale, float eps,
                        const TensorView& out, uintptr_t stream);

}  // namespace cuda
}  // namespace fluid
