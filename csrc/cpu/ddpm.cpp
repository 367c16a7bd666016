// The reverse-diffusion step on the CPU: rows split across threads, fp32 arithmetic whatever the
// storage dtypes of x and model_out.
#include "ddpm.h"

#include <cmath>

#include "../common/dispatch.h"
#include "../common/half.h"
#include "../common/parallel.h"

namespace fluid {
namespace cpu {
namespace {

template <typename TX, typename TM>
void ddpm_step_impl(const TensorView& x, const TensorView& mo, const TensorView& noise,
                    const float* coef, float temperature, float cfg, bool add_noise,
                    bool clip_denoised, const TensorView& out, int nthreads) {
  const int64_t n = x.size(0), c = x.size(1);
  const bool guided = mo.size(0) == 2 * n;
  const TX* xp = x.ptr<TX>();
  const TX* np = noise.ptr<TX>();
  const TM* mp = mo.ptr<TM>();
  TX* op = out.ptr<TX>();
  const float c1 = coef[0], c2 = coef[1], a = coef[2], b = coef[3], min_log = coef[4],
              max_log = coef[5];
  parallel_for(n, nthreads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const TM* cond = mp + r * 2 * c;
      const TM* uncond = mp + (r + n) * 2 * c;
      for (int64_t j = 0; j < c; ++j) {
        float xv = load_f32(xp, r * c + j);
        float eps = load_f32(cond, j);
        if (guided) {
          float eu = load_f32(uncond, j);
          eps = eu + cfg * (eps - eu);
        }
        float frac = (load_f32(cond, c + j) + 1.0f) * 0.5f;
        float logvar = frac * max_log + (1.0f - frac) * min_log;
        float xstart = a * xv - b * eps;
        // clamp to [-1, 1] as torch.clamp does (NaN stays NaN)
        if (clip_denoised) xstart = xstart < -1.0f ? -1.0f : (xstart > 1.0f ? 1.0f : xstart);
        float v = c1 * xstart + c2 * xv;
        if (add_noise) v += std::exp(0.5f * logvar) * temperature * load_f32(np, r * c + j);
        store_f32(op, r * c + j, v);
      }
    }
  });
}

}  // namespace

void ddpm_step(const TensorView& x, const TensorView& model_out, const TensorView& noise,
               const TensorView& table, int64_t step, float temperature, float cfg,
               bool clip_denoised, const TensorView& out, int nthreads) {
  FLUID_CHECK(x.ndim == 2 && out.ndim == 2 && noise.ndim == 2 && model_out.ndim == 2,
              "x, noise, out and model_out must be 2-D");
  const int64_t n = x.size(0), c = x.size(1);
  FLUID_CHECK(model_out.size(1) == 2 * c && (model_out.size(0) == n || model_out.size(0) == 2 * n),
              "model_out must be (N, 2C) or (2N, 2C)");
  FLUID_CHECK(noise.size(0) == n && noise.size(1) == c && out.size(0) == n && out.size(1) == c,
              "noise and out must match x");
  FLUID_CHECK(table.ndim == 2 && table.size(1) == 6, "table must be (S, 6)");
  FLUID_CHECK(step >= 0 && step < table.size(0), "step out of range of the table");
  check_dtype(table, DType::F32, "table");
  FLUID_CHECK(noise.dtype == x.dtype && out.dtype == x.dtype, "noise and out must have x's dtype");
  for (const TensorView* t : {&x, &model_out, &noise, &table, &out})
    check_contiguous(*t, "every argument");
  const float* coef = table.ptr<float>() + step * 6;
  FLUID_DISPATCH_FLOAT(x.dtype, TX, {
    FLUID_DISPATCH_FLOAT(model_out.dtype, TM, {
      ddpm_step_impl<TX, TM>(x, model_out, noise, coef, temperature, cfg, step > 0, clip_denoised,
                             out, nthreads);
    });
  });
}

}  // namespace cpu
}  // namespace fluid
