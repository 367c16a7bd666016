#include "../cpu/categorical.h"
#include "pyview.h"

namespace py = pybind11;

namespace fluid {
void bind_cpu_categorical(py::module_& m) {
  m.def("sample_categorical", &cpu::sample_categorical, nogil(), py::arg("logits"),
        py::arg("uniform"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("out"), py::arg("nthreads"));
}
}  // namespace fluid
