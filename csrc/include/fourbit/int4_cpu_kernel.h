// The CPU int4 matmul kernel body, written once against a SIMD traits type V:
//   V::W                  int32 words (= floats) per register
//   V::Half               traits of the half-width block (int4_cpu.h), or void
//   V::vec / V::ivec      float / int32 registers
//   zero(), load(p), add(a, b), fma(a, b, c) = a * b + c, broadcast(s), hsum(v)
//   load_words(p)         W words of a weight row
//   nibble(words, i)      float of nibble i of every word
//   group_t, group(s, m)  what dequantizes one group (scale s, offset m), made once per group
//   weights(words, i, g)  fp32 q s + m of nibble i of every word, all in group g
//   lane_scales(p, per)   `per` consecutive scales, scale j spread over lanes [j W / per, (j + 1) W / per)
//   store(p, v)           W floats
//   widen(p, type, begin, count, out)   count scales (fp32 / fp16 / bf16) from p + begin as fp32
//   row_offsets(first, last, stride)   int32 lane l = min(first + l, last) * stride
//   gather_words(p, idx) / gather(p, idx)   lane l = p[idx[l]] (int32 words / floats)
//   load_transposed(rows, j, out[8])   out[t] lane l = rows[l][j + t]  (W rows, 8 words each)
// Included only by the per-ISA translation units csrc/cpu/int4_mm_<isa>.cpp, each compiled
// for its instruction set; every function here is a template on V, so the copies of two
// ISAs never merge. See int4_cpu.h for the math and the activation layout.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fourbit/cpu_prefetch.h"
#include "fourbit/int4_cpu.h"

namespace fourbit {
namespace cpu {

// ---- Few rows of x (decode): dot-product schedule, int4_cpu.h (1) ----
// Up to kDotMaxRows (int4_cpu.h) rows of x, each weight register is unpacked and dequantized
// once per group of MR <= 4 rows of x and feeds MR multiply-adds.
// Registers of weights summed into the per-lane accumulators before those are added into the
// running totals (and at least at every group boundary): two-level summation, so no fp32
// chain is longer than about 8 / CH x this + K / (8 W x this) terms (the reference's BLAS
// blocks its sums in the same way).
constexpr int64_t kRegistersPerPartialSum = 4;

template <class V, int MR, int NR>
inline void int4_row(const Int4MatmulArgs& a, const float* scales, const float* offsets, int64_t n0, int64_t m0) {
  // Weight rows n0 .. n0 + NR - 1 against rows m0 .. m0 + MR - 1 of x; scales / offsets: fp32
  // [NR, groups], those rows' own.
  using vec = typename V::vec;
  using ivec = typename V::ivec;
  constexpr int W = V::W;
  const int64_t words_per_row = a.k_padded / 8;
  const int64_t full_blocks = words_per_row / W;
  const int64_t block_cols = 8 * W;

  // Independent accumulation chains: an FMA waits about 4 cycles for its accumulator, so
  // one chain per output would stall. Nibble i feeds chain i % CH; MR NR CH accumulators
  // + MR NR totals + NR groups' dequantization constants + temporaries fit in 16 registers.
  constexpr int CH = MR * NR == 1 ? 4 : 2;
  vec acc[MR][NR][CH], total[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
      total[r][c] = V::zero();
      for (int h = 0; h < CH; ++h) acc[r][c][h] = V::zero();
    }

  // Multiply-add registers [b_begin, b_end) into acc: weights(words, i, c) dequantizes
  // nibble i of every word of weight row n0 + c. Each x load feeds NR FMAs, each
  // dequantized weight register MR.
  auto accumulate = [&](int64_t b_begin, int64_t b_end, const auto& weights) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      ivec words[NR];
      for (int c = 0; c < NR; ++c) words[c] = V::load_words(a.qweight + (n0 + c) * words_per_row + b * W);
      const float* xb = a.xp + m0 * a.k_padded + b * block_cols;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        vec x[MR];
        for (int r = 0; r < MR; ++r) x[r] = V::load(xb + r * a.k_padded + i * W);
        for (int c = 0; c < NR; ++c) {
          const vec w = weights(words[c], i, c);
          for (int r = 0; r < MR; ++r) acc[r][c][i % CH] = V::fma(x[r], w, acc[r][c][i % CH]);
        }
      }
    }
  };
  auto add_partial_sums = [&]() {
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NR; ++c) {
        vec sum = acc[r][c][0];
        for (int h = 1; h < CH; ++h) sum = V::add(sum, acc[r][c][h]);
        total[r][c] = V::add(total[r][c], sum);
        for (int h = 0; h < CH; ++h) acc[r][c][h] = V::zero();
      }
  };
  // Walk group by group so the inner loop has no index arithmetic. When groups > 1 the
  // group length is a power of two: a whole number of registers, or a fraction of one.
  if (a.group_len < block_cols) {
    // `per` groups inside each register: each lane's scale and offset (V::lane_scales), and
    // the generic dequantization, one FMA per weight.
    const int per = static_cast<int>(block_cols / a.group_len);
    for (int64_t b0 = 0; b0 < full_blocks; b0 += kRegistersPerPartialSum) {
      const int64_t b1 = b0 + kRegistersPerPartialSum < full_blocks ? b0 + kRegistersPerPartialSum : full_blocks;
      for (int64_t b = b0; b < b1; ++b) {
        vec s[NR], m[NR];
        for (int c = 0; c < NR; ++c) {
          s[c] = V::lane_scales(scales + c * a.groups + b * per, per);
          m[c] = V::lane_scales(offsets + c * a.groups + b * per, per);
        }
        accumulate(b, b + 1, [&](const ivec& words, int i, int c) { return V::fma(V::nibble(words, i), s[c], m[c]); });
      }
      add_partial_sums();
    }
  } else {
    // Whole registers per group: the group's constants (V::group: on AVX-512 its table of
    // the 16 weights q s + m) are made once per group, V::weights dequantizes with them.
    const int64_t per_group = a.groups == 1 ? full_blocks : a.group_len / block_cols;
    for (int64_t b0 = 0, g = 0; b0 < full_blocks; b0 += per_group, ++g) {
      const int64_t group_end = b0 + per_group < full_blocks ? b0 + per_group : full_blocks;
      typename V::group_t grp[NR];
      for (int c = 0; c < NR; ++c) grp[c] = V::group(scales[c * a.groups + g], offsets[c * a.groups + g]);
      for (int64_t b = b0; b < group_end; b += kRegistersPerPartialSum) {
        accumulate(b, b + kRegistersPerPartialSum < group_end ? b + kRegistersPerPartialSum : group_end,
                   [&](const ivec& words, int i, int c) { return V::weights(words, i, grp[c]); });
        add_partial_sums();
      }
    }
  }

  // The half-width block (AVX-512: 8 words on the AVX2 traits), summed on its own. It covers
  // two groups of 32 columns (lanes 0-3 and 4-7), or lies inside one group.
  const int64_t half_begin = full_blocks * W;
  float half_sum[MR][NR] = {};
  if constexpr (!std::is_void_v<typename V::Half>) {
    using H = typename V::Half;
    if (int4_half_block_words(W, words_per_row) == H::W) {
      const int64_t col0 = 8 * half_begin;
      typename H::ivec words[NR];
      typename H::vec s[NR], m[NR], acc_h[MR][NR][2];
      for (int c = 0; c < NR; ++c) {
        words[c] = H::load_words(a.qweight + (n0 + c) * words_per_row + half_begin);
        const float* s_row = scales + c * a.groups;
        const float* m_row = offsets + c * a.groups;
        if (a.group_len == 32) {
          s[c] = H::lane_scales(s_row + col0 / 32, 2);
          m[c] = H::lane_scales(m_row + col0 / 32, 2);
        } else {
          s[c] = H::broadcast(s_row[col0 / a.group_len]);
          m[c] = H::broadcast(m_row[col0 / a.group_len]);
        }
        for (int r = 0; r < MR; ++r) acc_h[r][c][0] = acc_h[r][c][1] = H::zero();
      }
      const float* xb = a.xp + m0 * a.k_padded + col0;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        typename H::vec x[MR];
        for (int r = 0; r < MR; ++r) x[r] = H::load(xb + r * a.k_padded + i * H::W);
        for (int c = 0; c < NR; ++c) {
          const typename H::vec w = H::fma(H::nibble(words[c], i), s[c], m[c]);
          for (int r = 0; r < MR; ++r) acc_h[r][c][i % 2] = H::fma(x[r], w, acc_h[r][c][i % 2]);
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NR; ++c) half_sum[r][c] = H::hsum(H::add(acc_h[r][c][0], acc_h[r][c][1]));
    }
  }
  const int64_t tail_begin = half_begin + int4_half_block_words(W, words_per_row);

  for (int c = 0; c < NR; ++c) {
    const int64_t n = n0 + c;
    const int32_t* words_row = a.qweight + n * words_per_row;
    const float* s_row = scales + c * a.groups;
    const float* m_row = offsets + c * a.groups;
    for (int r = 0; r < MR; ++r) {
      // Words past the last full register (and half block), in natural column order, one
      // word at a time.
      const float* xr = a.xp + (m0 + r) * a.k_padded;
      float tail = 0.f;
      for (int64_t j = tail_begin; j < words_per_row; ++j) {
        const uint32_t word = static_cast<uint32_t>(words_row[j]);
        const float s = s_row[j * 8 / a.group_len], m = m_row[j * 8 / a.group_len];
        for (int i = 0; i < 8; ++i) tail += xr[j * 8 + i] * (static_cast<float>((word >> (4 * i)) & 0xF) * s + m);
      }
      a.out[(m0 + r) * a.n + n] = V::hsum(total[r][c]) + half_sum[r][c] + tail + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

// ---- Larger M: blocked GEMM over dequantized panels ----
//
// Past a few rows of x the multiply-adds dominate, and the dot-product schedule (x along
// K in registers) would re-read every row of x once per weight row. Instead, as in a BLAS GEMM:
//   * a panel of NR = 2 W weight rows x KC columns is dequantized ONCE into L1, transposed
//     to [k][NR] so one k gives two registers of weights for NR consecutive outputs;
//   * a 6 x NR micro-kernel broadcasts x[m, k] for 6 rows of x and multiply-adds it with
//     those two registers: 12 accumulators + 2 weights + 1 broadcast = 15 of the 16 ymm, and
//     each k costs 2 L1 loads + 6 broadcasts for 12 FMAs (the FMA ports are the bottleneck,
//     as in an fp32 GEMM);
//   * loops run KC chunk -> panel -> rows of x, so the KC columns of all rows of x (at most
//     kGemmRowsOfXPerBlock x KC floats, <= 192 KiB) stay in L2 while the thread walks its
//     panels, each weight is dequantized once per block of rows of x, and partial sums are
//     added into out once per KC chunk (a cheap vector read-modify-write: rows of out are
//     contiguous in n).
// x is read in natural order (no permutation), and k stops at K, so the padding columns of
// the weights are never touched by the products.
constexpr int kGemmMicroRows = 6;
// Rows of x per outer block: bounds the L2 footprint of a KC chunk of x (192 x 256 x 4 =
// 192 KiB on AVX2). A multiple of kGemmMicroRows.
constexpr int64_t kGemmRowsOfXPerBlock = 192;

// panel[(k - k0) * NR + c] = w[n0 + c, k] for c < NR, k in [k0, k1) rounded up to a word.
// Rows past `rows` repeat the last valid row (so no read goes past the tensors); their
// outputs are never stored.
//
// The panel wants one k for W consecutive outputs per register, i.e. the weights transposed.
// With the packing, that is a transpose of WORDS, not of nibbles: if lane l of a register
// holds word j of row l, nibble i of every lane is column 8 j + i of W rows. So 8 words of
// each of W rows are loaded contiguously (one 32-byte load per row) and transposed in
// registers (V::load_transposed, 8 x 8 words on AVX2), after which every nibble is an
// unpack (V::nibble) + FMA + store, as in the dot-product schedule. A word tail (K_padded
// not a multiple of 64 columns inside this panel) gathers one word of W rows at a time.
//
// Memory order: the caller walks panels along n inside a KC chunk, so each panel reads only
// KC / 2 bytes of each of its rows, scattered far apart; the hardware prefetcher does not
// follow that, so the words of the NEXT panel are prefetched here, a whole panel's
// micro-kernels ahead of their use.
template <class V>
inline void dequantize_panel(const Int4MatmulArgs& a, int64_t n0, int64_t rows, int64_t n_end, int64_t k0,
                             int64_t k1, float* panel) {
  constexpr int W = V::W;
  constexpr int NR = 2 * W;
  const int64_t words_per_row = a.k_padded / 8;
  const int64_t j_begin = k0 / 8, j_end = (k1 + 7) / 8;
  // Next panel: rows n0 + NR .. n0 + 2 NR - 1, the same words; one prefetch per 64-byte line.
  for (int64_t n = n0 + NR; n < n0 + 2 * NR && n < n_end; ++n)
    for (int64_t j = j_begin; j < j_end; j += 16) __builtin_prefetch(a.qweight + n * words_per_row + j);

  const int32_t* w_base = a.qweight + n0 * words_per_row;
  // fp32 here: the launcher widens the scales for the blocked GEMM (int4_cpu.h).
  const float* s_base = static_cast<const float*>(a.scales) + n0 * a.groups;
  const float* m_base = static_cast<const float*>(a.offsets) + n0 * a.groups;
  for (int h = 0; h < 2; ++h) {
    const int32_t* row_ptr[W];
    for (int l = 0; l < W; ++l) row_ptr[l] = w_base + (h * W + l < rows ? h * W + l : rows - 1) * words_per_row;
    const typename V::ivec g_idx = V::row_offsets(h * W, rows - 1, a.groups);
    // Groups are whole words. Track the word where the next group starts instead of
    // dividing per word (a 64-bit division costs as much as dequantizing the word).
    const int64_t words_per_group = a.group_len / 8;
    int64_t g = j_begin / words_per_group, next_group_word = -1;
    typename V::vec s = V::zero(), m = V::zero();
    // Nibbles of one word register -> 8 consecutive k of the panel.
    auto emit = [&](const typename V::ivec& words, int64_t j) {
      if (j >= next_group_word) {
        if (next_group_word >= 0) ++g;
        s = V::gather(s_base + g, g_idx);
        m = V::gather(m_base + g, g_idx);
        next_group_word = (g + 1) * words_per_group;
      }
      float* dst = panel + (8 * j - k0) * NR + h * W;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) V::store(dst + i * NR, V::fma(V::nibble(words, i), s, m));
    };
    int64_t j = j_begin;
    for (; j + 8 <= j_end; j += 8) {
      typename V::ivec words[8];
      V::load_transposed(row_ptr, j, words);
      for (int t = 0; t < 8; ++t) emit(words[t], j + t);
    }
    const typename V::ivec w_idx = V::row_offsets(h * W, rows - 1, words_per_row);
    for (; j < j_end; ++j) emit(V::gather_words(w_base + j, w_idx), j);
  }
}

// out[m0 + r, n0 + c] (+)= sum_{k < kc} x[m0 + r, k0 + k] * panel[k][c], r < MR, c < cols.
// The first KC chunk stores (with the bias), later ones accumulate.
template <class V, int MR>
inline void gemm_micro(const Int4MatmulArgs& a, const float* panel, int64_t m0, int64_t n0, int64_t cols,
                       int64_t k0, int64_t kc) {
  constexpr int W = V::W;
  constexpr int NR = 2 * W;
  typename V::vec acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = V::zero();
  const float* x0 = a.x + m0 * a.k + k0;
  for (int64_t k = 0; k < kc; ++k) {
    const typename V::vec w0 = V::load(panel + k * NR);
    const typename V::vec w1 = V::load(panel + k * NR + W);
    for (int r = 0; r < MR; ++r) {
      const typename V::vec xb = V::broadcast(x0[r * a.k + k]);
      acc[r][0] = V::fma(xb, w0, acc[r][0]);
      acc[r][1] = V::fma(xb, w1, acc[r][1]);
    }
  }
  const bool first = k0 == 0;
  for (int r = 0; r < MR; ++r) {
    float* o = a.out + (m0 + r) * a.n + n0;
    if (cols == NR) {
      typename V::vec lo = acc[r][0], hi = acc[r][1];
      if (!first) {
        lo = V::add(lo, V::load(o));
        hi = V::add(hi, V::load(o + W));
      } else if (a.bias != nullptr) {
        lo = V::add(lo, V::load(a.bias + n0));
        hi = V::add(hi, V::load(a.bias + n0 + W));
      }
      V::store(o, lo);
      V::store(o + W, hi);
    } else {
      float tmp[NR];
      V::store(tmp, acc[r][0]);
      V::store(tmp + W, acc[r][1]);
      for (int64_t c = 0; c < cols; ++c)
        o[c] = tmp[c] + (!first ? o[c] : a.bias != nullptr ? a.bias[n0 + c] : 0.f);
    }
  }
}

template <class V>
inline void gemm_rows(const Int4MatmulArgs& a, int64_t n_begin, int64_t n_end, float* panel) {
  constexpr int64_t NR = 2 * V::W;
  const int64_t kc_max = int4_panel_cols(V::W);
  if (a.k == 0) {  // no products: out = bias
    for (int64_t r = 0; r < a.m; ++r)
      for (int64_t n = n_begin; n < n_end; ++n) a.out[r * a.n + n] = a.bias != nullptr ? a.bias[n] : 0.f;
    return;
  }
  for (int64_t mb = 0; mb < a.m; mb += kGemmRowsOfXPerBlock) {
    const int64_t mb_end = mb + kGemmRowsOfXPerBlock < a.m ? mb + kGemmRowsOfXPerBlock : a.m;
    for (int64_t k0 = 0; k0 < a.k; k0 += kc_max) {
      const int64_t kc = a.k - k0 < kc_max ? a.k - k0 : kc_max;
      for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
        const int64_t cols = n_end - n0 < NR ? n_end - n0 : NR;
        dequantize_panel<V>(a, n0, cols, n_end, k0, k0 + kc, panel);
        int64_t m0 = mb;
        for (; m0 + kGemmMicroRows <= mb_end; m0 += kGemmMicroRows)
          gemm_micro<V, kGemmMicroRows>(a, panel, m0, n0, cols, k0, kc);
        switch (mb_end - m0) {
          case 5: gemm_micro<V, 5>(a, panel, m0, n0, cols, k0, kc); break;
          case 4: gemm_micro<V, 4>(a, panel, m0, n0, cols, k0, kc); break;
          case 3: gemm_micro<V, 3>(a, panel, m0, n0, cols, k0, kc); break;
          case 2: gemm_micro<V, 2>(a, panel, m0, n0, cols, k0, kc); break;
          case 1: gemm_micro<V, 1>(a, panel, m0, n0, cols, k0, kc); break;
          default: break;
        }
      }
    }
  }
}

template <class V>
inline void dot_rows(const Int4MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch) {
  // The pass kPrefetchBytes of weights ahead is asked for in advance (cpu_prefetch.h).
  const int64_t row_bytes = a.k_padded / 2;
  const int64_t scale_bytes = a.groups * (a.scale_type == ScaleType::kFloat32 ? 4 : 2);
  const int64_t offset_bytes = a.groups * (a.offset_type == ScaleType::kFloat32 ? 4 : 2);
  const int64_t ahead = std::max<int64_t>(kWeightRowsPerPass, kPrefetchBytes / row_bytes);
  // The pass's scales and offsets as fp32: in place, or widened into scratch.
  auto pass_rows = [&](const void* p, ScaleType t, int64_t n0, int64_t rows, float* buf) -> const float* {
    if (t == ScaleType::kFloat32) return static_cast<const float*>(p) + n0 * a.groups;
    V::widen(p, t, n0 * a.groups, rows * a.groups, buf);
    return buf;
  };
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kWeightRowsPerPass) {
    const int64_t n1 = n0 + kWeightRowsPerPass < n_end ? n0 + kWeightRowsPerPass : n_end;
    const int64_t next = n0 + ahead, next_rows = std::min<int64_t>(kWeightRowsPerPass, n_end - next);
    if (next_rows > 0) {
      prefetch_bytes(a.qweight + next * (row_bytes / 4), next_rows * row_bytes);
      prefetch_bytes(static_cast<const char*>(a.scales) + next * scale_bytes, next_rows * scale_bytes);
      prefetch_bytes(static_cast<const char*>(a.offsets) + next * offset_bytes, next_rows * offset_bytes);
    }
    const float* s = pass_rows(a.scales, a.scale_type, n0, n1 - n0, scratch);
    const float* o = pass_rows(a.offsets, a.offset_type, n0, n1 - n0, scratch + kWeightRowsPerPass * a.groups);
    int64_t m0 = 0;
    for (; m0 + 4 <= a.m; m0 += 4)
      for (int64_t n = n0; n < n1; ++n) int4_row<V, 4, 1>(a, s + (n - n0) * a.groups, o + (n - n0) * a.groups, n, m0);
    const int64_t rest = a.m - m0;
    int64_t n = n0;
    if (rest == 1)  // decode: two weight rows at a time share each x load
      for (; n + 2 <= n1; n += 2) int4_row<V, 1, 2>(a, s + (n - n0) * a.groups, o + (n - n0) * a.groups, n, m0);
    for (; n < n1; ++n) {
      const float* sn = s + (n - n0) * a.groups;
      const float* on = o + (n - n0) * a.groups;
      if (rest == 3) int4_row<V, 3, 1>(a, sn, on, n, m0);
      if (rest == 2) int4_row<V, 2, 1>(a, sn, on, n, m0);
      if (rest == 1) int4_row<V, 1, 1>(a, sn, on, n, m0);
    }
  }
}

// Rows [n_begin, n_end) for any M; `scratch` holds int4_dot_scratch_floats(groups) (dot) or
// int4_scratch_floats(V::W) (GEMM) floats.
template <class V>
inline void int4_rows(const Int4MatmulArgs& a, bool dot, int64_t n_begin, int64_t n_end, float* scratch) {
  if (dot)
    dot_rows<V>(a, n_begin, n_end, scratch);
  else
    gemm_rows<V>(a, n_begin, n_end, scratch);
}

}  // namespace cpu
}  // namespace fourbit
