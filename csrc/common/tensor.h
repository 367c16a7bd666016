// A tensor as the compiled kernels see it: pointer, dtype, shape, strides (in elements).
// The Python layer builds these from torch tensors; nothing here knows about torch.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fluid {

// Codes shared with fluid_ops/_compiled.py (_DTYPE_CODES). Keep in sync.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3, I32 = 4, I64 = 5, BOOL = 6, U8 = 7 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::BOOL: return "bool";
    case DType::U8: return "uint8";
  }
  return "unknown";
}

// Bytes per element (a table, not a dispatch: every code has a size).
inline int64_t dtype_size(DType d) {
  switch (d) {
    case DType::F16: case DType::BF16: return 2;
    case DType::F32: case DType::I32: return 4;
    case DType::F64: case DType::I64: return 8;
    case DType::BOOL: case DType::U8: return 1;
  }
  return 1;
}

constexpr int kMaxDims = 6;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t stride[kMaxDims] = {0};

  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  bool is_contiguous() const {
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && stride[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Errors raised by kernels' own checks. The Python layer validates first and gives the
// user-facing message; these are a second line so that a bad call never writes out of bounds.
struct CheckError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

#define FLUID_CHECK(cond, msg)                                                        \
  do {                                                                                \
    if (!(cond)) throw ::fluid::CheckError(std::string(__func__) + ": " + (msg));     \
  } while (0)

inline void check_dtype(const TensorView& t, DType d, const char* name) {
  FLUID_CHECK(t.dtype == d, std::string(name) + " must be " + dtype_name(d) + ", got " +
                                dtype_name(t.dtype));
}
inline void check_float(const TensorView& t, const char* name) {
  FLUID_CHECK(t.dtype == DType::F32 || t.dtype == DType::F16 || t.dtype == DType::BF16,
              std::string(name) + " must be float32, float16 or bfloat16, got " +
                  dtype_name(t.dtype));
}
inline void check_contiguous(const TensorView& t, const char* name) {
  FLUID_CHECK(t.is_contiguous(), std::string(name) + " must be contiguous");
}

}  // namespace fluid
