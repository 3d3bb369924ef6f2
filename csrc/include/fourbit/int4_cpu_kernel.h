// The CPU int4 matmul kernel body, written once against a SIMD traits type V:
//   V::W                  int32 words (= floats) per register
//   V::vec / V::ivec      float / int32 registers
//   zero(), load(p), add(a, b), fma(a, b, c) = a * b + c, broadcast(s), hsum(v)
//   load_words(p)         W words of a weight row
//   nibble(words, i)      float of nibble i of every word
//   lane_scales(p, per)   `per` consecutive scales, scale j spread over lanes [j W / per, (j + 1) W / per)
// Included only by the per-ISA translation units csrc/cpu/int4_mm_<isa>.cpp, each compiled
// for its instruction set; every function here is a template on V, so the copies of two
// ISAs never merge. See int4_cpu.h for the math and the activation layout.
#pragma once

#include <cstdint>

#include "fourbit/int4_cpu.h"

namespace fourbit {
namespace cpu {

// Rows of x handled together (MR <= 4): each unpacked weight register feeds MR multiply-adds, so
// the shift/mask/convert work is shared. 2 MR accumulators + 5 temporaries fit in 16 ymm.
// Up to this many rows of x, each weight register is unpacked once per group of MR rows
// and the scale is factored out (int4_row); beyond, rows are dequantized once into a
// small fp32 tile that every row of x reuses (tile_product).
constexpr int64_t kFactoredMaxRows = 4;
// Weight rows visited per pass over the rows of x: their packed words (8 x K/2 bytes)
// stay in L1/L2 while every group of MR rows of x streams past them.
constexpr int64_t kWeightRowsPerPass = 8;

template <class V, int MR, int NR>
inline void int4_row(const Int4MatmulArgs& a, int64_t n0, int64_t m0) {
  // Weight rows n0 .. n0 + NR - 1 against rows m0 .. m0 + MR - 1 of x.
  constexpr int W = V::W;
  const int64_t words_per_row = a.k_padded / 8;
  const int64_t full_blocks = words_per_row / W;
  const int64_t block_cols = 8 * W;

  // Independent accumulation chains: an FMA waits about 4 cycles for its accumulator, so
  // one chain per output would stall. Nibble i feeds chain i % CH; MR NR CH accumulators
  // + MR NR totals + 4 temporaries fit in 16 registers.
  constexpr int CH = MR * NR == 1 ? 4 : 2;
  typename V::vec acc[MR][NR][CH], total[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
      total[r][c] = V::zero();
      for (int h = 0; h < CH; ++h) acc[r][c][h] = V::zero();
    }

  // Multiply-add nibbles of registers [b_begin, b_end) into acc (no scale yet). Each x
  // load feeds NR FMAs, each unpacked weight register MR.
  auto accumulate = [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      typename V::ivec words[NR];
      for (int c = 0; c < NR; ++c) words[c] = V::load_words(a.qweight + (n0 + c) * words_per_row + b * W);
      const float* xb = a.xp + m0 * a.k_padded + b * block_cols;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        typename V::vec x[MR];
        for (int r = 0; r < MR; ++r) x[r] = V::load(xb + r * a.k_padded + i * W);
        for (int c = 0; c < NR; ++c) {
          const typename V::vec q = V::nibble(words[c], i);
          for (int r = 0; r < MR; ++r) acc[r][c][i % CH] = V::fma(q, x[r], acc[r][c][i % CH]);
        }
      }
    }
  };
  auto apply_scale = [&](int c, const typename V::vec& s) {
    for (int r = 0; r < MR; ++r) {
      typename V::vec sum = acc[r][c][0];
      for (int h = 1; h < CH; ++h) sum = V::add(sum, acc[r][c][h]);
      total[r][c] = V::fma(sum, s, total[r][c]);
      for (int h = 0; h < CH; ++h) acc[r][c][h] = V::zero();
    }
  };
  // Walk group by group so the inner loop has no index arithmetic. When groups > 1 the
  // group length is a power of two: a whole number of registers, or a fraction of one.
  if (a.group_len < block_cols) {  // `per` groups inside each register: lane-wise scales
    const int per = static_cast<int>(block_cols / a.group_len);
    for (int64_t b = 0; b < full_blocks; ++b) {
      accumulate(b, b + 1);
      for (int c = 0; c < NR; ++c) apply_scale(c, V::lane_scales(a.scales + (n0 + c) * a.groups + b * per, per));
    }
  } else {
    const int64_t per_group = a.groups == 1 ? full_blocks : a.group_len / block_cols;
    for (int64_t b = 0, g = 0; b < full_blocks; b += per_group, ++g) {
      accumulate(b, b + per_group < full_blocks ? b + per_group : full_blocks);
      for (int c = 0; c < NR; ++c) apply_scale(c, V::broadcast(a.scales[(n0 + c) * a.groups + g]));
    }
  }

  for (int c = 0; c < NR; ++c) {
    const int64_t n = n0 + c;
    const int32_t* words_row = a.qweight + n * words_per_row;
    const float* s_row = a.scales + n * a.groups;
    const float* m_row = a.offsets + n * a.groups;
    for (int r = 0; r < MR; ++r) {
      float result = V::hsum(total[r][c]);
      // Words past the last full register, in natural column order, one word at a time.
      const float* xr = a.xp + (m0 + r) * a.k_padded;
      for (int64_t j = full_blocks * W; j < words_per_row; ++j) {
        const uint32_t word = static_cast<uint32_t>(words_row[j]);
        float dot = 0.f;
        for (int i = 0; i < 8; ++i) dot += static_cast<float>((word >> (4 * i)) & 0xF) * xr[j * 8 + i];
        result += s_row[j * 8 / a.group_len] * dot;
      }
      // The offsets: sum over groups of m[g] * (sum of x over group g).
      const float* xs = a.xsum + (m0 + r) * a.groups;
      for (int64_t g = 0; g < a.groups; ++g) result += m_row[g] * xs[g];
      a.out[(m0 + r) * a.n + n] = result + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

// ---- Larger M: dequantize a few weight rows once, then a register-blocked product ----

// Weight rows per tile, and rows of x per micro-tile: 3 x 4 accumulators + 3 x + 1 w
// registers fill the 16 ymm registers; each x load feeds 4 FMAs, each w load 3.
constexpr int kTileRows = 4;
constexpr int kTileRowsOfX = 3;

// w = q * s + m for row n, in the same permuted column order as xp (int4_cpu.h).
template <class V>
inline void dequantize_row(const Int4MatmulArgs& a, int64_t n, float* dst) {
  constexpr int W = V::W;
  const int32_t* words_row = a.qweight + n * (a.k_padded / 8);
  const float* s_row = a.scales + n * a.groups;
  const float* m_row = a.offsets + n * a.groups;
  const int64_t full_blocks = (a.k_padded / 8) / W, block_cols = 8 * W;
  for (int64_t b = 0; b < full_blocks; ++b) {
    typename V::vec s, m;
    if (a.group_len < block_cols) {
      const int per = static_cast<int>(block_cols / a.group_len);
      s = V::lane_scales(s_row + b * per, per);
      m = V::lane_scales(m_row + b * per, per);
    } else {
      const int64_t g = b * block_cols / a.group_len;  // once per register, not per FMA
      s = V::broadcast(s_row[g]);
      m = V::broadcast(m_row[g]);
    }
    const typename V::ivec words = V::load_words(words_row + b * W);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) V::store(dst + b * block_cols + i * W, V::fma(V::nibble(words, i), s, m));
  }
  for (int64_t j = full_blocks * W; j < a.k_padded / 8; ++j) {
    const uint32_t word = static_cast<uint32_t>(words_row[j]);
    const int64_t g = j * 8 / a.group_len;
    for (int i = 0; i < 8; ++i) dst[j * 8 + i] = static_cast<float>((word >> (4 * i)) & 0xF) * s_row[g] + m_row[g];
  }
}

// out[m0 + r, n0 + c] for r < MR, c < NR: dot products along K of xp rows and tile rows.
// Padded columns hold x = 0, so the offsets stored there never count.
template <class V, int MR, int NR>
inline void tile_product(const Int4MatmulArgs& a, const float* tile, int64_t n0, int64_t m0) {
  constexpr int W = V::W;
  const int64_t vecs = a.k_padded / W;
  typename V::vec acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = V::zero();
  const float* x0 = a.xp + m0 * a.k_padded;
  for (int64_t v = 0; v < vecs; ++v) {
    typename V::vec x[MR];
    for (int r = 0; r < MR; ++r) x[r] = V::load(x0 + r * a.k_padded + v * W);
#pragma GCC unroll 4
    for (int c = 0; c < NR; ++c) {
      const typename V::vec w = V::load(tile + c * a.k_padded + v * W);
      for (int r = 0; r < MR; ++r) acc[r][c] = V::fma(x[r], w, acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
      float sum = V::hsum(acc[r][c]);
      for (int64_t k = vecs * W; k < a.k_padded; ++k) sum += x0[r * a.k_padded + k] * tile[c * a.k_padded + k];
      a.out[(m0 + r) * a.n + n0 + c] = sum + (a.bias ? a.bias[n0 + c] : 0.f);
    }
}

template <class V, int NR>
inline void tile_products(const Int4MatmulArgs& a, const float* tile, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + kTileRowsOfX <= a.m; m0 += kTileRowsOfX) tile_product<V, kTileRowsOfX, NR>(a, tile, n0, m0);
  if (a.m - m0 == 2) tile_product<V, 2, NR>(a, tile, n0, m0);
  if (a.m - m0 == 1) tile_product<V, 1, NR>(a, tile, n0, m0);
}

// Rows [n_begin, n_end) for any M. `scratch` holds kTileRows x k_padded floats.
template <class V>
inline void int4_rows(const Int4MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch) {
  if (a.m <= kFactoredMaxRows) {
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kWeightRowsPerPass) {
      const int64_t n1 = n0 + kWeightRowsPerPass < n_end ? n0 + kWeightRowsPerPass : n_end;
      int64_t m0 = 0;
      for (; m0 + 4 <= a.m; m0 += 4)
        for (int64_t n = n0; n < n1; ++n) int4_row<V, 4, 1>(a, n, m0);
      const int64_t rest = a.m - m0;
      int64_t n = n0;
      if (rest == 1)  // decode: two weight rows at a time share each x load
        for (; n + 2 <= n1; n += 2) int4_row<V, 1, 2>(a, n, m0);
      for (; n < n1; ++n) {
        if (rest == 3) int4_row<V, 3, 1>(a, n, m0);
        if (rest == 2) int4_row<V, 2, 1>(a, n, m0);
        if (rest == 1) int4_row<V, 1, 1>(a, n, m0);
      }
    }
    return;
  }
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileRows) {
    const int64_t rows = n_end - n0 < kTileRows ? n_end - n0 : kTileRows;
    for (int64_t c = 0; c < rows; ++c) dequantize_row<V>(a, n0 + c, scratch + c * a.k_padded);
    if (rows == 4) tile_products<V, 4>(a, scratch, n0);
    if (rows == 3) tile_products<V, 3>(a, scratch, n0);
    if (rows == 2) tile_products<V, 2>(a, scratch, n0);
    if (rows == 1) tile_products<V, 1>(a, scratch, n0);
  }
}

}  // namespace cpu
}  // namespace fourbit
