// fp16 / bf16 <-> fp32 conversions for host code (round to nearest even), no intrinsics needed.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

namespace fluid {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | (exp + 112u) << 23 | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absu < 0x38800000u) {  // fp16 subnormal or zero: units of 2^-24, round half to even
    float a;
    std::memcpy(&a, &absu, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  uint32_t r = absu + 0xfffu + ((absu >> 13) & 1u);  // round to nearest even on bit 13
  return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
}

// Load / store one element of any float dtype as fp32.
template <typename T> inline float load_f32(const T* p, int64_t i);
template <> inline float load_f32<float>(const float* p, int64_t i) { return p[i]; }

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };
template <> inline float load_f32<bf16_t>(const bf16_t* p, int64_t i) { return bf16_to_f32(p[i].bits); }
template <> inline float load_f32<f16_t>(const f16_t* p, int64_t i) { return f16_to_f32(p[i].bits); }

inline void store_f32(float* p, int64_t i, float v) { p[i] = v; }
inline void store_f32(bf16_t* p, int64_t i, float v) { p[i].bits = f32_to_bf16(v); }
inline void store_f32(f16_t* p, int64_t i, float v) { p[i].bits = f32_to_f16(v); }

}  // namespace fluid
