// The one TORCH_LIBRARY(fourbit) block: every schema of the library lives here.
//
// Each schema has one Python implementation, python/fourbit/ops.py's router to a backend in
// python/fourbit/backends/ (the reference, a C++ kernel bound below, a Triton kernel),
// registered there for CUDA tensors with one fake per op for torch.compile. For CPU tensors
// csrc/cpu/routes.cpp is the implementation: it runs the C++ CPU kernels itself and hands
// every other call to that router.

#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/routes.h"
#include "ops.h"

TORCH_LIBRARY(fourbit, m) {
  // out = x @ dequantize(qweight, scales, offsets).T + bias, fp32 accumulation.
  // x [M, K]; qweight int32 [N, K_padded/8] in the layout `backend` expects (the canonical
  // one for "torch" and "cpu"); scales, offsets [N, K_padded/group_len]; returns [M, N].
  m.def(
      "int4_mm(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_len, "
      "Tensor? bias, str backend) -> Tensor");

  // out = x @ (qweight * scales).T + bias, fp32 accumulation: int8 weight-only (GGUF Q8_0 and
  // int8 heads). x [M, K]; qweight int8 [N, K]; scales [N, K/group_len], group_len K or a
  // multiple of 32 dividing K; returns [M, N] in x's dtype.
  m.def("int8_mm(Tensor x, Tensor qweight, Tensor scales, int group_len, Tensor? bias, str backend) -> Tensor");

  // Paged KV cache (layout: python/fourbit/kv_cache.py). Caches are
  // [num_blocks, block_size, num_kv_heads, head_dim]; block_tables int32 [B, max_blocks];
  // seq_lens int32 [B]; slot_mapping int64 [T] (page * block_size + row, -1 = skip).
  //
  // k_cache[slot] = k[t], v_cache[slot] = v[t] for every slot >= 0; k, v [T, Hkv, D].
  m.def(
      "write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
      "str backend) -> ()");
  // Decode: q [B, Hq, D], one token per sequence, attending to its seq_lens[b] cached tokens.
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "float scale, str backend) -> Tensor");
  // Prefill: q [total_q, Hq, D], the new tokens of sequence b at
  // query_start_loc[b] .. query_start_loc[b + 1] - 1, causal over the cached tokens;
  // max_query_len, the most new tokens of any sequence, known on the host (it sizes grids).
  m.def(
      "paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor query_start_loc, int max_query_len, float scale, str backend) -> Tensor");
}

// Kernel entry points, called by the launchers in python/fourbit/backends/.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm_cpu", &fourbit::int4_mm_cpu, "int4 weight-only matmul, C++ CPU kernel",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("offsets"),
        py::arg("group_len"), py::arg("bias") = py::none());
  m.def("int4_mm_cpu_isa", &fourbit::int4_mm_cpu_isa,
        "vector instruction set of the CPU kernel on this machine");
  m.def("int4_a8_mm_cpu", &fourbit::int4_a8_mm_cpu,
        "int4 weight, int8 activations (W4A8; digits 2 / 3: 16- / 24-bit activations, 0: by x's dtype) matmul, "
        "C++ CPU kernel", py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("offsets"), py::arg("group_len"),
        py::arg("bias") = py::none(), py::arg("digits") = 1);
  m.def("int4_a8_mm_cpu_isa", &fourbit::int4_a8_mm_cpu_isa, "vector instruction set of the W4A8 CPU kernel");
  m.def("paged_attention_cpu", &fourbit::paged_attention_cpu, "paged decode attention, C++ CPU kernel",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("scale"));
  m.def("paged_prefill_attention_cpu", &fourbit::paged_prefill_attention_cpu,
        "paged prefill attention, C++ CPU kernel", py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_tables"), py::arg("seq_lens"), py::arg("query_start_loc"), py::arg("max_query_len"),
        py::arg("scale"));
  m.def("write_kv_cpu", &fourbit::write_kv_cpu, "paged KV cache write, C++ CPU kernel", py::arg("k"), py::arg("v"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"));
  m.def("int8_mm_cpu", &fourbit::int8_mm_cpu, "int8 weight-only matmul, C++ CPU kernel", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("group_len"), py::arg("bias") = py::none());
  m.def("install_cpu_routes", &fourbit::install_cpu_routes,
        "hand the ops' Python implementations to the CPU implementations of csrc/cpu/routes.cpp",
        py::arg("routes"), py::arg("int4_kernel_rows"));
  m.def("int8_mm_cpu_isa", &fourbit::int8_mm_cpu_isa, "vector instruction set of the CPU int8 kernel on this machine");
#ifdef FOURBIT_WITH_CUDA
  m.def("int4_mm_cuda", &fourbit::int4_mm_cuda, "int4 weight-only matmul, CUDA tensor-core kernel (M <= 64)",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("offsets"), py::arg("n"), py::arg("group_len"),
        py::arg("bias") = py::none());
  m.def("paged_attention_cuda", &fourbit::paged_attention_cuda, "paged decode attention, CUDA kernel",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("scale"));
  m.def("write_kv_cuda", &fourbit::write_kv_cuda, "paged KV cache write, CUDA kernel", py::arg("k"), py::arg("v"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"));
#endif
}
