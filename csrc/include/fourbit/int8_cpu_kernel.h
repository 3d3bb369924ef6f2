// The CPU int8 weight-only matmul kernel body, written once against a SIMD traits type V:
//   V::W                 floats per register;  V::MR  rows of x one pass multiplies
//   V::vec               a float register
//   zero(), load(p), store(p, v), mul(a, b), fma(a, b, c) = a * b + c, broadcast(s), hsum(v)
//   load_q(p)            W int8 weights from p, sign-extended and converted to float (exact)
//   scales_to_float(p, type, begin, count, out)   count scales widened to fp32
// Included only by the per-ISA translation units csrc/cpu/int8_mm_<isa>.cpp, each compiled
// for its instruction set; every function here is a template on V, so the copies of two
// ISAs never merge. See int8_cpu.h for the math and the two schedules.
#pragma once

#include <algorithm>
#include <cstdint>

#include "fourbit/cpu_prefetch.h"
#include "fourbit/int8_cpu.h"

namespace fourbit {
namespace cpu {

// Weight rows n0 .. n0 + NR - 1 against rows m0 .. m0 + MR - 1 of x; s holds the fp32
// scales of the NR weight rows ([NR, groups]).
template <class V, int MR, int NR>
inline void int8_block(const Int8MatmulArgs& a, int64_t n0, int64_t m0, const float* s) {
  using vec = typename V::vec;
  constexpr int W = V::W;
  const int64_t k = a.k, gl = a.group_len, vector_len = gl / W * W;
  const int8_t* q[NR];
  for (int c = 0; c < NR; ++c) q[c] = a.q + (n0 + c) * k;
  const float* x[MR];
  for (int r = 0; r < MR; ++r) x[r] = a.x + (m0 + r) * k;

  // One accumulator per (row of x, weight row): MR NR independent FMA chains.
  vec acc[MR][NR];
  float tail[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = V::zero(), tail[r][c] = 0.f;

  for (int64_t g = 0, k0 = 0; g < a.groups; ++g, k0 += gl) {
    vec sv[NR];
    for (int c = 0; c < NR; ++c) sv[c] = V::broadcast(s[c * a.groups + g]);
    for (int64_t j = k0; j < k0 + vector_len; j += W) {
      vec w[NR];
      for (int c = 0; c < NR; ++c) w[c] = V::mul(V::load_q(q[c] + j), sv[c]);  // exact for 16-bit scales
      for (int r = 0; r < MR; ++r) {
        const vec xv = V::load(x[r] + j);
        for (int c = 0; c < NR; ++c) acc[r][c] = V::fma(xv, w[c], acc[r][c]);
      }
    }
    // Columns past the last whole register of a group (one group per row of any length K).
    for (int64_t j = k0 + vector_len; j < k0 + gl; ++j)
      for (int c = 0; c < NR; ++c) {
        const float w = static_cast<float>(q[c][j]) * s[c * a.groups + g];
        for (int r = 0; r < MR; ++r) tail[r][c] += x[r][j] * w;
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c)
      a.out[(m0 + r) * a.n + n0 + c] = V::hsum(acc[r][c]) + tail[r][c] + (a.bias ? a.bias[n0 + c] : 0.f);
}

template <class V, int NR>
inline void int8_rows_of_x(const Int8MatmulArgs& a, int64_t n0, const float* s) {
  int64_t m0 = 0;
  for (; m0 + V::MR <= a.m; m0 += V::MR) int8_block<V, V::MR, NR>(a, n0, m0, s);
  switch (a.m - m0) {  // the last, partial pass over the rows of x
    case 1: int8_block<V, 1, NR>(a, n0, m0, s); break;
    case 2: if constexpr (V::MR > 2) int8_block<V, 2, NR>(a, n0, m0, s); break;
    case 3: if constexpr (V::MR > 3) int8_block<V, 3, NR>(a, n0, m0, s); break;
    default: break;
  }
}

template <class V>
inline void int8_rows(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch) {
  constexpr int64_t NR = kInt8RowsPerBlock;
  // Rows kPrefetchBytes ahead are asked for in advance (cpu_prefetch.h): the head of a small
  // model is one long stream, but a layer's share of a thread may not be.
  const int64_t scale_bytes = a.groups * (a.scale_type == ScaleType::kFloat32 ? 4 : 2);
  const int64_t ahead_rows = std::max<int64_t>(NR, kPrefetchBytes / std::max<int64_t>(a.k, 1));
  for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
    const int64_t rows = n0 + NR <= n_end ? NR : n_end - n0;
    const int64_t next = n0 + ahead_rows, next_rows = std::min<int64_t>(NR, n_end - next);
    if (next_rows > 0) {
      prefetch_bytes(a.q + next * a.k, next_rows * a.k);
      prefetch_bytes(static_cast<const char*>(a.scales) + next * scale_bytes, next_rows * scale_bytes);
    }
    // The block's scales are contiguous ([N, groups] row-major): widen them once.
    V::scales_to_float(a.scales, a.scale_type, n0 * a.groups, rows * a.groups, scratch);
    if (rows == NR) {
      int8_rows_of_x<V, NR>(a, n0, scratch);
    } else {
      for (int64_t c = 0; c < rows; ++c) int8_rows_of_x<V, 1>(a, n0 + c, scratch + c * a.groups);
    }
  }
}

template <class V>
inline void int8_dequantize(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* w, float* scratch) {
  constexpr int W = V::W;
  const int64_t k = a.k, gl = a.group_len, vector_len = gl / W * W;
  for (int64_t n = n_begin; n < n_end; ++n) {
    V::scales_to_float(a.scales, a.scale_type, n * a.groups, a.groups, scratch);
    const int8_t* q = a.q + n * k;
    float* out = w + (n - n_begin) * k;
    for (int64_t g = 0, k0 = 0; g < a.groups; ++g, k0 += gl) {
      const typename V::vec sv = V::broadcast(scratch[g]);
      for (int64_t j = k0; j < k0 + vector_len; j += W) V::store(out + j, V::mul(V::load_q(q + j), sv));
      for (int64_t j = k0 + vector_len; j < k0 + gl; ++j) out[j] = static_cast<float>(q[j]) * scratch[g];
    }
  }
}

}  // namespace cpu
}  // namespace fourbit
