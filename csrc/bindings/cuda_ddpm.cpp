// ddpm family (fluid_ops/ops/ddpm.py) in fluid_ops._C_cuda: csrc/cuda/ddpm.h.
#include "../cuda/ddpm.h"
#include "pyview.h"

namespace py = pybind11;

namespace fluid {
namespace cuda {
void bind_ddpm(py::module_& m) {
  m.def("ddpm_step", &ddpm_step, nogil(), py::arg("x"), py::arg("model_out"), py::arg("noise"),
        py::arg("table"), py::arg("step"), py::arg("temperature"), py::arg("cfg"),
        py::arg("clip_denoised"), py::arg("out"), py::arg("stream"));
  m.def("ddpm_step_params", &ddpm_step_params, nogil(), py::arg("x"), py::arg("model_out"),
        py::arg("noise"), py::arg("table"), py::arg("step"), py::arg("params"),
        py::arg("clip_denoised"), py::arg("out"), py::arg("stream"));
}
}  // namespace cuda
}  // namespace fluid
