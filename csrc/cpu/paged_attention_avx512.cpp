// AVX-512 CPU paged attention: 16 floats per register, tiles of 32 keys. Compiled for
// AVX-512F/DQ in this translation unit only, chosen at run time when the CPU has it
// (paged_attention.cpp). bf16 widens by a 16-bit shift (exact), fp16 by vcvtph2ps.
#pragma GCC target("avx2,avx512f,avx512dq,fma,f16c")
// GCC 12 warns about the deliberately undefined upper lanes inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "fourbit/paged_attention_cpu_kernel.h"

namespace fourbit {
namespace cpu {
namespace {

struct Avx512 {
  static constexpr int W = 16;
  // 8 rows x 2 vectors of scores (or of output) = 16 accumulators of the 32 registers.
  static constexpr int kRows = 8;
  using vec = __m512;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static vec broadcast(float s) { return _mm512_set1_ps(s); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
  static float reduce_max(vec v) { return _mm512_reduce_max_ps(v); }
  static float reduce_add(vec v) { return _mm512_reduce_add_ps(v); }
  static vec keep_first(vec v, int k, float fill) {
    const __mmask16 keep = k <= 0 ? 0 : k >= W ? 0xffff : static_cast<__mmask16>((1u << k) - 1);
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), keep, v);
  }
  // 2^x = 2^n 2^f, n = round(x), f in [-0.5, 0.5]: a degree-6 polynomial (least squares on
  // Chebyshev nodes, max error 0.9 ulp in fp32), scaled by vscalefps, which also gives exact
  // 0 below 2^-149. The clamp keeps NaN (vmaxps returns its second operand on NaN).
  static vec exp2(vec x) {
    x = _mm512_min_ps(_mm512_set1_ps(128.0f), _mm512_max_ps(_mm512_set1_ps(-160.0f), x));
    const vec n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vec f = _mm512_sub_ps(x, n);
    vec p = _mm512_set1_ps(1.546973198e-04f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.340043216e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618025603e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550327214e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265121e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472067e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
  }
  static vec widen(const float* p) { return _mm512_loadu_ps(p); }
  static vec widen(const Bf16* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  static vec widen(const Fp16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // 16 x 16 transpose: 32-bit interleave of row pairs, 64-bit shuffle within 128-bit lanes
  // (b[4 q + c] lane L = rows 4 q .. 4 q + 3 of column 4 L + c), then two 128-bit lane
  // shuffles gather column 4 L + c from the four row quads.
  template <class T>
  static void transpose(const T* const* rows, int64_t d0, float* dst, int64_t stride) {
    vec r[16], a[16], b[16];
    for (int i = 0; i < 16; ++i) r[i] = widen(rows[i] + d0);
    for (int i = 0; i < 8; ++i) {
      a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 4; ++q) {
      const vec* aa = a + 4 * q;
      b[4 * q + 0] = _mm512_shuffle_ps(aa[0], aa[2], 0x44);
      b[4 * q + 1] = _mm512_shuffle_ps(aa[0], aa[2], 0xEE);
      b[4 * q + 2] = _mm512_shuffle_ps(aa[1], aa[3], 0x44);
      b[4 * q + 3] = _mm512_shuffle_ps(aa[1], aa[3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      const vec e0 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0x88), e1 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0xDD);
      const vec f0 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0x88);
      const vec f1 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0xDD);
      _mm512_storeu_ps(dst + (c + 0) * stride, _mm512_shuffle_f32x4(e0, f0, 0x88));
      _mm512_storeu_ps(dst + (c + 4) * stride, _mm512_shuffle_f32x4(e1, f1, 0x88));
      _mm512_storeu_ps(dst + (c + 8) * stride, _mm512_shuffle_f32x4(e0, f0, 0xDD));
      _mm512_storeu_ps(dst + (c + 12) * stride, _mm512_shuffle_f32x4(e1, f1, 0xDD));
    }
  }
};

}  // namespace

void attend_block_avx512(const PagedAttentionArgs& a, const AttentionBlock& block, float* scratch) {
  attend_block_impl<Avx512>(a, block, scratch);
}

}  // namespace cpu
}  // namespace fourbit
