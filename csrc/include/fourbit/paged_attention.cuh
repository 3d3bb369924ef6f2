// Paged KV cache kernels: cache writes and split-KV decode attention. Torch-free device code;
// the launcher is csrc/cuda/paged_attention.cu.
//
// Layout (python/fourbit/kv_cache.py): K and V pages [num_blocks, block_size, Hkv, D] (NHD);
// block_tables int32 [B, max_blocks]; token t of sequence b is at page
// block_tables[b, t / block_size], row t % block_size; slot_mapping int64 [T] = page *
// block_size + row (-1 = skip). Query head h reads kv head h / group (GQA).
//
// Decode (flash-decoding, as in the Triton kernel, kernels/paged_attention.py). The grid is
// (splits, Hkv, B) with splits sized from the page table's width (host-known, so a launch
// captured in a CUDA graph stays valid at every step); each block sizes its sequence's own
// partitions from seq_lens[b] on the device (decode_split: a short sequence in a wide table
// still spreads over several blocks; the blocks past its end exit at once). Block (split,
// kv head, b) takes one partition of sequence b and every query head of that kv head, so each
// K and V row is read from memory once per group:
//   0. the partition's page numbers (clamped) go to shared memory with q (pre-scaled), so no
//      K or V load waits behind a page-table load;
//   A. logits: a team of kKTeam threads per token reads the K row with 16-byte loads; each
//      thread issues kKUnroll tokens x kKVecs vectors (kLoadsInFlight loads) before it uses
//      any, dots them with each query head's q and the team reduces with shuffles;
//   B. per query head (one warp each): max and sum of exp over the partition;
//   C. out[g, :] = sum_t p[g, t] v[t, :]: teams of kVTeam threads own whole V rows (each
//      thread kVVecs 16-byte columns) of every kVTeams-th token, kVUnroll tokens per step (the
//      next step's loads issued before this step's arithmetic), and accumulate kHeadChunk query
//      heads at once; the teams' partial sums are added through shared memory;
// and writes the partition's normalized output (fp32) and log-sum-exp. A second kernel
// merges the partitions (one block per query head, the splits spread over its threads).
// Every index read from memory (page, seq_len, slot) is clamped to the cache, so bad tables
// give wrong numbers but never an access outside it. Nothing here synchronizes with the
// host: the launch is safe to capture in a CUDA graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fourbit {
namespace cuda {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kLoadsInFlight = 4;   // independent 16-byte K or V loads a thread issues before using one
constexpr int kKTeam = 8;           // threads reading one K row in phase A
constexpr int kHeadChunk = 4;       // query heads phase C accumulates per pass over V
constexpr int kMinSplitTokens = 64; // a sequence is cut into partitions of at least this many tokens...
constexpr int kSplitAlign = 16;     // ...rounded up to a multiple of this
constexpr int kTargetBlocksPerSm = 4;  // decode blocks per SM the split count aims at
constexpr int kMergeThreads = 128;

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

// 16 bytes of T (16-byte aligned), read-only path; kept raw until used.
__device__ __forceinline__ uint4 load16_raw(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// The kElems values of a raw 16-byte vector of T as floats.
template <class T>
__device__ __forceinline__ void to_floats(const uint4& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kElems; ++i) out[i] = to_float(e[i]);
}

// Phase C's teams for a row of `row_vecs` 16-byte vectors: each thread owns v_vecs columns
// (vectors), a team of v_team threads covers the row, v_teams teams fit in the block (the
// remaining kThreads - v_teams * v_team threads idle in phase C: 8 of 128 for D = 80 and 96).
__host__ __device__ constexpr int v_vecs(int row_vecs) { return (row_vecs + 31) / 32; }
__host__ __device__ constexpr int v_team(int row_vecs) { return (row_vecs + v_vecs(row_vecs) - 1) / v_vecs(row_vecs); }
__host__ __device__ constexpr int v_teams(int row_vecs) { return kThreads / v_team(row_vecs); }

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
  int num_blocks, max_blocks, block_size_log2, num_kv_heads, group;
  int partition;      // the most tokens one partition may hold (a multiple of kSplitAlign): bounds shared memory
  int splits;         // the grid's splits: ceil(max_blocks * block_size / partition)
  int target_splits;  // splits per sequence that fill the GPU (>= 1), host-known
  float scale;
};

// Shared memory of the decode kernel, offsets in floats: [0, logits) holds q [group][D] in
// phase A, then the teams' partial outputs [v_teams][kHeadChunk][D] in phase C; the logits
// [group][partition]; the partition's page numbers (int32, at most partition / block_size + 2).
struct DecodeSmem {
  int64_t logits, pages, total;
};

__host__ __device__ inline DecodeSmem decode_smem(int group, int head_dim, int elem_bytes, int partition,
                                                  int block_size_log2) {
  const int64_t q_floats = static_cast<int64_t>(group) * head_dim;
  const int64_t team_floats = static_cast<int64_t>(v_teams(head_dim * elem_bytes / 16)) * kHeadChunk * head_dim;
  DecodeSmem s{};
  s.logits = q_floats > team_floats ? q_floats : team_floats;
  s.pages = s.logits + static_cast<int64_t>(group) * partition;
  s.total = s.pages + (partition >> block_size_log2) + 2;
  return s;
}

// seq_lens[b] clamped to [0, the page table's capacity].
__device__ __forceinline__ int clamped_seq_len(const PagedDecodeParams& p, int b) {
  return min(max(p.seq_lens[b], 0), p.max_blocks << p.block_size_log2);
}

// How sequence b's tokens are cut into partitions; the decode and merge kernels both ask here.
// tokens: tokens per partition (the last one may hold fewer), a multiple of kSplitAlign and at
// most p.partition; count: partitions holding tokens (0 for an empty sequence), at most
// p.splits. The split count aims at p.target_splits, never cuts below kMinSplitTokens tokens
// per partition, and never exceeds the shared-memory bound p.partition.
struct DecodeSplit {
  int tokens, count;
};

__host__ __device__ inline DecodeSplit decode_split(int seq_len, const PagedDecodeParams& p) {
  if (seq_len <= 0) return {p.partition, 0};
  const int most = (seq_len - 1) / kMinSplitTokens + 1;  // ceil, without overflow near 2^31
  const int least = (seq_len - 1) / p.partition + 1;
  int want = most < p.target_splits ? most : p.target_splits;
  want = want > least ? want : least;
  want = want < p.splits ? want : p.splits;
  int tokens = ((seq_len - 1) / want + kSplitAlign) / kSplitAlign * kSplitAlign;  // round_up(ceil(seq_len / want))
  tokens = tokens < p.partition ? tokens : p.partition;
  return {tokens, (seq_len - 1) / tokens + 1};
}

// One step's 16-byte loads of a team: vectors lane + j * kTeam (j < kVecs) of the rows of tokens
// base + u * kTeams + team (u < kUnroll) of the partition. The loads are unconditional, from
// addresses clamped to token n - 1 and vector kRowVecs - 1 (always inside the cache), so the
// compiler issues them all, branch-free, before any is used; what a clamped load brings is
// never used (phase A does not store those logits, phase C gives them weight 0, and neither
// reads a vector past the row).
template <class T, int kRowVecs, int kTeam, int kTeams, int kVecs, int kUnroll, class RowOf>
__device__ __forceinline__ void load_tile(uint4 (&raw)[kUnroll][kVecs], const T* head_base, int64_t row_elems,
                                          const RowOf& row_of, int base, int n, int team, int lane) {
  constexpr int kVec = Vec16<T>::kElems;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const T* row = head_base + row_of(min(base + u * kTeams + team, n - 1)) * row_elems;
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int vec = kRowVecs == kTeam * kVecs ? lane + j * kTeam : min(lane + j * kTeam, kRowVecs - 1);
      raw[u][j] = load16_raw(row + vec * kVec);
    }
  }
}

// Max and sum over the 32 lanes of a warp (every lane gets the result).
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const PagedDecodeParams p) {
  constexpr int kVec = Vec16<T>::kElems;
  constexpr int kRowVecs = D / kVec;  // 16-byte vectors in one row
  static_assert(D % kVec == 0 && kRowVecs >= kKTeam, "head_dim must be whole 16-byte vectors, at least kKTeam");
  // Phase A: thread (k_team, k_lane) reads vectors k_lane + j * kKTeam of tokens
  // base + u * kKTeams + k_team.
  constexpr int kKVecs = (kRowVecs + kKTeam - 1) / kKTeam;
  constexpr int kKUnroll = kKVecs >= kLoadsInFlight ? 1 : kLoadsInFlight / kKVecs;
  constexpr int kKTeams = kThreads / kKTeam;
  constexpr int kKTile = kKTeams * kKUnroll;  // tokens per step of the block
  // Phase C: thread (v_team, v_lane) reads vectors v_lane + j * kVTeam of tokens
  // base + u * kVTeams + v_team.
  constexpr int kVVecs = v_vecs(kRowVecs);
  constexpr int kVTeam = v_team(kRowVecs);
  constexpr int kVTeams = v_teams(kRowVecs);
  constexpr int kVUnroll = kVVecs >= kLoadsInFlight ? 1 : kLoadsInFlight / kVVecs;
  constexpr int kVTile = kVTeams * kVUnroll;
  constexpr int kD4 = D / 4;  // float4 columns of an fp32 row

  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int group = p.group, num_heads = p.num_kv_heads * group;
  const int seq_len = clamped_seq_len(p, b);
  const DecodeSplit part = decode_split(seq_len, p);
  const int64_t head0 = static_cast<int64_t>(b) * num_heads + static_cast<int64_t>(kvh) * group;

  if (split >= part.count) {  // past the sequence's end: zero weight in the merge
    for (int g = threadIdx.x; g < group; g += kThreads) p.partial_lse[(head0 + g) * p.splits + split] = -INFINITY;
    return;
  }
  const int start = split * part.tokens;             // < seq_len
  const int n = min(part.tokens, seq_len - start);   // tokens of this partition, in [1, p.partition]

  const DecodeSmem layout = decode_smem(group, D, sizeof(T), p.partition, p.block_size_log2);
  float* q_s = smem;                                  // [group][D], pre-scaled (phase A)
  float4* team_out = smem4;                           // [kVTeams][kHeadChunk][kD4] (phase C)
  float* logits = smem + layout.logits;               // [group][p.partition]
  int* pages = reinterpret_cast<int*>(smem + layout.pages);

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b;
  for (int i = threadIdx.x; i < group * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    q_s[i] = to_float(q[(static_cast<int64_t>(kvh) * group + g) * p.q_stride_h + d]) * p.scale;
  }
  // The pages of tokens [start, start + n): table entries first_page .. last_page, all below
  // max_blocks because start + n <= seq_len <= capacity.
  const int bs_log2 = p.block_size_log2, row_mask = (1 << bs_log2) - 1;
  const int first_page = start >> bs_log2;
  const int num_pages = ((start + n - 1) >> bs_log2) - first_page + 1;
  const int32_t* table_row = p.block_tables + b * p.block_tables_stride;
  for (int j = threadIdx.x; j < num_pages; j += kThreads) {
    pages[j] = min(max(table_row[first_page + j], 0), p.num_blocks - 1);
  }
  __syncthreads();

  const int64_t row_elems = static_cast<int64_t>(p.num_kv_heads) * D;  // one (page, row): Hkv x D
  const T* k_base = static_cast<const T*>(p.k_cache) + static_cast<int64_t>(kvh) * D;
  const T* v_base = static_cast<const T*>(p.v_cache) + static_cast<int64_t>(kvh) * D;
  // Cache row of token start + i, for i in [0, n) (callers clamp i).
  auto row_of = [&](int i) -> int64_t {
    const int t = start + i;
    return (static_cast<int64_t>(pages[(t >> bs_log2) - first_page]) << bs_log2) + (t & row_mask);
  };

  // A. logits[g][i] = q_s[g] . k[start + i]
  {
    const int k_team = threadIdx.x / kKTeam, k_lane = threadIdx.x % kKTeam;
    for (int base = 0; base < n; base += kKTile) {
      uint4 raw[kKUnroll][kKVecs];
      load_tile<T, kRowVecs, kKTeam, kKTeams>(raw, k_base, row_elems, row_of, base, n, k_team, k_lane);
      float k[kKUnroll][kKVecs][kVec];
#pragma unroll
      for (int u = 0; u < kKUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < kKVecs; ++j) to_floats<T>(raw[u][j], k[u][j]);
      }
      for (int g = 0; g < group; ++g) {
        const float* qg = q_s + g * D;
        float dot[kKUnroll];
#pragma unroll
        for (int u = 0; u < kKUnroll; ++u) dot[u] = 0.f;
#pragma unroll
        for (int j = 0; j < kKVecs; ++j) {
          const int vec = k_lane + j * kKTeam;
          if (kRowVecs == kKTeam * kKVecs || vec < kRowVecs) {
            float qv[kVec];
#pragma unroll
            for (int e = 0; e < kVec; e += 4) {
              const float4 q4 = *reinterpret_cast<const float4*>(qg + vec * kVec + e);
              qv[e] = q4.x, qv[e + 1] = q4.y, qv[e + 2] = q4.z, qv[e + 3] = q4.w;
            }
#pragma unroll
            for (int u = 0; u < kKUnroll; ++u) {
#pragma unroll
              for (int e = 0; e < kVec; ++e) dot[u] = fmaf(k[u][j][e], qv[e], dot[u]);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kKUnroll; ++u) {
#pragma unroll
          for (int offset = kKTeam / 2; offset > 0; offset /= 2) dot[u] += __shfl_xor_sync(0xffffffffu, dot[u], offset);
        }
        if (k_lane == 0) {
#pragma unroll
          for (int u = 0; u < kKUnroll; ++u) {
            const int i = base + u * kKTeams + k_team;
            if (i < n) logits[g * p.partition + i] = dot[u];
          }
        }
      }
    }
  }
  __syncthreads();

  // B. softmax numerators in place, and each head's log-sum-exp; one warp per head.
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  for (int g = warp; g < group; g += kWarps) {
    float* row = logits + g * p.partition;
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, row[i]);
    m = warp_max(m);
    float sum = 0.f;
    for (int i = lane; i < n; i += 32) {
      const float e = __expf(row[i] - m);
      row[i] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) p.partial_lse[(head0 + g) * p.splits + split] = m + __logf(sum);
    // Normalize here so C writes the partition's softmax output directly.
    const float inv = 1.f / sum;
    for (int i = lane; i < n; i += 32) row[i] *= inv;
  }
  __syncthreads();  // q_s is dead from here: team_out reuses it

  // C. out[g][:] = sum_i logits[g][i] * v[start + i][:], kHeadChunk heads per pass.
  const int v_team_id = threadIdx.x / kVTeam, v_lane = threadIdx.x - v_team_id * kVTeam;
  for (int g0 = 0; g0 < group; g0 += kHeadChunk) {
    const int heads = min(kHeadChunk, group - g0);
    if (v_team_id < kVTeams) {
      float acc[kHeadChunk][kVVecs][kVec];
#pragma unroll
      for (int h = 0; h < kHeadChunk; ++h) {
#pragma unroll
        for (int j = 0; j < kVVecs; ++j) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[h][j][e] = 0.f;
        }
      }
      // Software-pipelined: the next step's loads are issued before this step's arithmetic, so
      // they stay in flight while it runs (and the compiler cannot sink them next to their use).
      uint4 next[kVUnroll][kVVecs];
      load_tile<T, kRowVecs, kVTeam, kVTeams>(next, v_base, row_elems, row_of, 0, n, v_team_id, v_lane);
      for (int base = 0; base < n; base += kVTile) {
        uint4 raw[kVUnroll][kVVecs];
#pragma unroll
        for (int u = 0; u < kVUnroll; ++u) {
#pragma unroll
          for (int j = 0; j < kVVecs; ++j) raw[u][j] = next[u][j];
        }
        if (base + kVTile < n) {
          load_tile<T, kRowVecs, kVTeam, kVTeams>(next, v_base, row_elems, row_of, base + kVTile, n, v_team_id, v_lane);
        }
#pragma unroll
        for (int u = 0; u < kVUnroll; ++u) {
          const int i = base + u * kVTeams + v_team_id;
          float w[kHeadChunk];
#pragma unroll
          for (int h = 0; h < kHeadChunk; ++h) {
            // Indices clamped into the written logits; the select drops what they stand for.
            const float x = logits[min(g0 + h, group - 1) * p.partition + min(i, n - 1)];
            w[h] = (i < n && h < heads) ? x : 0.f;
          }
#pragma unroll
          for (int j = 0; j < kVVecs; ++j) {
            float v[kVec];
            to_floats<T>(raw[u][j], v);
#pragma unroll
            for (int h = 0; h < kHeadChunk; ++h) {
#pragma unroll
              for (int e = 0; e < kVec; ++e) acc[h][j][e] = fmaf(w[h], v[e], acc[h][j][e]);
            }
          }
        }
      }
      // This team's partial output of the chunk's heads.
#pragma unroll
      for (int h = 0; h < kHeadChunk; ++h) {
#pragma unroll
        for (int j = 0; j < kVVecs; ++j) {
          const int vec = v_lane + j * kVTeam;
          if (h < heads && (kRowVecs == kVTeam * kVVecs || vec < kRowVecs)) {
#pragma unroll
            for (int e = 0; e < kVec; e += 4) {
              team_out[(v_team_id * kHeadChunk + h) * kD4 + (vec * kVec + e) / 4] =
                  make_float4(acc[h][j][e], acc[h][j][e + 1], acc[h][j][e + 2], acc[h][j][e + 3]);
            }
          }
        }
      }
    }
    __syncthreads();
    // The teams' sum, one float4 column per thread.
    for (int idx = threadIdx.x; idx < heads * kD4; idx += kThreads) {
      const int h = idx / kD4, c = idx - h * kD4;
      float4 s = team_out[h * kD4 + c];
#pragma unroll
      for (int t = 1; t < kVTeams; ++t) {
        const float4 x = team_out[(t * kHeadChunk + h) * kD4 + c];
        s.x += x.x, s.y += x.y, s.z += x.z, s.w += x.w;
      }
      reinterpret_cast<float4*>(p.partial_out + ((head0 + g0 + h) * p.splits + split) * D)[c] = s;
    }
    __syncthreads();  // before the next chunk overwrites team_out
  }
}

// out[b, h, :] = sum_s exp(lse_s - lse) partial_out[b, h, s, :], lse = log sum_s exp(lse_s),
// over the partitions decode_split gives sequence b (the same definition as the decode kernel;
// the grid's surplus splits are never read). Block (h, b) of kMergeThreads threads: every warp
// reduces max and sum of exp over the splits with shuffles (the same values in each warp, no
// barrier); then thread (slice, col) adds float4 column col of splits slice, slice + kSlices,
// ..., and the slices' sums meet in shared memory. A sequence of length 0 gets zeros.
template <class T, int D>
__global__ void __launch_bounds__(kMergeThreads) paged_decode_merge_kernel(const PagedDecodeParams p) {
  constexpr int kCols = D / 4;                     // float4 columns
  constexpr int kSlices = kMergeThreads / kCols;   // threads per column
  static_assert(D % 4 == 0 && kSlices >= 1, "head_dim must be a multiple of 4, at most 4 * kMergeThreads");
  __shared__ float4 slice_out[kSlices][kCols];
  const int h = blockIdx.x, b = blockIdx.y;
  const int num_heads = p.num_kv_heads * p.group;
  const int64_t head = static_cast<int64_t>(b) * num_heads + h;
  const int used = decode_split(clamped_seq_len(p, b), p).count;
  const float* lse = p.partial_lse + head * p.splits;

  const int lane = threadIdx.x & 31;
  float m = -INFINITY;
  for (int s = lane; s < used; s += 32) m = fmaxf(m, lse[s]);
  m = warp_max(m);
  float total = 0.f;
  for (int s = lane; s < used; s += 32) total += __expf(lse[s] - m);
  total = warp_sum(total);

  const int col = threadIdx.x % kCols, slice = threadIdx.x / kCols;
  if (slice < kSlices) {
    const float4* src = reinterpret_cast<const float4*>(p.partial_out + head * p.splits * D) + col;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int s = slice; s < used; s += kSlices) {
      const float w = __expf(lse[s] - m);
      const float4 x = src[static_cast<int64_t>(s) * kCols];
      acc.x = fmaf(w, x.x, acc.x), acc.y = fmaf(w, x.y, acc.y), acc.z = fmaf(w, x.z, acc.z), acc.w = fmaf(w, x.w, acc.w);
    }
    slice_out[slice][col] = acc;
  }
  __syncthreads();
  if (threadIdx.x < kCols) {
    float4 acc = slice_out[0][threadIdx.x];
#pragma unroll
    for (int s = 1; s < kSlices; ++s) {
      const float4 x = slice_out[s][threadIdx.x];
      acc.x += x.x, acc.y += x.y, acc.z += x.z, acc.w += x.w;
    }
    // total >= 1 whenever seq_len >= 1 (the largest split has weight 1); 0 keeps bad input finite.
    const float inv = total > 0.f ? 1.f / total : 0.f;
    T* o = static_cast<T*>(p.out) + head * D + 4 * threadIdx.x;
    o[0] = from_float<T>(acc.x * inv);
    o[1] = from_float<T>(acc.y * inv);
    o[2] = from_float<T>(acc.z * inv);
    o[3] = from_float<T>(acc.w * inv);
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
