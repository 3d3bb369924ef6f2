// AVX-512 CPU int4 matmul: 16 words (128 columns) per register. Compiled for AVX-512F/DQ
// in this translation unit only, chosen at run time when the CPU has it (int4_mm.cpp).
#pragma GCC target("avx512f,avx512dq,fma")
// GCC 12 warns about the deliberately undefined upper lanes inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "fourbit/int4_cpu_kernel.h"

namespace fourbit {
namespace cpu {
namespace {

struct Avx512 {
  static constexpr int W = 16;
  using vec = __m512;
  using ivec = __m512i;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static vec broadcast(float s) { return _mm512_set1_ps(s); }
  static ivec load_words(const int32_t* p) { return _mm512_loadu_si512(p); }
  static vec nibble(ivec w, int i) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(w, 4 * i), _mm512_set1_epi32(0xF)));
  }
  // `per` (2 or 4) groups in a 128-column register: quarter q of the lanes (4 words,
  // 32 columns) belongs to group q * per / 4.
  static vec lane_scales(const float* p, int per) {
    vec v = _mm512_set1_ps(p[0]);
    v = _mm512_insertf32x4(v, _mm_set1_ps(p[1 * per / 4]), 1);
    v = _mm512_insertf32x4(v, _mm_set1_ps(p[2 * per / 4]), 2);
    return _mm512_insertf32x4(v, _mm_set1_ps(p[3 * per / 4]), 3);
  }
  static float hsum(vec v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace

void int4_matmul_rows_avx512(const Int4MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch) {
  int4_rows<Avx512>(a, n_begin, n_end, scratch);
}

}  // namespace cpu
}  // namespace fourbit
