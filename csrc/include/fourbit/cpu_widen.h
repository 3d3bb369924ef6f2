// fp16 / bf16 / fp32 scales widened to fp32, one vectorized loop per instruction set: the
// int8 and the W4A8 int4 kernels widen a block of weight rows' scales (and offsets) at a time.
// widen_scales_avx512bw needs AVX-512 BW and VL besides F (its masked tail): only the W4A8
// kernel, whose AVX-512 path requires them, calls it. Each function carries its own target attribute, so any translation unit may include this
// header; only the per-ISA ones (compiled for that ISA or wider) call them.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "fourbit/int8_cpu.h"  // ScaleType, int8_scales_to_float_scalar

namespace fourbit {
namespace cpu {

__attribute__((target("avx2,f16c"))) static inline void widen_scales_avx2(const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
  if (t == ScaleType::kFloat32) return int8_scales_to_float_scalar(p, t, begin, count, out);
  const uint16_t* h = static_cast<const uint16_t*>(p) + begin;
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i));
    _mm256_storeu_ps(out + i, t == ScaleType::kFloat16
                                  ? _mm256_cvtph_ps(v)
                                  : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)));
  }
  int8_scales_to_float_scalar(p, t, begin + i, count - i, out + i);
}

__attribute__((target("avx2,f16c,avx512f"))) static inline void widen_scales_avx512(const void* p, ScaleType t,
                                                                                  int64_t begin, int64_t count,
                                                                                  float* out) {
  if (t == ScaleType::kFloat32) return int8_scales_to_float_scalar(p, t, begin, count, out);
  const uint16_t* h = static_cast<const uint16_t*>(p) + begin;
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i));
    _mm512_storeu_ps(out + i, t == ScaleType::kFloat16
                                  ? _mm512_cvtph_ps(v)
                                  : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
  }
  int8_scales_to_float_scalar(p, t, begin + i, count - i, out + i);
}

__attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vl"))) static inline void widen_scales_avx512bw(
    const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
  if (t == ScaleType::kFloat32) return int8_scales_to_float_scalar(p, t, begin, count, out);
  const uint16_t* h = static_cast<const uint16_t*>(p) + begin;
  // The last count % 16 under a mask: a short row (SmolLM2's 18 groups) pays no scalar tail.
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 live = count - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (count - i)) - 1);
    const __m256i v = _mm256_maskz_loadu_epi16(live, h + i);
    _mm512_mask_storeu_ps(out + i, live, t == ScaleType::kFloat16
                                             ? _mm512_cvtph_ps(v)
                                             : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
  }
}

}  // namespace cpu
}  // namespace fourbit
