// Torch-free interface of the CPU int8 weight-only matmul kernels (csrc/cpu/int8_mm_*.cpp).
//
// out[m, n] = sum_k x[m, k] * (q[n, k] * s[n, k / group_len]) + bias[n]
//
// q is a signed int8 weight [N, K] (row-major), s one scale per group of group_len
// consecutive input channels of a row (GGUF Q8_0: 32; per-channel: K), fp32, fp16 or bf16.
// Each weight is dequantized in registers, w = float(q) * s (exact when s is 16-bit: 8 x 11
// significant bits fit in fp32's 24), then multiply-added with x in fp32, as reference.py
// computes it. Two schedules:
//
// 1. Dot products (few rows of x, decode). Memory-bound on q (1 byte per weight), so q is
//    read once: kInt8RowsPerBlock weight rows at a time, each dequantized register feeding
//    every row of x in the pass (up to V's row count), with one accumulator per (row of x,
//    weight row): 4 independent FMA chains at M = 1.
// 2. Dequantized panels (many rows of x, prefill): a panel of weight rows is dequantized to
//    fp32 (small enough to stay in L2) and multiplied by the launcher with at::mm, at the
//    fp32 GEMM rate. Its cost is one pass over q, like the dot products', plus the GEMM.
//
// The inline helpers below are `static`: this header is also compiled inside the AVX2 and
// AVX-512 translation units (under #pragma GCC target), and internal linkage keeps the
// linker from ever substituting such a copy for the baseline one the launcher calls.
#pragma once

#include <cstdint>
#include <cstring>

namespace fourbit {
namespace cpu {

// The storage of the scales; the kernels widen them to fp32 a block of rows at a time.
enum class ScaleType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Int8MatmulArgs {
  const float* x;       // [M, K] fp32 activations, row-major
  const int8_t* q;      // [N, K] int8 weights, row-major
  const void* scales;   // [N, groups] in scale_type, row-major
  ScaleType scale_type;
  const float* bias;    // [N] or nullptr
  float* out;           // [M, N] (dot-product schedule)
  int64_t m, n, k, groups, group_len;
};

// Weight rows per block of the dot-product schedule (and the unit of work of a thread).
constexpr int64_t kInt8RowsPerBlock = 4;

// Rows of x up to which the dot-product schedule runs; above, dequantized panels and at::mm.
// Measured on this project's 2-core AVX-512 machine (bench/results/cpu-int8.md).
// One thread, CPU time, M = 1 / 16 / 32: 49152 x 576 dot 4.8 / 14.2 / 25.6 ms, panels 7.4 /
// 16.1 / 20.5 ms; 4096 x 4096 dot 0.95 / 6.0 / 11.5 ms, panels 3.9 / 16.2 / 19.7 ms (the
// fp32 GEMM alone 4.7 / 13.4 / 16.3 ms). Past 16 rows the panels' GEMM is the faster one
// on the embedding-sized shape, and comparable with the dot products on square ones.
constexpr int64_t kInt8DotMaxRows = 16;

// Floats of per-thread scratch: the fp32 scales of one block of rows.
static inline int64_t int8_scratch_floats(int64_t groups) { return kInt8RowsPerBlock * groups; }

// Rows [n_begin, n_end) of out for every row of x (dot-product schedule). Safe to call from
// many threads on disjoint row ranges, each with its own scratch of int8_scratch_floats floats.
void int8_matmul_rows_portable(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch);
void int8_matmul_rows_avx2(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch);
void int8_matmul_rows_avx512(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* scratch);

// w[(n - n_begin) * K + k] = float(q[n, k]) * s[n, k / group_len] for rows [n_begin, n_end)
// (the panel schedule), same scratch.
void int8_dequantize_rows_portable(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* w, float* scratch);
void int8_dequantize_rows_avx2(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* w, float* scratch);
void int8_dequantize_rows_avx512(const Int8MatmulArgs& a, int64_t n_begin, int64_t n_end, float* w, float* scratch);

// IEEE half -> float, every value (subnormals, infinities, NaN) exact. The portable path and
// the vector paths' tails use it.
static inline float int8_half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf, NaN (payload kept)
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    float f = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

static inline float int8_bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// count scales from p (scale type t) as fp32, one at a time.
static inline void int8_scales_to_float_scalar(const void* p, ScaleType t, int64_t begin, int64_t count, float* out) {
  if (t == ScaleType::kFloat32) {
    std::memcpy(out, static_cast<const float*>(p) + begin, count * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(p) + begin;
  for (int64_t i = 0; i < count; ++i) out[i] = t == ScaleType::kFloat16 ? int8_half_to_float(h[i]) : int8_bf16_to_float(h[i]);
}

}  // namespace cpu
}  // namespace fourbit
