// denoiser family (fluid_ops/ops/denoiser.py: layernorm_modulate, gated_residual) in
// fluid_ops._C_cuda: csrc/cuda/denoiser.h. The two backwards have no CUDA kernel: other backends
// run them.
#include <optional>

#include "../cuda/denoiser.h"
#include "pyview.h"

namespace py = pybind11;

namespace fluid {
namespace cuda {
void bind_denoiser(py::module_& m) {
  m.def(
      "layernorm_modulate",
      [](const TensorView& x, std::optional<TensorView> w, std::optional<TensorView> b,
         const TensorView& shift, const TensorView& scale, float eps, const TensorView& out,
         uintptr_t stream) {
        layernorm_modulate(x, opt(w), opt(b), shift, scale, eps, out, stream);
      },
      nogil(), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("shift"),
      py::arg("scale"), py::arg("eps"), py::arg("out"), py::arg("stream"));
  m.def("gated_residual", &gated_residual, nogil(), py::arg("h"), py::arg("gate"), py::arg("y"),
        py::arg("out"), py::arg("stream"));
}
}  // namespace cuda
}  // namespace fluid
