// categorical family (fluid_ops/ops/categorical.py) in fluid_ops._C: csrc/cpu/categorical.h.
#include "../cpu/categorical.h"
#include "pyview.h"

namespace py = pybind11;

namespace fluid {
namespace cpu {
void bind_categorical(py::module_& m) {
  m.def("sample_categorical", &sample_categorical, nogil(), py::arg("logits"), py::arg("uniform"),
        py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("out"),
        py::arg("nthreads"));
}
}  // namespace cpu
}  // namespace fluid
