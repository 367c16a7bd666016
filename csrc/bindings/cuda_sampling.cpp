// Bindings of the CUDA sampling kernels (csrc/cuda/sampling_ops.h), registered into
// fluid_ops._C_cuda by cuda_module.cpp.
#include "../cuda/sampling_ops.h"
#include "pyview.h"

namespace py = pybind11;

void register_sampling(py::module& m) {
  m.def("ddpm_step_params", &fluid::cuda::ddpm_step_params, fluid::nogil(), py::arg("x"),
        py::arg("model_out"), py::arg("noise"), py::arg("table"), py::arg("step"),
        py::arg("params"), py::arg("clip_denoised"), py::arg("out"), py::arg("stream"));
  m.def("sample_categorical", &fluid::cuda::sample_categorical, fluid::nogil(), py::arg("logits"),
        py::arg("uniform"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("out"), py::arg("stream"));
}
