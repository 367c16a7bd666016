// Host entry points of the denoiser family's CUDA kernels (denoiser.cu): the fused non-GEMM parts
// of the DenoiserMLP (docs/contracts.md §2.2; CPU counterpart csrc/cpu/denoiser.h). Each launches
// on the given stream (the caller's current torch stream) and never synchronises.
#pragma once
#include <cstdint>

#include "../common/tensor.h"

namespace fluid {
namespace cuda {

// out = LN(x) * (1 + scale) + shift, LN over the last dim with optional affine weight / bias.
// x, shift, scale, out: (R, D), unit stride along D, any row stride (shift / scale may be
// column chunks of one adaLN output, or broadcast rows with stride 0).
void layernorm_modulate(const TensorView& x, const TensorView* weight, const TensorView* bias,
                        const TensorView& shift, const TensorView& scale, float eps,
                        const TensorView& out, uintptr_t stream);

// out = h + gate * y over (R, D) views: unit stride along D, any row stride (gate may be a
// column chunk of the adaLN output, or one row broadcast with stride 0). out may be h itself.
// fp32 arithmetic; h, gate, y, out may each be fp32 / fp16 / bf16.
void gated_residual(const TensorView& h, const TensorView& gate, const TensorView& y,
                    const TensorView& out, uintptr_t stream);

}  // namespace cuda
}  // namespace fluid
