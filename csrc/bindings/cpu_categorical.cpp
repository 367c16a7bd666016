#include "pyview.h"

namespace py = pybind11;

namespace fluid {
void bind_cpu_categorical(py::module_& m) { (void)m; }
}  // namespace fluid
