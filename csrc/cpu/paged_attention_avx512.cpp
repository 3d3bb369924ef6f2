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

// ---- Decode (one query token), head_dim a multiple of 32 --------------------------------
//
// The tile algorithm transposes every tile of keys so that Q K^T is FMAs without horizontal
// sums. That pays when many query rows share the transpose (prefill, wide GQA); decode has
// `group` rows per kv head (1 for MHA), and then the transpose (some 80 shuffles per 16 x 16,
// all on one port) costs more than the dot products it feeds. Decode instead:
//   - takes a kv head's 16 keys of one page run, forms 16 partial-sum vectors q . k_n (two
//     FMAs per 32 dims per key, K rows read as they lie, each chunk loaded once for up to 4
//     query rows of the GQA group), and folds them into one vector of 16 scores with a
//     4-level transpose-and-add (30 shuffles + 15 adds per 16 keys and row, against 128 FMAs
//     of the dot products at D = 128);
//   - walks the keys page run by page run (up to 16 keys inside one page) and, inside a run,
//     every kv head of the block: a page's rows [block_size][Hkv][D] are then read front to
//     back, so the sequence streams through memory as SDPA's contiguous K/V does. One head at
//     a time strides Hkv * D elements from key to key (16 KiB for fp32 MHA): a TLB miss per
//     key and a stream no hardware prefetcher follows (the tile path prefetches each row by
//     hand instead).
//   - bf16 rows are split in registers into their even and odd elements (a shift and a mask:
//     bf16 is the top half of an fp32), not widened in order (a cross-lane shuffle per 16).
//     Q and O are kept in that same order (a per-32 permutation of the dims), undone when the
//     output is written; exact, so no rounding differs from the widened path.
//
// Scratch (floats): Q, O [rows][D]; P [rows][16]; alpha, m, l [rows]; a zero row [D].

constexpr int64_t kPrefetchHeads = 2;

// 32 elements of a row as two fp32 vectors, in the kernel's order for that dtype: natural
// (0-15, 16-31) for fp32 and fp16, evens then odds for bf16.
static inline void load32(const float* p, __m512& lo, __m512& hi) {
  lo = _mm512_loadu_ps(p);
  hi = _mm512_loadu_ps(p + 16);
}
static inline void load32(const Fp16* p, __m512& lo, __m512& hi) {
  lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
}
static inline void load32(const Bf16* p, __m512& lo, __m512& hi) {
  const __m512i x = _mm512_loadu_si512(p);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  hi = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
// Where lane i of half `hi` of a 32-chunk sits in the row (see load32).
template <class T>
static inline int chunk_pos(int hi, int i) {
  return std::is_same_v<T, Bf16> ? 2 * i + hi : 16 * hi + i;
}

// Lane n of the result = sum of the 16 lanes of acc[n]: pairs of vectors interleaved and
// added (unpack), then quads (shuffle), then the 128-bit lanes (two rounds of shuffle_f32x4).
static inline __m512 reduce16(const __m512* acc) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                         _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  // t[i], each 128-bit lane: keys 2i, 2i+1, 2i, 2i+1.
  for (int j = 0; j < 4; ++j)
    u[j] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * j], t[2 * j + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * j], t[2 * j + 1], 0xEE));
  // u[j], each 128-bit lane L: keys 4j .. 4j+3 summed over lane L's part of the dims.
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

// Scores of RB query rows (fp32, kernel order, scaled; row r at q + r * d) against 16 key
// rows: s[r] lane n = q_r . k_n. Keys go four at a time, each 32-dim chunk of a key loaded
// (and for bf16 split) once for the RB rows of a GQA group rather than once per row; 4 RB
// partial-sum vectors (at most 16) plus the 8 of the keys' chunk fit the 32 registers.
template <int RB, class T>
static inline void scores16(const float* q, int64_t d, const T* const* k, __m512* s) {
  __m512 part[RB][16];
  for (int n0 = 0; n0 < 16; n0 += 4) {
    __m512 acc[RB][4];
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 32) {
      __m512 lo[4], hi[4];
      for (int j = 0; j < 4; ++j) load32(k[n0 + j] + c, lo[j], hi[j]);
      for (int r = 0; r < RB; ++r) {
        const __m512 q0 = _mm512_loadu_ps(q + r * d + c), q1 = _mm512_loadu_ps(q + r * d + c + 16);
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(q1, hi[j], _mm512_fmadd_ps(q0, lo[j], acc[r][j]));
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < 4; ++j) part[r][n0 + j] = acc[r][j];
  }
  for (int r = 0; r < RB; ++r) s[r] = reduce16(part[r]);
}

// O[r][c0 : c0 + 32 CP] = alpha[r] O[r] + sum_{n < count} P[r][n] V[n] for RB rows: each V
// row is loaded (and split) once for the RB rows; 2 RB CP accumulators (at most 16).
template <int RB, int CP, class T>
static inline void pv_rows(float* o, int64_t d, const float* p, const float* alpha, const T* const* v, int count,
                           int64_t c0) {
  __m512 acc[RB][2 * CP];
  for (int r = 0; r < RB; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < 2 * CP; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * d + c0 + 16 * c), al);
  }
  for (int n = 0; n < count; ++n) {
    __m512 x[2 * CP];
    for (int c = 0; c < CP; ++c) load32(v[n] + c0 + 32 * c, x[2 * c], x[2 * c + 1]);
    for (int r = 0; r < RB; ++r) {
      const __m512 pn = _mm512_set1_ps(p[r * 16 + n]);
      for (int c = 0; c < 2 * CP; ++c) acc[r][c] = _mm512_fmadd_ps(pn, x[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < 2 * CP; ++c) _mm512_storeu_ps(o + r * d + c0 + 16 * c, acc[r][c]);
}

template <class T>
static void decode_block(const PagedAttentionArgs& a, const AttentionBlock& blk, float* scratch) {
  const int64_t d = a.head_dim, group = a.group, heads = blk.kv_heads, rows = heads * group;
  float* q = scratch;
  float* o = q + rows * d;
  float* p = o + rows * d;
  float* alpha = p + rows * 16;
  float* m = alpha + rows;
  float* l = m + rows;
  float* zero = l + rows;
  std::fill(zero, zero + d, 0.0f);
  const T* zero_t = reinterpret_cast<const T*>(zero);  // all-zero bits: 0.0 in every dtype

  const T* q_in = static_cast<const T*>(a.q) + blk.q_token * a.q_stride_token;
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);
  const __m512 scale = _mm512_set1_ps(a.scale_log2);
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = q_in + (blk.kvh * group + r) * a.q_stride_head;
    for (int64_t c = 0; c < d; c += 32) {
      __m512 lo, hi;
      load32(src + c, lo, hi);
      _mm512_storeu_ps(q + r * d + c, _mm512_mul_ps(lo, scale));
      _mm512_storeu_ps(q + r * d + c + 16, _mm512_mul_ps(hi, scale));
    }
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(o, o + rows * d, 0.0f);
  std::fill(m, m + rows, neg_inf);
  std::fill(l, l + rows, 0.0f);

  const int64_t row_stride = a.num_kv_heads * d;
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  const int32_t* table = a.block_tables + blk.b * a.block_tables_stride;
  // The run of keys starting at t: up to 16, inside one page, below key_end; its first row's
  // element offset (head blk.kvh), the page clamped into the cache.
  auto run = [&](int64_t t, int64_t& off) {
    const int64_t entry = t / a.block_size, row = t % a.block_size;
    const int64_t page = std::min<int64_t>(std::max<int64_t>(table[entry], 0), a.num_blocks - 1);
    off = ((page * a.block_size + row) * a.num_kv_heads + blk.kvh) * d;
    return static_cast<int>(std::min<int64_t>({16, a.block_size - row, blk.key_end - t}));
  };

  int64_t off = 0;
  int count = blk.key_begin < blk.key_end ? run(blk.key_begin, off) : 0;
  for (int64_t t = blk.key_begin; t < blk.key_end;) {
    int64_t next_off = 0;
    const int next_count = t + count < blk.key_end ? run(t + count, next_off) : 0;
    for (int64_t h = 0; h < heads; ++h) {
      // Within a page run the sweep reads memory in order and the hardware prefetcher keeps
      // up (measured: prefetching every row by hand was slower, 20 against 27 GB/s at fp32
      // MHA in L3); what it cannot guess is the next page (the table jumps anywhere). So the
      // last kPrefetchHeads heads of this run ask for the first kPrefetchHeads heads' rows of
      // the next run, which starts the streams there (1.3x-1.5x from DRAM).
      if (h + kPrefetchHeads >= heads && h + kPrefetchHeads - heads < heads) {
        const int64_t pf = next_off + (h + kPrefetchHeads - heads) * d;
        for (int n = 0; n < next_count; ++n) {
          const char* kr = reinterpret_cast<const char*>(k_cache + pf + n * row_stride);
          const char* vr = reinterpret_cast<const char*>(v_cache + pf + n * row_stride);
          for (int64_t byte = 0; byte < row_bytes; byte += 64) {
            __builtin_prefetch(kr + byte);
            __builtin_prefetch(vr + byte);
          }
        }
      }
      // Keys past the run point at the zero row: their scores are computed (branch-free) and
      // then replaced by -inf; the P V loop stops at `count`, so they never reach O.
      const T* krow[16];
      const T* vrow[16];
      for (int n = 0; n < 16; ++n) {
        krow[n] = n < count ? k_cache + off + h * d + n * row_stride : zero_t;
        vrow[n] = n < count ? v_cache + off + h * d + n * row_stride : zero_t;
      }
      const int64_t r0 = h * group;
      for (int64_t r1 = r0; r1 < r0 + group; r1 += 4) {
        const int rb = static_cast<int>(std::min<int64_t>(4, r0 + group - r1));
        __m512 sv[4];
        with_rows<4>(rb, [&](auto k) {
          scores16<decltype(k)::value>(q + r1 * d, d, static_cast<const T* const*>(krow), sv);
        });
        for (int j = 0; j < rb; ++j) {
          const int64_t r = r1 + j;
          const __m512 s = Avx512::keep_first(sv[j], count, neg_inf);
          // Online softmax in base 2, as the tile path: a row that has seen no finite score
          // keeps m = -inf and subtracts 0, so 2^(-inf) = 0 rather than NaN.
          const float m_old = m[r];
          const float m_new = std::max(m_old, _mm512_reduce_max_ps(s));
          const float m_safe = m_new == neg_inf ? 0.0f : m_new;
          const __m512 pr = Avx512::keep_first(Avx512::exp2(_mm512_sub_ps(s, _mm512_set1_ps(m_safe))), count, 0.0f);
          const float al = std::exp2(m_old - m_safe);
          l[r] = l[r] * al + _mm512_reduce_add_ps(pr);
          alpha[r] = al;
          m[r] = m_new;
          _mm512_storeu_ps(p + r * 16, pr);
        }
      }
      for (int64_t r = r0; r < r0 + group; r += 4) {
        const int rb = static_cast<int>(std::min<int64_t>(4, r0 + group - r));
        with_rows<4>(rb, [&](auto k) {
          constexpr int RB = decltype(k)::value;
          constexpr int CP = RB <= 2 ? 4 : 2;  // chunk pairs: 2 RB CP <= 16 accumulators
          int64_t c = 0;
          for (; c + 32 * CP <= d; c += 32 * CP)
            pv_rows<RB, CP>(o + r * d, d, p + r * 16, alpha + r, static_cast<const T* const*>(vrow), count, c);
          for (; c < d; c += 32)
            pv_rows<RB, 1>(o + r * d, d, p + r * 16, alpha + r, static_cast<const T* const*>(vrow), count, c);
        });
      }
    }
    t += count;
    off = next_off;
    count = next_count;
  }

  // Normalize, undoing the kernel's order of the dims. A row that saw no key (l = 0) has
  // O = 0: its output is 0, its lse -inf.
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = l[r] == 0.0f ? 1.0f : 1.0f / l[r];
    float* dst = blk.out + r * blk.out_stride_head;
    for (int64_t c = 0; c < d; c += 32)
      for (int hi = 0; hi < 2; ++hi)
        for (int i = 0; i < 16; ++i) dst[c + chunk_pos<T>(hi, i)] = o[r * d + c + 16 * hi + i] * inv;
    if (blk.lse != nullptr) blk.lse[r * blk.lse_stride_head] = l[r] == 0.0f ? neg_inf : m[r] + std::log2(l[r]);
  }
}

}  // namespace

void attend_block_avx512(const PagedAttentionArgs& a, const AttentionBlock& block, float* scratch) {
  if (block.tokens == 1 && a.head_dim % 32 == 0 && block.first_pos + 1 >= block.key_end) {
    switch (a.dtype) {
      case KvDtype::kFloat32: return decode_block<float>(a, block, scratch);
      case KvDtype::kBFloat16: return decode_block<Bf16>(a, block, scratch);
      case KvDtype::kFloat16: return decode_block<Fp16>(a, block, scratch);
    }
  }
  attend_block_impl<Avx512>(a, block, scratch);
}

}  // namespace cpu
}  // namespace fourbit
