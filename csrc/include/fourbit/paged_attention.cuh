// Paged KV cache kernels: cache writes and split-KV decode attention. Torch-free device code;
// the launcher is csrc/cuda/paged_attention.cu.
//
// Layout (python/fourbit/kv_cache.py): K and V pages [num_blocks, block_size, Hkv, D] (NHD);
// block_tables int32 [B, max_blocks]; token t of sequence b is at page
// block_tables[b, t / block_size], row t % block_size; slot_mapping int64 [T] = page *
// block_size + row (-1 = skip). Query head h reads kv head h / group (GQA).
//
// Decode (flash-decoding, as in the Triton kernel, kernels/paged_attention.py): block
// (split, kv head, b) takes `partition` consecutive tokens of sequence b and every query
// head of that kv head, so each K and V row is read from memory once per group:
//   A. logits: a team of kTeam threads per token reads the token's K row with 16-byte loads
//      (one load per thread for fp16 D = 128), dots it with each query head's q (kept in
//      shared memory, pre-scaled) and reduces inside the team with shuffles;
//   B. per query head (one warp each): max and sum of exp over the partition;
//   C. out[g, :] = sum_t p[g, t] v[t, :]: threads own (g, 16-byte column) pairs, so the
//      threads of a warp read one V row contiguously;
// and writes the partition's normalized output (fp32) and log-sum-exp. A second kernel
// merges the partitions. Every index read from memory (page, seq_len, slot) is clamped to
// the cache, so bad tables give wrong numbers but never an access outside it. Nothing
// here synchronizes with the host: the launch is safe to capture in a CUDA graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fourbit {
namespace cuda {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// Explicit conversions: torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements of T in one 16-byte load.
template <class T>
struct Vec16 {
  static constexpr int kElems = 16 / sizeof(T);
};

// Load 16 bytes of T (16-byte aligned) as kElems floats.
template <class T>
__device__ __forceinline__ void load16(const T* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kElems; ++i) out[i] = to_float(e[i]);
}

constexpr int next_pow2(int x) { return x <= 1 ? 1 : 2 * next_pow2((x + 1) / 2); }

struct PagedDecodeParams {
  const void* q;             // [B, Hq, D], strides q_stride_b, q_stride_h (elements), unit along D
  const void* k_cache;       // [num_blocks, block_size, Hkv, D], contiguous
  const void* v_cache;       // same
  const int32_t* block_tables;  // [B, max_blocks], row stride block_tables_stride
  const int32_t* seq_lens;   // [B]
  float* partial_out;        // [B, Hq, splits, D]
  float* partial_lse;        // [B, Hq, splits], natural log
  void* out;                 // [B, Hq, D] contiguous, q's dtype
  int64_t q_stride_b, q_stride_h;
  int64_t block_tables_stride;
  int num_blocks, max_blocks, block_size_log2, num_kv_heads, group, partition, splits;
  float scale;
};

// Row r of the page holding token t of one sequence, clamped into the cache.
__device__ __forceinline__ int64_t token_row(const int32_t* table_row, int t, const PagedDecodeParams& p) {
  int page = table_row[t >> p.block_size_log2];
  page = min(max(page, 0), p.num_blocks - 1);
  return (static_cast<int64_t>(page) << p.block_size_log2) + (t & ((1 << p.block_size_log2) - 1));
}

// Dynamic shared memory of the decode kernel, in floats: q [group][D], logits [group][partition].
__host__ __device__ inline int64_t decode_smem_floats(int group, int head_dim, int partition) {
  return static_cast<int64_t>(group) * (head_dim + partition);
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const PagedDecodeParams p) {
  constexpr int kVec = Vec16<T>::kElems;
  constexpr int kRowVecs = D / kVec;                                  // 16-byte vectors in one row
  constexpr int kTeam = kRowVecs >= 32 ? 32 : next_pow2(kRowVecs);    // threads reading one K row
  constexpr int kTeamsPerBlock = kThreads / kTeam;
  constexpr int kVecsPerThread = (kRowVecs + kTeam - 1) / kTeam;
  static_assert(D % kVec == 0, "head_dim must be a whole number of 16-byte vectors");

  extern __shared__ float smem[];
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int group = p.group, num_heads = p.num_kv_heads * group;
  const int capacity = p.max_blocks << p.block_size_log2;
  const int seq_len = min(max(p.seq_lens[b], 0), capacity);
  const int start = split * p.partition;
  const int n = min(start + p.partition, seq_len) - start;            // tokens of this partition
  const int64_t head0 = static_cast<int64_t>(b) * num_heads + static_cast<int64_t>(kvh) * group;

  if (n <= 0) {  // past the sequence's end: zero weight in the merge
    for (int g = threadIdx.x; g < group; g += kThreads) p.partial_lse[(head0 + g) * p.splits + split] = -INFINITY;
    return;
  }

  float* q_s = smem;                       // [group][D], pre-scaled
  float* logits = smem + group * D;        // [group][partition]
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b;
  for (int i = threadIdx.x; i < group * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    q_s[i] = to_float(q[(static_cast<int64_t>(kvh) * group + g) * p.q_stride_h + d]) * p.scale;
  }
  __syncthreads();

  const int32_t* table_row = p.block_tables + b * p.block_tables_stride;
  const int64_t row_elems = static_cast<int64_t>(p.num_kv_heads) * D;  // one (page, row): Hkv x D
  const T* k_base = static_cast<const T*>(p.k_cache) + static_cast<int64_t>(kvh) * D;
  const T* v_base = static_cast<const T*>(p.v_cache) + static_cast<int64_t>(kvh) * D;

  // A. logits[g][i] = q_s[g] . k[start + i]
  const int lane = threadIdx.x & 31;
  const int team_lane = threadIdx.x % kTeam;
  // The lanes of this thread's team inside its warp: teams never straddle warps.
  const unsigned team_mask = kTeam == 32 ? 0xffffffffu : ((1u << kTeam) - 1) << (lane & ~(kTeam - 1));
  for (int i = threadIdx.x / kTeam; i < n; i += kTeamsPerBlock) {
    const T* k_row = k_base + token_row(table_row, start + i, p) * row_elems;
    float k[kVecsPerThread][kVec];
#pragma unroll
    for (int j = 0; j < kVecsPerThread; ++j) {
      const int vec = team_lane + j * kTeam;
      if (vec < kRowVecs) {
        load16(k_row + vec * kVec, k[j]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) k[j][e] = 0.f;
      }
    }
    for (int g = 0; g < group; ++g) {
      const float* qg = q_s + g * D;
      float dot = 0.f;
#pragma unroll
      for (int j = 0; j < kVecsPerThread; ++j) {
        const int vec = team_lane + j * kTeam;
        if (vec < kRowVecs) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) dot += k[j][e] * qg[vec * kVec + e];
        }
      }
#pragma unroll
      for (int offset = kTeam / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(team_mask, dot, offset, kTeam);
      if (team_lane == 0) logits[g * p.partition + i] = dot;
    }
  }
  __syncthreads();

  // B. softmax numerators in place, and each head's log-sum-exp; one warp per head.
  const int warp = threadIdx.x / 32;
  for (int g = warp; g < group; g += kWarps) {
    float* row = logits + g * p.partition;
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, row[i]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    float sum = 0.f;
    for (int i = lane; i < n; i += 32) {
      const float e = __expf(row[i] - m);
      row[i] = e;
      sum += e;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) p.partial_lse[(head0 + g) * p.splits + split] = m + __logf(sum);
    // Normalize here so C writes the partition's softmax output directly.
    const float inv = 1.f / sum;
    for (int i = lane; i < n; i += 32) row[i] *= inv;
  }
  __syncthreads();

  // C. out[g][vec] = sum_i logits[g][i] * v[start + i][vec]; consecutive threads take
  // consecutive 16-byte columns of one head, so a warp reads a V row contiguously.
  for (int pair = threadIdx.x; pair < group * kRowVecs; pair += kThreads) {
    const int g = pair / kRowVecs, vec = pair - g * kRowVecs;
    const float* pg = logits + g * p.partition;
    float acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
    for (int i = 0; i < n; ++i) {
      float v[kVec];
      load16(v_base + token_row(table_row, start + i, p) * row_elems + vec * kVec, v);
      const float w = pg[i];
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += w * v[e];
    }
    float* o = p.partial_out + ((head0 + g) * p.splits + split) * D + vec * kVec;
#pragma unroll
    for (int e = 0; e < kVec; ++e) o[e] = acc[e];
  }
}

// out[b, h, :] = sum_s exp(lse_s - lse) partial_out[b, h, s, :], lse = log sum_s exp(lse_s).
// Block (h, b), one thread per element of D (blockDim.x: D rounded up to whole warps, every
// thread reaches the shuffles). Partitions past a
// sequence's end have lse = -inf and are skipped (their partial output was never written).
template <class T, int D>
__global__ void paged_decode_merge_kernel(const PagedDecodeParams p) {
  __shared__ float warp_max[32];
  const int h = blockIdx.x, b = blockIdx.y;
  const int num_heads = p.num_kv_heads * p.group;
  const int64_t head = static_cast<int64_t>(b) * num_heads + h;
  const float* lse = p.partial_lse + head * p.splits;

  // The largest log-sum-exp, reduced over the block.
  float m = -INFINITY;
  for (int s = threadIdx.x; s < p.splits; s += blockDim.x) m = fmaxf(m, lse[s]);
  for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  m = -INFINITY;
  for (int w = 0; w < (blockDim.x + 31) / 32; ++w) m = fmaxf(m, warp_max[w]);
  __syncthreads();

  if (threadIdx.x < D) {
    float total = 0.f, acc = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      if (lse[s] == -INFINITY) continue;
      const float w = __expf(lse[s] - m);
      total += w;
      acc += w * p.partial_out[(head * p.splits + s) * D + threadIdx.x];
    }
    // total > 0 whenever seq_len >= 1 (partition 0 is never empty); 0 keeps bad input finite.
    static_cast<T*>(p.out)[head * D + threadIdx.x] = from_float<T>(total > 0.f ? acc / total : 0.f);
  }
}

// k_cache[slot] = k[t], v_cache[slot] = v[t] (rows of hd = Hkv x D elements); block t, one
// token. Slots outside [0, num_slots) are skipped (-1 by contract, anything else by safety).
template <class T, bool kVectorized>
__global__ void write_kv_kernel(const T* k, const T* v, T* k_cache, T* v_cache, const int64_t* slot_mapping,
                                int64_t num_slots, int hd, int64_t k_stride, int64_t v_stride) {
  const int64_t slot = slot_mapping[blockIdx.x];
  if (slot < 0 || slot >= num_slots) return;
  const T* k_src = k + blockIdx.x * k_stride;
  const T* v_src = v + blockIdx.x * v_stride;
  T* k_dst = k_cache + slot * hd;
  T* v_dst = v_cache + slot * hd;
  if (kVectorized) {  // hd and every row start are 16-byte multiples (checked by the launcher)
    constexpr int kVec = Vec16<T>::kElems;
    for (int i = threadIdx.x; i < hd / kVec; i += blockDim.x) {
      reinterpret_cast<uint4*>(k_dst)[i] = reinterpret_cast<const uint4*>(k_src)[i];
      reinterpret_cast<uint4*>(v_dst)[i] = reinterpret_cast<const uint4*>(v_src)[i];
    }
  } else {
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
      k_dst[i] = k_src[i];
      v_dst[i] = v_src[i];
    }
  }
}

}  // namespace cuda
}  // namespace fourbit
