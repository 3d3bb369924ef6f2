// Launcher of the CPU W4A8 int4 matmul: checks the inputs, quantizes x to int8 per block of
// 32 columns (or to two or three int8 digits: 16- / 24-bit activations), picks the instruction
// set at run time, splits the output rows over threads, and hands the rows that fixed point
// cannot hold to the W4A16 kernel. The math is in include/fourbit/int4_a8_cpu.h.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_dtypes.h"
#include "cpu_isa.h"
#include "fourbit/int4_a8_cpu.h"
#include "ops.h"

namespace fourbit {
namespace {

using cpu::Isa;

using cpu::is_float_dtype;
using cpu::scale_type;

// The instruction set of this kernel: pick_isa's, where AVX-512 also needs BW and VNNI (else
// the AVX2 kernel runs: FOURBIT_CPU_ISA=avx512 on such a CPU is honoured as far as it can be).
Isa pick_a8_isa() {
  const Isa isa = cpu::pick_isa();
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::kAvx512 && !(__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                               __builtin_cpu_supports("avx512vnni")))
    return Isa::kAvx2;
#endif
  return isa;
}

}  // namespace

const char* int4_a8_mm_cpu_isa() { return pick_a8_isa() == Isa::kAvx512 ? "avx512-vnni" : cpu::isa_name(pick_a8_isa()); }

at::Tensor int4_a8_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& offsets, int64_t group_len, const std::optional<at::Tensor>& bias,
                          int64_t digits) {
  TORCH_CHECK(digits >= 0 && digits <= 3, "int4_a8_mm_cpu: digits must be 1 (int8 activations), 2 or 3 (16- / "
              "24-bit activations) or 0 (by x's dtype: 3 for float32, else 2), got ", digits);
  if (digits == 0) digits = x.scalar_type() == at::kFloat ? 3 : 2;  // reference.fixed_point_digits
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu() &&
                  offsets.device().is_cpu() && (!bias || bias->device().is_cpu()),
              "int4_a8_mm_cpu: every input must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "int4_a8_mm_cpu: x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "int4_a8_mm_cpu: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt,
              "int4_a8_mm_cpu: qweight must be int32 [N, K_padded / 8], got ", qweight.scalar_type(), " ",
              qweight.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0), k_padded = 8 * qweight.size(1);
  TORCH_CHECK(group_len > 0 && k_padded % group_len == 0 && cpu::int4_a8_supports_group_len(group_len, k_padded),
              "int4_a8_mm_cpu: group_len must be 32, 64, a multiple of 128 or K_padded = ", k_padded,
              " (one group per row), and divide K_padded; got ", group_len);
  const int64_t groups = k_padded / group_len;
  TORCH_CHECK(k <= k_padded && k > k_padded - group_len, "int4_a8_mm_cpu: x has K = ", k,
              " columns but qweight holds K_padded = ", k_padded, " (", qweight.size(1),
              " words per row) with group_len ", group_len, ": K_padded must be K rounded up to the group length");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == groups && is_float_dtype(scales.scalar_type()),
              "int4_a8_mm_cpu: scales must be float [N, K_padded / group_len] = [", n, ", ", groups, "], got ",
              scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(offsets.sizes() == scales.sizes() && is_float_dtype(offsets.scalar_type()),
              "int4_a8_mm_cpu: offsets must be float with the shape of scales, got ", offsets.scalar_type(), " ",
              offsets.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == n && bias->is_floating_point()),
              "int4_a8_mm_cpu: bias must be a float [N] = [", n, "] tensor");

  if (m == 0 || n == 0) return at::empty({m, n}, x.options());
  if (k == 0) {  // no products: out = bias (or 0), broadcast over the rows
    auto out = at::zeros({m, n}, x.options().dtype(at::kFloat));
    if (bias) out.add_(bias->to(at::kFloat));
    return out.to(x.scalar_type());
  }

  const Isa isa = pick_a8_isa();
  const int chunk = isa == Isa::kAvx512 ? cpu::kInt4A8ChunkAvx512 : cpu::kInt4A8Chunk;
  const int64_t chunks = cpu::int4_a8_chunks(k_padded, chunk);
  const auto x32 = x.to(at::kFloat).contiguous();
  // Scales and offsets are read in their own dtype (the kernel widens one row at a time):
  // nothing here converts the weight per call.
  const auto s = scales.contiguous();
  const auto o = offsets.contiguous();
  const auto w = qweight.contiguous();
  const auto b32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  // The quantized x in one allocation (a decode call is a few microseconds of work): the
  // lane scales, lane sums and group sums, then the bytes, then the row flags.
  const int64_t lanes = m * chunks * chunk / 8, words = 2 * lanes + m * groups;
  auto x8 = at::empty({words * 4 + m + m * digits * chunks * chunk}, x.options().dtype(at::kByte));
  uint8_t* base = x8.data_ptr<uint8_t>();
  float* lane_scale = reinterpret_cast<float*>(base);
  int32_t* lane_sum8 = reinterpret_cast<int32_t*>(base) + lanes;
  float* group_sum = lane_scale + 2 * lanes;
  int8_t* xq = reinterpret_cast<int8_t*>(base + words * 4);
  uint8_t* in_range = base + words * 4 + m * digits * chunks * chunk;
  const int64_t out_of_range =
      cpu::int4_a8_quantize_activations(x32.data_ptr<float>(), m, k, k_padded, group_len, chunk,
                                        static_cast<int>(digits), xq, lane_scale, lane_sum8, group_sum, in_range);
  auto out = at::empty({m, n}, x.options().dtype(at::kFloat));
  const cpu::Int4A8Args args{{xq, lane_scale, lane_sum8, group_sum, static_cast<int>(digits)},
                             reinterpret_cast<const uint8_t*>(w.data_ptr<int32_t>()),
                             s.data_ptr(),
                             o.data_ptr(),
                             scale_type(s.scalar_type()),
                             scale_type(o.scalar_type()),
                             b32.defined() ? b32.data_ptr<float>() : nullptr,
                             out.data_ptr<float>(),
                             m, n, k_padded, groups, group_len};
  auto rows = isa == Isa::kAvx512 ? cpu::int4_a8_rows_avx512
              : isa == Isa::kAvx2 ? cpu::int4_a8_rows_avx2
                                  : cpu::int4_a8_rows_portable;
  // Threads take contiguous ranges of weight rows, at least 32 KiB of weights each (and 16
  // rows): below that a second thread costs more to wake than it saves (SmolLM2's 64 x 576
  // pieces: 5.8 us on 2 threads, 5.4 on one; 576 x 576: 11.2 against 15.8).
  const int64_t grain = std::max<int64_t>(16, (int64_t{32} << 10) / (k_padded / 2));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(cpu::int4_a8_scratch_floats(groups));
    rows(args, begin, end, scratch.data());
  });
  if (out_of_range > 0) {
    // Rows fixed point cannot hold (inf, NaN, magnitudes past 2^64 or below 2^-64; their
    // outputs above are NaN): the W4A16 kernel, whose fp32 products give what x @ W.T gives.
    std::vector<int64_t> redo;
    for (int64_t r = 0; r < m; ++r)
      if (!in_range[r]) redo.push_back(r);
    const auto index = at::tensor(redo, x.options().dtype(at::kLong));
    const auto exact = int4_mm_cpu(x.index_select(0, index), qweight, scales, offsets, group_len, bias);
    out.index_copy_(0, index, exact.to(at::kFloat));
  }
  return out.to(x.scalar_type());
}

}  // namespace fourbit
