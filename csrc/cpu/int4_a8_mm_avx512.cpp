// AVX-512 VNNI CPU W4A8 int4 matmul: 64 weight bytes (128 columns) per register, `vpdpbusd`
// for the products. Compiled for AVX-512F/BW/VNNI in this translation unit only, chosen at
// run time when the CPU has them (int4_a8_mm.cpp).
#pragma GCC target("avx2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")
// GCC 12 warns about the deliberately undefined upper lanes inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "fourbit/cpu_widen.h"
#include "fourbit/int4_a8_cpu_kernel.h"

namespace fourbit {
namespace cpu {
namespace {

struct Avx512Vnni {
  static constexpr int C = kInt4A8ChunkAvx512, L = C / 8;
  // 4 x 4 accumulators + a weight row's nibbles, scales and sums within 32 registers
  static constexpr int MR = 4, NR = 4;
  using vec = __m512;
  using ivec = __m512i;
  static ivec load_w(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static ivec load_w(const uint8_t* p, int bytes) { return _mm512_maskz_loadu_epi8((__mmask64{1} << bytes) - 1, p); }
  static ivec low(ivec w) { return _mm512_and_si512(w, _mm512_set1_epi8(0x0F)); }
  static ivec high(ivec w) { return _mm512_and_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi8(0x0F)); }
  static ivec dot(ivec acc, ivec u, const int8_t* p) { return _mm512_dpbusd_epi32(acc, u, _mm512_loadu_si512(p)); }
  static ivec shift_digit(ivec i) { return _mm512_slli_epi32(i, 8); }
  static ivec izero() { return _mm512_setzero_si512(); }
  static ivec isub(ivec a, ivec b) { return _mm512_sub_epi32(a, b); }
  static ivec load_i(const int32_t* p) { return _mm512_loadu_si512(p); }
  static vec to_float(ivec i) { return _mm512_cvtepi32_ps(i); }
  static vec zero() { return _mm512_setzero_ps(); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec broadcast(float s) { return _mm512_set1_ps(s); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(vec v) { return _mm512_reduce_add_ps(v); }
  static ivec lane_index(int shift) {
    return _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), shift);
  }
  static vec expand(const float* p, ivec index) {
    return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(_mm_loadu_ps(p)));
  }
  static void to_float(const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
    widen_scales_avx512bw(p, t, begin, count, out);
  }
};

}  // namespace

void int4_a8_rows_avx512(const Int4A8Args& a, int64_t n_begin, int64_t n_end, float* scratch) {
  int4_a8_rows<Avx512Vnni>(a, n_begin, n_end, scratch);
}

}  // namespace cpu
}  // namespace fourbit
