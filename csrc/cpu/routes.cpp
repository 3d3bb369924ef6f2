// The CPU implementations of fourbit's schemas: TORCH_LIBRARY_IMPL(fourbit, CPU).
//
// Why in C++: a call whose backend is one of csrc/cpu/'s kernels ("cpu", "cpu-a8", "cpu-int")
// runs it from here, with no Python between torch's dispatcher and the kernel. A compiled decode step
// of SmolLM2 makes ~180 such calls per token, and a Python implementation costs ~6-8 us of
// interpreter each (a 64 x 64 int4_mm: 2 us called directly, 9-11 us through a Python
// implementation, in one process on the 2-core EPYC), more than its small layers' kernels.
//
// Every other call on CPU tensors (the "torch" reference, "triton" under TRITON_INTERPRET=1,
// the "cpu" backend's dense path for many rows) goes to the op's Python implementation:
// ops.py's router, the one CUDA tensors reach directly, handed over by install_cpu_routes.
// So the routing rules stay in one place (ops.py, dispatch.py); this file only takes the
// calls that rule sends to a C++ kernel anyway, before Python would.
#include "routes.h"

#include <string>

#include <torch/library.h>

#include "fourbit/int4_a8_cpu.h"
#include "ops.h"

namespace fourbit {
namespace {

constexpr const char* kOps[] = {"int4_mm", "int8_mm", "write_kv", "paged_attention", "paged_prefill_attention"};
enum Op { kInt4Mm, kInt8Mm, kWriteKv, kPagedAttention, kPagedPrefillAttention, kNumOps };

// What ops.py installed. The Python objects are owned for the life of the process (never
// released: the dispatcher may outlive the interpreter's teardown).
struct PythonRoutes {
  py::object* route[kNumOps] = {};
  int64_t int4_kernel_rows = 0;
};

PythonRoutes& installed() {
  static PythonRoutes routes;
  return routes;
}

// Calls op's Python implementation with the schema's arguments, holding the GIL.
template <typename... Args>
py::object call_python(Op op, Args&&... args) {
  py::object* route = installed().route[op];
  TORCH_CHECK(route != nullptr, "fourbit::", kOps[op], ": its Python implementation is not installed; import "
              "fourbit (fourbit.ops installs it) before calling torch.ops.fourbit on CPU tensors");
  py::gil_scoped_acquire gil;
  return (*route)(std::forward<Args>(args)...);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& offsets,
                   int64_t group_len, const std::optional<at::Tensor>& bias, c10::string_view backend) {
  if (backend == "cpu-a8" || backend == "cpu-int") {
    // The op-level refusal (ValueError, with the way out); the kernel checks everything else.
    if (qweight.dim() == 2) {
      const int64_t k_padded = 8 * qweight.size(1);
      TORCH_CHECK_VALUE(cpu::int4_a8_supports_group_len(group_len, k_padded), "backend '", std::string(backend),
                        "' takes group lengths 32, 64, a multiple of 128, or the whole row (K_padded = ", k_padded,
                        "), not ", group_len, "; use backend 'cpu'");
    }
    return int4_a8_mm_cpu(x, qweight, scales, offsets, group_len, bias, backend == "cpu-int" ? 0 : 1);
  }
  if (backend == "cpu" && x.dim() == 2 && x.size(0) < installed().int4_kernel_rows)
    return int4_mm_cpu(x, qweight, scales, offsets, group_len, bias);
  return call_python(kInt4Mm, x, qweight, scales, offsets, group_len, bias, std::string(backend)).cast<at::Tensor>();
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_len,
                   const std::optional<at::Tensor>& bias, c10::string_view backend) {
  if (backend == "cpu") return int8_mm_cpu(x, qweight, scales, group_len, bias);
  return call_python(kInt8Mm, x, qweight, scales, group_len, bias, std::string(backend)).cast<at::Tensor>();
}

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping, c10::string_view backend) {
  if (backend == "cpu") return write_kv_cpu(k, v, k_cache, v_cache, slot_mapping);
  call_python(kWriteKv, k, v, k_cache, v_cache, slot_mapping, std::string(backend));
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                           c10::string_view backend) {
  if (backend == "cpu") return paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale);
  return call_python(kPagedAttention, q, k_cache, v_cache, block_tables, seq_lens, scale, std::string(backend))
      .cast<at::Tensor>();
}

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                   const at::Tensor& query_start_loc, int64_t max_query_len, double scale,
                                   c10::string_view backend) {
  if (backend == "cpu")
    return paged_prefill_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                                       scale);
  return call_python(kPagedPrefillAttention, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                     max_query_len, scale, std::string(backend))
      .cast<at::Tensor>();
}

}  // namespace

void install_cpu_routes(const py::dict& routes, int64_t int4_kernel_rows) {
  // Every route is checked before any is replaced: a refused install leaves the last one whole.
  for (const char* op : kOps) {
    TORCH_CHECK_VALUE(routes.contains(op), "install_cpu_routes: no Python implementation given for ", op);
    TORCH_CHECK_VALUE(PyCallable_Check(py::object(routes[op]).ptr()), "install_cpu_routes: the implementation of ",
                      op, " is not callable");
  }
  PythonRoutes& target = installed();
  for (int op = 0; op < kNumOps; ++op) {
    if (target.route[op] == nullptr) target.route[op] = new py::object();  // owned for the process
    *target.route[op] = routes[kOps[op]];
  }
  target.int4_kernel_rows = int4_kernel_rows;
}

TORCH_LIBRARY_IMPL(fourbit, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("write_kv", &write_kv);
  m.impl("paged_attention", &paged_attention);
  m.impl("paged_prefill_attention", &paged_prefill_attention);
}

}  // namespace fourbit
