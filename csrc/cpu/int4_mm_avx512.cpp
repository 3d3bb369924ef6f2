// AVX-512 CPU int4 matmul: 16 words (128 columns) per register. Compiled for AVX-512F/DQ
// in this translation unit only, chosen at run time when the CPU has it (int4_mm.cpp).
#pragma GCC target("avx2,avx512f,avx512dq,fma,f16c")
// GCC 12 warns about the deliberately undefined upper lanes inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "fourbit/cpu_widen.h"
#include "fourbit/int4_cpu_avx2.h"
#include "fourbit/int4_cpu_kernel.h"
#include "fourbit/int4_cpu_transpose8.h"

namespace fourbit {
namespace cpu {
namespace {

struct Avx512 {
  static constexpr int W = 16;
  using Half = Avx2;  // the 8-word block after the last full register (int4_cpu.h)
  using vec = __m512;
  using ivec = __m512i;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static vec broadcast(float s) { return _mm512_set1_ps(s); }
  static ivec load_words(const int32_t* p) { return _mm512_loadu_si512(p); }
  // vpermps reads only the low 4 bits of each index lane, so after the shift a lookup in
  // a 16-entry table both masks the nibble and maps it: to float(q) in `nibble`, or straight
  // to the dequantized weight q s + m in `weights` (shift + lookup, no mask, no convert).
  static ivec shifted(ivec w, int i) { return i == 0 ? w : _mm512_srli_epi32(w, 4 * i); }
  static vec iota() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static vec nibble(ivec w, int i) { return _mm512_permutexvar_ps(shifted(w, i), iota()); }
  // One group's table: entry q = fp32 q s + m (one rounding, as the reference computes it).
  using group_t = vec;
  static group_t group(float s, float m) { return _mm512_fmadd_ps(iota(), _mm512_set1_ps(s), _mm512_set1_ps(m)); }
  static vec weights(ivec w, int i, group_t table) { return _mm512_permutexvar_ps(shifted(w, i), table); }
  // `per` (2 or 4) groups in a 128-column register: quarter q of the lanes (4 words,
  // 32 columns) belongs to group q * per / 4. One load of the `per` scales and one vpermps
  // spread them (four broadcasts and three inserts took three more shuffle-port operations
  // per register and row, next to the 8 of the nibble lookups).
  static vec lane_scales(const float* p, int per) {
    const __m128 loaded = per == 4 ? _mm_loadu_ps(p) : _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m512i lanes = per == 4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                                   : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(loaded));
  }
  static ivec row_offsets(int first, int64_t last, int64_t stride) {
    const __m512i rows = _mm512_add_epi32(_mm512_set1_epi32(first),
                                          _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    return _mm512_mullo_epi32(_mm512_min_epi32(rows, _mm512_set1_epi32(static_cast<int>(last))),
                              _mm512_set1_epi32(static_cast<int>(stride)));
  }
  static ivec gather_words(const int32_t* p, ivec idx) { return _mm512_i32gather_epi32(idx, p, 4); }
  static vec gather(const float* p, ivec idx) { return _mm512_i32gather_ps(idx, p, 4); }
  // out[t] lane l = rows[l][j + t] for 16 rows: the 8 x 8 word transpose of rows 0-7 and
  // of rows 8-15 (int4_cpu_transpose8.h), the two halves then joined (lanes 0-7 = rows 0-7).
  static void load_transposed(const int32_t* const* rows, int64_t j, ivec out[8]) {
    __m256i lo[8], hi[8];
    transpose_words_8x8(rows, j, lo);
    transpose_words_8x8(rows + 8, j, hi);
    for (int t = 0; t < 8; ++t) out[t] = _mm512_inserti64x4(_mm512_castsi256_si512(lo[t]), hi[t], 1);
  }
  static void widen(const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
    widen_scales_avx512(p, t, begin, count, out);
  }
  static float hsum(vec v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace

void int4_matmul_rows_avx512(const Int4MatmulArgs& a, bool dot, int64_t n_begin, int64_t n_end, float* scratch) {
  int4_rows<Avx512>(a, dot, n_begin, n_end, scratch);
}

}  // namespace cpu
}  // namespace fourbit
