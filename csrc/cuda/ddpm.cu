// The ddpm family on CUDA (docs/contracts.md §2.3): one reverse-diffusion step, one thread per
// element; ddpm_step_params reads temperature / cfg from the device for CUDA-graph replays.
#include "common.cuh"
#include "ddpm.h"

namespace fluid {
namespace cuda {
namespace {

__global__ void ddpm_step_kernel(const void* __restrict__ x, const void* __restrict__ mo,
                                 const void* __restrict__ noise, const float* __restrict__ coef,
                                 void* __restrict__ out, DType xt, DType mt, int64_t n, int64_t c,
                                 bool guided, bool add_noise, bool clip_denoised, float temperature,
                                 float cfg, const float* __restrict__ params) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * c) return;
  if (params != nullptr) {  // [temperature, cfg] from the device (graph replays with any value)
    temperature = params[0];
    cfg = params[1];
  }
  const int64_t r = i / c, j = i - r * c;
  const float c1 = coef[0], c2 = coef[1], a = coef[2], b = coef[3], min_log = coef[4],
              max_log = coef[5];
  const float xv = load_as_f32(x, xt, i);
  float eps = load_as_f32(mo, mt, r * 2 * c + j);
  if (guided) {
    const float eu = load_as_f32(mo, mt, (r + n) * 2 * c + j);
    eps = eu + cfg * (eps - eu);
  }
  const float frac = (load_as_f32(mo, mt, r * 2 * c + c + j) + 1.0f) * 0.5f;
  const float logvar = frac * max_log + (1.0f - frac) * min_log;
  float xstart = a * xv - b * eps;
  if (clip_denoised) xstart = xstart < -1.0f ? -1.0f : (xstart > 1.0f ? 1.0f : xstart);  // NaN stays
  float v = c1 * xstart + c2 * xv;
  if (add_noise) v += expf(0.5f * logvar) * temperature * load_as_f32(noise, xt, i);
  store_from_f32(out, xt, i, v);
}

void launch_ddpm_step(const TensorView& x, const TensorView& model_out, const TensorView& noise,
                      const TensorView& table, int64_t step, float temperature, float cfg,
                      const float* params, bool clip_denoised, const TensorView& out,
                      uintptr_t stream) {
  FLUID_CHECK(x.ndim == 2 && model_out.ndim == 2 && table.ndim == 2 && table.size(1) == 6,
              "bad ranks");
  FLUID_CHECK(step >= 0 && step < table.size(0), "step out of range of the table");
  const int64_t n = x.size(0), c = x.size(1);
  if (n * c == 0) return;
  const bool guided = model_out.size(0) == 2 * n;
  const int threads = 256;
  const int64_t blocks = (n * c + threads - 1) / threads;
  ddpm_step_kernel<<<static_cast<unsigned>(blocks), threads, 0,
                     reinterpret_cast<cudaStream_t>(stream)>>>(
      x.data, model_out.data, noise.data, table.ptr<float>() + step * 6, out.data, x.dtype,
      model_out.dtype, n, c, guided, step > 0, clip_denoised, temperature, cfg, params);
  check_launch("ddpm_step");
}

}  // namespace

void ddpm_step(const TensorView& x, const TensorView& model_out, const TensorView& noise,
               const TensorView& table, int64_t step, float temperature, float cfg,
               bool clip_denoised, const TensorView& out, uintptr_t stream) {
  launch_ddpm_step(x, model_out, noise, table, step, temperature, cfg, nullptr, clip_denoised, out,
                   stream);
}

void ddpm_step_params(const TensorView& x, const TensorView& model_out, const TensorView& noise,
                      const TensorView& table, int64_t step, const TensorView& params,
                      bool clip_denoised, const TensorView& out, uintptr_t stream) {
  FLUID_CHECK(params.ndim == 1 && params.size(0) == 2 && params.dtype == DType::F32,
              "params must be a (2,) float32 tensor [temperature, cfg]");
  launch_ddpm_step(x, model_out, noise, table, step, 1.0f, 1.0f, params.ptr<float>(), clip_denoised,
                   out, stream);
}

}  // namespace cuda
}  // namespace fluid
