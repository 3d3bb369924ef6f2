// AVX2 + FMA CPU int8 weight-only matmul: 8 weights per register. Everything in this
// translation unit is compiled for AVX2 (F16C widens fp16 scales); it includes no torch or
// STL code, so no inline function built here can stand in for a baseline copy elsewhere.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "fourbit/cpu_widen.h"
#include "fourbit/int8_cpu_kernel.h"

namespace fourbit {
namespace cpu {
namespace {

struct Avx2 {
  static constexpr int W = 8;
  static constexpr int MR = 2;  // 2 x 4 accumulators + 4 weights + scales within 16 registers
  using vec = __m256;
  static vec zero() { return _mm256_setzero_ps(); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec broadcast(float s) { return _mm256_set1_ps(s); }
  static float hsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static vec load_q(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void scales_to_float(const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
    widen_scales_avx2(p, t, begin, count, out);
  }
};

}  // namespace

void int8_matmul_rows_avx2(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch) {
  int8_rows<Avx2>(a, n_begin, n_end, scratch);
}

void int8_dequantize_rows_avx2(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* w, float* scratch) {
  int8_dequantize<Avx2>(a, n_begin, n_end, w, scratch);
}

}  // namespace cpu
}  // namespace fourbit
