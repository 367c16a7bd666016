// The denoiser family on CUDA (docs/contracts.md §2.2): LayerNorm + adaLN modulation and the gated
// residual, bandwidth-bound kernels with a runtime dtype per operand (common.cuh's load_as_f32).
#include "common.cuh"
#include "denoiser.h"

namespace fluid {
namespace cuda {
namespace {

struct RowArgs {
  const void* x; int64_t x_rs; DType xt;
  const void* shift; int64_t shift_rs; DType st;
  const void* scale; int64_t scale_rs;
  const void* weight; const void* bias; DType wt;
  void* out; int64_t out_rs; DType ot;
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp per row; two passes over x (mean, then centred variance) for accuracy at any D.
__global__ void layernorm_modulate_kernel(RowArgs a, int64_t rows, int64_t d, float eps) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const void* x = a.x;
  const int64_t xo = row * a.x_rs;
  float s = 0.f;
  for (int64_t j = lane; j < d; j += 32) s += load_as_f32(x, a.xt, xo + j);
  const float mean = warp_sum(s) / static_cast<float>(d);
  float v = 0.f;
  for (int64_t j = lane; j < d; j += 32) {
    const float t = load_as_f32(x, a.xt, xo + j) - mean;
    v += t * t;
  }
  const float rstd = rsqrtf(warp_sum(v) / static_cast<float>(d) + eps);
  for (int64_t j = lane; j < d; j += 32) {
    float y = (load_as_f32(x, a.xt, xo + j) - mean) * rstd;
    if (a.weight) y *= load_as_f32(a.weight, a.wt, j);
    if (a.bias) y += load_as_f32(a.bias, a.wt, j);
    const float sc = load_as_f32(a.scale, a.st, row * a.scale_rs + j);
    const float sh = load_as_f32(a.shift, a.st, row * a.shift_rs + j);
    store_from_f32(a.out, a.ot, row * a.out_rs + j, y * (1.0f + sc) + sh);
  }
}

}  // namespace

void layernorm_modulate(const TensorView& x, const TensorView* weight, const TensorView* bias,
                        const TensorView& shift, const TensorView& scale, float eps,
                        const TensorView& out, uintptr_t stream) {
  FLUID_CHECK(x.ndim == 2 && shift.ndim == 2 && scale.ndim == 2 && out.ndim == 2, "bad ranks");
  FLUID_CHECK(x.stride[1] == 1 && shift.stride[1] == 1 && scale.stride[1] == 1 &&
                  out.stride[1] == 1,
              "last dim must have unit stride");
  FLUID_CHECK(shift.dtype == scale.dtype, "shift and scale must share a dtype");
  const int64_t rows = x.size(0), d = x.size(1);
  if (rows == 0 || d == 0) return;
  RowArgs a{x.data, x.stride[0], x.dtype,
            shift.data, shift.stride[0], shift.dtype,
            scale.data, scale.stride[0],
            weight ? weight->data : nullptr, bias ? bias->data : nullptr,
            weight ? weight->dtype : (bias ? bias->dtype : DType::F32),
            out.data, out.stride[0], out.dtype};
  const dim3 block(32, 8);
  const int64_t blocks = (rows + block.y - 1) / block.y;
  layernorm_modulate_kernel<<<static_cast<unsigned>(blocks), block, 0,
                              reinterpret_cast<cudaStream_t>(stream)>>>(a, rows, d, eps);
  check_launch("layernorm_modulate");
}

namespace {

struct GatedArgs {
  const void* h; int64_t h_rs; DType ht;
  const void* gate; int64_t g_rs; DType gt;
  const void* y; int64_t y_rs; DType yt;
  void* out; int64_t o_rs; DType ot;
};

// Grid-stride loop over the R x D elements; each element is read before it is written, so
// out == h (in place) is safe.
__global__ void gated_residual_kernel(GatedArgs a, int64_t rows, int64_t d) {
  const int64_t total = rows * d;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / d, j = i - r * d;
    const float h = load_as_f32(a.h, a.ht, r * a.h_rs + j);
    const float g = load_as_f32(a.gate, a.gt, r * a.g_rs + j);
    const float y = load_as_f32(a.y, a.yt, r * a.y_rs + j);
    store_from_f32(a.out, a.ot, r * a.o_rs + j, fmaf(g, y, h));
  }
}

}  // namespace

void gated_residual(const TensorView& h, const TensorView& gate, const TensorView& y,
                    const TensorView& out, uintptr_t stream) {
  FLUID_CHECK(h.ndim == 2 && gate.ndim == 2 && y.ndim == 2 && out.ndim == 2, "bad ranks");
  const int64_t rows = h.size(0), d = h.size(1);
  for (const TensorView* t : {&gate, &y, &out})
    FLUID_CHECK(t->size(0) == rows && t->size(1) == d, "gate, y and out must match h's shape");
  FLUID_CHECK(d <= 1 || (h.stride[1] == 1 && gate.stride[1] == 1 && y.stride[1] == 1 &&
                         out.stride[1] == 1),
              "last dim must have unit stride");
  if (rows == 0 || d == 0) return;
  GatedArgs a{h.data, h.stride[0], h.dtype, gate.data, gate.stride[0], gate.dtype,
              y.data, y.stride[0], y.dtype, out.data, out.stride[0], out.dtype};
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((rows * d + threads - 1) / threads, 65535 * 8);
  gated_residual_kernel<<<static_cast<unsigned>(blocks), threads, 0,
                          reinterpret_cast<cudaStream_t>(stream)>>>(a, rows, d);
  check_launch("gated_residual");
}

}  // namespace cuda
}  // namespace fluid
