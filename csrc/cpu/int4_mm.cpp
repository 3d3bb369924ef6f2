// Launcher of the CPU int4 matmul: checks the inputs, converts x to fp32 (and, for the blocked
// GEMM, the scales), picks the instruction set at run time, and splits the output rows over
// threads. The math is in
// include/fourbit/int4_cpu_kernel.h.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_dtypes.h"
#include "cpu_isa.h"
#include "fourbit/int4_cpu.h"
#include "ops.h"

namespace fourbit {
namespace {

using cpu::Isa;
using cpu::is_float_dtype;
using cpu::isa_name;
using cpu::pick_isa;
using cpu::scale_type;

}  // namespace

// The instruction set the kernel runs here.
const char* int4_mm_cpu_isa() { return isa_name(pick_isa()); }

at::Tensor int4_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& offsets, int64_t group_len, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu() &&
                  offsets.device().is_cpu() && (!bias || bias->device().is_cpu()),
              "int4_mm_cpu: every input must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "int4_mm_cpu: x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "int4_mm_cpu: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt,
              "int4_mm_cpu: qweight must be int32 [N, K_padded / 8], got ", qweight.scalar_type(), " ",
              qweight.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0), k_padded = 8 * qweight.size(1);
  TORCH_CHECK(group_len > 0 && group_len % 8 == 0 && k_padded % group_len == 0,
              "int4_mm_cpu: group_len must be a positive multiple of 8 dividing K_padded = ", k_padded, ", got ",
              group_len);
  const int64_t groups = k_padded / group_len;
  TORCH_CHECK(k <= k_padded && k > k_padded - group_len, "int4_mm_cpu: x has K = ", k,
              " columns but qweight holds K_padded = ", k_padded, " (", qweight.size(1),
              " words per row) with group_len ", group_len, ": K_padded must be K rounded up to the group length");
  // The GEMM gathers words of 32 rows with int32 offsets (int4_cpu_kernel.h).
  TORCH_CHECK(qweight.size(1) <= INT32_MAX / 32, "int4_mm_cpu: K_padded = ", k_padded, " is too large");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == groups &&
                  is_float_dtype(scales.scalar_type()),
              "int4_mm_cpu: scales must be float [N, K_padded / group_len] = [", n, ", ", groups, "], got ",
              scales.scalar_type(), " ", scales.sizes());
  // Offsets may be fp32 beside 16-bit scales (exact imports, python/fourbit/format.py): each
  // is read in its own dtype.
  TORCH_CHECK(offsets.sizes() == scales.sizes() && is_float_dtype(offsets.scalar_type()),
              "int4_mm_cpu: offsets must be float with the shape of scales, got ", offsets.scalar_type(), " ",
              offsets.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == n && bias->is_floating_point()),
              "int4_mm_cpu: bias must be a float [N] = [", n, "] tensor");

  // Empty problems: no kernel call (and no pointer into an empty tensor).
  if (m == 0 || n == 0) return at::empty({m, n}, x.options());
  if (k == 0) {  // no products: out = bias (or 0), broadcast over the rows
    auto out = at::zeros({m, n}, x.options().dtype(at::kFloat));
    if (bias) out.add_(bias->to(at::kFloat));
    return out.to(x.scalar_type());
  }

  const Isa isa = pick_isa();
  const int width = isa == Isa::kAvx512 ? 16 : 8;  // the portable kernel is 8 wide too
  const bool dot = cpu::int4_use_dot(m, group_len, groups, width);
  const auto x32 = x.to(at::kFloat).contiguous();
  // The dot-product schedule widens 16-bit scales and offsets one pass of weight rows at a
  // time (int4_cpu_kernel.h): a conversion of the whole tensors here cost more than the
  // products at decode (SmolLM2's 576 x 576 fp16, M = 1: 27.6 against 17.4 us with fp32
  // scales, on this project's Xeon). The GEMM reads fp32 (shared by its > 3 rows of x).
  const auto s_in = dot ? scales.contiguous() : scales.to(at::kFloat).contiguous();
  const auto m_in = dot ? offsets.contiguous() : offsets.to(at::kFloat).contiguous();
  const auto w = qweight.contiguous();
  const auto b32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto out = at::empty({m, n}, x.options().dtype(at::kFloat));
  // The dot-product schedule reads x permuted to the register layout (int4_cpu.h), built
  // once per call. The blocked GEMM reads x as it is.
  at::Tensor xp;
  if (dot) {
    xp = at::empty({m, k_padded}, out.options());
    cpu::int4_prepare_activations(x32.data_ptr<float>(), m, k, k_padded, width, xp.data_ptr<float>());
  }

  const cpu::Int4MatmulArgs args{x32.data_ptr<float>(),
                                 dot ? xp.data_ptr<float>() : nullptr,
                                 w.data_ptr<int32_t>(),
                                 s_in.data_ptr(),
                                 m_in.data_ptr(),
                                 scale_type(s_in.scalar_type()),
                                 scale_type(m_in.scalar_type()),
                                 b32.defined() ? b32.data_ptr<float>() : nullptr,
                                 out.data_ptr<float>(),
                                 m, n, k, k_padded, groups, group_len};
  auto rows = isa == Isa::kAvx512 ? cpu::int4_matmul_rows_avx512
              : isa == Isa::kAvx2 ? cpu::int4_matmul_rows_avx2
                                  : cpu::int4_matmul_rows_portable;
  // Threads take contiguous ranges of whole units of output rows (a GEMM panel, or a pass
  // of the dot-product schedule), so only the last unit of the last range is partial. A grain
  // of 2 units (>= 16 rows, >= 16 x K/2 bytes of weights) amortizes the scheduling.
  const int64_t unit = cpu::int4_rows_per_unit(dot, width);
  const int64_t units = (n + unit - 1) / unit;
  at::parallel_for(0, units, 2, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(dot ? cpu::int4_dot_scratch_floats(groups) : cpu::int4_scratch_floats(width));
    rows(args, dot, begin * unit, std::min(end * unit, n), scratch.data());
  });
  return out.to(x.scalar_type());
}

}  // namespace fourbit
