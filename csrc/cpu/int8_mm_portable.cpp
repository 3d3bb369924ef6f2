// Portable CPU int8 weight-only matmul (any instruction set): eight floats per "register"
// in plain C++, loops the compiler can vectorize for any target. Compiled with the default flags.
#include "fourbit/int8_cpu_kernel.h"

namespace fourbit {
namespace cpu {
namespace {

struct Portable {
  static constexpr int W = 8;
  static constexpr int MR = 2;
  struct vec {
    float v[W];
  };
  static vec zero() { return vec{}; }
  static vec load(const float* p) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = p[l];
    return r;
  }
  static void store(float* p, const vec& v) {
    for (int l = 0; l < W; ++l) p[l] = v.v[l];
  }
  static vec mul(const vec& a, const vec& b) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] * b.v[l];
    return r;
  }
  static vec fma(const vec& a, const vec& b, const vec& c) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static vec broadcast(float s) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = s;
    return r;
  }
  static float hsum(const vec& v) {
    float s = 0.f;
    for (int l = 0; l < W; ++l) s += v.v[l];
    return s;
  }
  static vec load_q(const int8_t* p) {
    vec r;
    for (int l = 0; l < W; ++l) r.v[l] = static_cast<float>(p[l]);
    return r;
  }
  static void scales_to_float(const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
    int8_scales_to_float_scalar(p, t, begin, count, out);
  }
};

}  // namespace

void int8_matmul_rows_portable(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch) {
  int8_rows<Portable>(a, n_begin, n_end, scratch);
}

void int8_dequantize_rows_portable(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* w,
                                   float* scratch) {
  int8_dequantize<Portable>(a, n_begin, n_end, w, scratch);
}

}  // namespace cpu
}  // namespace fourbit
