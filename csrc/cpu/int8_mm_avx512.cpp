// AVX-512 CPU int8 weight-only matmul: 16 weights per register. Compiled for AVX-512F in this
// translation unit only, chosen at run time when the CPU has it (int8_mm.cpp).
#pragma GCC target("avx2,avx512f,avx512dq,fma,f16c")
// GCC 12 warns about the deliberately undefined upper lanes inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "fourbit/cpu_widen.h"
#include "fourbit/int8_cpu_kernel.h"

namespace fourbit {
namespace cpu {
namespace {

struct Avx512 {
  static constexpr int W = 16;
  static constexpr int MR = 4;  // 4 x 4 accumulators + 4 weights + 4 scales of 32 registers
  using vec = __m512;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec broadcast(float s) { return _mm512_set1_ps(s); }
  static float hsum(vec v) { return _mm512_reduce_add_ps(v); }
  static vec load_q(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void scales_to_float(const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
    widen_scales_avx512(p, t, begin, count, out);
  }
};

}  // namespace

void int8_matmul_rows_avx512(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch) {
  int8_rows<Avx512>(a, n_begin, n_end, scratch);
}

void int8_dequantize_rows_avx512(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* w, float* scratch) {
  int8_dequantize<Avx512>(a, n_begin, n_end, w, scratch);
}

}  // namespace cpu
}  // namespace fourbit
