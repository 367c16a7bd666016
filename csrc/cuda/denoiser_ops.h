// Host entry points of the DenoiserMLP's CUDA kernels that are not in ops.h (ops.h holds
// layernorm_modulate). Each launches on the given stream and never synchronises.
#pragma once
#include <cstdint>

#include "../common/tensor.h"

namespace fluid {
namespace cuda {

// out = h + gate * y over (R, D) views: unit stride along D, any row stride (gate may be a
// column chunk of the adaLN output, or one row broadcast with stride 0). out may be h itself.
// fp32 arithmetic; h, gate, y, out may each be fp32 / fp16 / bf16.
void gated_residual(const TensorView& h, const TensorView& gate, const TensorView& y,
                    const TensorView& out, uintptr_t stream);

}  // namespace cuda
}  // namespace fluid
