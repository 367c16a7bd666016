// fluid_ops._C: the CPU kernels. Each op family binds itself in its own file (cpu_*.cpp).
#include <thread>

#include "pyview.h"

namespace py = pybind11;

namespace fluid {
void bind_cpu_sampling(py::module_& m);
void bind_cpu_attention(py::module_& m);
void bind_cpu_denoiser(py::module_& m);
void bind_cpu_categorical(py::module_& m);
}  // namespace fluid

PYBIND11_MODULE(_C, m) {
  m.doc() = "fluid_ops CPU kernels (C++17). Called through fluid_ops.ops, not directly.";
  py::register_exception<fluid::CheckError>(m, "KernelArgumentError", PyExc_ValueError);
  m.def("hardware_threads", [] { return static_cast<int>(std::thread::hardware_concurrency()); });
  fluid::bind_cpu_sampling(m);
  fluid::bind_cpu_attention(m);
  fluid::bind_cpu_denoiser(m);
  fluid::bind_cpu_categorical(m);
}
