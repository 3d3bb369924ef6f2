// Launcher of the CPU int8 weight-only matmul: checks the inputs, converts x to fp32, picks
// the instruction set at run time and splits the output rows over threads. The math is in
// include/fourbit/int8_cpu_kernel.h (schedules: int8_cpu.h).
#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include "cpu_dtypes.h"
#include "cpu_isa.h"
#include "fourbit/int8_cpu.h"
#include "ops.h"

namespace fourbit {
namespace {

using cpu::Isa;

using cpu::is_float_dtype;
using cpu::scale_type;

// Weight rows of one dequantized panel (many rows of x): about 2 MiB of fp32, so the panel
// stays in L2 while at::mm streams x past it (1 to 4 MiB measured alike at M = 32 and 256 on
// 49152 x 576 and 4096 x 4096; 256 KiB was slower); a multiple of 16 rows.
int64_t panel_rows(int64_t k, int64_t n) {
  const int64_t rows = std::max<int64_t>(16, ((int64_t{1} << 21) / (4 * std::max<int64_t>(k, 1))) / 16 * 16);
  return std::min(rows, n);
}

}  // namespace

at::Tensor int8_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_len,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu() &&
                  (!bias || bias->device().is_cpu()),
              "int8_mm_cpu: every input must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "int8_mm_cpu: x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "int8_mm_cpu: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, "int8_mm_cpu: qweight must be int8 [N, K], got ",
              qweight.scalar_type(), " ", qweight.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == k, "int8_mm_cpu: x has K = ", k, " columns but qweight has ", qweight.size(1));
  TORCH_CHECK(group_len > 0 && k % group_len == 0 && (group_len == k || group_len % 32 == 0),
              "int8_mm_cpu: group_len must be K = ", k, " (one group per row) or a multiple of 32 dividing K, got ",
              group_len);
  const int64_t groups = k / group_len;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == groups &&
                  is_float_dtype(scales.scalar_type()),
              "int8_mm_cpu: scales must be float32, bfloat16 or float16 [N, K / group_len] = [", n, ", ", groups,
              "], got ", scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == n && bias->is_floating_point()),
              "int8_mm_cpu: bias must be a float [N] = [", n, "] tensor");

  if (m == 0 || n == 0) return at::empty({m, n}, x.options());
  if (k == 0) {  // no products: out = bias (or 0), broadcast over the rows
    auto out = at::zeros({m, n}, x.options().dtype(at::kFloat));
    if (bias) out.add_(bias->to(at::kFloat));
    return out.to(x.scalar_type());
  }

  const Isa isa = cpu::pick_isa();
  const auto x32 = x.to(at::kFloat).contiguous();
  const auto q = qweight.contiguous();
  const auto s = scales.contiguous();
  const auto b32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto out = at::empty({m, n}, x.options().dtype(at::kFloat));
  const cpu::Int8MatmulArgs args{x32.data_ptr<float>(), q.data_ptr<int8_t>(), s.data_ptr(),
                                 scale_type(s.scalar_type()), b32.defined() ? b32.data_ptr<float>() : nullptr,
                                 out.data_ptr<float>(), m, n, k, groups, group_len};
  const int64_t scratch_floats = cpu::int8_scratch_floats(groups);

  if (m <= cpu::kInt8DotMaxRows) {
    auto rows = isa == Isa::kAvx512 ? cpu::int8_matmul_rows_avx512
                : isa == Isa::kAvx2 ? cpu::int8_matmul_rows_avx2
                                    : cpu::int8_matmul_rows_portable;
    // Threads take contiguous ranges of whole blocks of rows; a grain of 16 blocks (>= 64 rows,
    // >= 64 K bytes of weights) amortizes the scheduling.
    const int64_t unit = cpu::kInt8RowsPerBlock, units = (n + unit - 1) / unit;
    at::parallel_for(0, units, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(scratch_floats);
      rows(args, begin * unit, std::min(end * unit, n), scratch.data());
    });
    return out.to(x.scalar_type());
  }

  // Many rows of x: each thread takes a contiguous range of weight rows and walks it a panel at
  // a time: dequantize the panel into its own buffer, then one fp32 GEMM (single-threaded
  // inside the parallel region) into the panel's columns of out. One parallel region in all:
  // on a loaded machine every extra fork / join of the threads costs a scheduler slice.
  auto dequantize = isa == Isa::kAvx512 ? cpu::int8_dequantize_rows_avx512
                    : isa == Isa::kAvx2 ? cpu::int8_dequantize_rows_avx2
                                        : cpu::int8_dequantize_rows_portable;
  const int64_t p = panel_rows(k, n);
  // The workers call ATen (at::mm_out into out): they take the caller's thread-local state
  // (inference mode, grad mode), which OpenMP threads do not inherit.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    std::vector<float> scratch(scratch_floats);
    auto panel = at::empty({std::min(p, end - begin), k}, out.options());
    for (int64_t n0 = begin; n0 < end; n0 += p) {
      const int64_t rows = std::min(p, end - n0);
      dequantize(args, n0, n0 + rows, panel.data_ptr<float>(), scratch.data());
      auto columns = out.narrow(1, n0, rows);
      at::mm_out(columns, x32, panel.narrow(0, 0, rows).t());
    }
  });
  if (b32.defined()) out.add_(b32);
  return out.to(x.scalar_type());
}

const char* int8_mm_cpu_isa() { return cpu::isa_name(cpu::pick_isa()); }

}  // namespace fourbit
