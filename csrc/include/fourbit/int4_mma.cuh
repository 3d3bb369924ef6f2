// int4 weight-only matmul (W4A16) on tensor cores: out[M, N] = x[M, K] @ dequant(W)[N, K]^T,
// fp16 or bf16 activations, fp32 accumulation, M up to 64. Torch-free device code; the
// launcher is csrc/cuda/int4_mm.cu and the weight layout is built by
// python/fourbit/format.py (prepack_mma, which documents it).
//
// Why this shape of kernel:
// - Decode is memory-bound: the packed weights must stream from DRAM at full speed and be
//   read exactly once. So the weights are the A operand of mma.sync.m16n8k16 ("swap AB":
//   16 output features x 16 input channels per instruction) and the activations, tiny and
//   shared by every block, the B operand (8 rows of x per instruction). Each weight is used
//   by one lane only, in registers: it never needs to be shared.
// - The prepacked layout gives every lane its four A tiles of a 64-column chunk in one
//   16-byte word group; a warp's 32 lanes read 512 contiguous bytes. cp.async moves them to
//   shared memory STAGES chunks ahead (no registers held while loads are in flight), along
//   with the matching x chunk (zero-filled past M and K) and the scales and offsets of the
//   groups that chunk touches: the main loop issues no global load of its own, so no warp
//   ever waits on one (a plain load at each group change used to stall the warp for a DRAM
//   or L2 round trip: most of its time at group size 128).
// - int4 -> half in registers: lop3 puts two nibbles into the mantissas of two halves whose
//   exponent makes them 1024 + q (fp16) or 128 + q (bf16), exactly; one subtraction gives q,
//   one fused multiply-add q * s + m the weight, rounded once to the activation dtype.
// - Split-K over blocks so that a 4096 x 4096 layer at M = 1 (64 blocks of 64 features)
//   fills every SM; partial sums meet in an fp32 workspace through atomics, and the last
//   block of each column of blocks converts its tile (a counter per tile; no second launch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fourbit {
namespace cuda {

constexpr int kMmaWarps = 4;                    // warps per block, 16 output features each
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaBlockN = 16 * kMmaWarps;      // = MMA_TILE_N of format.py
constexpr int kMmaChunkK = 64;                  // = MMA_TILE_K: input channels per pipeline stage
constexpr int kMmaStages = 4;
constexpr int kXStride = kMmaChunkK + 8;        // halves per shared row of x: +16 bytes avoids bank conflicts
// Scales and offsets in shared memory, per stage: the [groups the chunk touches, the block's
// 64 columns] slice of the transposed [groups, N] tables, one contiguous 128-byte row segment
// per group. Groups are at least kMmaMinGroupLen wide (the launcher checks it whenever there
// are several) and chunks start at multiples of 64, so a chunk touches one group, or two
// when group_len is 32 (tiles 0, 1 in the first, 2, 3 in the second).
constexpr int kMmaMinGroupLen = 32;
constexpr int kGroupRows = kMmaChunkK / kMmaMinGroupLen;
static_assert(kGroupRows == 2, "the main loop reloads scales at tile 2 only: one or two groups per chunk");
// A row segment starts wherever group * N + n0 puts it (N is any size, so only 2-byte aligned)
// but cp.async moves aligned 16-byte pieces: each row is copied from the 16-byte boundary at or
// below its start, 9 pieces (72 halves) covering the 64 columns at any of the 8 possible
// element offsets ("lead", 0..7), and read at index lead + column (at most 7 + 63 < 72).
constexpr int kGroupStride = kMmaBlockN + 8;    // halves per shared row of scales or offsets
constexpr int kGroupPieces = kGroupStride * 2 / 16;

struct Int4MmaParams {
  const void* x;                 // [M, K] fp16 | bf16, row stride K (K a multiple of 8, 16-byte aligned)
  const int32_t* packed;         // [N_pad / 16, K_pad / 64 * 128], prepack_mma
  const void* scales;            // [groups, N] in x's dtype (transposed from the canonical [N, groups])
  const void* offsets;           // [groups, N]
  const void* bias;              // [N] in x's dtype, or null
  void* out;                     // [M, N] in x's dtype
  float* workspace;              // [M, N_pad] fp32, zero (split_k > 1 only)
  int32_t* counters;             // [N_pad / 64], zero (split_k > 1 only)
  int m, n, k, n_pad, k_chunks, groups, group_shift, split_k;
  // group_shift: log2(group_len), or -1 for one group per row (group_len = K_pad canonical).
};

template <class T>
struct MmaType;
template <>
struct MmaType<__half> {
  using T = __half;
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // two fp16 1024.0: mantissa ulp 1
  static __device__ __forceinline__ T2 magic_value() { return __float2half2_rn(1024.f); }
  static __device__ __forceinline__ T2 pair(T lo, T hi) { return __halves2half2(lo, hi); }
  static __device__ __forceinline__ T2 fma(T2 a, T2 b, T2 c) { return __hfma2(a, b, c); }
  static __device__ __forceinline__ T2 sub(T2 a, T2 b) { return __hsub2(a, b); }
  static __device__ __forceinline__ T from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float to_float(T v) { return __half2float(v); }
};
template <>
struct MmaType<__nv_bfloat16> {
  using T = __nv_bfloat16;
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // two bf16 128.0: mantissa ulp 1
  static __device__ __forceinline__ T2 magic_value() { return __float2bfloat162_rn(128.f); }
  static __device__ __forceinline__ T2 pair(T lo, T hi) { return __halves2bfloat162(lo, hi); }
  static __device__ __forceinline__ T2 fma(T2 a, T2 b, T2 c) { return __hfma2(a, b, c); }
  static __device__ __forceinline__ T2 sub(T2 a, T2 b) { return __hsub2(a, b); }
  static __device__ __forceinline__ T from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float to_float(T v) { return __bfloat162float(v); }
};

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <class T2>
__device__ __forceinline__ T2 as_pair(uint32_t bits) {
  return *reinterpret_cast<const T2*>(&bits);
}
template <class T2>
__device__ __forceinline__ uint32_t as_bits(T2 v) {
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The four A registers of one 16 x 16 tile from its prepacked word: register r takes
// nibbles r and r + 4 (format.py: nibble h + 2 kh + 4 e), as 1024 + q (or 128 + q),
// then q * s + m with the scale and offset of row g (registers 0, 2) or g + 8 (1, 3).
template <class T>
__device__ __forceinline__ void dequant_tile(uint32_t word, typename MmaType<T>::T2 s_lo, typename MmaType<T>::T2 m_lo,
                                             typename MmaType<T>::T2 s_hi, typename MmaType<T>::T2 m_hi,
                                             uint32_t a[4]) {
  using Ty = MmaType<T>;
  using T2 = typename Ty::T2;
  const T2 magic = Ty::magic_value();
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const T2 q = Ty::sub(as_pair<T2>(lop3_and_or(word >> (4 * r), 0x000f000fu, Ty::kMagic)), magic);
    a[r] = as_bits(r % 2 == 0 ? Ty::fma(q, s_lo, m_lo) : Ty::fma(q, s_hi, m_hi));
  }
}

template <class T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared, bypassing L1 (.cg: every byte is read once); src_bytes = 0
// writes zeros (rows of x past M, columns past K) without reading.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)); }

// Block (n tile of 64 features, K split). kMTiles = ceil(M / 8) rounded up to 1, 2, 4 or 8.
template <class T, int kMTiles>
__global__ void __launch_bounds__(kMmaThreads) int4_mma_kernel(const Int4MmaParams p) {
  using Ty = MmaType<T>;
  using T2 = typename Ty::T2;
  constexpr int kRowsX = 8 * kMTiles;
  constexpr int kXPieces = kRowsX * kMmaChunkK * 2 / 16;  // 16-byte pieces of one x chunk
  // Static shared memory, at kMTiles = 8: 8 KB of weights, 36 KB of x, 2.25 KB of scales and
  // offsets (46.3 KB): under the 48 KB static limit (so the launcher sets no attribute), and
  // two blocks fit a 99 KB SM (sm_86/89/120).
  __shared__ __align__(16) uint32_t w_smem[kMmaStages][kMmaWarps][32 * 4];
  __shared__ __align__(16) uint16_t x_bits[kMmaStages][kRowsX * kXStride];  // T's bits (no constructors in shared)
  // [stage][0: scales, 1: offsets][group row of the chunk][lead + column of the block]
  __shared__ __align__(16) uint16_t group_bits[kMmaStages][2][kGroupRows][kGroupStride];
  static_assert(sizeof(w_smem) + sizeof(x_bits) + sizeof(group_bits) + 16 <= 48 * 1024, "static shared memory");
  T(*x_smem)[kRowsX * kXStride] = reinterpret_cast<T(*)[kRowsX * kXStride]>(x_bits);
  const T(*group_smem)[2][kGroupRows][kGroupStride] =
      reinterpret_cast<const T(*)[2][kGroupRows][kGroupStride]>(group_bits);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int n_block = blockIdx.x, split = blockIdx.y;
  // This block's chunks of 64 input channels: an even share of the split.
  const int chunk_begin = static_cast<int>(static_cast<int64_t>(p.k_chunks) * split / p.split_k);
  const int chunk_end = static_cast<int>(static_cast<int64_t>(p.k_chunks) * (split + 1) / p.split_k);
  const int chunks = chunk_end - chunk_begin;
  const int n16 = n_block * kMmaWarps + warp;                       // this warp's 16 features
  const int n0 = n_block * kMmaBlockN;                              // the block's first feature
  const int n_valid = min(kMmaBlockN, p.n - n0);                    // >= 1, as n_pad - n < 64
  const T* x = static_cast<const T*>(p.x);
  const int32_t* w_warp = p.packed + static_cast<int64_t>(n16) * p.k_chunks * 128;
  // The groups of a chunk: its first, and the next one too when groups are narrower than a
  // chunk (group_len 32: the launcher allows no narrower). One group per row: group 0.
  const bool two_groups = p.group_shift >= 0 && (1 << p.group_shift) < kMmaChunkK;
  auto first_group = [&](int chunk) { return p.group_shift < 0 ? 0 : (chunk * kMmaChunkK) >> p.group_shift; };

  auto load_stage = [&](int stage, int chunk) {
    // Weights: each lane its own 16 bytes of this warp's 512.
    cp_async16(&w_smem[stage][warp][lane * 4], w_warp + static_cast<int64_t>(chunk) * 128 + lane * 4, 16);
    // x: kRowsX rows x 8 pieces of 16 bytes; zeros past M and past K (K is a multiple of 8).
    // A loop of known trip count (the stride is the block size) unrolls without remainders.
    const int k0 = chunk * kMmaChunkK;
#pragma unroll
    for (int it = 0; it < (kXPieces + kMmaThreads - 1) / kMmaThreads; ++it) {
      const int i = threadIdx.x + it * kMmaThreads;
      if (kXPieces % kMmaThreads == 0 || i < kXPieces) {
        const int row = i / 8, col = (i % 8) * 8;
        const bool valid = row < p.m && k0 + col < p.k;
        const T* src = valid ? x + static_cast<int64_t>(row) * p.k + k0 + col : x;
        cp_async16(&x_smem[stage][row * kXStride + col], src, valid ? 16 : 0);
      }
    }
    // Scales and offsets: per group row and table, kGroupPieces aligned pieces from the 16-byte
    // boundary at or below the segment's start (T is 2 bytes and torch aligns it to 2, so the
    // lead is even). Bytes of a piece past the segment's n_valid columns (features past N) are
    // zero-filled, unread; so are whole rows of groups past the last one: their channels lie at
    // or past groups * group_len >= K, where x is zero-filled and q is zero, so zero scales and
    // offsets give the same zero product the last group's did, without a read. The only bytes
    // read outside the segment are the lead bytes before its start, in the same 16-byte line,
    // hence the same allocation (the previous group's row, or bytes before a data pointer that
    // is not 16-byte aligned). Threads are taken from the top down: at kMTiles = 1 the bottom
    // half copies x.
    const int i = kMmaThreads - 1 - threadIdx.x;
    if (i < (two_groups ? 2 : 1) * 2 * kGroupPieces) {
      const int row = i / (2 * kGroupPieces), table = i / kGroupPieces % 2, piece = i % kGroupPieces;
      const int group = first_group(chunk) + row;
      const uintptr_t base = reinterpret_cast<uintptr_t>(table == 0 ? p.scales : p.offsets);
      const uintptr_t begin = base + 2 * (static_cast<int64_t>(group) * p.n + n0);  // bytes; T is 2 bytes
      const int lead = static_cast<int>(begin & 15);                  // bytes before the segment
      const int bytes = group < p.groups ? max(0, min(16, lead + 2 * n_valid - 16 * piece)) : 0;
      const uintptr_t src = bytes > 0 ? (begin & ~uintptr_t{15}) + 16 * piece : base & ~uintptr_t{15};
      cp_async16(&group_bits[stage][table][row][piece * 8], reinterpret_cast<const void*>(src), bytes);
    }
  };

  float acc[kMTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;

#pragma unroll
  for (int s = 0; s < kMmaStages - 1; ++s) {
    if (s < chunks) load_stage(s, chunk_begin + s);
    cp_async_commit();  // every thread commits every time, so the group counts agree
  }

  const int row_lo = n16 * 16 + g, row_hi = row_lo + 8;          // this lane's two features
  const int col_lo = row_lo - n0;                                 // ...as columns of the block
  // Where a group's segment starts in its shared copy: the element offset of its first column
  // within its 16-byte line, (element address) mod 8 per table, the copy's `lead` / 2. 32-bit
  // arithmetic: wrapping keeps the low bits.
  const uint32_t lead_scales = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p.scales) >> 1) + n0;
  const uint32_t lead_offsets = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p.offsets) >> 1) + n0;

  for (int c = 0; c < chunks; ++c) {
    cp_async_wait<kMmaStages - 2>();  // chunk c has landed (for this thread)...
    __syncthreads();                  // ...and for every thread; stage (c - 1) is free again
    if (c + kMmaStages - 1 < chunks) load_stage((c + kMmaStages - 1) % kMmaStages, chunk_begin + c + kMmaStages - 1);
    cp_async_commit();

    const int stage = c % kMmaStages;
    const uint4 words = *reinterpret_cast<const uint4*>(&w_smem[stage][warp][lane * 4]);
    const uint32_t word[4] = {words.x, words.y, words.z, words.w};
    const int group0 = first_group(chunk_begin + c);
    T2 s_lo, m_lo, s_hi, m_hi;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // The scales and offsets of these 16 input channels, from this stage's copy: tiles 0, 1
      // in the chunk's first group, tiles 2, 3 in its second when groups are 32 wide (a
      // uniform branch), else in the first as well.
      if (j == 0 || (j == 2 && two_groups)) {
        const int row = j / 2;
        const uint32_t offset = static_cast<uint32_t>(group0 + row) * static_cast<uint32_t>(p.n);
        const int ls = static_cast<int>((lead_scales + offset) & 7), lo = static_cast<int>((lead_offsets + offset) & 7);
        const T s0 = group_smem[stage][0][row][ls + col_lo], s1 = group_smem[stage][0][row][ls + col_lo + 8];
        const T m0 = group_smem[stage][1][row][lo + col_lo], m1 = group_smem[stage][1][row][lo + col_lo + 8];
        s_lo = Ty::pair(s0, s0);
        m_lo = Ty::pair(m0, m0);
        s_hi = Ty::pair(s1, s1);
        m_hi = Ty::pair(m1, m1);
      }
      uint32_t a[4];
      dequant_tile<T>(word[j], s_lo, m_lo, s_hi, m_hi, a);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        // B (16 channels x 8 rows of x): channels 2t, 2t + 1 and 2t + 8, 2t + 9 of row 8 mt + g.
        const T* xr = &x_smem[stage][(8 * mt + g) * kXStride + 16 * j + 2 * t];
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(xr);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(xr + 8);
        mma_16816<T>(acc[mt], a, b0, b1);
      }
    }
  }
  cp_async_wait<0>();

  // C (16 features x 8 rows): c0, c1 at feature g, rows 2t, 2t + 1; c2, c3 at feature g + 8.
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  if (p.split_k == 1) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 8 * mt + 2 * t + (i & 1), col = (i < 2 ? row_lo : row_hi);
        if (row < p.m && col < p.n)
          out[static_cast<int64_t>(row) * p.n + col] =
              Ty::from_float(acc[mt][i] + (bias != nullptr ? Ty::to_float(bias[col]) : 0.f));
      }
    return;
  }

#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = 8 * mt + 2 * t + (i & 1), col = (i < 2 ? row_lo : row_hi);
      if (row < p.m) atomicAdd(&p.workspace[static_cast<int64_t>(row) * p.n_pad + col], acc[mt][i]);
    }
  // The last block of this column of blocks to finish converts the tile: its atomics and
  // everyone else's are complete once the counter says so (fence, then count).
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&p.counters[n_block], 1) == p.split_k - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = threadIdx.x; i < p.m * kMmaBlockN; i += kMmaThreads) {
    const int row = i / kMmaBlockN, col = n_block * kMmaBlockN + i % kMmaBlockN;
    if (col < p.n) {
      const float v = __ldcg(&p.workspace[static_cast<int64_t>(row) * p.n_pad + col]);
      out[static_cast<int64_t>(row) * p.n + col] = Ty::from_float(v + (bias != nullptr ? Ty::to_float(bias[col]) : 0.f));
    }
  }
}

}  // namespace cuda
}  // namespace fourbit
