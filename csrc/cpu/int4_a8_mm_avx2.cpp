// AVX2 CPU W4A8 int4 matmul: 32 weight bytes (64 columns) per register, `vpmaddubsw` then
// `vpmaddwd` for the products (no 16-bit overflow: 2 x 15 x 128 < 2^15). Everything in this
// translation unit is compiled for AVX2 (F16C widens fp16 scales).
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <cstring>

#include "fourbit/cpu_widen.h"
#include "fourbit/int4_a8_cpu_kernel.h"

namespace fourbit {
namespace cpu {
namespace {

struct Avx2 {
  static constexpr int C = kInt4A8Chunk, L = C / 8;
  // 2 x 2 accumulators + a weight row's nibbles, scales and sums within 16 registers
  static constexpr int MR = 2, NR = 2;
  using vec = __m256;
  using ivec = __m256i;
  static ivec load_w(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static ivec load_w(const uint8_t* p, int bytes) {
    alignas(32) uint8_t tail[C / 2] = {};
    std::memcpy(tail, p, bytes);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
  }
  static ivec low(ivec w) { return _mm256_and_si256(w, _mm256_set1_epi8(0x0F)); }
  static ivec high(ivec w) { return _mm256_and_si256(_mm256_srli_epi16(w, 4), _mm256_set1_epi8(0x0F)); }
  static ivec dot(ivec acc, ivec u, const int8_t* p) {
    const __m256i pairs = _mm256_maddubs_epi16(u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  static ivec shift_digit(ivec i) { return _mm256_slli_epi32(i, 8); }
  static ivec izero() { return _mm256_setzero_si256(); }
  static ivec isub(ivec a, ivec b) { return _mm256_sub_epi32(a, b); }
  static ivec load_i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static vec to_float(ivec i) { return _mm256_cvtepi32_ps(i); }
  static vec zero() { return _mm256_setzero_ps(); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static vec broadcast(float s) { return _mm256_set1_ps(s); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static ivec lane_index(int shift) { return _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), shift); }
  static vec expand(const float* p, ivec index) {
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), index);
  }
  static void to_float(const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
    widen_scales_avx2(p, t, begin, count, out);
  }
};

}  // namespace

void int4_a8_rows_avx2(const Int4A8Args& a, int64_t n_begin, int64_t n_end, float* scratch) {
  int4_a8_rows<Avx2>(a, n_begin, n_end, scratch);
}

}  // namespace cpu
}  // namespace fourbit
