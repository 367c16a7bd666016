// denoiser family (fluid_ops/ops/denoiser.py: layernorm_modulate, gated_residual and their
// backwards) in fluid_ops._C: csrc/cpu/denoiser.h.
#include <optional>

#include "../cpu/denoiser.h"
#include "pyview.h"

namespace py = pybind11;

namespace fluid {
namespace cpu {
void bind_denoiser(py::module_& m) {
  m.def(
      "layernorm_modulate",
      [](const TensorView& x, std::optional<TensorView> w, std::optional<TensorView> b,
         const TensorView& shift, const TensorView& scale, float eps, const TensorView& out,
         int nthreads) {
        layernorm_modulate(x, opt(w), opt(b), shift, scale, eps, out, nthreads);
      },
      nogil(), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("shift"),
      py::arg("scale"), py::arg("eps"), py::arg("out"), py::arg("nthreads"));
  m.def(
      "layernorm_modulate_backward",
      [](const TensorView& x, std::optional<TensorView> w, std::optional<TensorView> b,
         const TensorView& scale, const TensorView& grad_out, float eps, const TensorView& grad_x,
         std::optional<TensorView> grad_scale, std::optional<TensorView> grad_weight,
         std::optional<TensorView> grad_bias, int nthreads) {
        layernorm_modulate_backward(x, opt(w), opt(b), scale, grad_out, eps, grad_x,
                                    opt(grad_scale), opt(grad_weight), opt(grad_bias), nthreads);
      },
      nogil(), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("scale"),
      py::arg("grad_out"), py::arg("eps"), py::arg("grad_x"), py::arg("grad_scale"),
      py::arg("grad_weight"), py::arg("grad_bias"), py::arg("nthreads"));
  m.def("gated_residual", &gated_residual, nogil(), py::arg("h"), py::arg("gate"),
        py::arg("y"), py::arg("out"), py::arg("nthreads"));
  m.def("gated_residual_backward", &gated_residual_backward, nogil(), py::arg("grad_out"),
        py::arg("gate"), py::arg("y"), py::arg("grad_gate"), py::arg("grad_y"),
        py::arg("nthreads"));
}
}  // namespace cpu
}  // namespace fluid
