// fluid_ops._C: the CPU kernels. Each op family binds itself in cpu_<family>.cpp (see
// csrc/README.md); this file holds only module-level things.
#include <thread>

#include "pyview.h"

namespace py = pybind11;

namespace fluid {
namespace cpu {
void bind_attention(py::module_& m);    // cpu_attention.cpp
void bind_denoiser(py::module_& m);     // cpu_denoiser.cpp
void bind_ddpm(py::module_& m);         // cpu_ddpm.cpp
void bind_categorical(py::module_& m);  // cpu_categorical.cpp
}  // namespace cpu
}  // namespace fluid

PYBIND11_MODULE(_C, m) {
  m.doc() = "fluid_ops CPU kernels (C++17). Called through fluid_ops.ops, not directly.";
  py::register_exception<fluid::CheckError>(m, "KernelArgumentError", PyExc_ValueError);
  m.def("hardware_threads", [] { return static_cast<int>(std::thread::hardware_concurrency()); });
  fluid::cpu::bind_attention(m);
  fluid::cpu::bind_denoiser(m);
  fluid::cpu::bind_ddpm(m);
  fluid::cpu::bind_categorical(m);
}
