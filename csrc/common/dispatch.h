// dtype and head-dim dispatch: turn runtime codes into template parameters.
#pragma once
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

// Binds a supported head dim (docs/contracts.md §2.1) to the constexpr int NAME inside BODY.
#define FLUID_DISPATCH_HEAD_DIM(D, NAME, ...)                                       \
  do {                                                                              \
    switch (D) {                                                                    \
      case 32: { constexpr int NAME = 32; __VA_ARGS__; break; }                     \
      case 64: { constexpr int NAME = 64; __VA_ARGS__; break; }                     \
      case 80: { constexpr int NAME = 80; __VA_ARGS__; break; }                     \
      case 96: { constexpr int NAME = 96; __VA_ARGS__; break; }                     \
      case 128: { constexpr int NAME = 128; __VA_ARGS__; break; }                   \
      default:                                                                      \
        throw ::fluid::CheckError("unsupported head dim " + std::to_string(D) +     \
                                  " (supported: 32, 64, 80, 96, 128)");             \
    }                                                                               \
  } while (0)
