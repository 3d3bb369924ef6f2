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

// int4 weight, int8 activations on the CPU (csrc/cpu/int4_a8_mm.cpp, W4A8): x quantized per
// block of 32 columns to int8 (scale max|x| / 127), integer dot products with the nibbles,
// the offsets against fp32 sums of x (include/fourbit/int4_a8_cpu.h). Inputs as int4_mm_cpu;
// group_len 32, 64, a multiple of 128, or K_padded. digits 1: int8 activations ("cpu-a8");
// 2 / 3: that many int8 digits per activation, 16- / 24-bit fixed point; 0: 3 for fp32 x, else
// 2 ("cpu-int", reference.fixed_point_digits). Returns [M, N] in x's dtype.
at::Tensor int4_a8_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& offsets, int64_t group_len, const std::optional<at::Tensor>& bias,
                          int64_t digits);
// The instruction set of the W4A8 kernel: "avx512-vnni", "avx2" or "portable".
const char* int4_a8_mm_cpu_isa();

// int8 weight-only matmul on the CPU (csrc/cpu/int8_mm.cpp): out = x @ (q * s).T + bias, each
// scale s[n, g] applying to q[n, g * group_len .. (g + 1) * group_len - 1], fp32 accumulation.
//   x        fp32 | bf16 | fp16 [M, K], any strides (made contiguous if needed)
//   qweight  int8 [N, K];  scales fp32 | bf16 | fp16 [N, K / group_len]
//   group_len  K (one scale per row) or a multiple of 32 dividing K (GGUF Q8_0: 32)
//   bias     optional, any float dtype, [N]
// returns    [M, N] in x's dtype.
at::Tensor int8_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_len,
                       const std::optional<at::Tensor>& bias);
// The vector instruction set the int8 kernel picks at run time: "avx512", "avx2" or "portable".
const char* int8_mm_cpu_isa();

// Paged KV cache on the CPU (csrc/cpu/paged_attention.cpp; layout: python/fourbit/kv_cache.py),
// AVX-512 / AVX2 / portable like int4_mm_cpu, fp32 accumulation, GQA, any head_dim.
//   k_cache, v_cache  contiguous fp32 | bf16 | fp16 [num_blocks, block_size, num_kv_heads, head_dim]
//   block_tables      int32 [B, max_blocks], unit column stride;  seq_lens int32 [B], contiguous
//   q                 [tokens, Hq, head_dim] in the cache's dtype, unit stride along head_dim
// Decode: q [B, Hq, D] -> [B, Hq, D]; split-KV when B x num_kv_heads is small for the threads.
at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
// Prefill: q [total_q, Hq, D], query_start_loc int32 [B + 1] -> [total_q, Hq, D], causal.
at::Tensor paged_prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                       const at::Tensor& query_start_loc, int64_t max_query_len, double scale);
// k_cache[slot] = k[t], v_cache[slot] = v[t]; k, v [T, num_kv_heads, head_dim] with contiguous
// rows, in the cache's dtype; slot_mapping int64 [T], -1 (or any slot outside the cache) skips.
void write_kv_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& slot_mapping);

#ifdef FOURBIT_WITH_CUDA
// int4 weight-only matmul on tensor cores (csrc/cuda/int4_mm.cu), M <= 64:
//   x        fp16 | bf16 [M, K], contiguous, K a multiple of 8
//   packed   int32 [N_pad / 16, K_pad / 64 * 128]: python/fourbit/format.py prepack_mma
//   scales   [groups, N] in x's dtype (the canonical [N, groups], transposed); offsets the same
//   n        output features N;  group_len  input channels per group (K_pad for one group)
//   bias     optional [N] in x's dtype
// returns    [M, N] in x's dtype, fp32 accumulation.
at::Tensor int4_mm_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const at::Tensor& offsets, int64_t n, int64_t group_len, const std::optional<at::Tensor>& bias);

// Paged KV cache on CUDA (csrc/cuda/paged_attention.cu; layout: python/fourbit/kv_cache.py).
//   k_cache, v_cache  contiguous [num_blocks, block_size, num_kv_heads, head_dim], one dtype
//   block_tables      int32 [B, max_blocks];  seq_lens int32 [B]
// Decode: q [B, Hq, head_dim] (head_dim 64, 80, 96, 128 or 256) -> [B, Hq, head_dim].
at::Tensor paged_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
// k_cache[slot] = k[t], v_cache[slot] = v[t]; k, v [T, num_kv_heads, head_dim]; slot_mapping
// int64 [T] = page * block_size + row, -1 skips.
void write_kv_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping);
#endif

}  // namespace fourbit
