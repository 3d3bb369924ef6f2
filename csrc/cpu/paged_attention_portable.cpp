// Portable CPU paged attention (any instruction set, default flags), and the pieces every
// width shares: the scratch size, the split-KV plan and the merge of partitions.
#include "fourbit/paged_attention_cpu_kernel.h"

namespace fourbit {
namespace cpu {
namespace {

// Eight floats per "register" in plain C++ (the AVX2 shapes), loops the compiler can
// vectorize for any target; exp2 is the C library's.
struct Portable {
  static constexpr int W = 8;
  static constexpr int kRows = 4;
  struct vec {
    float v[W];
  };
  template <class F>
  static vec map(F f) {
    vec r;
    for (int i = 0; i < W; ++i) r.v[i] = f(i);
    return r;
  }
  static vec zero() { return map([](int) { return 0.0f; }); }
  static vec load(const float* p) { return map([&](int i) { return p[i]; }); }
  static void store(float* p, const vec& a) {
    for (int i = 0; i < W; ++i) p[i] = a.v[i];
  }
  static vec broadcast(float s) { return map([&](int) { return s; }); }
  static vec add(const vec& a, const vec& b) { return map([&](int i) { return a.v[i] + b.v[i]; }); }
  static vec sub(const vec& a, const vec& b) { return map([&](int i) { return a.v[i] - b.v[i]; }); }
  static vec mul(const vec& a, const vec& b) { return map([&](int i) { return a.v[i] * b.v[i]; }); }
  static vec fma(const vec& a, const vec& b, const vec& c) {
    return map([&](int i) { return std::fma(a.v[i], b.v[i], c.v[i]); });
  }
  static vec max(const vec& a, const vec& b) { return map([&](int i) { return std::max(a.v[i], b.v[i]); }); }
  static float reduce_max(const vec& a) {
    float m = a.v[0];
    for (int i = 1; i < W; ++i) m = std::max(m, a.v[i]);
    return m;
  }
  static float reduce_add(const vec& a) {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += a.v[i];
    return s;
  }
  static vec keep_first(const vec& a, int k, float fill) { return map([&](int i) { return i < k ? a.v[i] : fill; }); }
  static vec exp2(const vec& a) { return map([&](int i) { return std::exp2(a.v[i]); }); }
  template <class T>
  static vec widen(const T* p) {
    return map([&](int i) { return to_float(p[i]); });
  }
  template <class T>
  static void transpose(const T* const* rows, int64_t d0, float* dst, int64_t stride) {
    for (int j = 0; j < W; ++j)
      for (int l = 0; l < W; ++l) dst[j * stride + l] = to_float(rows[l][d0 + j]);
  }
};

}  // namespace

void attend_block_portable(const PagedAttentionArgs& a, const AttentionBlock& block, float* scratch) {
  attend_block_impl<Portable>(a, block, scratch);
}

int64_t attention_scratch_floats(int64_t rows, int64_t head_dim, int width) {
  return scratch_floats(rows, head_dim, width);
}

int64_t decode_partition_keys(int64_t seq_len, int64_t chunk, int width) {
  const int64_t tile = 2 * static_cast<int64_t>(width);
  const int64_t parts = std::max<int64_t>(1, (seq_len + chunk - 1) / chunk);
  return std::max<int64_t>(tile, round_up((seq_len + parts - 1) / parts, tile));
}

void merge_partitions(const float* part, const float* lse, int64_t splits, int64_t head_dim, float* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < splits; ++s) top = std::max(top, lse[s]);
  std::fill(out, out + head_dim, 0.0f);
  if (top == -std::numeric_limits<float>::infinity()) return;  // no partition saw a key
  float total = 0.0f;
  for (int64_t s = 0; s < splits; ++s) {
    // NaN in a partition (a NaN query or key): its weight is NaN and so is the whole output.
    const float w = std::exp2(lse[s] - top);
    total += w;
    for (int64_t j = 0; j < head_dim; ++j) out[j] += w * part[s * head_dim + j];
  }
  const float inv = 1.0f / total;
  for (int64_t j = 0; j < head_dim; ++j) out[j] *= inv;
}

}  // namespace cpu
}  // namespace fourbit
