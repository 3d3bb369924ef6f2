// The AVX2 traits of the CPU int4 matmul kernel (int4_cpu_kernel.h): 8 words (64 columns) per
// 256-bit register. Included by the AVX2 translation unit, and by the AVX-512 one for its
// half-register tail (V::Half); each compiles it for its own instruction set.
//
// The anonymous namespace is deliberate: every translation unit that includes this header gets
// its own copy with internal linkage, so the linker never substitutes the AVX-512 unit's copy
// (which the compiler may encode with AVX-512 instructions) for the AVX2 unit's one.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "fourbit/cpu_widen.h"
#include "fourbit/int4_cpu_transpose8.h"

namespace fourbit {
namespace cpu {
namespace {

struct Avx2 {
  static constexpr int W = 8;
  using Half = void;
  using vec = __m256;
  using ivec = __m256i;
  static vec zero() { return _mm256_setzero_ps(); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static vec broadcast(float s) { return _mm256_set1_ps(s); }
  static ivec load_words(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  // Shift, mask, convert: nibble i of all 8 words. q <= 15 converts exactly. The top
  // nibble needs no mask (i is a constant wherever the loops are unrolled).
  static vec nibble(ivec w, int i) {
    const ivec shifted = _mm256_srli_epi32(w, 4 * i);
    return _mm256_cvtepi32_ps(i == 7 ? shifted : _mm256_and_si256(shifted, _mm256_set1_epi32(0xF)));
  }
  // One group's scale and offset, broadcast: w = q s + m, one FMA after the convert.
  struct group_t {
    vec s, m;
  };
  static group_t group(float s, float m) { return {_mm256_set1_ps(s), _mm256_set1_ps(m)}; }
  static vec weights(ivec w, int i, const group_t& g) { return _mm256_fmadd_ps(nibble(w, i), g.s, g.m); }
  // Groups of 32 columns: words 0-3 of a 64-column register are one group, 4-7 the next.
  static vec lane_scales(const float* p, int /*per == 2*/) { return _mm256_set_m128(_mm_set1_ps(p[1]), _mm_set1_ps(p[0])); }
  static ivec row_offsets(int first, int64_t last, int64_t stride) {
    const __m256i rows = _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_mullo_epi32(_mm256_min_epi32(rows, _mm256_set1_epi32(static_cast<int>(last))),
                              _mm256_set1_epi32(static_cast<int>(stride)));
  }
  static ivec gather_words(const int32_t* p, ivec idx) {
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(p), idx, 4);
  }
  static vec gather(const float* p, ivec idx) { return _mm256_i32gather_ps(p, idx, 4); }
  // out[t] lane l = rows[l][j + t] (int4_cpu_transpose8.h).
  static void load_transposed(const int32_t* const* rows, int64_t j, ivec out[8]) { transpose_words_8x8(rows, j, out); }
  static void widen(const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
    widen_scales_avx2(p, t, begin, count, out);
  }
  static float hsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};

}  // namespace
}  // namespace cpu
}  // namespace fourbit
