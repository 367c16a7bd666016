// Host entry points of the ddpm family's CUDA kernel (ddpm.cu). Each launches on the given stream
// and never synchronises.
#pragma once
#include <cstdint>

#include "../common/tensor.h"

namespace fluid {
namespace cuda {

// See csrc/cpu/ddpm.h for the contract; the table stays on the device and the step index
// travels as a kernel argument, so a sampling loop does no host-to-device copy.
void ddpm_step(const TensorView& x, const TensorView& model_out, const TensorView& noise,
               const TensorView& table, int64_t step, float temperature, float cfg,
               bool clip_denoised, const TensorView& out, uintptr_t stream);

// ddpm_step with temperature and cfg read by the kernel from `params`, a (2,) float32 device
// tensor [temperature, cfg]: a CUDA graph captured once replays with any values.
void ddpm_step_params(const TensorView& x, const TensorView& model_out, const TensorView& noise,
                      const TensorView& table, int64_t step, const TensorView& params,
                      bool clip_denoised, const TensorView& out, uintptr_t stream);

}  // namespace cuda
}  // namespace fluid
