// fluid_ops._C_cuda: the CUDA kernels. Imports on machines with no GPU or driver: nothing here
// touches the device until a kernel is called, and device_status() says what is missing.
#include <cuda_runtime_api.h>

#include <optional>

#include "../cuda/denoiser_ops.h"
#include "../cuda/ops.h"
#include "pyview.h"

namespace py = pybind11;
namespace fluid { void register_cuda_attention(pybind11::module_& m); }  // cuda_attention.cpp
using fluid::TensorView;
void register_sampling(py::module& m);  // cuda_sampling.cpp

void register_denoiser(py::module& m);  // cuda_denoiser.cpp: the fused head GEMMs

namespace {

py::tuple device_status() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls see a clean state
    return py::make_tuple(0, std::string("no CUDA device: cudaGetDeviceCount failed with error ") +
                                 std::to_string(static_cast<int>(err)) + " (" +
                                 cudaGetErrorString(err) + ")");
  }
  if (count == 0) return py::make_tuple(0, std::string("no CUDA device present"));
  return py::make_tuple(count, std::string("ok"));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fluid_ops CUDA kernels. Called through fluid_ops.ops, not directly.";
  py::register_exception<fluid::CheckError>(m, "KernelArgumentError", PyExc_ValueError);
  m.def("device_status", &device_status,
        "(device_count, message): message is 'ok' or why no device can be used");
  int rt = 0;
  cudaRuntimeGetVersion(&rt);  // static cudart: answers without a driver
  m.attr("cuda_runtime_version") = rt;
  m.attr("compiled_archs") = FLUID_CUDA_ARCHS;
  m.def("ddpm_step", &fluid::cuda::ddpm_step, fluid::nogil(), py::arg("x"), py::arg("model_out"),
        py::arg("noise"), py::arg("table"), py::arg("step"), py::arg("temperature"),
        py::arg("cfg"), py::arg("clip_denoised"), py::arg("out"), py::arg("stream"));
  m.def(
      "layernorm_modulate",
      [](const TensorView& x, std::optional<TensorView> w, std::optional<TensorView> b,
         const TensorView& shift, const TensorView& scale, float eps, const TensorView& out,
         uintptr_t stream) {
        fluid::cuda::layernorm_modulate(x, w ? &*w : nullptr, b ? &*b : nullptr, shift, scale,
                                        eps, out, stream);
      },
      fluid::nogil(), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("shift"),
      py::arg("scale"), py::arg("eps"), py::arg("out"), py::arg("stream"));
  fluid::register_cuda_attention(m);
  m.def("gated_residual", &fluid::cuda::gated_residual, fluid::nogil(), py::arg("h"),
        py::arg("gate"), py::arg("y"), py::arg("out"), py::arg("stream"));
  register_denoiser(m);
  register_sampling(m);
}
