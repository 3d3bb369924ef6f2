// Launchers of the paged KV cache CUDA kernels (device code: include/fourbit/paged_attention.cuh).
// They check the inputs, pick the template and the partition size, and launch on the current
// stream. No host synchronization: paged_attention_cuda can be captured in a CUDA graph
// (its two scratch tensors come from torch's caching allocator, which graphs support).
// Only c10's CUDA headers (not ATen/cuda/CUDAContext.h, which needs cuBLAS and cuSPARSE
// headers): the file then compiles wherever nvcc and torch's headers are (make cuda-check).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "fourbit/paged_attention.cuh"
#include "ops.h"
#include "sm_count.h"

namespace fourbit {
namespace {

using cuda::PagedDecodeParams;

void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.is_cuda() && k_cache.dim() == 4 && k_cache.is_contiguous(),
              "k_cache must be a contiguous CUDA tensor [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type() &&
                  v_cache.device() == k_cache.device() && v_cache.is_contiguous(),
              "v_cache must match k_cache in shape, dtype and device, and be contiguous");
  const int64_t block_size = k_cache.size(1);
  TORCH_CHECK(block_size >= 8 && (block_size & (block_size - 1)) == 0, "block_size must be a power of two >= 8, got ",
              block_size);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

int log2_exact(int64_t x) {
  int l = 0;
  while ((int64_t{1} << l) < x) ++l;
  return l;
}

template <class T>
void launch_decode(const PagedDecodeParams& p, int head_dim, int batch, int64_t smem_bytes, cudaStream_t stream) {
  const dim3 grid(p.splits, p.num_kv_heads, batch);
  const dim3 merge_grid(p.num_kv_heads * p.group, batch);
  auto run = [&](auto decode, auto merge) {
    if (smem_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(decode, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem_bytes)));
    }
    decode<<<grid, cuda::kThreads, smem_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    merge<<<merge_grid, cuda::kMergeThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (head_dim) {
    case 64: return run(cuda::paged_decode_kernel<T, 64>, cuda::paged_decode_merge_kernel<T, 64>);
    case 80: return run(cuda::paged_decode_kernel<T, 80>, cuda::paged_decode_merge_kernel<T, 80>);
    case 96: return run(cuda::paged_decode_kernel<T, 96>, cuda::paged_decode_merge_kernel<T, 96>);
    case 128: return run(cuda::paged_decode_kernel<T, 128>, cuda::paged_decode_merge_kernel<T, 128>);
    case 256: return run(cuda::paged_decode_kernel<T, 256>, cuda::paged_decode_merge_kernel<T, 256>);
    default: TORCH_CHECK(false, "paged_attention_cuda: head_dim ", head_dim,
                         " is not compiled (64, 80, 96, 128, 256); the triton backend takes any head_dim");
  }
}

// Shared memory of the decode kernel in bytes (layout: cuda::decode_smem).
int64_t decode_smem_bytes(int group, int head_dim, int elem_bytes, int partition, int block_size_log2) {
  return cuda::decode_smem(group, head_dim, elem_bytes, partition, block_size_log2).total * 4;
}

// The most tokens a partition may hold: the largest of 512, 256, 128, 64 that still gives the
// grid kTargetBlocksPerSm blocks per SM, computed from the page table's capacity (host-known)
// rather than seq_lens; each block then cuts its own sequence on the device (decode_split).
int choose_partition(int64_t batch, int64_t kv_heads, int64_t capacity, int group, int head_dim, int elem_bytes,
                     int block_size_log2, int sms) {
  int partition = 512;
  while (partition > 64 && batch * kv_heads * ((capacity + partition - 1) / partition) < cuda::kTargetBlocksPerSm * sms)
    partition /= 2;
  // Keep the shared memory (q and the partition's logits) within what any SM80+ block can get.
  while (partition > 64 && decode_smem_bytes(group, head_dim, elem_bytes, partition, block_size_log2) > 96 * 1024)
    partition /= 2;
  return partition;
}

}  // namespace

at::Tensor paged_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  check_cache(k_cache, v_cache);
  TORCH_CHECK(q.is_cuda() && q.device() == k_cache.device(), "q must be on the cache's device");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q must have the cache's dtype");
  TORCH_CHECK(q.dim() == 3 && q.size(2) == k_cache.size(3) && q.stride(2) == 1,
              "q must be [B, Hq, head_dim] with a unit stride along head_dim");
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k_cache.size(2), head_dim = q.size(2);
  TORCH_CHECK(heads % kv_heads == 0, "the query heads must be a multiple of the kv heads");
  TORCH_CHECK(block_tables.is_cuda() && block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.size(0) == batch && block_tables.size(1) >= 1 && block_tables.stride(1) == 1,
              "block_tables must be int32 [B, max_blocks] with unit column stride");
  TORCH_CHECK(seq_lens.is_cuda() && seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == batch && seq_lens.is_contiguous(),
              "seq_lens must be contiguous int32 [B]");
  TORCH_CHECK(aligned16(q) && aligned16(k_cache) && aligned16(v_cache) && (q.stride(0) * q.element_size()) % 16 == 0 &&
                  (q.stride(1) * q.element_size()) % 16 == 0,
              "paged_attention_cuda reads 16-byte vectors: q and the caches must be 16-byte aligned");
  const int64_t capacity = block_tables.size(1) * k_cache.size(1);
  TORCH_CHECK(capacity < (int64_t{1} << 31), "the page table's capacity must fit in int32");

  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (batch == 0) return out;
  const int group = static_cast<int>(heads / kv_heads);
  const int sms = sm_count(q.get_device());
  const int elem_bytes = static_cast<int>(q.element_size());
  const int block_size_log2 = log2_exact(k_cache.size(1));
  const int partition =
      choose_partition(batch, kv_heads, capacity, group, static_cast<int>(head_dim), elem_bytes, block_size_log2, sms);
  const int splits = static_cast<int>((capacity + partition - 1) / partition);
  // Splits per sequence that give kTargetBlocksPerSm blocks per SM (decode_split's aim).
  const int64_t sequence_heads = batch * kv_heads;
  const int target_splits = static_cast<int>(std::min<int64_t>(
      splits, std::max<int64_t>(1, (int64_t{cuda::kTargetBlocksPerSm} * sms + sequence_heads - 1) / sequence_heads)));
  auto partial_out = at::empty({batch, heads, splits, head_dim}, q.options().dtype(at::kFloat));
  auto partial_lse = at::empty({batch, heads, splits}, q.options().dtype(at::kFloat));

  PagedDecodeParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.partial_out = partial_out.data_ptr<float>();
  p.partial_lse = partial_lse.data_ptr<float>();
  p.out = out.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.block_tables_stride = block_tables.stride(0);
  p.num_blocks = static_cast<int>(k_cache.size(0));
  p.max_blocks = static_cast<int>(block_tables.size(1));
  p.block_size_log2 = block_size_log2;
  p.num_kv_heads = static_cast<int>(kv_heads);
  p.group = group;
  p.partition = partition;
  p.splits = splits;
  p.target_splits = target_splits;
  p.scale = static_cast<float>(scale);
  const int64_t smem_bytes = decode_smem_bytes(group, static_cast<int>(head_dim), elem_bytes, partition, block_size_log2);
  TORCH_CHECK(smem_bytes <= 96 * 1024, "paged_attention_cuda: ", group, " query heads per kv head at head_dim ",
              head_dim, " need more shared memory than a block gets; use the triton backend");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (q.scalar_type()) {
    case at::kFloat: launch_decode<float>(p, static_cast<int>(head_dim), static_cast<int>(batch), smem_bytes, stream); break;
    case at::kHalf: launch_decode<__half>(p, static_cast<int>(head_dim), static_cast<int>(batch), smem_bytes, stream); break;
    case at::kBFloat16:
      launch_decode<__nv_bfloat16>(p, static_cast<int>(head_dim), static_cast<int>(batch), smem_bytes, stream);
      break;
    default: TORCH_CHECK(false, "paged_attention_cuda: q must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  return out;
}

void write_kv_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping) {
  check_cache(k_cache, v_cache);
  TORCH_CHECK(k.is_cuda() && v.is_cuda() && k.device() == k_cache.device() && v.device() == k_cache.device(),
              "k and v must be on the cache's device");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(),
              "k and v must have the cache's dtype");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3),
              "k and v must be [T, num_kv_heads, head_dim] matching the cache");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "k and v rows [num_kv_heads, head_dim] must be contiguous");
  TORCH_CHECK(slot_mapping.is_cuda() && slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == k.size(0) && slot_mapping.is_contiguous(),
              "slot_mapping must be contiguous int64 [T]");
  const int64_t tokens = k.size(0);
  if (tokens == 0) return;
  const int hd = static_cast<int>(k.size(1) * k.size(2));
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const c10::cuda::CUDAGuard guard(k.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vectorized = (hd * k.element_size()) % 16 == 0 && (k.stride(0) * k.element_size()) % 16 == 0 &&
                          (v.stride(0) * v.element_size()) % 16 == 0 && aligned16(k) && aligned16(v) &&
                          aligned16(k_cache) && aligned16(v_cache);
  auto run = [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    auto args = std::make_tuple(static_cast<const T*>(k.data_ptr()), static_cast<const T*>(v.data_ptr()),
                                static_cast<T*>(k_cache.data_ptr()), static_cast<T*>(v_cache.data_ptr()),
                                slot_mapping.data_ptr<int64_t>(), num_slots, hd, k.stride(0), v.stride(0));
    if (vectorized) {
      std::apply([&](auto... a) { cuda::write_kv_kernel<T, true><<<tokens, 128, 0, stream>>>(a...); }, args);
    } else {
      std::apply([&](auto... a) { cuda::write_kv_kernel<T, false><<<tokens, 128, 0, stream>>>(a...); }, args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (k.scalar_type()) {
    case at::kFloat: run(static_cast<float*>(nullptr)); break;
    case at::kHalf: run(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: run(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "write_kv_cuda: k must be float32, float16 or bfloat16, got ", k.scalar_type());
  }
}

}  // namespace fourbit
