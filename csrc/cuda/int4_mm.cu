// Launcher of the CUDA int4 matmul (device code: include/fourbit/int4_mma.cuh). Checks the
// inputs, picks the M tile count and the K split, zeroes the split-K workspace, launches on
// the current stream. Weights arrive prepacked (python/fourbit/format.py, prepack_mma) with
// transposed scales and offsets in x's dtype; python/fourbit/ops.py prepares them once per
// weight and dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fourbit/int4_mma.cuh"
#include "ops.h"
#include "sm_count.h"

namespace fourbit {
namespace {

using cuda::Int4MmaParams;

template <class T>
void launch(const Int4MmaParams& p, int m_tiles, dim3 grid, cudaStream_t stream) {
  switch (m_tiles) {
    case 1: cuda::int4_mma_kernel<T, 1><<<grid, cuda::kMmaThreads, 0, stream>>>(p); break;
    case 2: cuda::int4_mma_kernel<T, 2><<<grid, cuda::kMmaThreads, 0, stream>>>(p); break;
    case 4: cuda::int4_mma_kernel<T, 4><<<grid, cuda::kMmaThreads, 0, stream>>>(p); break;
    default: cuda::int4_mma_kernel<T, 8><<<grid, cuda::kMmaThreads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor int4_mm_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const at::Tensor& offsets, int64_t n, int64_t group_len, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "int4_mm_cuda: x must be a 2-D CUDA tensor [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "int4_mm_cuda: x must be float16 or bfloat16, got ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(packed.is_cuda() && packed.device() == x.device() && packed.scalar_type() == at::kInt &&
                  packed.dim() == 2 && packed.is_contiguous() && packed.size(1) % 128 == 0,
              "int4_mm_cuda: packed must be contiguous int32 [N_pad / 16, K_pad / 64 * 128] (prepack_mma) on x's device");
  const int64_t n_pad = packed.size(0) * 16, k_chunks = packed.size(1) / 128;
  TORCH_CHECK(n >= 1 && n <= n_pad && n_pad % cuda::kMmaBlockN == 0 && n_pad - n < cuda::kMmaBlockN,
              "int4_mm_cuda: packed holds ", n_pad, " rows, which is not N = ", n, " rounded up to 64");
  TORCH_CHECK(k >= 1 && k <= k_chunks * cuda::kMmaChunkK && k_chunks * cuda::kMmaChunkK - k < cuda::kMmaChunkK + 8,
              "int4_mm_cuda: x has K = ", k, " columns but packed holds ", k_chunks * cuda::kMmaChunkK);
  TORCH_CHECK(k % 8 == 0 && x.is_contiguous() && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "int4_mm_cuda: x must be contiguous, 16-byte aligned, with K a multiple of 8 (pad it)");
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == n && scales.scalar_type() == x.scalar_type() &&
                  scales.is_contiguous() && scales.device() == x.device(),
              "int4_mm_cuda: scales must be contiguous [groups, N] in x's dtype on x's device");
  TORCH_CHECK(offsets.sizes() == scales.sizes() && offsets.scalar_type() == x.scalar_type() &&
                  offsets.is_contiguous() && offsets.device() == x.device(),
              "int4_mm_cuda: offsets must match scales");
  const int64_t groups = scales.size(0);
  int group_shift = -1;
  if (groups > 1) {
    // The kernel stages at most two groups per 64-channel chunk (kMmaMinGroupLen, int4_mma.cuh).
    TORCH_CHECK(group_len >= cuda::kMmaMinGroupLen && (group_len & (group_len - 1)) == 0,
                "int4_mm_cuda: group_len must be a power of two >= 32 when there are several groups, got ", group_len);
    while ((int64_t{1} << (group_shift + 1)) <= group_len) ++group_shift;
    TORCH_CHECK((k + group_len - 1) / group_len <= groups, "int4_mm_cuda: ", groups, " groups of ", group_len,
                " do not cover K = ", k);
  }
  TORCH_CHECK(!bias || (bias->is_cuda() && bias->device() == x.device() && bias->dim() == 1 && bias->size(0) == n &&
                        bias->scalar_type() == x.scalar_type() && bias->is_contiguous()),
              "int4_mm_cuda: bias must be contiguous [N] in x's dtype on x's device");
  TORCH_CHECK(m <= 64, "int4_mm_cuda: at most 64 rows per launch (the caller splits larger M), got ", m);

  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({m, n}, x.options());
  if (m == 0) return out;
  const int m_tiles = m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8;
  const int64_t n_blocks = n_pad / cuda::kMmaBlockN;
  // Split K until there are two blocks per SM, keeping at least 4 chunks (256 channels) per split.
  const int64_t sms = sm_count(x.get_device());
  int64_t split_k = 1;
  while (n_blocks * split_k < 2 * sms && k_chunks / (split_k * 2) >= 4) split_k *= 2;

  Int4MmaParams p{};
  p.x = x.data_ptr();
  p.packed = packed.data_ptr<int32_t>();
  p.scales = scales.data_ptr();
  p.offsets = offsets.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  at::Tensor scratch;
  if (split_k > 1) {  // fp32 partial sums and one counter per column of blocks, zeroed in one memset
    scratch = at::zeros({m * n_pad + n_blocks}, x.options().dtype(at::kFloat));
    p.workspace = scratch.data_ptr<float>();
    p.counters = reinterpret_cast<int32_t*>(p.workspace + m * n_pad);
  }
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.n_pad = static_cast<int>(n_pad);
  p.k_chunks = static_cast<int>(k_chunks);
  p.groups = static_cast<int>(groups);
  p.group_shift = group_shift;
  p.split_k = static_cast<int>(split_k);

  const dim3 grid(static_cast<unsigned>(n_blocks), static_cast<unsigned>(split_k));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kHalf) {
    launch<__half>(p, m_tiles, grid, stream);
  } else {
    launch<__nv_bfloat16>(p, m_tiles, grid, stream);
  }
  return out;
}

}  // namespace fourbit
