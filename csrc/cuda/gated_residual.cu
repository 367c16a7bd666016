#include "common.cuh"
#include "denoiser_ops.h"

namespace fluid {
namespace cuda {
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
