// Portable CPU W4A8 int4 matmul (any instruction set), and the activation quantization that
// every width shares. Compiled with the default flags.
#include <cmath>
#include <cstring>

#include "fourbit/int4_a8_cpu_kernel.h"

namespace fourbit {
namespace cpu {
namespace {

// 32 weight bytes (64 columns, 8 lanes) per "register" in plain C++, the AVX2 layout, in
// loops the compiler can vectorize for any target.
struct Portable {
  static constexpr int C = kInt4A8Chunk, L = C / 8, B = C / 2;
  static constexpr int MR = 4, NR = 2;
  struct vec {
    float v[L];
  };
  struct ivec {
    uint8_t b[B];  // bytes, or L int32 lanes (int_lanes / from_lanes)
  };
  static void int_lanes(const ivec& i, int32_t* out) { std::memcpy(out, i.b, B); }
  static ivec from_lanes(const int32_t* lanes) {
    ivec r;
    std::memcpy(r.b, lanes, B);
    return r;
  }
  static ivec load_w(const uint8_t* p) { return load_w(p, B); }
  static ivec load_w(const uint8_t* p, int bytes) {
    ivec r{};
    std::memcpy(r.b, p, bytes);
    return r;
  }
  static ivec low(const ivec& w) {
    ivec r;
    for (int t = 0; t < B; ++t) r.b[t] = w.b[t] & 0x0F;
    return r;
  }
  static ivec high(const ivec& w) {
    ivec r;
    for (int t = 0; t < B; ++t) r.b[t] = w.b[t] >> 4;
    return r;
  }
  static ivec dot(const ivec& acc, const ivec& u, const int8_t* p) {
    int32_t lanes[L];
    int_lanes(acc, lanes);
    for (int l = 0; l < L; ++l)
      for (int j = 0; j < 4; ++j) lanes[l] += static_cast<int32_t>(u.b[4 * l + j]) * p[4 * l + j];
    return from_lanes(lanes);
  }
  static ivec shift_digit(const ivec& i) {
    int32_t lanes[L];
    int_lanes(i, lanes);
    for (int l = 0; l < L; ++l) lanes[l] *= 256;  // |lane| < 2^23 before the last shift: no overflow
    return from_lanes(lanes);
  }
  static ivec izero() { return ivec{}; }
  static ivec isub(const ivec& a, const ivec& b) {
    int32_t x[L], y[L];
    int_lanes(a, x);
    int_lanes(b, y);
    for (int l = 0; l < L; ++l) x[l] -= y[l];
    return from_lanes(x);
  }
  static ivec load_i(const int32_t* p) { return from_lanes(p); }
  static vec to_float(const ivec& i) {
    int32_t lanes[L];
    int_lanes(i, lanes);
    vec r;
    for (int l = 0; l < L; ++l) r.v[l] = static_cast<float>(lanes[l]);
    return r;
  }
  static vec zero() { return vec{}; }
  static vec load(const float* p) {
    vec r;
    for (int l = 0; l < L; ++l) r.v[l] = p[l];
    return r;
  }
  static vec broadcast(float s) {
    vec r;
    for (int l = 0; l < L; ++l) r.v[l] = s;
    return r;
  }
  static vec add(const vec& a, const vec& b) {
    vec r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] + b.v[l];
    return r;
  }
  static vec mul(const vec& a, const vec& b) {
    vec r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] * b.v[l];
    return r;
  }
  static vec fma(const vec& a, const vec& b, const vec& c) {
    vec r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static float hsum(const vec& v) {
    float h = 0.f;
    for (int l = 0; l < L; ++l) h += v.v[l];
    return h;
  }
  static ivec lane_index(int shift) {
    int32_t lanes[L];
    for (int l = 0; l < L; ++l) lanes[l] = l >> shift;
    return from_lanes(lanes);
  }
  static vec expand(const float* p, const ivec& index) {
    int32_t lanes[L];
    int_lanes(index, lanes);
    vec r;
    for (int l = 0; l < L; ++l) r.v[l] = p[lanes[l]];
    return r;
  }
  static void to_float(const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
    int8_scales_to_float_scalar(p, t, begin, count, out);
  }
};

// Round to nearest, ties to even, for |v| <= 2^22 (the default rounding mode, as std::nearbyint
// with no library call): adding 1.5 * 2^23 leaves no fraction bits; subtracting restores v.
// The compiler may not fold (v + c) - c: fourbit builds without -ffast-math.
inline float round_to_even(float v) {
  constexpr float kShift = 12582912.f;
  return (v + kShift) - kShift;
}

}  // namespace

void int4_a8_rows_portable(const Int4A8Args& a, int64_t n_begin, int64_t n_end, float* scratch) {
  int4_a8_rows<Portable>(a, n_begin, n_end, scratch);
}

int64_t int4_a8_quantize_activations(const float* x, int64_t m, int64_t k, int64_t k_padded, int64_t group_len,
                                     int chunk_cols, int digits, int8_t* xq, float* lane_scale, int32_t* lane_sum8,
                                     float* group_sum, uint8_t* in_range) {
  const int64_t chunks = int4_a8_chunks(k_padded, chunk_cols), cols = chunks * chunk_cols;
  const int64_t groups = k_padded / group_len, half = chunk_cols / 2, blocks_per_chunk = chunk_cols / 32;
  const int low_bits = 8 * (digits - 1);                        // 0, 8 or 16
  const float unit = std::ldexp(1.f, low_bits);                 // 1, 256 or 65536
  int64_t out_of_range = 0;
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    int8_t* qr = xq + r * digits * cols;
    float* dr = lane_scale + r * (cols / 8);
    int32_t* cr = lane_sum8 + r * (cols / 8);
    bool row_in_range = true;
    for (int64_t c = 0; c < chunks; ++c) {
      int8_t* even = qr + c * chunk_cols;  // the chunk's even columns, then its odd ones (each digit `cols` on)
      for (int64_t b = 0; b < blocks_per_chunk; ++b) {
        const int64_t c0 = c * chunk_cols + 32 * b, live = std::max<int64_t>(0, std::min<int64_t>(32, k - c0));
        const float* xb = xr + c0;
        float amax = 0.f;
        bool finite = true;
        for (int64_t i = 0; i < live; ++i) {
          finite = finite && std::isfinite(xb[i]);
          amax = std::max(amax, std::fabs(xb[i]));
        }
        const bool in = finite && (amax == 0.f || (amax >= kInt4A8MinAbs && amax <= kInt4A8MaxAbs));
        row_in_range = row_in_range && in;
        // d = max|x| / 127 and t = x * (127 / max|x|): the reference's roundings
        // (reference.quantize_activations_int8). One digit: round(t) to nearest even. More:
        // v = round(t * unit) = a1 unit + round((t - a1) unit) with a1 = round(t) (t - a1 exact,
        // the products by unit exact; |v| <= 127 unit), written as `digits` int8 digits, the
        // lower ones in [-128, 127] (two's complement bytes), the top one in [-127, 127]; the
        // lane scale d / unit. Blocks out of range: d = NaN, no bytes (their row is redone).
        const float inv = in && amax > 0.f ? 127.f / amax : 0.f;
        const float d = in ? amax / 127.f : NAN;
        int32_t lane_sum[4] = {};
        // Column 32 b + i of the chunk is byte 16 b + i / 2 of its even (i even) or odd half.
        for (int64_t i = 0; i < 32; ++i) {
          const float t = i < live && inv != 0.f ? xb[i] * inv : 0.f;
          const float a1 = std::max(-127.f, std::min(127.f, round_to_even(t)));
          int32_t v = static_cast<int32_t>(a1) * (int32_t{1} << low_bits) +
                      (digits > 1 ? static_cast<int32_t>(round_to_even((t - a1) * unit)) : 0);
          const int32_t top = 127 * (int32_t{1} << low_bits);  // t may be an ulp past 127
          v = std::max(-top, std::min(top, v));
          lane_sum[i / 8] += v;  // lane 4 b + i / 8 of the chunk: its columns 8 l .. 8 l + 7
          const int64_t byte = (i & 1) * half + 16 * b + i / 2;
          for (int digit = digits - 1; digit > 0; --digit) {  // lowest first
            const int8_t low = static_cast<int8_t>(v & 0xFF);  // v - low is a multiple of 256
            even[digit * cols + byte] = low;
            v = (v - low) / 256;
          }
          even[byte] = static_cast<int8_t>(v);
        }
        for (int64_t l = 0; l < 4; ++l) {
          dr[c * (chunk_cols / 8) + 4 * b + l] = d / unit;
          cr[c * (chunk_cols / 8) + 4 * b + l] = 8 * lane_sum[l];  // |8 x 8 x 127 unit| < 2^29
        }
      }
    }
    // The groups' sums of x in fp64, rounded once: an fp32 running sum over a long group (a
    // whole row of 1000 or more) would be off by many roundings, and the offset term carries
    // that error into every output of the row.
    float* sr = group_sum + r * groups;
    for (int64_t g = 0; g < groups; ++g) {
      double sum = 0.0;
      for (int64_t col = g * group_len; col < std::min<int64_t>((g + 1) * group_len, k); ++col) sum += xr[col];
      sr[g] = static_cast<float>(sum);
    }
    in_range[r] = row_in_range;
    out_of_range += !row_in_range;
  }
  return out_of_range;
}

}  // namespace cpu
}  // namespace fourbit
