// attention family (fluid_ops/ops/attention.py: fwd, bwd, kvcache) in fluid_ops._C:
// csrc/cpu/attention.h. The KV-cache op is attention_fwd with seqlens_k.
#include "../cpu/attention.h"
#include "pyview.h"

namespace py = pybind11;

namespace fluid {
namespace cpu {
void bind_attention(py::module_& m) {
  m.def("attention_fwd", &attention_fwd, nogil(), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("key_padding_mask"), py::arg("seqlens_k"), py::arg("o"), py::arg("lse"),
        py::arg("causal"), py::arg("softmax_scale"), py::arg("nthreads"), py::arg("impl") = 0);
  m.def("attention_bwd", &attention_bwd, nogil(), py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("key_padding_mask"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("causal"), py::arg("softmax_scale"), py::arg("nthreads"),
        py::arg("impl") = 0);
  m.def("attention_fwd_isa", &attention_fwd_isa);
  m.def("attention_fwd_isas", &attention_fwd_isas);
  m.def("attention_bwd_isa", &attention_bwd_isa, py::arg("dtype"), py::arg("d"), py::arg("impl") = 0);
}
}  // namespace cpu
}  // namespace fluid
