// The CPU paged attention block (paged_attention_cpu.h describes the algorithm), written once
// over a vector type V and compiled in each ISA's translation unit (paged_attention_avx512.cpp,
// _avx2.cpp, _portable.cpp, each under its own #pragma GCC target). `static` gives every copy
// internal linkage, so no baseline code can link against an AVX copy.
//
// V provides: W (floats per register), kRows (query rows per register block), vec, zero,
// load, store, broadcast, add, sub, mul, fma, max, reduce_max, reduce_add, exp2 (accurate to
// about 1 ulp, exactly 0 at -inf, NaN in NaN out), keep_first(v, k, fill) (lanes >= k become
// fill), widen(const T*) for T = float, Bf16, Fp16 (W elements to fp32), and
// transpose(rows, d0, dst, stride): dst[j * stride + l] = fp32 of rows[l][d0 + j] for
// j, l < W, rows of float, Bf16 or Fp16.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "fourbit/paged_attention_cpu.h"

namespace fourbit {
namespace cpu {
namespace {

static inline float to_float(float x) { return x; }

// bf16 is the top half of an fp32: widening is exact, a 16-bit shift.
static inline float to_float(Bf16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// IEEE half -> float, exact (subnormals, inf, NaN included); the tails of rows whose length
// is not a multiple of W, and the portable path.
static inline float to_float(Fp16 x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu, mant = x.bits & 0x3ffu;
  float f;
  if (exp == 0x1f) {  // inf / NaN
    const uint32_t bits = sign | 0x7f800000u | (mant << 13);
    std::memcpy(&f, &bits, 4);
    return f;
  }
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    f = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -f : f;
  }
  const uint32_t bits = sign | ((exp + 112u) << 23) | (mant << 13);
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Calls f(std::integral_constant<int, n>) for a run-time n in [1, K]: the register-blocked
// micro-kernels are templates on their row count, the last block of rows takes the rest.
template <int K, class F>
static inline void with_rows(int n, F&& f) {
  if constexpr (K > 0) {
    if (n == K) {
      f(std::integral_constant<int, K>{});
    } else {
      with_rows<K - 1>(n, f);
    }
  }
}

// dst [Dp] = fp32 of src [D], zero past D (so dot products over Dp equal those over D).
template <class V, class T>
static inline void widen_row(const T* src, float* dst, int64_t d, int64_t dp) {
  int64_t j = 0;
  for (; j + V::W <= d; j += V::W) V::store(dst + j, V::widen(src + j));
  for (; j < d; ++j) dst[j] = to_float(src[j]);
  for (; j < dp; ++j) dst[j] = 0.0f;
}

// Scores of RB rows against one tile: S[r][0 : 2W] = sum_d Q[r][d] Kt[d][0 : 2W]. Every row
// reuses the two Kt vectors of a dimension; 2 RB independent accumulators hide the FMA latency.
template <class V, int RB>
static inline void tile_scores(const float* q, int64_t dp, const float* kt, float* s) {
  constexpr int W = V::W, N = 2 * W;
  typename V::vec acc[RB][2];
  for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = V::zero();
  for (int64_t d = 0; d < dp; ++d) {
    const auto k0 = V::load(kt + d * N), k1 = V::load(kt + d * N + W);
    for (int r = 0; r < RB; ++r) {
      const auto qd = V::broadcast(q[r * dp + d]);
      acc[r][0] = V::fma(qd, k0, acc[r][0]);
      acc[r][1] = V::fma(qd, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    V::store(s + r * N, acc[r][0]);
    V::store(s + r * N + W, acc[r][1]);
  }
}

// O[r][d0 : d0 + CB W] = alpha[r] O[r][...] + sum_n P[r][n] V[n][...] for RB rows, n below
// each row's own limit lim[r] (the keys it sees): all rows share n < n_common; past it each
// row adds only its own keys, so no 0 * (NaN or inf) from a key it does not see.
template <class V, int RB, int CB, class R>
static inline void tile_values(float* o, int64_t dp, const float* p, const float* alpha, const int32_t* lim,
                               int n_common, int n_max, const R* const* vrow, int64_t d0) {
  constexpr int W = V::W, N = 2 * W;
  typename V::vec acc[RB][CB];
  for (int r = 0; r < RB; ++r) {
    const auto a = V::broadcast(alpha[r]);
    for (int c = 0; c < CB; ++c) acc[r][c] = V::mul(V::load(o + r * dp + d0 + c * W), a);
  }
  for (int n = 0; n < n_common; ++n) {
    typename V::vec v[CB];
    for (int c = 0; c < CB; ++c) v[c] = V::widen(vrow[n] + d0 + c * W);
    for (int r = 0; r < RB; ++r) {
      const auto pn = V::broadcast(p[r * N + n]);
      for (int c = 0; c < CB; ++c) acc[r][c] = V::fma(pn, v[c], acc[r][c]);
    }
  }
  for (int n = n_common; n < n_max; ++n) {
    typename V::vec v[CB];
    for (int c = 0; c < CB; ++c) v[c] = V::widen(vrow[n] + d0 + c * W);
    for (int r = 0; r < RB; ++r) {
      if (n >= lim[r]) continue;
      const auto pn = V::broadcast(p[r * N + n]);
      for (int c = 0; c < CB; ++c) acc[r][c] = V::fma(pn, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CB; ++c) V::store(o + r * dp + d0 + c * W, acc[r][c]);
}

// Scratch layout in floats (attention_scratch_floats): Q, O [rows][Dp]; S [rows][N]; m, l,
// alpha [rows]; lim [rows] (int32); Kt [Dp][N]; Kf, Vf [N][Dp] (rows widened to fp32);
// a zero row [Dp] (keys past the sequence).
static inline int64_t scratch_floats(int64_t rows, int64_t head_dim, int width) {
  const int64_t dp = round_up(head_dim, width), n = 2 * width;
  return rows * (2 * dp + n + 4) + dp * n + 2 * n * dp + dp;
}

template <class V, class T>
static void attend_block_typed(const PagedAttentionArgs& a, const AttentionBlock& blk, float* scratch) {
  constexpr int W = V::W, N = 2 * W, RB = V::kRows;
  const int64_t d = a.head_dim, dp = round_up(d, W), g_count = a.group;
  const int64_t rows = blk.tokens * g_count;
  float* q = scratch;
  float* o = q + rows * dp;
  float* s = o + rows * dp;
  float* m = s + rows * N;
  float* l = m + rows;
  float* alpha = l + rows;
  int32_t* lim = reinterpret_cast<int32_t*>(alpha + rows);
  float* kt = alpha + 2 * rows;
  float* kf = kt + dp * N;
  float* vf = kf + N * dp;
  float* zero = vf + N * dp;
  std::fill(zero, zero + dp, 0.0f);

  const T* q_in = static_cast<const T*>(a.q);
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);
  const auto scale = V::broadcast(a.scale_log2);
  for (int64_t i = 0; i < blk.tokens; ++i) {
    for (int64_t g = 0; g < g_count; ++g) {
      float* qr = q + (i * g_count + g) * dp;
      widen_row<V>(q_in + (blk.q_token + i) * a.q_stride_token + (blk.kvh * g_count + g) * a.q_stride_head, qr, d,
                   dp);
      for (int64_t j = 0; j < dp; j += W) V::store(qr + j, V::mul(V::load(qr + j), scale));
    }
  }
  std::fill(o, o + rows * dp, 0.0f);
  std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
  std::fill(l, l + rows, 0.0f);

  // Rows whose length is a whole number of registers are read in place, widened to fp32 in
  // registers; others are widened (and zero-padded to Dp) into Kf / Vf first.
  const bool in_place = d % W == 0;
  const int64_t row_stride = a.num_kv_heads * d;  // elements from one token's row to the next
  const int32_t* table = a.block_tables + blk.b * a.block_tables_stride;
  // Element offsets of the rows of keys t .. t + count - 1 for kv head kvh, every page clamped
  // into the cache; one division per run of keys, not one per key.
  auto slots = [&](int64_t t, int count, int64_t* off) {
    int64_t entry = t / a.block_size, row = t % a.block_size;
    int64_t page = -1;
    for (int n = 0; n < count; ++n, ++row) {
      if (row == a.block_size) row = 0, ++entry;
      if (n == 0 || row == 0) page = std::min<int64_t>(std::max<int64_t>(table[entry], 0), a.num_blocks - 1);
      off[n] = (page * a.block_size + row) * row_stride + blk.kvh * d;
    }
  };
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  // Keys past the last row's position are seen by no row of the block.
  const int64_t key_stop = std::min(blk.key_end, blk.first_pos + blk.tokens);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const T* zero_t = reinterpret_cast<const T*>(zero);  // all-zero bits: 0.0 in every dtype

  // One tile of keys t0 .. t0 + n_valid - 1, their rows at krow / vrow (float or T).
  auto tile = [&](auto krow, auto vrow, int n_valid, int64_t t0) {
    for (int nb = 0; nb < N; nb += W)
      for (int64_t j = 0; j < dp; j += W) V::transpose(krow + nb, j, kt + j * N + nb, N);

    // Keys of this tile each row sees: token i sees keys <= first_pos + i. Rows are in token
    // order, so their limits rise; rows before `first` see none of this tile and are skipped.
    int64_t first = rows;
    for (int64_t i = blk.tokens - 1; i >= 0; --i) {
      const int64_t seen = std::min<int64_t>(std::max<int64_t>(blk.first_pos + i + 1 - t0, 0), n_valid);
      if (seen == 0) break;
      for (int64_t g = 0; g < g_count; ++g) lim[i * g_count + g] = static_cast<int32_t>(seen);
      first = i * g_count;
    }
    if (first == rows) return;

    for (int64_t r = first; r < rows; r += RB) {
      const int rb = static_cast<int>(std::min<int64_t>(RB, rows - r));
      with_rows<RB>(rb, [&](auto k) { tile_scores<V, decltype(k)::value>(q + r * dp, dp, kt, s + r * N); });
    }
    for (int64_t r = first; r < rows; ++r) {
      float* sr = s + r * N;
      const int k = lim[r];
      auto s0 = V::keep_first(V::load(sr), k, neg_inf);
      auto s1 = V::keep_first(V::load(sr + W), k - W, neg_inf);
      const float m_old = m[r];
      const float m_new = std::max(m_old, V::reduce_max(V::max(s0, s1)));
      // A row that has seen no finite score yet keeps m = -inf: subtract 0 there, so that
      // 2^(-inf - 0) = 0 rather than 2^(-inf + inf) = NaN.
      const float m_safe = m_new == neg_inf ? 0.0f : m_new;
      const auto ms = V::broadcast(m_safe);
      const auto p0 = V::keep_first(V::exp2(V::sub(s0, ms)), k, 0.0f);
      const auto p1 = V::keep_first(V::exp2(V::sub(s1, ms)), k - W, 0.0f);
      const float al = std::exp2(m_old - m_safe);
      l[r] = l[r] * al + V::reduce_add(V::add(p0, p1));
      alpha[r] = al;
      m[r] = m_new;
      V::store(sr, p0);
      V::store(sr + W, p1);
    }
    for (int64_t r = first; r < rows; r += RB) {
      const int rb = static_cast<int>(std::min<int64_t>(RB, rows - r));
      int n_common = N, n_max = 0;
      for (int j = 0; j < rb; ++j) {
        n_common = std::min(n_common, lim[r + j]);
        n_max = std::max(n_max, lim[r + j]);
      }
      with_rows<RB>(rb, [&](auto k) {
        constexpr int R = decltype(k)::value;
        int64_t j = 0;
        for (; j + 2 * W <= dp; j += 2 * W)
          tile_values<V, R, 2>(o + r * dp, dp, s + r * N, alpha + r, lim + r, n_common, n_max, vrow, j);
        if (j < dp) tile_values<V, R, 1>(o + r * dp, dp, s + r * N, alpha + r, lim + r, n_common, n_max, vrow, j);
      });
    }
  };

  int64_t off[N];
  for (int64_t t0 = blk.key_begin; t0 < key_stop; t0 += N) {
    const int n_valid = static_cast<int>(std::min<int64_t>(N, key_stop - t0));
    slots(t0, n_valid, off);
    // The rows of one kv head lie num_kv_heads * D elements apart, each in its own page of
    // memory more often than not, where the hardware prefetcher does not follow: ask for the
    // next tile's rows while this one computes.
    if (t0 + N < key_stop) {
      int64_t ahead[N];
      const int count = static_cast<int>(std::min<int64_t>(N, key_stop - t0 - N));
      slots(t0 + N, count, ahead);
      for (int n = 0; n < count; ++n) {
        for (int64_t byte = 0; byte < row_bytes; byte += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(k_cache + ahead[n]) + byte);
          __builtin_prefetch(reinterpret_cast<const char*>(v_cache + ahead[n]) + byte);
        }
      }
    }
    if (in_place) {
      const T* krow[N];
      const T* vrow[N];
      for (int n = 0; n < N; ++n) {
        krow[n] = n < n_valid ? k_cache + off[n] : zero_t;
        vrow[n] = n < n_valid ? v_cache + off[n] : zero_t;
      }
      tile(static_cast<const T* const*>(krow), static_cast<const T* const*>(vrow), n_valid, t0);
    } else {
      const float* krow[N];
      const float* vrow[N];
      for (int n = 0; n < N; ++n) {
        if (n < n_valid) {
          widen_row<V>(k_cache + off[n], kf + n * dp, d, dp);
          widen_row<V>(v_cache + off[n], vf + n * dp, d, dp);
        }
        krow[n] = n < n_valid ? kf + n * dp : zero;
        vrow[n] = n < n_valid ? vf + n * dp : zero;
      }
      tile(static_cast<const float* const*>(krow), static_cast<const float* const*>(vrow), n_valid, t0);
    }
  }

  // Normalize. A row that saw no key (l = 0) has O = 0: its output is 0, its lse -inf.
  for (int64_t i = 0; i < blk.tokens; ++i) {
    for (int64_t g = 0; g < g_count; ++g) {
      const int64_t r = i * g_count + g;
      const float inv = l[r] == 0.0f ? 1.0f : 1.0f / l[r];
      float* dst = blk.out + i * blk.out_stride_token + g * blk.out_stride_head;
      for (int64_t j = 0; j < d; ++j) dst[j] = o[r * dp + j] * inv;
      if (blk.lse != nullptr)
        blk.lse[i * blk.lse_stride_token + g * blk.lse_stride_head] = l[r] == 0.0f ? neg_inf : m[r] + std::log2(l[r]);
    }
  }
}

// One kv head at a time: the tile algorithm's rows are one head's group (its Kt tile serves
// them all), so a block of several heads is several blocks of one.
template <class V>
static void attend_block_impl(const PagedAttentionArgs& a, const AttentionBlock& blk, float* scratch) {
  for (int64_t h = 0; h < blk.kv_heads; ++h) {
    AttentionBlock one = blk;
    one.kvh = blk.kvh + h;
    one.kv_heads = 1;
    one.out = blk.out + h * a.group * blk.out_stride_head;
    if (blk.lse != nullptr) one.lse = blk.lse + h * a.group * blk.lse_stride_head;
    switch (a.dtype) {
      case KvDtype::kFloat32: attend_block_typed<V, float>(a, one, scratch); break;
      case KvDtype::kBFloat16: attend_block_typed<V, Bf16>(a, one, scratch); break;
      case KvDtype::kFloat16: attend_block_typed<V, Fp16>(a, one, scratch); break;
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fourbit
