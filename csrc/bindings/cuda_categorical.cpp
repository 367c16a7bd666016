// categorical family (fluid_ops/ops/categorical.py) in fluid_ops._C_cuda: csrc/cuda/categorical.h.
#include "../cuda/categorical.h"
#include "pyview.h"

namespace py = pybind11;

namespace fluid {
namespace cuda {
void bind_categorical(py::module_& m) {
  m.def("sample_categorical", &sample_categorical, nogil(), py::arg("logits"), py::arg("uniform"),
        py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("out"),
        py::arg("stream"));
}
}  // namespace cuda
}  // namespace fluid
