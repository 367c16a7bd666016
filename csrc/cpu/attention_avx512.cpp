// AVX-512 instantiation of the SIMD attention forward (attention_simd.h); CMake compiles this file
// with -mavx512f/bw/vl/dq (not bf16: attention_avx512bf16.cpp) and attention.cpp calls in only after __builtin_cpu_supports says
// the CPU has them. 16 lanes, 8 query rows per register tile (16 + 2 + 1 of the 32 zmm).
#include <cstdint>

#include "../common/dispatch.h"
#include "attention.h"

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>

#include "attention_simd.h"

namespace fluid {
namespace cpu {
namespace attn {
namespace {

struct VecAvx512 {
  using T = __m512;
  static constexpr int kW = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float f) { return _mm512_set1_ps(f); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static float hmax(T v) { return _mm512_reduce_max_ps(v); }
  static float hsum(T v) { return _mm512_reduce_add_ps(v); }
  // See attention_avx2.cpp: same polynomial, 16 lanes.
  static T exp2z(T x) {
    const T lo = _mm512_set1_ps(-126.0f);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_max_ps(x, lo);
    const T n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const T f = _mm512_sub_ps(x, n);
    T p = _mm512_set1_ps(1.5252733804059841e-05f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428441e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const T r = _mm512_scalef_ps(p, n);
    return _mm512_maskz_mov_ps(keep, r);
  }
};

void forward_avx512(const FwdItem& it) { simd::forward<VecAvx512, 8>(it); }
void backward_avx512(const BwdItem& it) { simd::backward<VecAvx512, 8>(it); }

}  // namespace

FwdKernel fwd_kernel_avx512() { return &forward_avx512; }
BwdKernel bwd_kernel_avx512() { return &backward_avx512; }

}  // namespace attn
}  // namespace cpu
}  // namespace fluid

#else
namespace fluid { namespace cpu { namespace attn {
FwdKernel fwd_kernel_avx512() { return nullptr; }
BwdKernel bwd_kernel_avx512() { return nullptr; }
}}}  // namespace fluid::cpu::attn
#endif
