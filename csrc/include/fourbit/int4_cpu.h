// Torch-free interface of the CPU int4 matmul kernels (csrc/cpu/int4_mm_*.cpp).
//
// out[m, n] = sum_k x[m, k] * (q[n, k] * s[n, g] + m[n, g]) + bias[n],  g = k / group_len
//
// Two schedules, both dequantizing in registers (the float weight matrix never exists):
//
// 1. Dot products (few rows of x, decode). Memory-bound on the packed weights, so the
//    weights are read exactly once and the per-weight work is minimal: each register of
//    words is unpacked, dequantized to fp32 in registers, w = q s + m (as reference.py
//    computes it, one rounding), and multiply-added with x for every row of x, accumulating
//    in fp32 along K. On AVX-512 the dequantization is a single table lookup (vpermps on the
//    group's 16 values q s + m) when a group covers whole registers.
//
//    Why not factor the scale and offset out of the sum, s * sum_k x q + m * sum_k x per
//    group (one FMA per weight instead of two)? That loses what the reference keeps: the two
//    terms are large and of opposite sign whenever x is mostly of one sign (constant or
//    non-negative activations: post-ReLU outputs, probabilities), so their fp32 cancellation
//    cost 19-101x the reference's error; x q overflows fp32 where x w does not (|x| near
//    1e36); and an infinite x gave inf - inf = NaN where x @ W.T gives inf (issue 16, item 8).
//    Dequantizing first has none of these. Its cost, measured against the factored form on
//    this project's AVX-512 machine (N = K = 4096, g = 128, M = 1, one thread, CPU time):
//    AVX-512 is faster, the table lookup replacing the mask and the convert (cold weights
//    -8%, weights in L2 -20%); AVX2 and portable pay the extra FMA (cold +10%, in L2 +17%;
//    portable in L2 +44%).
//
//    Activation layout. A SIMD register of W int32 words holds 8 W columns of a weight row:
//    word l holds columns 8 l .. 8 l + 7. Shifting the whole register right by 4 i and
//    masking yields nibble i of every word, i.e. columns {8 l + i : l < W}. The activations
//    are therefore permuted once per call so that those W columns lie next to each other:
//        xp[8 W b + W i + l] = x[8 W b + 8 l + i]   for every full block b of 8 W columns.
//    On AVX-512, 8 or more words past the last full register make one half-width block of
//    8 words, laid out and computed as at W = 8 (int4_half_block_words: SmolLM2's K = 576 is
//    4 registers and a half). Columns past that stay in natural order and are handled one
//    word at a time.
//
// 2. Blocked GEMM (more rows of x). Compute-bound on the multiply-adds, so the goal is the
//    fp32 GEMM rate: a panel of 2 W weight rows x KC columns is dequantized once into L1
//    (transposed, one k per 2 W floats) and then feeds a 6 x 2W register-blocked outer-product
//    micro-kernel for every row of x, reading x in natural order. See int4_cpu_kernel.h.
//
// The inline helpers below are `static`: this header is also compiled inside the AVX2 and
// AVX-512 translation units (under #pragma GCC target), and internal linkage keeps the
// linker from ever substituting such a copy for the baseline one the launcher calls.
#pragma once

#include <cstdint>

#include "fourbit/int8_cpu.h"  // ScaleType

namespace fourbit {
namespace cpu {

struct Int4MatmulArgs {
  const float* x;          // [M, k] fp32 activations, row-major (blocked GEMM schedule)
  const float* xp;         // [M, k_padded] permuted activations, zero past K (dot-product schedule only)
  const int32_t* qweight;  // [N, k_padded / 8] canonical packing
  // [N, groups] each, row-major, in their own dtype: the dot-product schedule widens one pass
  // of weight rows at a time into its scratch (int4_dot_scratch_floats), so fp16 / bf16 scales
  // cost no conversion per call; the blocked GEMM reads fp32 only (the launcher widens them
  // for it, once per call: its cost is shared by more than 3 rows of x).
  const void* scales;
  const void* offsets;
  ScaleType scale_type, offset_type;
  const float* bias;       // [N] or nullptr
  float* out;              // [M, N]
  int64_t m, n, k, k_padded, groups, group_len;
};

// Rows of x up to which the dot-product schedule wins over the blocked GEMM. Measured on this
// project's 2-core AVX-512 machine, N = K = 4096, medians of 10, with the factored form the
// schedule had before (dequantizing per weight is faster on AVX-512, so the crossover holds
// there; on AVX2 it is not re-measured): M = 1 dot 0.35 ms vs GEMM 0.94 ms; M = 2 0.78 vs
// 1.01; M = 4 1.19 vs 0.98 (N = 4096, K = 11008: 3.51 vs 3.32).
constexpr int64_t kDotMaxRows = 3;

// Whether the dot-product schedule handles this problem at vector width `width` (8 or 16
// words). It needs each group to be a whole number of registers (8 W columns), or one group
// per row, or groups of exactly 32 columns (AVX-512 also 64) that split a register into lane
// quarters. Anything else (e.g. group_len 8 or 96) takes the blocked GEMM, which handles any
// multiple of 8.
static inline bool int4_use_dot(int64_t m, int64_t group_len, int64_t groups, int width) {
  if (m > kDotMaxRows) return false;
  const int64_t block_cols = 8 * static_cast<int64_t>(width);
  if (groups == 1 || group_len % block_cols == 0) return true;
  return group_len == 32 || (width == 16 && group_len == 64);
}

// Weight rows the dot-product schedule visits per pass over the rows of x: their packed words
// (8 x K/2 bytes) stay in L1/L2 while every group of MR rows of x streams past them.
constexpr int64_t kWeightRowsPerPass = 8;

// Output rows per unit of work handed to a thread: the blocked GEMM works on panels of
// 2 W weight rows; the dot-product schedule visits kWeightRowsPerPass rows per pass.
static inline int64_t int4_rows_per_unit(bool dot, int width) {
  return dot ? kWeightRowsPerPass : 2 * static_cast<int64_t>(width);
}

// Columns of one dequantized GEMM panel: 2 W rows x 2048 / W columns x 4 bytes = 16 KiB at
// any width, so the panel stays in L1 next to the streaming rows of x while every row of x
// passes over it. A multiple of 8, so panels start on word boundaries.
static inline int64_t int4_panel_cols(int width) { return 2048 / width; }

// Floats of per-thread scratch: one panel, plus one word (8 columns) of slack because the
// last word of a panel is dequantized whole even where K ends inside it.
static inline int64_t int4_scratch_floats(int width) { return (int4_panel_cols(width) + 8) * 2 * width; }

// Words of the half-width block after the full registers of a row at vector width `width`
// (the layout above): 8 where AVX-512 leaves 8 or more words past its last register, else 0.
static inline int64_t int4_half_block_words(int width, int64_t words_per_row) {
  return width == 16 && words_per_row % 16 >= 8 ? 8 : 0;
}

// Floats of per-thread scratch of the dot-product schedule: one pass of weight rows' scales
// and offsets widened to fp32.
static inline int64_t int4_dot_scratch_floats(int64_t groups) { return 2 * kWeightRowsPerPass * groups; }

// Rows [n_begin, n_end) of out, for every row of x. Each is safe to call from many threads
// on disjoint row ranges, each with its own scratch of int4_dot_scratch_floats(groups)
// (dot) or int4_scratch_floats(W) (GEMM) floats.
// Vector width W: portable 8, avx2 8, avx512 16. `dot` must be int4_use_dot(...).
void int4_matmul_rows_portable(const Int4MatmulArgs& a, bool dot, int64_t n_begin, int64_t n_end, float* scratch);
void int4_matmul_rows_avx2(const Int4MatmulArgs& a, bool dot, int64_t n_begin, int64_t n_end, float* scratch);
void int4_matmul_rows_avx512(const Int4MatmulArgs& a, bool dot, int64_t n_begin, int64_t n_end, float* scratch);

// Fill xp from x [M, K] (row-major fp32) for vector width `width` (dot-product schedule).
void int4_prepare_activations(const float* x, int64_t m, int64_t k, int64_t k_padded, int width, float* xp);

}  // namespace cpu
}  // namespace fourbit
