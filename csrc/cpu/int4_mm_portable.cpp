// Portable CPU int4 matmul (any instruction set), and the activation preparation that
// every width shares. Compiled with the default flags.
#include "fourbit/int4_cpu_kernel.h"

namespace fourbit {
namespace cpu {
namespace {

// Eight words per "register" in plain C++: the same activation order and summation
// lengths as AVX2 (so the same accuracy), and loops the compiler can vectorize for any
// target.
struct Portable {
  static constexpr int W = 8;
  using Half = void;
  struct vec {
    float v[W];
  };
  struct ivec {
    uint32_t v[W];
  };
  static vec zero() { return vec{}; }
  static vec load(const float* p) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = p[l];
    return r;
  }
  static vec fma(const vec& a, const vec& b, const vec& c) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static vec add(const vec& a, const vec& b) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] + b.v[l];
    return r;
  }
  static void store(float* p, const vec& v) {
    for (int l = 0; l < W; ++l) p[l] = v.v[l];
  }
  static vec broadcast(float s) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = s;
    return r;
  }
  static ivec load_words(const int32_t* p) {
    ivec r;
    for (int l = 0; l < W; ++l) r.v[l] = static_cast<uint32_t>(p[l]);
    return r;
  }
  static vec nibble(const ivec& w, int i) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = static_cast<float>((w.v[l] >> (4 * i)) & 0xF);
    return r;
  }
  // One group's scale and offset, broadcast: w = q s + m.
  struct group_t {
    vec s, m;
  };
  static group_t group(float s, float m) { return {broadcast(s), broadcast(m)}; }
  static vec weights(const ivec& w, int i, const group_t& g) { return fma(nibble(w, i), g.s, g.m); }
  // Groups of 32 columns: words 0-3 are one group, 4-7 the next (per == 2).
  static vec lane_scales(const float* p, int /*per*/) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = p[l / 4];
    return r;
  }
  static ivec row_offsets(int first, int64_t last, int64_t stride) {
    ivec r;
    for (int l = 0; l < W; ++l) r.v[l] = static_cast<uint32_t>((first + l < last ? first + l : last) * stride);
    return r;
  }
  static ivec gather_words(const int32_t* p, const ivec& idx) {
    ivec r;
    for (int l = 0; l < W; ++l) r.v[l] = static_cast<uint32_t>(p[idx.v[l]]);
    return r;
  }
  static vec gather(const float* p, const ivec& idx) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = p[idx.v[l]];
    return r;
  }
  static void load_transposed(const int32_t* const* rows, int64_t j, ivec out[8]) {
    for (int t = 0; t < 8; ++t)
      for (int l = 0; l < W; ++l) out[t].v[l] = static_cast<uint32_t>(rows[l][j + t]);
  }
  static void widen(const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
    int8_scales_to_float_scalar(p, t, begin, count, out);
  }
  static float hsum(const vec& v) {
    // Pairwise, as the AVX2 kernel adds its lanes.
    float h[4];
    for (int l = 0; l < 4; ++l) h[l] = v.v[l] + v.v[l + 4];
    return (h[0] + h[2]) + (h[1] + h[3]);
  }
};

}  // namespace

void int4_matmul_rows_portable(const Int4MatmulArgs& a, bool dot, int64_t n_begin, int64_t n_end, float* scratch) {
  int4_rows<Portable>(a, dot, n_begin, n_end, scratch);
}

void int4_prepare_activations(const float* x, int64_t m, int64_t k, int64_t k_padded, int width, float* xp) {
  const int64_t block_cols = 8 * static_cast<int64_t>(width);
  const int64_t full_blocks = (k_padded / 8) / width;
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    float* out = xp + r * k_padded;
    for (int64_t b = 0; b < full_blocks; ++b)
      for (int64_t i = 0; i < 8; ++i)
        for (int64_t l = 0; l < width; ++l) {
          const int64_t col = b * block_cols + 8 * l + i;
          out[b * block_cols + i * width + l] = col < k ? xr[col] : 0.f;
        }
    // The half-width block (int4_cpu.h): 8 words in the layout of width 8.
    const int64_t half = full_blocks * block_cols, half_words = int4_half_block_words(width, k_padded / 8);
    for (int64_t i = 0; i < 8 && half_words > 0; ++i)
      for (int64_t l = 0; l < half_words; ++l) {
        const int64_t col = half + 8 * l + i;
        out[half + i * half_words + l] = col < k ? xr[col] : 0.f;
      }
    for (int64_t col = half + 8 * half_words; col < k_padded; ++col) out[col] = col < k ? xr[col] : 0.f;
  }
}

}  // namespace cpu
}  // namespace fourbit
