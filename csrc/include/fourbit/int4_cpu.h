// Torch-free interface of the CPU int4 matmul kernels (csrc/cpu/int4_mm_*.cpp).
//
// out[m, n] = sum_k x[m, k] * (q[n, k] * s[n, g] + m[n, g]) + bias[n],  g = k / group_len
//
// The kernels never form w. Per group, sum_k x (q s + m) = s * sum_k x q + m * sum_k x:
// the inner loop is one multiply-add of x by the integer q per weight, the scale is applied
// once per group (or once per vector when groups are shorter than a vector), and the
// offsets meet the per-group sums of x once per row.
//
// Activation layout. A SIMD register of W int32 words holds 8 W columns of a weight row:
// word l (column 8 l + i for nibble i). Shifting the whole register right by 4 i and
// masking yields nibble i of every word, i.e. columns {8 l + i : l < W}. The activations
// are therefore permuted once per call so that those W columns lie next to each other:
//     xp[8 W b + W i + l] = x[8 W b + 8 l + i]   for every full block b of 8 W columns;
// columns past the last full block (fewer than W words) stay in natural order and are
// handled one word at a time.
#pragma once

#include <cstdint>

namespace fourbit {
namespace cpu {

struct Int4MatmulArgs {
  const float* xp;         // [M, k_padded] activations, permuted as above, zero past K
  const float* xsum;       // [M, groups] sum of x over each group (columns < K)
  const int32_t* qweight;  // [N, k_padded / 8] canonical packing
  const float* scales;     // [N, groups]
  const float* offsets;    // [N, groups]
  const float* bias;       // [N] or nullptr
  float* out;              // [M, N]
  int64_t m, n, k, k_padded, groups, group_len;
};

// Rows [n_begin, n_end) of out, for every row of x. Each is safe to call from many
// threads on disjoint row ranges, each with its own scratch of int4_scratch_floats(a)
// floats. Vector width W: portable 8, avx2 8, avx512 16.
void int4_matmul_rows_portable(const Int4MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch);
void int4_matmul_rows_avx2(const Int4MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch);
void int4_matmul_rows_avx512(const Int4MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch);
inline int64_t int4_scratch_floats(const Int4MatmulArgs& a) { return 4 * a.k_padded; }

// Fill xp and xsum from x [M, K] (row-major fp32) for vector width `width`.
void int4_prepare_activations(const float* x, int64_t m, int64_t k, int64_t k_padded, int64_t group_len,
                              int64_t groups, int width, float* xp, float* xsum);

}  // namespace cpu
}  // namespace fourbit
