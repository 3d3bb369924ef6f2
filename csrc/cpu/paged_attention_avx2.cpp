// AVX2 CPU paged attention: 8 floats per register, tiles of 16 keys. Compiled for
// AVX2/FMA/F16C in this translation unit only, chosen at run time when the CPU has them
// (paged_attention.cpp). bf16 widens by a 16-bit shift (exact), fp16 by vcvtph2ps (F16C).
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "fourbit/int4_cpu_transpose8.h"
#include "fourbit/paged_attention_cpu_kernel.h"

namespace fourbit {
namespace cpu {
namespace {

struct Avx2 {
  static constexpr int W = 8;
  // 4 rows x 2 vectors = 8 accumulators, 2 loaded vectors and a broadcast: 11 of 16 registers.
  static constexpr int kRows = 4;
  using vec = __m256;
  static vec zero() { return _mm256_setzero_ps(); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static vec broadcast(float s) { return _mm256_set1_ps(s); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  static float reduce_max(vec v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static float reduce_add(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static vec keep_first(vec v, int k, float fill) {
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(keep));
  }
  // 2^x as on AVX-512 (the same polynomial), with 2^n built in the exponent field: x is
  // clamped to [-127, 128], where n = -127 gives the bits of +0 and n = 128 those of inf.
  static vec exp2(vec x) {
    x = _mm256_min_ps(_mm256_set1_ps(128.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), x));
    const vec n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vec f = _mm256_sub_ps(x, n);
    vec p = _mm256_set1_ps(1.546973198e-04f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.340043216e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618025603e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550327214e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265121e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472067e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static vec widen(const float* p) { return _mm256_loadu_ps(p); }
  static vec widen(const Bf16* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static vec widen(const Fp16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // fp32 rows: the int4 kernel's 8 x 8 word transpose (int4_cpu_transpose8.h) on the bits
  // of the floats. 16-bit rows: widened first, then the same three shuffle stages on floats.
  static void transpose(const float* const* rows, int64_t d0, float* dst, int64_t stride) {
    __m256i out[8];
    transpose_words_8x8(reinterpret_cast<const int32_t* const*>(rows), d0, out);
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + j * stride, _mm256_castsi256_ps(out[j]));
  }
  template <class T>
  static void transpose(const T* const* rows, int64_t d0, float* dst, int64_t stride) {
    vec r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = widen(rows[i] + d0);
    for (int p = 0; p < 4; ++p) {
      t[2 * p] = _mm256_unpacklo_ps(r[2 * p], r[2 * p + 1]);
      t[2 * p + 1] = _mm256_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
    for (int h = 0; h < 2; ++h) {
      u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
      u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
      u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
      u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      _mm256_storeu_ps(dst + c * stride, _mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
      _mm256_storeu_ps(dst + (c + 4) * stride, _mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
    }
  }
};

}  // namespace

void attend_block_avx2(const PagedAttentionArgs& a, const AttentionBlock& block, float* scratch) {
  attend_block_impl<Avx2>(a, block, scratch);
}

}  // namespace cpu
}  // namespace fourbit
