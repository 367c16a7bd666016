// AVX2 + FMA instantiation of the SIMD attention forward (attention_simd.h). The build compiles
// every csrc/cpu/*.cpp with baseline flags, so the ISA is switched on for this file only by
// `#pragma GCC target`, after all shared headers are included: nothing outside this file is
// compiled for AVX2, and attention.cpp calls in only after __builtin_cpu_supports("avx2"/"fma").
#include <cstdint>

#include "../common/dispatch.h"
#include "attention.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "attention_simd.h"

namespace fluid {
namespace cpu {
namespace attn {
namespace {

struct VecAvx2 {
  using T = __m256;
  static constexpr int kW = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float f) { return _mm256_set1_ps(f); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static float hmax(T v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float hsum(T v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  // 2^x for x <= 0: x = n + f, |f| <= 1/2, 2^f by its Taylor series in f ln2 to degree 7
  // (relative error ~1e-8), 2^n through the exponent bits; 0 below -126 (and for -inf / masked).
  static T exp2z(T x) {
    const T lo = _mm256_set1_ps(-126.0f);
    const T keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
    x = _mm256_max_ps(x, lo);
    const T n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const T f = _mm256_sub_ps(x, n);
    T p = _mm256_set1_ps(1.5252733804059841e-05f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428441e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
  }
};

// 16 lanes from two AVX2 registers. Not for speed: it runs the 16-lane tiling of the AVX-512
// kernels (32-key score tiles, the 16-wide remainder chunk of D = 80, 8-row tiles) on CPUs without
// AVX-512, so the tests check that geometry on any AVX2 machine.
struct VecAvx2x2 {
  struct T { __m256 lo, hi; };
  static constexpr int kW = 16;
  using H = VecAvx2;
  static T zero() { return {H::zero(), H::zero()}; }
  static T set1(float f) { return {H::set1(f), H::set1(f)}; }
  static T load(const float* p) { return {H::load(p), H::load(p + 8)}; }
  static void store(float* p, T v) { H::store(p, v.lo); H::store(p + 8, v.hi); }
  static T add(T a, T b) { return {H::add(a.lo, b.lo), H::add(a.hi, b.hi)}; }
  static T sub(T a, T b) { return {H::sub(a.lo, b.lo), H::sub(a.hi, b.hi)}; }
  static T mul(T a, T b) { return {H::mul(a.lo, b.lo), H::mul(a.hi, b.hi)}; }
  static T max(T a, T b) { return {H::max(a.lo, b.lo), H::max(a.hi, b.hi)}; }
  static T fmadd(T a, T b, T c) { return {H::fmadd(a.lo, b.lo, c.lo), H::fmadd(a.hi, b.hi, c.hi)}; }
  static float hmax(T v) { return H::hmax(H::max(v.lo, v.hi)); }
  static float hsum(T v) { return H::hsum(H::add(v.lo, v.hi)); }
  static T exp2z(T x) { return {H::exp2z(x.lo), H::exp2z(x.hi)}; }
};

void forward_avx2_w16(const FwdItem& it) { simd::forward<VecAvx2x2, 8>(it); }
void backward_avx2_w16(const BwdItem& it) { simd::backward<VecAvx2x2, 8>(it); }

void forward_avx2(const FwdItem& it) { simd::forward<VecAvx2, 6>(it); }
void backward_avx2(const BwdItem& it) { simd::backward<VecAvx2, 6>(it); }

}  // namespace

FwdKernel fwd_kernel_avx2() { return &forward_avx2; }
FwdKernel fwd_kernel_avx2_w16() { return &forward_avx2_w16; }
BwdKernel bwd_kernel_avx2_w16() { return &backward_avx2_w16; }
BwdKernel bwd_kernel_avx2() { return &backward_avx2; }

}  // namespace attn
}  // namespace cpu
}  // namespace fluid
#pragma GCC pop_options

#else
namespace fluid { namespace cpu { namespace attn {
FwdKernel fwd_kernel_avx2() { return nullptr; }
FwdKernel fwd_kernel_avx2_w16() { return nullptr; }
BwdKernel bwd_kernel_avx2_w16() { return nullptr; }
BwdKernel bwd_kernel_avx2() { return nullptr; }
}}}  // namespace fluid::cpu::attn
#endif
