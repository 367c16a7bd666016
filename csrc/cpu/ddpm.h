// CPU kernel of the reverse-diffusion step (docs/contracts.md §2.3).
#pragma once
#include "../common/tensor.h"

namespace fluid {
namespace cpu {

// One reverse-diffusion step with classifier-free guidance and temperature (docs/contracts.md §2.3).
// x (N, C); model_out (N, 2C) or (2N, 2C) = [cond; uncond] when guided; noise (N, C);
// table (S, 6) float32 rows [coef1, coef2, sqrt_recip_acp, sqrt_recipm1_acp, min_log, max_log];
// out (N, C), may alias x. step indexes the table; noise is added iff step > 0.
// clip_denoised: the predicted x_0 = a x - b eps is clamped to [-1, 1] before the posterior mean
// (IDDPM's clip_denoised; for tokens known to lie in [-1, 1], such as pixel patches).
void ddpm_step(const TensorView& x, const TensorView& model_out, const TensorView& noise,
               const TensorView& table, int64_t step, float temperature, float cfg,
               bool clip_denoised, const TensorView& out, int nthreads);

}  // namespace cpu
}  // namespace fluid
