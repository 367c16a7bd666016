// dtype and head-dim dispatch: turn runtime codes into template parameters. Every switch of a
// kernel over a float dtype or a head dim goes through these macros, so each list of cases lives
// in one place.
#pragma once
#include <string>

#include "half.h"
#include "tensor.h"

// Binds the C++ storage type of a float DType to NAME inside BODY (bf16_t / f16_t are 2-byte
// structs; load_f32 / store_f32 convert them).
#define FLUID_DISPATCH_FLOAT(DT, NAME, ...)                                         \
  do {                                                                              \
    switch (DT) {                                                                   \
      case ::fluid::DType::F32: { using NAME = float; __VA_ARGS__; break; }         \
      case ::fluid::DType::F16: { using NAME = ::fluid::f16_t; __VA_ARGS__; break; } \
      case ::fluid::DType::BF16: { using NAME = ::fluid::bf16_t; __VA_ARGS__; break; } \
      default:                                                                      \
        throw ::fluid::CheckError(std::string("unsupported dtype ") +               \
                                  ::fluid::dtype_name(DT));                         \
    }                                                                               \
  } while (0)

// The supported head dims (docs/contracts.md §2.1), each bound to the constexpr int NAME.
#define FLUID_HEAD_DIM_CASES(NAME, ...)                                             \
  case 32: { constexpr int NAME = 32; __VA_ARGS__; break; }                         \
  case 64: { constexpr int NAME = 64; __VA_ARGS__; break; }                         \
  case 80: { constexpr int NAME = 80; __VA_ARGS__; break; }                         \
  case 96: { constexpr int NAME = 96; __VA_ARGS__; break; }                         \
  case 128: { constexpr int NAME = 128; __VA_ARGS__; break; }

// Binds a supported head dim to the constexpr int NAME inside BODY; any other throws.
#define FLUID_DISPATCH_HEAD_DIM(D, NAME, ...)                                       \
  do {                                                                              \
    switch (D) {                                                                    \
      FLUID_HEAD_DIM_CASES(NAME, __VA_ARGS__)                                       \
      default:                                                                      \
        throw ::fluid::CheckError("unsupported head dim " + std::to_string(D) +     \
                                  " (supported: 32, 64, 80, 96, 128)");             \
    }                                                                               \
  } while (0)

// As FLUID_DISPATCH_HEAD_DIM, but another D does nothing: for code built with extra ISA flags
// (csrc/cpu/*_avx512.cpp), where the throw's inline std::string code could be emitted with those
// instructions and picked by the linker for baseline callers. The caller has checked D.
#define FLUID_DISPATCH_HEAD_DIM_NOTHROW(D, NAME, ...)                               \
  do {                                                                              \
    switch (D) {                                                                    \
      FLUID_HEAD_DIM_CASES(NAME, __VA_ARGS__)                                       \
      default: break;                                                               \
    }                                                                               \
  } while (0)

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Binds the CUDA type of a 16-bit float DType (__half / __nv_bfloat16) to NAME inside BODY: the
// tensor-core kernels' dtypes (their hosts have checked for fp16 / bf16 first).
#define FLUID_DISPATCH_CUDA_HALF(DT, NAME, ...)                                     \
  do {                                                                              \
    switch (DT) {                                                                   \
      case ::fluid::DType::F16: { using NAME = __half; __VA_ARGS__; break; }        \
      case ::fluid::DType::BF16: { using NAME = __nv_bfloat16; __VA_ARGS__; break; } \
      default:                                                                      \
        throw ::fluid::CheckError(std::string("unsupported dtype ") +               \
                                  ::fluid::dtype_name(DT) + " (float16 / bfloat16 only)"); \
    }                                                                               \
  } while (0)
#endif
