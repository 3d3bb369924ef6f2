// The 8 x 8 transpose of int32 words shared by the AVX2 and AVX-512 GEMM panels
// (int4_cpu_kernel.h, dequantize_panel). Included only by translation units compiled with
// AVX2 enabled (#pragma GCC target before the includes); `static` keeps each copy internal,
// so no baseline code can ever link against an AVX2 copy.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fourbit {
namespace cpu {

// out[t] lane l = rows[l][j + t] for t, l < 8: eight 32-byte row loads, then the classic
// transpose (32-bit interleave, 64-bit interleave, 128-bit lane swap): 24 shuffles for 64 words.
static inline void transpose_words_8x8(const int32_t* const* rows, int64_t j, __m256i out[8]) {
  __m256i r[8], t[8], u[8];
  for (int l = 0; l < 8; ++l) r[l] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[l] + j));
  // t: pairs of rows interleaved by word: t[2p] = words 0,1 | 4,5 of rows 2p, 2p+1.
  for (int p = 0; p < 4; ++p) {
    t[2 * p] = _mm256_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
    t[2 * p + 1] = _mm256_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
  }
  // u[q], u[4 + q]: word q (low lane) and q + 4 (high lane) of rows 0-3, resp. rows 4-7.
  for (int half = 0; half < 2; ++half) {
    const __m256i* tt = t + 4 * half;
    u[4 * half + 0] = _mm256_unpacklo_epi64(tt[0], tt[2]);
    u[4 * half + 1] = _mm256_unpackhi_epi64(tt[0], tt[2]);
    u[4 * half + 2] = _mm256_unpacklo_epi64(tt[1], tt[3]);
    u[4 * half + 3] = _mm256_unpackhi_epi64(tt[1], tt[3]);
  }
  for (int q = 0; q < 4; ++q) {
    out[q] = _mm256_permute2x128_si256(u[q], u[4 + q], 0x20);
    out[q + 4] = _mm256_permute2x128_si256(u[q], u[4 + q], 0x31);
  }
}

}  // namespace cpu
}  // namespace fourbit
