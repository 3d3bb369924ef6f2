// Declarations of the launchers that registration.cpp binds. Launchers check their
// inputs with TORCH_CHECK, pick a kernel and launch it; the math lives in include/fourbit/.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace fourbit {

// int4 weight-only matmul on the CPU: out = x @ dequantize(qweight, scales, offsets).T + bias,
// accumulated in fp32.
//   x        fp32 | bf16 | fp16 [M, K], any strides (made contiguous if needed)
//   qweight  int32 [N, K_padded / 8], canonical packing (python/fourbit/format.py)
//   scales   fp32 | bf16 | fp16 [N, K_padded / group_len]
//   offsets  same dtype and shape as scales
//   group_len  input channels per group: a positive multiple of 8 dividing K_padded
//   bias     optional, any float dtype, [N]
// returns    [M, N] in x's dtype.
at::Tensor int4_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& offsets, int64_t group_len,
                       const std::optional<at::Tensor>& bias);

// The vector instruction set the CPU kernel picked at run time: "avx512", "avx2" or "portable".
const char* int4_mm_cpu_isa();

}  // namespace fourbit
