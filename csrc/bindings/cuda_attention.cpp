// attention family (fluid_ops/ops/attention.py: fwd, bwd, kvcache) in fluid_ops._C_cuda:
// csrc/cuda/attention.h. The KV-cache op is attention_fwd with seqlens_k. Views only: the Python
// layer allocates outputs and workspaces and passes the current stream.
#include <optional>

#include "../cuda/attention.h"
#include "pyview.h"

namespace py = pybind11;

namespace fluid {
namespace cuda {
void bind_attention(py::module_& m) {
  m.attr("attention_tile_n") = kAttnTileN;
  m.def(
      "attention_fwd",
      [](const TensorView& q, const TensorView& k, const TensorView& v, std::optional<TensorView> mask,
         std::optional<TensorView> tile_any, std::optional<TensorView> seqlens_k, const TensorView& o,
         const TensorView& lse, bool causal, float softmax_scale, uintptr_t stream) {
        attention_fwd(q, k, v, opt(mask), opt(tile_any), opt(seqlens_k), o, lse, causal, softmax_scale,
                      stream);
      },
      nogil(), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_padding_mask"),
      py::arg("tile_any"), py::arg("seqlens_k"), py::arg("o"), py::arg("lse"), py::arg("causal"),
      py::arg("softmax_scale"), py::arg("stream"),
      "o, lse <- attention(q, k, v); fp16 / bf16, mma.sync tensor cores, launched on `stream`");
  m.def(
      "attention_bwd",
      [](const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
         const TensorView& o, const TensorView& lse, std::optional<TensorView> mask,
         std::optional<TensorView> tile_any, const TensorView& dq, const TensorView& dk,
         const TensorView& dv, const TensorView& delta, const TensorView& lse2,
         std::optional<TensorView> dq_accum, bool causal, float softmax_scale, uintptr_t stream) {
        attention_bwd(dout, q, k, v, o, lse, opt(mask), opt(tile_any), dq, dk, dv, delta, lse2,
                      opt(dq_accum), causal, softmax_scale, stream);
      },
      nogil(), py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"),
      py::arg("lse"), py::arg("key_padding_mask"), py::arg("tile_any"), py::arg("dq"), py::arg("dk"),
      py::arg("dv"), py::arg("delta"), py::arg("lse2"), py::arg("dq_accum"), py::arg("causal"),
      py::arg("softmax_scale"), py::arg("stream"),
      "dq, dk, dv <- attention backward; dq_accum None: deterministic, else atomic dq into it");
}
}  // namespace cuda
}  // namespace fluid
