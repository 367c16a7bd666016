// Device-side helpers shared by the CUDA kernels: dtype loads/stores and launch checks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "../common/tensor.h"

namespace fluid {
namespace cuda {

// Warp-uniform runtime dtype switch in device code, not FLUID_DISPATCH_FLOAT: cheaper to compile
// than a template per dtype combination, and the branch costs nothing next to the memory traffic
// of these bandwidth-bound kernels.
__device__ __forceinline__ float load_as_f32(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_f32(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::F16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace fluid
