#include "../cpu/sampling.h"
#include "pyview.h"

namespace py = pybind11;

namespace fluid {
void bind_cpu_sampling(py::module_& m) {
  m.def("ddpm_step", &cpu::ddpm_step, nogil(), py::arg("x"), py::arg("model_out"),
        py::arg("noise"), py::arg("table"), py::arg("step"), py::arg("temperature"),
        py::arg("cfg"), py::arg("clip_denoised"), py::arg("out"), py::arg("nthreads"));
}
}  // namespace fluid
