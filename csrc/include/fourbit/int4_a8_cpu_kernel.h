// The CPU W4A8 int4 matmul kernel body, written once against a SIMD traits type V:
//   V::C, V::L           columns per weight register (chunk), and its 32-bit lanes (C / 8)
//   V::MR, V::NR         rows of x, and weight rows, one block multiplies
//   V::vec, V::ivec      a float register of L lanes, an integer register of C / 2 bytes
//   load_w(p), load_w(p, bytes)   a chunk's C / 2 weight bytes; its first `bytes`, the rest zero
//   low(w), high(w)      its low and high nibbles as bytes (even and odd columns)
//   dot(acc, u, p)       acc + per lane the sum of 4 products u8 (u) x s8 (bytes at p)
//   shift_digit(i)       each 32-bit lane shifted left by 8 bits (x 256, the high digit's weight)
//   isub(a, b), load_i(p)  32-bit lane differences; L int32 lanes from p
//   izero(), to_float(i), zero(), load(p), broadcast(s), mul(a, b), fma(a, b, c), hsum(v)
//   lane_index(shift), expand(p, index)   lane l takes p[l >> shift]
//   to_float(p, type, count, out)         count scales widened to fp32
// Included only by the per-ISA translation units csrc/cpu/int4_a8_mm_<isa>.cpp, each compiled
// for its instruction set; every function here is a template on V, so the copies of two
// ISAs never merge. See int4_a8_cpu.h for the math and the activation layout.
#pragma once

#include <algorithm>
#include <cstdint>

#include "fourbit/cpu_prefetch.h"
#include "fourbit/int4_a8_cpu.h"

namespace fourbit {
namespace cpu {

// One chunk (C columns, `bytes` of each weight row: B but in a row's last chunk) of NR weight
// rows (w, rows row_bytes apart) against MR rows of x (xq, x_row bytes apart, each digit of a
// row `plane` bytes after the one above it; their lane scales d and lane sums c8, d_row apart):
// acc[j][r] += the chunk's lanes of sum (q - 8) xq, each scaled by its weight scale (from
// ss[j]) and its activation block's d.
template <class V, int MR, int NR, bool PerLane, int Digits>
__attribute__((always_inline)) inline void int4_a8_chunk(typename V::vec (&acc)[NR][MR], const uint8_t* w,
                                                         int64_t row_bytes, int bytes, const float* const (&ss)[NR],
                                                         typename V::ivec index, const int8_t* xq, int64_t x_row,
                                                         int64_t plane, const float* d, const int32_t* c8,
                                                         int64_t d_row) {
  using vec = typename V::vec;
  using ivec = typename V::ivec;
  constexpr int B = V::C / 2;
  for (int j = 0; j < NR; ++j) {
    const ivec wv = bytes == B ? V::load_w(w + j * row_bytes) : V::load_w(w + j * row_bytes, bytes);
    const ivec lo = V::low(wv), hi = V::high(wv);
    const vec ws = PerLane ? V::expand(ss[j], index) : V::broadcast(*ss[j]);
    for (int r = 0; r < MR; ++r) {
      const int8_t* xr = xq + r * x_row;
      ivec sum = V::dot(V::dot(V::izero(), lo, xr), hi, xr + B);
      // Each lower digit (its bytes `plane` after the one above): the sum so far x 256, plus its products.
      for (int digit = 1; digit < Digits; ++digit)
        sum = V::dot(V::dot(V::shift_digit(sum), lo, xr + digit * plane), hi, xr + digit * plane + B);
      // Centred: sum (q - 8) xq = sum q xq - 8 sum xq, exact (see int4_a8_cpu.h).
      sum = V::isub(sum, V::load_i(c8 + r * d_row));
      acc[j][r] = V::fma(V::to_float(sum), V::mul(ws, V::load(d + r * d_row)), acc[j][r]);
    }
  }
}

// Weight rows n0 .. n0 + NR - 1 against rows m0 .. m0 + MR - 1 of x; s and o hold those
// weight rows' scales and centred offsets o' = o + 8 s in fp32 ([NR][groups + 4]). Per chunk, each weight row is
// unpacked once and meets every row of x, and each row of x's chunk (loaded from L2 once)
// meets NR weight rows from L1: an activation row of K bytes plus its scales would not stay
// in L1 across many weight rows. PerLane: the chunk's lanes split over several groups
// (group_len < C); else each chunk lies in one group, chunks_per_group of them in a row
// (all of them for one group).
template <class V, int MR, int NR, bool PerLane, int Digits>
inline void int4_a8_block(const Int4A8Args& a, int64_t n0, int64_t m0, const float* s, const float* o,
                          int64_t row_floats) {
  using vec = typename V::vec;
  using ivec = typename V::ivec;
  constexpr int C = V::C, L = V::L, B = C / 2;
  const int64_t chunks = int4_a8_chunks(a.k_padded, C), row_bytes = a.k_padded / 2;
  const uint8_t* w = a.w + n0 * row_bytes;
  const int64_t plane = chunks * C, x_row = Digits * plane, d_row = chunks * L;
  const int8_t* xq = a.x.q + m0 * x_row;
  const float* d = a.x.lane_scale + m0 * d_row;
  const int32_t* c8 = a.x.lane_sum8 + m0 * d_row;
  const int64_t groups_per_chunk = PerLane ? C / a.group_len : 0;
  const int64_t chunks_per_group = PerLane ? 0 : a.groups == 1 ? chunks : a.group_len / C;
  const ivec index = V::lane_index(a.group_len == 32 ? 2 : 3);

  vec acc[NR][MR];
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < MR; ++r) acc[j][r] = V::zero();
  int64_t group = 0, left = chunks_per_group;  // the chunk's group (counted, not divided)
  const int64_t full = row_bytes / B;          // chunks with all their bytes
  for (int64_t c = 0; c < full; ++c) {
    const float* ss[NR];
    for (int j = 0; j < NR; ++j) ss[j] = PerLane ? s + j * row_floats + c * groups_per_chunk : s + j * row_floats + group;
    int4_a8_chunk<V, MR, NR, PerLane, Digits>(acc, w + c * B, row_bytes, B, ss, index, xq + c * C, x_row, plane,
                                              d + c * L, c8 + c * L, d_row);
    if (!PerLane && --left == 0) ++group, left = chunks_per_group;
  }
  if (full < chunks) {  // the row's last, partial chunk
    const float* ss[NR];
    for (int j = 0; j < NR; ++j) ss[j] = PerLane ? s + j * row_floats + full * groups_per_chunk : s + j * row_floats + group;
    int4_a8_chunk<V, MR, NR, PerLane, Digits>(acc, w + full * B, row_bytes, static_cast<int>(row_bytes - full * B), ss,
                                              index, xq + full * C, x_row, plane, d + full * L, c8 + full * L,
                                              d_row);
  }
  for (int j = 0; j < NR; ++j) {
    const float* oj = o + j * row_floats;
    for (int r = 0; r < MR; ++r) {
      // The offset term in fp32: sum over groups of o'[n, g] X[m, g].
      const float* xs = a.x.group_sum + (m0 + r) * a.groups;
      // Its lanes join the chunks' in one horizontal sum.
      vec total = acc[j][r];
      int64_t g = 0;
      for (; g + L <= a.groups; g += L) total = V::fma(V::load(oj + g), V::load(xs + g), total);
      float tail = 0.f;
      for (; g < a.groups; ++g) tail += oj[g] * xs[g];
      a.out[(m0 + r) * a.n + n0 + j] = V::hsum(total) + tail + (a.bias ? a.bias[n0 + j] : 0.f);
    }
  }
}

template <class V, int NR, bool PerLane, int Digits>
inline void int4_a8_row_block(const Int4A8Args& a, int64_t n0, const float* s, const float* o, int64_t row_floats) {
  constexpr int MR = V::MR;
  int64_t m0 = 0;
  for (; m0 + MR <= a.m; m0 += MR) int4_a8_block<V, MR, NR, PerLane, Digits>(a, n0, m0, s, o, row_floats);
  // The last rows of x, fewer than MR: one block of exactly that many (no masked lanes).
  switch (a.m - m0) {
    case 1: if constexpr (MR > 1) int4_a8_block<V, 1, NR, PerLane, Digits>(a, n0, m0, s, o, row_floats); break;
    case 2: if constexpr (MR > 2) int4_a8_block<V, 2, NR, PerLane, Digits>(a, n0, m0, s, o, row_floats); break;
    case 3: if constexpr (MR > 3) int4_a8_block<V, 3, NR, PerLane, Digits>(a, n0, m0, s, o, row_floats); break;
    default: break;
  }
  static_assert(MR <= 4, "int4_a8_row_block handles at most 3 leftover rows");
}

// Rows [n_begin, n_end) of out, V::NR weight rows at a time (then one at a time): their
// scales and offsets widened to fp32 once (scratch), then every block of rows of x against
// them; the NR rows (K_padded / 2 bytes each) stay in L1 from the first block to the last,
// so the weights are read from memory once.
template <class V, int Digits>
inline void int4_a8_rows_of(const Int4A8Args& a, int64_t n_begin, int64_t n_end, float* scratch) {
  constexpr int NR = V::NR;
  const int64_t row_floats = a.groups + 4;  // + 4 read (never used) by the last chunk's expansion
  float* s = scratch;
  float* o = scratch + NR * row_floats;
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < 4; ++i) s[j * row_floats + a.groups + i] = 0.f;
  const bool per_lane = a.groups > 1 && a.group_len < V::C;  // one group: every chunk inside it
  // Software prefetch, ahead_rows ahead (about 4 KiB of weights): a decode layer's share of
  // a thread is a few hundred KiB, over before the hardware's stream prefetch has ramped up.
  // Measured on the 2-core AMD EPYC, interleaved in one process: SmolLM2's 120 int4 layers at
  // M = 1 from memory 4.3 ms without, 3.1 with 2-4 KiB, 3.3 with 8-16 KiB; 4096 x 4096 g128
  // 418 against 346 us.
  const int64_t row_bytes = a.k_padded / 2, ahead_rows = std::max<int64_t>(NR, kPrefetchBytes / row_bytes);
  const int64_t scale_bytes = a.groups * (a.scale_type == ScaleType::kFloat32 ? 4 : 2);
  const int64_t offset_bytes = a.groups * (a.offset_type == ScaleType::kFloat32 ? 4 : 2);
  int64_t n0 = n_begin;
  for (; n0 < n_end; n0 += NR) {
    const int rows = static_cast<int>(std::min<int64_t>(NR, n_end - n0));
    const int64_t next = n0 + ahead_rows, next_rows = std::min<int64_t>(NR, n_end - next);
    if (next_rows > 0) {
      prefetch_bytes(a.w + next * row_bytes, next_rows * row_bytes);
      prefetch_bytes(static_cast<const char*>(a.scales) + next * scale_bytes, next_rows * scale_bytes);
      prefetch_bytes(static_cast<const char*>(a.offsets) + next * offset_bytes, next_rows * offset_bytes);
    }
    for (int j = 0; j < rows; ++j) {
      V::to_float(a.scales, a.scale_type, (n0 + j) * a.groups, a.groups, s + j * row_floats);
      V::to_float(a.offsets, a.offset_type, (n0 + j) * a.groups, a.groups, o + j * row_floats);
      for (int64_t g = 0; g < a.groups; ++g) o[j * row_floats + g] += 8.f * s[j * row_floats + g];  // o'
    }
    if (rows == NR) {
      if (per_lane) int4_a8_row_block<V, NR, true, Digits>(a, n0, s, o, row_floats);
      else int4_a8_row_block<V, NR, false, Digits>(a, n0, s, o, row_floats);
    } else {
      for (int j = 0; j < rows; ++j) {
        const float* sj = s + j * row_floats;
        const float* oj = o + j * row_floats;
        if (per_lane) int4_a8_row_block<V, 1, true, Digits>(a, n0 + j, sj, oj, row_floats);
        else int4_a8_row_block<V, 1, false, Digits>(a, n0 + j, sj, oj, row_floats);
      }
    }
  }
}

template <class V>
inline void int4_a8_rows(const Int4A8Args& a, int64_t n_begin, int64_t n_end, float* scratch) {
  switch (a.x.digits) {
    case 3: return int4_a8_rows_of<V, 3>(a, n_begin, n_end, scratch);
    case 2: return int4_a8_rows_of<V, 2>(a, n_begin, n_end, scratch);
    default: return int4_a8_rows_of<V, 1>(a, n_begin, n_end, scratch);
  }
}

}  // namespace cpu
}  // namespace fourbit
