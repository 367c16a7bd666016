// head family (fluid_ops/ops/head_cuda.py: the fused diffusion-head GEMMs, CUDA only) in
// fluid_ops._C_cuda: csrc/cuda/head.h. Views in, nothing out; every call is validated in C++
// (fluid::CheckError -> KernelArgumentError, a ValueError) before a launch, so a bad call cannot
// write out of bounds.
#include <optional>

#include "../cuda/head.h"
#include "pyview.h"

namespace py = pybind11;

namespace fluid {
namespace cuda {
void bind_head(py::module_& m) {
  m.def(
      "head_linear",
      [](const TensorView& a, std::optional<TensorView> c, std::optional<TensorView> lnw,
         std::optional<TensorView> lnb, std::optional<TensorView> shift,
         std::optional<TensorView> scale, float eps, const TensorView& w,
         std::optional<TensorView> bias, std::optional<TensorView> rbias, bool silu,
         std::optional<TensorView> gate, const TensorView& out, uintptr_t stream) {
        head_linear(a, opt(c), opt(lnw), opt(lnb), opt(shift), opt(scale), eps, w,
                                 opt(bias), opt(rbias), silu, opt(gate), out, stream);
      },
      nogil(), py::arg("a"), py::arg("c"), py::arg("lnw"), py::arg("lnb"), py::arg("shift"),
      py::arg("scale"), py::arg("eps"), py::arg("w"), py::arg("bias"), py::arg("rbias"),
      py::arg("silu"), py::arg("gate"), py::arg("out"), py::arg("stream"),
      "out = epilogue(prologue(a) @ w^T) on tensor cores (see csrc/cuda/head.h)");
  m.def("head_input_proj", [](const TensorView& x, const TensorView& w, std::optional<TensorView> bias,
                              const TensorView& out, uintptr_t stream) {
        head_input_proj(x, w, opt(bias), out, stream);
      },
      nogil(), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("stream"),
      "out (M, N) fp32 = x[r % x.rows] @ w^T + bias");
  m.def("head_silu_add", &head_silu_add, nogil(), py::arg("a"), py::arg("c"),
        py::arg("out"), py::arg("stream"), "out = SiLU(a + c), c may be one broadcast row");
  m.def(
      "head_gemm_tile",
      [](int64_t rows) {
        int bm = 0, bn = 0, warps = 0;
        head_gemm_tile(rows, &bm, &bn, &warps);
        return py::make_tuple(bm, bn, warps);
      },
      py::arg("rows"), "(BM, BN, warps) of head_linear's tile for this many rows");
}
}  // namespace cuda
}  // namespace fluid
