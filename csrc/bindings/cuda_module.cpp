// fluid_ops._C_cuda: the CUDA kernels. Each op family binds itself in cuda_<family>.cpp (see
// csrc/README.md); this file holds only module-level things. Imports on machines with no GPU or
// driver: nothing here touches the device until a kernel is called, and device_status() says
// what is missing.
#include <cuda_runtime_api.h>

#include <string>

#include "pyview.h"

namespace py = pybind11;

namespace fluid {
namespace cuda {
void bind_attention(py::module_& m);    // cuda_attention.cpp
void bind_denoiser(py::module_& m);     // cuda_denoiser.cpp
void bind_head(py::module_& m);         // cuda_head.cpp
void bind_ddpm(py::module_& m);         // cuda_ddpm.cpp
void bind_categorical(py::module_& m);  // cuda_categorical.cpp
}  // namespace cuda
}  // namespace fluid

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
  fluid::cuda::bind_attention(m);
  fluid::cuda::bind_denoiser(m);
  fluid::cuda::bind_head(m);
  fluid::cuda::bind_ddpm(m);
  fluid::cuda::bind_categorical(m);
}
