// Launchers of the CPU paged KV cache ops (layout: python/fourbit/kv_cache.py): check the
// tensors, cut the work into blocks (include/fourbit/paged_attention_cpu.h), run them on
// torch's threads, and merge split-KV partitions. The math is in
// include/fourbit/paged_attention_cpu_kernel.h.
//
// Index values are not checked here: a PagedBatch checked them once when the step was
// planned (kv_cache.py), and the kernels clamp every page and length they read, so even a
// trusted batch with bad tables gives wrong numbers, never a read or write outside a tensor.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_isa.h"
#include "fourbit/paged_attention_cpu.h"
#include "ops.h"

namespace fourbit {
namespace {

using cpu::AttentionBlock;
using cpu::Isa;
using cpu::PagedAttentionArgs;

// Decode partitions hold at least kMinPartition keys x kv heads and kMinPartitionKeys keys:
// below that the merge and the per-block setup (loading the queries) stop being small against
// reading the keys.
constexpr int64_t kMinPartition = 512;
constexpr int64_t kMinPartitionKeys = 64;
// Query rows (kv heads x their group) per decode block: a block sweeps each page run over all
// its kv heads (the rows of a page lie head after head, so the sweep reads memory in order);
// the rows' Q and O (2 x 32 x D floats) stay in L1 / L2.
constexpr int64_t kDecodeRows = 32;
// Blocks per thread the decode plan aims for, so that uneven lengths still even out over the
// threads (blocks are taken from a shared counter, longest first).
constexpr int64_t kBlocksPerThread = 4;
// Query rows (tokens x GQA heads) per prefill block: each K/V tile read serves this many
// rows; Q and O of the block (2 x 64 x D floats) stay in L2.
constexpr int64_t kPrefillRows = 64;

cpu::KvDtype kv_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cpu::KvDtype::kFloat32;
    case at::kBFloat16: return cpu::KvDtype::kBFloat16;
    case at::kHalf: return cpu::KvDtype::kFloat16;
    default: TORCH_CHECK(false, op, ": the cache must be float32, bfloat16 or float16, got ", t);
  }
}

void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op) {
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu(), op, ": k_cache and v_cache must be CPU tensors");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous(), op,
              ": k_cache must be contiguous [num_blocks, block_size, num_kv_heads, head_dim], got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type() &&
                  v_cache.is_contiguous(),
              op, ": v_cache must match k_cache (", k_cache.scalar_type(), " ", k_cache.sizes(),
              ") in shape and dtype and be contiguous, got ", v_cache.scalar_type(), " ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(0) >= 1 && k_cache.size(1) >= 1 && k_cache.size(2) >= 1 && k_cache.size(3) >= 1, op,
              ": the cache must have at least one block, row, kv head and dimension, got shape ", k_cache.sizes());
  kv_dtype(k_cache.scalar_type(), op);
}

// q, block_tables, seq_lens of an attention call; returns the kernel's arguments.
PagedAttentionArgs attention_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  const char* op) {
  check_cache(k_cache, v_cache, op);
  TORCH_CHECK(q.device().is_cpu() && block_tables.device().is_cpu() && seq_lens.device().is_cpu(), op,
              ": q, block_tables and seq_lens must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), op, ": q must have the cache's dtype ",
              k_cache.scalar_type(), ", got ", q.scalar_type());
  const int64_t kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == head_dim && q.stride(2) == 1, op,
              ": q must be [tokens, num_heads, head_dim = ", head_dim, "] with unit stride along head_dim, got shape ",
              q.sizes(), " strides ", q.strides());
  TORCH_CHECK(q.size(1) >= 1 && q.size(1) % kv_heads == 0, op, ": the ", q.size(1),
              " query heads must be a positive multiple of the ", kv_heads, " kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.size(1) >= 1 &&
                  block_tables.stride(1) == 1,
              op, ": block_tables must be int32 [batch, max_blocks >= 1] with unit column stride, got ",
              block_tables.scalar_type(), " ", block_tables.sizes());
  const int64_t batch = block_tables.size(0);
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == batch &&
                  seq_lens.is_contiguous(),
              op, ": seq_lens must be contiguous int32 [batch = ", batch, "], got ", seq_lens.scalar_type(), " ",
              seq_lens.sizes());
  PagedAttentionArgs a{};
  a.q = q.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.block_tables = block_tables.data_ptr<int32_t>();
  a.dtype = kv_dtype(k_cache.scalar_type(), op);
  a.q_stride_token = q.stride(0);
  a.q_stride_head = q.stride(1);
  a.num_blocks = k_cache.size(0);
  a.block_size = k_cache.size(1);
  a.num_kv_heads = kv_heads;
  a.head_dim = head_dim;
  a.group = q.size(1) / kv_heads;
  a.max_blocks = block_tables.size(1);
  a.block_tables_stride = block_tables.stride(0);
  a.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return a;
}

struct Kernel {
  void (*attend)(const PagedAttentionArgs&, const AttentionBlock&, float*);
  int width;
};

Kernel pick_kernel() {
  switch (cpu::pick_isa()) {
    case Isa::kAvx512: return {cpu::attend_block_avx512, 16};
    case Isa::kAvx2: return {cpu::attend_block_avx2, 8};
    default: return {cpu::attend_block_portable, 8};
  }
}

// Runs the blocks on torch's threads. Each thread takes the next block from a shared counter
// (blocks come longest first), so uneven blocks (ragged sequences, causal prefill) balance.
void run_blocks(const PagedAttentionArgs& a, const std::vector<AttentionBlock>& blocks, const Kernel& kernel) {
  if (blocks.empty()) return;
  int64_t rows = 1;
  for (const auto& b : blocks) rows = std::max(rows, b.tokens * a.group * b.kv_heads);
  const int64_t scratch_floats = cpu::attention_scratch_floats(rows, a.head_dim, kernel.width);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(blocks.size()));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t i = next++; i < static_cast<int64_t>(blocks.size()); i = next++)
      kernel.attend(a, blocks[i], scratch.data());
  });
}

int64_t clamp_len(int64_t n, int64_t capacity) { return std::min(std::max<int64_t>(n, 0), capacity); }

}  // namespace

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  const char* op = "paged_attention_cpu";
  const PagedAttentionArgs a = attention_args(q, k_cache, v_cache, block_tables, seq_lens, scale, op);
  const int64_t batch = block_tables.size(0), heads = q.size(1), d = a.head_dim, group = a.group;
  TORCH_CHECK(q.size(0) == batch, op, ": q must have one token per sequence, [", batch, ", num_heads, ", d,
              "], got ", q.sizes());
  auto out = at::empty({batch, heads, d}, q.options().dtype(at::kFloat));
  if (batch == 0) return out.to(q.scalar_type());
  const Kernel kernel = pick_kernel();

  // Blocks of `head_span` consecutive kv heads (kv heads split into equal spans of at most
  // kDecodeRows query rows).
  const int64_t spans = (a.num_kv_heads * group + kDecodeRows - 1) / kDecodeRows;
  const int64_t head_span = (a.num_kv_heads + std::min(spans, a.num_kv_heads) - 1) / std::min(spans, a.num_kv_heads);
  const int64_t head_blocks = (a.num_kv_heads + head_span - 1) / head_span;

  // Split-KV plan, from seq_lens on the host (a CPU tensor: no synchronization). Partitions
  // of `chunk` keys or more, enough that every thread has kBlocksPerThread blocks: with
  // batch x head spans at or above that, no sequence is split; a long sequence with few
  // blocks is, and the partitions are merged through their log-sum-exps.
  const int64_t capacity = a.max_blocks * a.block_size;
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  std::vector<int64_t> len(batch), part(batch), splits(batch);
  int64_t total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    len[b] = clamp_len(lens[b], capacity);
    total += std::max<int64_t>(len[b], 1) * head_blocks;
  }
  const int64_t target = kBlocksPerThread * at::get_num_threads();
  const int64_t chunk = std::max({kMinPartitionKeys, (kMinPartition + head_span - 1) / head_span, (total + target - 1) / target});
  int64_t max_splits = 1;
  for (int64_t b = 0; b < batch; ++b) {
    part[b] = cpu::decode_partition_keys(len[b], chunk, kernel.width);
    splits[b] = std::max<int64_t>(1, (len[b] + part[b] - 1) / part[b]);
    max_splits = std::max(max_splits, splits[b]);
  }
  // One partition each: blocks write the output. Several: fp32 partials [B, Hq, splits, D]
  // and their log-sum-exps, merged below.
  at::Tensor partial, lse;
  if (max_splits > 1) {
    partial = at::empty({batch, heads, max_splits, d}, out.options());
    lse = at::empty({batch, heads, max_splits}, out.options());
  }
  float* out_ptr = out.data_ptr<float>();
  std::vector<AttentionBlock> blocks;
  blocks.reserve(batch * head_blocks * max_splits);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t kvh = 0; kvh < a.num_kv_heads; kvh += head_span) {
      const int64_t row = b * heads + kvh * group;  // the span's first query head
      for (int64_t s = 0; s < splits[b]; ++s) {
        AttentionBlock blk{};
        blk.b = b;
        blk.kvh = kvh;
        blk.kv_heads = std::min(head_span, a.num_kv_heads - kvh);
        blk.q_token = b;
        blk.tokens = 1;
        blk.first_pos = len[b] - 1;
        blk.key_begin = std::min(s * part[b], len[b]);
        blk.key_end = std::min((s + 1) * part[b], len[b]);
        if (max_splits == 1) {
          blk.out = out_ptr + row * d;
          blk.out_stride_head = d;
        } else {
          blk.out = partial.data_ptr<float>() + (row * max_splits + s) * d;
          blk.out_stride_head = max_splits * d;
          blk.lse = lse.data_ptr<float>() + row * max_splits + s;
          blk.lse_stride_head = max_splits;
        }
        blocks.push_back(blk);
      }
    }
  }
  std::stable_sort(blocks.begin(), blocks.end(), [](const AttentionBlock& x, const AttentionBlock& y) {
    return x.key_end - x.key_begin > y.key_end - y.key_begin;
  });
  run_blocks(a, blocks, kernel);
  if (max_splits > 1) {
    const float* part_ptr = partial.data_ptr<float>();
    const float* lse_ptr = lse.data_ptr<float>();
    // On the calling thread: splits exist only when there are few blocks (about
    // kBlocksPerThread per thread), so the merge is a few microseconds, while a second
    // parallel region is a second wait for every thread to be scheduled (on a loaded machine
    // it doubled the time of a short decode).
    for (int64_t row = 0; row < batch * heads; ++row)
      cpu::merge_partitions(part_ptr + row * max_splits * d, lse_ptr + row * max_splits, splits[row / heads], d,
                            out_ptr + row * d);
  }
  return out.to(q.scalar_type());
}

at::Tensor paged_prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                       const at::Tensor& query_start_loc, int64_t max_query_len, double scale) {
  const char* op = "paged_prefill_attention_cpu";
  const PagedAttentionArgs a = attention_args(q, k_cache, v_cache, block_tables, seq_lens, scale, op);
  const int64_t batch = block_tables.size(0), total_q = q.size(0), heads = q.size(1), d = a.head_dim;
  TORCH_CHECK(query_start_loc.device().is_cpu() && query_start_loc.scalar_type() == at::kInt &&
                  query_start_loc.dim() == 1 && query_start_loc.size(0) == batch + 1 && query_start_loc.is_contiguous(),
              op, ": query_start_loc must be contiguous int32 [batch + 1 = ", batch + 1, "], got ",
              query_start_loc.scalar_type(), " ", query_start_loc.sizes());
  TORCH_CHECK(max_query_len >= 0, op, ": max_query_len must be >= 0, got ", max_query_len);
  // Rows no sequence covers (only on inconsistent trusted tables) stay 0.
  auto out = at::zeros({total_q, heads, d}, q.options().dtype(at::kFloat));
  const Kernel kernel = pick_kernel();
  const int64_t capacity = a.max_blocks * a.block_size;
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int64_t tokens_per_block = std::max<int64_t>(1, kPrefillRows / a.group);
  float* out_ptr = out.data_ptr<float>();
  std::vector<AttentionBlock> blocks;
  for (int64_t b = 0; b < batch; ++b) {
    // Sequence b's new tokens are rows start .. start + new - 1 of q, its last `new` tokens.
    // Only the first max_query_len of them are computed (as the reference lays them out),
    // and only rows inside q, whatever query_start_loc holds.
    const int64_t start = starts[b], fresh = static_cast<int64_t>(starts[b + 1]) - start;
    const int64_t len = clamp_len(lens[b], capacity), context = len - fresh;
    const int64_t lo = std::max<int64_t>(0, -start);
    const int64_t hi = std::min({fresh, max_query_len, total_q - start});
    for (int64_t i = lo; i < hi; i += tokens_per_block) {
      for (int64_t kvh = 0; kvh < a.num_kv_heads; ++kvh) {
        AttentionBlock blk{};
        blk.b = b;
        blk.kvh = kvh;
        blk.q_token = start + i;
        blk.tokens = std::min(tokens_per_block, hi - i);
        blk.first_pos = context + i;
        blk.key_begin = 0;
        blk.key_end = len;
        blk.out = out_ptr + (blk.q_token * heads + kvh * a.group) * d;
        blk.out_stride_token = heads * d;
        blk.out_stride_head = d;
        blocks.push_back(blk);
      }
    }
  }
  // Causal: a block reads the keys up to its last token's position.
  auto keys = [](const AttentionBlock& x) { return std::min(x.key_end, x.first_pos + x.tokens); };
  std::stable_sort(blocks.begin(), blocks.end(),
                   [&](const AttentionBlock& x, const AttentionBlock& y) { return keys(x) > keys(y); });
  run_blocks(a, blocks, kernel);
  return out.to(q.scalar_type());
}

void write_kv_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& slot_mapping) {
  const char* op = "write_kv_cpu";
  check_cache(k_cache, v_cache, op);
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && slot_mapping.device().is_cpu(), op,
              ": k, v and slot_mapping must be CPU tensors");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(), op,
              ": k and v must have the cache's dtype ", k_cache.scalar_type(), ", got ", k.scalar_type(), " and ",
              v.scalar_type());
  const int64_t kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == kv_heads && k.size(2) == head_dim, op,
              ": k and v must both be [tokens, num_kv_heads = ", kv_heads, ", head_dim = ", head_dim, "], got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == head_dim && v.stride(2) == 1 && v.stride(1) == head_dim, op,
              ": the [num_kv_heads, head_dim] rows of k and v must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == k.size(0) && slot_mapping.is_contiguous(),
              op, ": slot_mapping must be contiguous int64 [tokens = ", k.size(0), "], got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  const int64_t tokens = k.size(0);
  if (tokens == 0) return;
  // A slot is one contiguous [num_kv_heads, head_dim] row of the cache: one copy per token.
  // Slots outside [0, num_blocks * block_size) (-1 and, on trusted tables, anything) write nowhere.
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t bytes = kv_heads * head_dim * static_cast<int64_t>(k.element_size());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const char* k_src = static_cast<const char*>(k.data_ptr());
  const char* v_src = static_cast<const char*>(v.data_ptr());
  char* k_dst = static_cast<char*>(k_cache.data_ptr());
  char* v_dst = static_cast<char*>(v_cache.data_ptr());
  const int64_t k_row = k.stride(0) * k.element_size(), v_row = v.stride(0) * v.element_size();
  at::parallel_for(0, tokens, std::max<int64_t>(1, (64 << 10) / bytes), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0 || slots[t] >= num_slots) continue;
      std::memcpy(k_dst + slots[t] * bytes, k_src + t * k_row, bytes);
      std::memcpy(v_dst + slots[t] * bytes, v_src + t * v_row, bytes);
    }
  });
}

}  // namespace fourbit
