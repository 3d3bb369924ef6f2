// The dtypes the CPU launchers (csrc/cpu/*.cpp) take for activations and scales, and how the
// torch-free kernels name a scale's storage (fourbit/int8_cpu.h's ScaleType).
#pragma once

#include <c10/core/ScalarType.h>

#include "fourbit/int8_cpu.h"

namespace fourbit {
namespace cpu {

inline bool is_float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

inline ScaleType scale_type(at::ScalarType t) {
  return t == at::kHalf ? ScaleType::kFloat16 : t == at::kBFloat16 ? ScaleType::kBFloat16 : ScaleType::kFloat32;
}

}  // namespace cpu
}  // namespace fourbit
