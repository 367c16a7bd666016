#include "../cpu/attention.h"
#include "pyview.h"

namespace py = pybind11;

namespace fluid {
void bind_cpu_attention(py::module_& m) {
  m.def("attention_fwd", &cpu::attention_fwd, nogil(), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("key_padding_mask"), py::arg("seqlens_k"), py::arg("o"), py::arg("lse"),
        py::arg("causal"), py::arg("softmax_scale"), py::arg("nthreads"), py::arg("impl") = 0);
  m.def("attention_bwd", &cpu::attention_bwd, nogil(), py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("key_padding_mask"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("causal"), py::arg("softmax_scale"), py::arg("nthreads"),
        py::arg("impl") = 0);
  m.def("attention_fwd_isa", &cpu::attention_fwd_isa);
  m.def("attention_fwd_isas", &cpu::attention_fwd_isas);
}
}  // namespace fluid
