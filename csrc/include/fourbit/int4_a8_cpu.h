// Torch-free interface of the CPU W4A8 int4 matmul kernels (csrc/cpu/int4_a8_mm_*.cpp): the
// int4 weight of int4_cpu.h against activations quantized to int8 on the fly, the technique
// of llama.cpp's Q4 x Q8 dot products.
//
//   out[m, n] = sum_g s[n, g] sum_{k in g} (q[n, k] - 8) x[m, k] + sum_g o'[n, g] X[m, g] + bias[n]
//
// with w = q s + o = (q - 8) s + o' (canonical layout, python/fourbit/format.py), o' = o + 8 s
// in fp32, and X[m, g] the sum of x over group g (in fp64, rounded to fp32). Only the first
// term is approximated: each block of 32 consecutive columns of a row of x becomes int8 with
// one fp32 scale d (x ~ d xq, d = max|x| / 127, round to nearest), and sum (q - 8) x becomes
// d sum (q - 8) xq, an exact integer dot product. Centred at 8, the first term is as small as the weights are
// (never a large sum cancelled by the offset term, where x is mostly of one sign), and a
// symmetric weight (o = -8 s) has o' = 0: nothing of it rides on X.
//
// Rows of x that fixed point cannot hold (a block with inf or NaN, or whose largest magnitude
// is outside [2^-64, 2^64] other than 0: scales or sums that would overflow or underflow fp32)
// are computed by the W4A16 kernel instead (int4_mm_cpu), which gives what x @ W.T gives.
//
// The integer products run 4 bytes per 32-bit lane: `vpdpbusd` (AVX-512 VNNI: unsigned byte
// q times signed byte xq, four products summed into each lane) or `vpmaddubsw` + `vpmaddwd`
// (AVX2). A weight register of B bytes holds C = 2B columns: its low nibbles are the even
// columns, its high nibbles the odd ones (byte t of a row holds columns 2t and 2t + 1), so the
// activations are stored per chunk of C columns as the C/2 even ones then the C/2 odd ones,
// and lane l of both products covers columns 8l .. 8l + 7 of the chunk. The centring is one
// integer subtraction per lane: sum q xq - 8 sum xq, the second sum (times 8) made once per row
// of x with the quantization. Each chunk's integer lanes are then widened to fp32 and scaled
// by s[n, group of the lane] d[block of the lane].
//
// Two or three digits (the "cpu-int" backend: 3 for fp32 x, 2 for bf16 / fp16): the same
// integer products on fixed-point activations. With t = x / d (the one-digit quotient,
// |t| <= 127) and unit = 256^(digits - 1), v = round(t unit) is written as a top digit in
// [-127, 127] and lower ones in [-128, 127] (v = 256 (... 256 a1 + a2 ...) + a3), and
// x ~ (d / unit) v, within d / (2 unit) of x instead of d / 2. Each more digit costs two more
// `vpdpbusd` per chunk and row of x: the lanes' sum so far is shifted left by 8 bits and the
// next digit's products accumulate onto it (|v| <= 127 unit, 8 columns per lane: at most
// 8 x 15 x 127 x 2^16 < 2^30, exact in int32, and after the centring at most 8 x 8 x 127 x
// 2^16 < 2^29; its fp32 conversion rounds once, like an fp32 sum), and the lane scale is d / unit. One scale per 32 columns: a 16- / 24-bit fixed-point
// number per block, whose step (max / 32512, max / 8323072) is below x's own rounding of the
// block's largest element in its dtype (2^-8 bf16, 2^-11 fp16, 2^-24 fp32: max / 16.7M).
//
// Group lengths: 32, 64, any multiple of 128, or K_padded (one group per row); either a
// chunk lies inside one group, or its lanes split evenly over C / group_len groups.
//
// The inline helpers below are `static`: this header is also compiled inside the AVX2 and
// AVX-512 translation units (under #pragma GCC target), and internal linkage keeps the
// linker from ever substituting such a copy for the baseline one the launcher calls.
#pragma once

#include <cmath>
#include <cstdint>

#include "fourbit/int8_cpu.h"  // ScaleType and the scalar fp16 / bf16 widening

namespace fourbit {
namespace cpu {

// x after quantization, for one call (int4_a8_quantize_activations).
struct Int4A8Activations {
  // [M, digits, chunks * C]: per row of x, each digit's bytes (the high digit first), per chunk
  // its C/2 even columns, then its C/2 odd
  const int8_t* q;
  const float* lane_scale;   // [M, chunks * C / 8]: d (one digit) or d / 256 (two) of each 8-column lane's block
  const int32_t* lane_sum8;  // [M, chunks * C / 8]: 8 x the sum of each lane's 8 activations as integers
  const float* group_sum;    // [M, groups]: fp32 sum of x over each weight group
  int digits;                // 1 (int8 activations, W4A8), 2 or 3 (16- / 24-bit, "cpu-int")
};

struct Int4A8Args {
  Int4A8Activations x;
  const uint8_t* w;          // [N, K_padded / 2] the int4 weight's bytes (canonical qweight)
  const void* scales;        // [N, groups] in scale_type
  const void* offsets;       // [N, groups] in offset_type
  ScaleType scale_type, offset_type;
  const float* bias;         // [N] or nullptr
  float* out;                // [M, N]
  int64_t m, n, k_padded, groups, group_len;
};

// Columns per chunk (C) of each instruction set's weight register: 128 on AVX-512, else 64.
constexpr int kInt4A8ChunkAvx512 = 128;
constexpr int kInt4A8Chunk = 64;

// Whether the kernels take this group length (see above), for K_padded columns.
static inline bool int4_a8_supports_group_len(int64_t group_len, int64_t k_padded) {
  return group_len == 32 || group_len == 64 || (group_len > 0 && group_len % 128 == 0) || group_len == k_padded;
}

static inline int64_t int4_a8_chunks(int64_t k_padded, int chunk_cols) { return (k_padded + chunk_cols - 1) / chunk_cols; }

// Weight rows per block of every kernel (the most any V::NR is).
constexpr int kInt4A8MaxRows = 4;

// Floats of per-thread scratch: a block of weight rows' scales and offsets in fp32 (each row
// + 4 of padding, read by the last chunk's lane expansion).
static inline int64_t int4_a8_scratch_floats(int64_t groups) { return 2 * kInt4A8MaxRows * (groups + 4); }

// The range of block magnitudes the kernels take (see above): max|x| of every block of a row
// of x is 0 or within [kInt4A8MinAbs, kInt4A8MaxAbs], and finite.
constexpr float kInt4A8MinAbs = 0x1p-64f, kInt4A8MaxAbs = 0x1p64f;

// Quantize rows of x (fp32 [M, K], row-major) to `digits` int8 digits for the kernels of one
// chunk width: xq [M, digits, chunks * C], lane_scale and lane_sum8 [M, chunks * C / 8],
// group_sum [M, groups]. Columns past K are zero. A block out of range (non-finite or its
// max|x| outside the range above) gets scale NaN and zero bytes, and in_range[r] = 0 for its
// row (else 1): the caller computes those rows otherwise. Returns how many rows are out of range.
int64_t int4_a8_quantize_activations(const float* x, int64_t m, int64_t k, int64_t k_padded, int64_t group_len,
                                     int chunk_cols, int digits, int8_t* xq, float* lane_scale, int32_t* lane_sum8,
                                     float* group_sum, uint8_t* in_range);

// Rows [n_begin, n_end) of out for every row of x. Safe to call from many threads on
// disjoint row ranges, each with its own scratch of int4_a8_scratch_floats floats.
void int4_a8_rows_portable(const Int4A8Args& a, int64_t n_begin, int64_t n_end, float* scratch);
void int4_a8_rows_avx2(const Int4A8Args& a, int64_t n_begin, int64_t n_end, float* scratch);
void int4_a8_rows_avx512(const Int4A8Args& a, int64_t n_begin, int64_t n_end, float* scratch);

}  // namespace cpu
}  // namespace fourbit
