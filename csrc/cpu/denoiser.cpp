// Row-parallel kernels for the DenoiserMLP's LayerNorm + adaLN modulation and gated residual.
// Each row is converted to fp32 scratch once, worked on in fp32 and written back in the output
// dtype: the dtype dispatch sits only in the row load / store, so the arithmetic is one
// vectorisable loop per step instead of one template instance per dtype combination.
#include "denoiser.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../common/dispatch.h"
#include "../common/half.h"
#include "../common/parallel.h"

// The row loops below are compiled twice, for AVX2 and for the x86-64 baseline, and the loader
// picks one per CPU (GCC/Clang function multiversioning): the module still loads anywhere while
// AVX2 machines get 8-wide loops. The helpers they call are inlined into each clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FLUID_ROW_CLONES __attribute__((target_clones("avx2", "default"), noinline))
#else
#define FLUID_ROW_CLONES
#endif

namespace fluid {
namespace cpu {
namespace {

using LoadRow = void (*)(const void* src, float* dst, int64_t n);
using StoreRow = void (*)(const float* src, void* dst, int64_t n);

template <typename T>
FLUID_ROW_CLONES void load_row(const void* src, float* dst, int64_t n) {
  const T* p = static_cast<const T*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = load_f32(p, i);
}
template <>
void load_row<float>(const void* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}
template <typename T>
FLUID_ROW_CLONES void store_row(const float* src, void* dst, int64_t n) {
  T* p = static_cast<T*>(dst);
  for (int64_t i = 0; i < n; ++i) store_f32(p, i, src[i]);
}
template <>
void store_row<float>(const float* src, void* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

LoadRow loader(DType d) {
  LoadRow f = nullptr;
  FLUID_DISPATCH_FLOAT(d, T, f = &load_row<T>);
  return f;
}
StoreRow storer(DType d) {
  StoreRow f = nullptr;
  FLUID_DISPATCH_FLOAT(d, T, f = &store_row<T>);
  return f;
}

// Byte address of row r of a (R, D) view.
inline const void* row_ptr(const TensorView& t, int64_t r) {
  return static_cast<const char*>(t.data) + r * t.stride[0] * dtype_size(t.dtype);
}
inline void* row_ptr_mut(const TensorView& t, int64_t r) {
  return static_cast<char*>(t.data) + r * t.stride[0] * dtype_size(t.dtype);
}

// Sum with 16 independent accumulators: vectorises without -ffast-math and is more accurate
// than one running sum.
inline float sum16(const float* v, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += v[i + k];
  float s = 0.f;
  for (; i < n; ++i) s += v[i];
  for (int k = 0; k < 16; ++k) s += acc[k];
  return s;
}
inline float sumsq_centered16(const float* v, float mean, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) {
      const float t = v[i + k] - mean;
      acc[k] += t * t;
    }
  float s = 0.f;
  for (; i < n; ++i) s += (v[i] - mean) * (v[i] - mean);
  for (int k = 0; k < 16; ++k) s += acc[k];
  return s;
}
inline float dot16(const float* a, const float* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * b[i + k];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int k = 0; k < 16; ++k) s += acc[k];
  return s;
}

// out := LN(x) (affine with w / b when given) * (1 + sc) + sh on fp32 rows: the tensors' own rows
// when all are fp32, else fp32 scratch copies. out may be x: stats come first, then each element
// is read before it is written.
FLUID_ROW_CLONES
void lnm_row(const float* x, const float* sh, const float* sc, const float* w, const float* b,
                 float* out, int64_t d, float inv_d, float eps) {
  const float mean = sum16(x, d) * inv_d;
  const float rstd = 1.0f / std::sqrt(sumsq_centered16(x, mean, d) * inv_d + eps);
  if (w && b) {
    for (int64_t j = 0; j < d; ++j)
      out[j] = ((x[j] - mean) * rstd * w[j] + b[j]) * (1.0f + sc[j]) + sh[j];
  } else if (w || b) {
    for (int64_t j = 0; j < d; ++j) {
      float v = (x[j] - mean) * rstd;
      v = v * (w ? w[j] : 1.0f) + (b ? b[j] : 0.0f);
      out[j] = v * (1.0f + sc[j]) + sh[j];
    }
  } else {
    for (int64_t j = 0; j < d; ++j) out[j] = (x[j] - mean) * rstd * (1.0f + sc[j]) + sh[j];
  }
}

// out := h + g * y on fp32 rows (own rows or scratch; out may be h: each element is read before
// it is written).
FLUID_ROW_CLONES
void gated_row(const float* h, const float* g, const float* y, float* out, int64_t d) {
  for (int64_t j = 0; j < d; ++j) out[j] = h[j] + g[j] * y[j];
}

void check_rows(const TensorView& t, int64_t rows, int64_t d, const char* name) {
  FLUID_CHECK(t.ndim == 2, std::string(name) + " must be 2-D");
  FLUID_CHECK(t.size(0) == rows && t.size(1) == d,
              std::string(name) + " must have shape (" + std::to_string(rows) + ", " +
                  std::to_string(d) + ")");
  FLUID_CHECK(t.stride[1] == 1 || d <= 1, std::string(name) + " must have unit stride along D");
  FLUID_CHECK(t.stride[0] >= 0, std::string(name) + " must have a non-negative row stride");
  check_float(t, name);
}

void check_vec(const TensorView* t, int64_t d, const char* name) {
  if (!t) return;
  FLUID_CHECK(t->ndim == 1 && t->size(0) == d && (t->stride[0] == 1 || d <= 1),
              std::string(name) + " must be a contiguous (D,) vector");
  check_dtype(*t, DType::F32, name);
}

// Row-chunked parallel loop with a stable chunk index (deterministic partial reductions).
template <typename F>
void for_row_chunks(int64_t rows, int nthreads, int64_t nchunks, F&& fn) {
  parallel_for(nchunks, nthreads, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c, rows * c / nchunks, rows * (c + 1) / nchunks);
  });
}

}  // namespace

void layernorm_modulate(const TensorView& x, const TensorView* weight, const TensorView* bias,
                        const TensorView& shift, const TensorView& scale, float eps,
                        const TensorView& out, int nthreads) {
  FLUID_CHECK(x.ndim == 2, "x must be 2-D");
  const int64_t rows = x.size(0), d = x.size(1);
  check_rows(x, rows, d, "x");
  check_rows(shift, rows, d, "shift");
  check_rows(scale, rows, d, "scale");
  check_rows(out, rows, d, "out");
  check_vec(weight, d, "weight");
  check_vec(bias, d, "bias");
  FLUID_CHECK(eps >= 0.f, "eps must be >= 0");
  if (rows == 0 || d == 0) return;
  const LoadRow lx = loader(x.dtype), lsh = loader(shift.dtype), lsc = loader(scale.dtype);
  const StoreRow so = storer(out.dtype);
  const float* w = weight ? weight->ptr<float>() : nullptr;
  const float* b = bias ? bias->ptr<float>() : nullptr;
  const float inv_d = 1.0f / static_cast<float>(d);
  if (x.dtype == DType::F32 && shift.dtype == DType::F32 && scale.dtype == DType::F32 &&
      out.dtype == DType::F32) {  // all fp32: straight from the rows, no scratch copies
    parallel_for(rows, nthreads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        lnm_row(static_cast<const float*>(row_ptr(x, r)),
                    static_cast<const float*>(row_ptr(shift, r)),
                    static_cast<const float*>(row_ptr(scale, r)), w, b,
                    static_cast<float*>(row_ptr_mut(out, r)), d, inv_d, eps);
    });
    return;
  }
  parallel_for(rows, nthreads, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(3 * d);
    float *xb = buf.data(), *shb = xb + d, *scb = shb + d;
    for (int64_t r = r0; r < r1; ++r) {
      lx(row_ptr(x, r), xb, d);
      lsh(row_ptr(shift, r), shb, d);
      lsc(row_ptr(scale, r), scb, d);
      lnm_row(xb, shb, scb, w, b, xb, d, inv_d, eps);
      so(xb, row_ptr_mut(out, r), d);
    }
  });
}

void layernorm_modulate_backward(const TensorView& x, const TensorView* weight,
                                 const TensorView* bias, const TensorView& scale,
                                 const TensorView& grad_out, float eps, const TensorView& grad_x,
                                 const TensorView* grad_scale, const TensorView* grad_weight,
                                 const TensorView* grad_bias, int nthreads) {
  FLUID_CHECK(x.ndim == 2, "x must be 2-D");
  const int64_t rows = x.size(0), d = x.size(1);
  check_rows(x, rows, d, "x");
  check_rows(scale, rows, d, "scale");
  check_rows(grad_out, rows, d, "grad_out");
  check_rows(grad_x, rows, d, "grad_x");
  if (grad_scale) check_rows(*grad_scale, rows, d, "grad_scale");
  check_vec(weight, d, "weight");
  check_vec(bias, d, "bias");
  check_vec(grad_weight, d, "grad_weight");
  check_vec(grad_bias, d, "grad_bias");
  float* gw = grad_weight ? grad_weight->ptr<float>() : nullptr;
  float* gb = grad_bias ? grad_bias->ptr<float>() : nullptr;
  if (gw) std::fill(gw, gw + d, 0.0f);
  if (gb) std::fill(gb, gb + d, 0.0f);
  if (rows == 0 || d == 0) return;
  const LoadRow lx = loader(x.dtype), lsc = loader(scale.dtype), lg = loader(grad_out.dtype);
  const StoreRow sgx = storer(grad_x.dtype);
  const StoreRow sgs = grad_scale ? storer(grad_scale->dtype) : nullptr;
  const float* w = weight ? weight->ptr<float>() : nullptr;
  const float* b = bias ? bias->ptr<float>() : nullptr;
  const float inv_d = 1.0f / static_cast<float>(d);
  const bool need_param_grads = gw || gb;
  const int64_t nchunks = std::min<int64_t>(rows, std::max(1, nthreads));
  // Per-chunk partial column sums, merged in chunk order afterwards: deterministic.
  std::vector<float> partial(need_param_grads ? static_cast<size_t>(nchunks * 2 * d) : 0, 0.0f);
  for_row_chunks(rows, nthreads, nchunks, [&](int64_t c, int64_t r0, int64_t r1) {
    std::vector<float> buf(4 * d);
    float *xb = buf.data(), *scb = xb + d, *gbuf = scb + d, *tmp = gbuf + d;
    float* pw = need_param_grads ? partial.data() + c * 2 * d : nullptr;
    float* pb = need_param_grads ? pw + d : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      lx(row_ptr(x, r), xb, d);
      lsc(row_ptr(scale, r), scb, d);
      lg(row_ptr(grad_out, r), gbuf, d);
      const float mean = sum16(xb, d) * inv_d;
      const float rstd = 1.0f / std::sqrt(sumsq_centered16(xb, mean, d) * inv_d + eps);
      for (int64_t j = 0; j < d; ++j) xb[j] = (xb[j] - mean) * rstd;  // xb := xhat
      if (sgs) {  // grad_scale = g * n, n = xhat * w + b
        for (int64_t j = 0; j < d; ++j)
          tmp[j] = gbuf[j] * (xb[j] * (w ? w[j] : 1.0f) + (b ? b[j] : 0.0f));
        sgs(tmp, row_ptr_mut(*grad_scale, r), d);
      }
      for (int64_t j = 0; j < d; ++j) gbuf[j] *= 1.0f + scb[j];  // gbuf := dn
      if (need_param_grads)
        for (int64_t j = 0; j < d; ++j) {
          pw[j] += gbuf[j] * xb[j];
          pb[j] += gbuf[j];
        }
      if (w)
        for (int64_t j = 0; j < d; ++j) gbuf[j] *= w[j];  // gbuf := d xhat
      const float m1 = sum16(gbuf, d) * inv_d;
      const float m2 = dot16(gbuf, xb, d) * inv_d;
      for (int64_t j = 0; j < d; ++j) tmp[j] = rstd * (gbuf[j] - m1 - xb[j] * m2);
      sgx(tmp, row_ptr_mut(grad_x, r), d);
    }
  });
  if (need_param_grads) {
    for (int64_t c = 0; c < nchunks; ++c) {
      const float* pw = partial.data() + c * 2 * d;
      const float* pb = pw + d;
      if (gw)
        for (int64_t j = 0; j < d; ++j) gw[j] += pw[j];
      if (gb)
        for (int64_t j = 0; j < d; ++j) gb[j] += pb[j];
    }
  }
}

void gated_residual(const TensorView& h, const TensorView& gate, const TensorView& y,
                    const TensorView& out, int nthreads) {
  FLUID_CHECK(h.ndim == 2, "h must be 2-D");
  const int64_t rows = h.size(0), d = h.size(1);
  check_rows(h, rows, d, "h");
  check_rows(gate, rows, d, "gate");
  check_rows(y, rows, d, "y");
  check_rows(out, rows, d, "out");
  FLUID_CHECK(out.stride[0] > 0 || rows <= 1, "out must not broadcast rows");
  if (rows == 0 || d == 0) return;
  if (h.dtype == DType::F32 && gate.dtype == DType::F32 && y.dtype == DType::F32 &&
      out.dtype == DType::F32) {  // all fp32: straight from the rows, no scratch copies
    parallel_for(rows, nthreads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        gated_row(static_cast<const float*>(row_ptr(h, r)),
                      static_cast<const float*>(row_ptr(gate, r)),
                      static_cast<const float*>(row_ptr(y, r)),
                      static_cast<float*>(row_ptr_mut(out, r)), d);
    });
    return;
  }
  const LoadRow lh = loader(h.dtype), lgt = loader(gate.dtype), ly = loader(y.dtype);
  const StoreRow so = storer(out.dtype);
  parallel_for(rows, nthreads, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(3 * d);
    float *hb = buf.data(), *gb = hb + d, *yb = gb + d;
    for (int64_t r = r0; r < r1; ++r) {
      lh(row_ptr(h, r), hb, d);  // read the whole row before writing: out may alias h
      lgt(row_ptr(gate, r), gb, d);
      ly(row_ptr(y, r), yb, d);
      gated_row(hb, gb, yb, hb, d);
      so(hb, row_ptr_mut(out, r), d);
    }
  });
}

void gated_residual_backward(const TensorView& grad_out, const TensorView& gate,
                             const TensorView& y, const TensorView& grad_gate,
                             const TensorView& grad_y, int nthreads) {
  FLUID_CHECK(grad_out.ndim == 2, "grad_out must be 2-D");
  const int64_t rows = grad_out.size(0), d = grad_out.size(1);
  check_rows(grad_out, rows, d, "grad_out");
  check_rows(gate, rows, d, "gate");
  check_rows(y, rows, d, "y");
  check_rows(grad_gate, rows, d, "grad_gate");
  check_rows(grad_y, rows, d, "grad_y");
  FLUID_CHECK((grad_gate.stride[0] > 0 && grad_y.stride[0] > 0) || rows <= 1,
              "grad_gate and grad_y must not broadcast rows");
  if (rows == 0 || d == 0) return;
  const LoadRow lg = loader(grad_out.dtype), lgt = loader(gate.dtype), ly = loader(y.dtype);
  const StoreRow sgg = storer(grad_gate.dtype), sgy = storer(grad_y.dtype);
  parallel_for(rows, nthreads, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(4 * d);
    float *g = buf.data(), *gt = g + d, *yb = gt + d, *tmp = yb + d;
    for (int64_t r = r0; r < r1; ++r) {
      lg(row_ptr(grad_out, r), g, d);
      lgt(row_ptr(gate, r), gt, d);
      ly(row_ptr(y, r), yb, d);
      for (int64_t j = 0; j < d; ++j) tmp[j] = g[j] * yb[j];
      sgg(tmp, row_ptr_mut(grad_gate, r), d);
      for (int64_t j = 0; j < d; ++j) tmp[j] = g[j] * gt[j];
      sgy(tmp, row_ptr_mut(grad_y, r), d);
    }
  });
}

}  // namespace cpu
}  // namespace fluid
