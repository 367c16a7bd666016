// CPU kernels of the fused non-GEMM parts of the DenoiserMLP (docs/contracts.md §2.2).
// All tensors are (R, D) views: any row stride (0 = one row broadcast to all), unit stride
// along D. Arithmetic is fp32 whatever the storage dtypes (fp32 / fp16 / bf16).
#pragma once
#include "../common/tensor.h"

namespace fluid {
namespace cpu {

// out = LN(x) * (1 + scale) + shift, LN over D with eps and optional affine weight / bias
// ((D,) float32, contiguous). out's dtype may differ from x's (fp32 h -> bf16 GEMM input).
void layernorm_modulate(const TensorView& x, const TensorView* weight, const TensorView* bias,
                        const TensorView& shift, const TensorView& scale, float eps,
                        const TensorView& out, int nthreads);

// Backward of layernorm_modulate given grad_out (R, D). Writes grad_x (R, D, x's layout
// rules), grad_scale (R, D) when given, and the column sums grad_weight / grad_bias ((D,)
// float32, contiguous; overwritten) when given. grad_shift is grad_out itself.
// Without weight / bias they are the sums for weight 1, bias 0. Statistics are recomputed
// from x (nothing is saved by the forward).
void layernorm_modulate_backward(const TensorView& x, const TensorView* weight,
                                 const TensorView* bias, const TensorView& scale,
                                 const TensorView& grad_out, float eps, const TensorView& grad_x,
                                 const TensorView* grad_scale, const TensorView* grad_weight,
                                 const TensorView* grad_bias, int nthreads);

// out = h + gate * y. out may be h itself (in place).
void gated_residual(const TensorView& h, const TensorView& gate, const TensorView& y,
                    const TensorView& out, int nthreads);

// grad_gate = grad_out * y, grad_y = grad_out * gate (grad_h is grad_out itself).
void gated_residual_backward(const TensorView& grad_out, const TensorView& gate,
                             const TensorView& y, const TensorView& grad_gate,
                             const TensorView& grad_y, int nthreads);

}  // namespace cpu
}  // namespace fluid
