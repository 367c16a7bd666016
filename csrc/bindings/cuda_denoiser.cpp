// The diffusion head's fused GEMM family (csrc/cuda/head_gemm.cu) in fluid_ops._C_cuda:
// register_denoiser(m) is called from cuda_module.cpp. Views in, nothing out; every call is
// validated in C++ (fluid::CheckError -> KernelArgumentError, a ValueError) before a launch, so
// a bad call cannot write out of bounds. Python side: fluid_ops/ops/head_cuda.py.
#include <optional>

#include "../cuda/head_gemm.h"
#include "pyview.h"

namespace py = pybind11;
using fluid::TensorView;

namespace {

const TensorView* opt(const std::optional<TensorView>& t) { return t ? &*t : nullptr; }

}  // namespace

void register_denoiser(py::module& m) {
  m.def(
      "head_linear",
      [](const TensorView& a, std::optional<TensorView> c, std::optional<TensorView> lnw,
         std::optional<TensorView> lnb, std::optional<TensorView> shift,
         std::optional<TensorView> scale, float eps, const TensorView& w,
         std::optional<TensorView> bias, std::optional<TensorView> rbias, bool silu,
         std::optional<TensorView> gate, const TensorView& out, uintptr_t stream) {
        fluid::cuda::head_linear(a, opt(c), opt(lnw), opt(lnb), opt(shift), opt(scale), eps, w,
                                 opt(bias), opt(rbias), silu, opt(gate), out, stream);
      },
      fluid::nogil(), py::arg("a"), py::arg("c"), py::arg("lnw"), py::arg("lnb"), py::arg("shift"),
      py::arg("scale"), py::arg("eps"), py::arg("w"), py::arg("bias"), py::arg("rbias"),
      py::arg("silu"), py::arg("gate"), py::arg("out"), py::arg("stream"),
      "out = epilogue(prologue(a) @ w^T) on tensor cores (see csrc/cuda/head_gemm.h)");
  m.def("head_input_proj", [](const TensorView& x, const TensorView& w, std::optional<TensorView> bias,
                              const TensorView& out, uintptr_t stream) {
        fluid::cuda::head_input_proj(x, w, opt(bias), out, stream);
      },
      fluid::nogil(), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("stream"),
      "out (M, N) fp32 = x[r % x.rows] @ w^T + bias");
  m.def("head_silu_add", &fluid::cuda::head_silu_add, fluid::nogil(), py::arg("a"), py::arg("c"),
        py::arg("out"), py::arg("stream"), "out = SiLU(a + c), c may be one broadcast row");
  m.def(
      "head_gemm_tile",
      [](int64_t rows) {
        int bm = 0, bn = 0, warps = 0;
        fluid::cuda::head_gemm_tile(rows, &bm, &bn, &warps);
        return py::make_tuple(bm, bn, warps);
      },
      py::arg("rows"), "(BM, BN, warps) of head_linear's tile for this many rows");
}
