// Torch-free interface of the CPU paged attention kernels (csrc/cpu/paged_attention_*.cpp;
// layout: python/fourbit/kv_cache.py). The launcher (csrc/cpu/paged_attention.cpp) checks
// the tensors, cuts the work into AttentionBlocks and hands them to threads; each block is
// one call of attend_block_<isa>.
//
// A block is flash attention for the query rows of `tokens` consecutive new tokens of one
// sequence x the `group` query heads that share kv head `kvh` (GQA), over the keys
// [key_begin, key_end) of that sequence; token i (position first_pos + i) sees the keys up
// to its own position (causal: decode's one token sees all of them). Rows r = i * group + g.
//
// Per tile of 2 W keys (W = the ISA's floats per register; 32 keys on AVX-512, 16 on AVX2 and
// portable), gathered through the page table:
//   1. the tile's K rows are widened to fp32 and transposed into Kt [D_pad][2 W] (in-register
//      W x W transposes), so that the scores of a row are 2 vector FMAs per dimension, with no
//      horizontal sum per key; Kt is built once and serves every row of the block;
//   2. S [rows][2 W] = Q Kt (register-blocked: kRows rows x 2 vectors of keys);
//   3. the online softmax in base 2 (log2(e) is folded into the scale): per row the running
//      max m and sum l, the tile's probabilities p = 2^(s - m), the factor alpha = 2^(m_old - m);
//   4. O [rows][D_pad] = alpha O + P V (register-blocked: rows x D chunks, each V vector
//      widened once for all the rows).
// Keys a row does not see never touch it: their scores are replaced (not added to) by -inf,
// their probabilities set to exactly 0, and the P V loop of a row stops at its last visible
// key, so a NaN or inf in a key or value it does not see (a stale slot past the sequence, a
// later token of the same prefill) cannot reach its output even as 0 * NaN. Slots past the
// sequence are never read at all (they point at a zero row). Every page index is clamped into
// the cache: a bad table gives wrong numbers, never a read outside the cache.
#pragma once

#include <cstdint>

namespace fourbit {
namespace cpu {

enum class KvDtype { kFloat32, kBFloat16, kFloat16 };

// 16-bit storage types of the cache, as raw bits (the kernels widen them to fp32).
struct Bf16 {
  uint16_t bits;
};
struct Fp16 {
  uint16_t bits;
};

struct PagedAttentionArgs {
  const void* q;        // [tokens, Hq, D] in `dtype`, unit stride along D
  const void* k_cache;  // contiguous [num_blocks, block_size, Hkv, D] in `dtype`
  const void* v_cache;  // same as k_cache
  const int32_t* block_tables;  // [B, max_blocks], row stride block_tables_stride, unit column stride
  KvDtype dtype;
  int64_t q_stride_token, q_stride_head;  // in elements
  int64_t num_blocks, block_size, num_kv_heads, head_dim, group;  // group = Hq / Hkv
  int64_t max_blocks, block_tables_stride;
  float scale_log2;  // softmax scale * log2(e): the kernels work in base 2
};

struct AttentionBlock {
  // kv heads kvh .. kvh + kv_heads - 1 (decode takes several, so that a page's rows, which lie
  // head after head, are read in one sweep; prefill takes one). Their rows follow one another:
  // head h, group row g is row (h - kvh) * group + g of the block's outputs.
  int64_t b, kvh, kv_heads = 1;
  int64_t q_token;    // row of q (and of the output) of the block's first token
  int64_t tokens;     // consecutive query tokens, >= 1
  int64_t first_pos;  // position of the first token in its sequence (may be < 0 on bad tables)
  int64_t key_begin, key_end;  // the keys of this block, within [0, max_blocks * block_size]
  // fp32 results: row (token i, head g of the group) goes to out + i * out_stride_token +
  // g * out_stride_head ([D] floats, normalized by its own sum) and, when lse is not null,
  // its log2-sum-exp (base 2, -inf for a row that saw no key) to lse + i * lse_stride_token +
  // g * lse_stride_head (split-KV: the merge weighs partitions by it).
  float* out;
  int64_t out_stride_token, out_stride_head;
  float* lse;
  int64_t lse_stride_token, lse_stride_head;
};

// Floats of per-thread scratch for blocks of up to `rows` query rows at head_dim with vector
// width `width` (16 on AVX-512, 8 otherwise).
int64_t attention_scratch_floats(int64_t rows, int64_t head_dim, int width);

// One block. The AVX-512 kernel runs decode blocks (tokens == 1, head_dim a multiple of 32)
// on its own path (paged_attention_avx512.cpp says how); every other block goes one kv head at
// a time through the tile algorithm above. Safe to call from many threads on disjoint outputs, each with its own scratch.
void attend_block_portable(const PagedAttentionArgs& a, const AttentionBlock& block, float* scratch);
void attend_block_avx2(const PagedAttentionArgs& a, const AttentionBlock& block, float* scratch);
void attend_block_avx512(const PagedAttentionArgs& a, const AttentionBlock& block, float* scratch);

// Split-KV merge of one query row: out [D] = sum_s 2^(lse_s - lse) part_s with
// lse = log2 sum_s 2^lse_s over `splits` partitions (part_s at part + s * D, lse_s at
// lse[s]): the exact softmax over all the keys. All partitions empty (-inf): out = 0.
void merge_partitions(const float* part, const float* lse, int64_t splits, int64_t head_dim, float* out);

// Decode's split-KV plan: the keys per partition of a sequence of seq_len keys, given the
// tokens per partition `chunk` the launcher chose; partitions = cdiv(seq_len, result) >= 1.
// Partitions of one sequence are equal to within a tile, so no thread waits on a long tail.
int64_t decode_partition_keys(int64_t seq_len, int64_t chunk, int width);

}  // namespace cpu
}  // namespace fourbit
