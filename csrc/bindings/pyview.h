// pybind11 conversion: Python tuple (data_ptr, dtype_code, shape, strides) -> fluid::TensorView.
// fluid_ops/_compiled.py builds the tuples; that is the whole compiled boundary.
#pragma once
#include <optional>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../common/tensor.h"

namespace pybind11 {
namespace detail {

template <>
struct type_caster<fluid::TensorView> {
  PYBIND11_TYPE_CASTER(fluid::TensorView, const_name("TensorView"));

  bool load(handle src, bool) {
    if (!isinstance<tuple>(src)) return false;
    auto t = reinterpret_borrow<tuple>(src);
    if (t.size() != 4) return false;
    value.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
    value.dtype = static_cast<fluid::DType>(t[1].cast<int>());
    auto shape = t[2].cast<tuple>();
    auto stride = t[3].cast<tuple>();
    if (shape.size() != stride.size() || shape.size() > fluid::kMaxDims) return false;
    value.ndim = static_cast<int>(shape.size());
    for (int i = 0; i < value.ndim; ++i) {
      value.shape[i] = shape[i].cast<int64_t>();
      value.stride[i] = stride[i].cast<int64_t>();
    }
    return true;
  }

  static handle cast(const fluid::TensorView&, return_value_policy, handle) {
    return none().release();  // views only travel into C++
  }
};

}  // namespace detail
}  // namespace pybind11

namespace fluid {
// Every binding releases the GIL: kernels never touch Python objects.
using nogil = pybind11::call_guard<pybind11::gil_scoped_release>;

// An optional view (Python None) as the kernels' `const TensorView*` (nullptr).
inline const TensorView* opt(const std::optional<TensorView>& t) { return t ? &*t : nullptr; }
}  // namespace fluid
