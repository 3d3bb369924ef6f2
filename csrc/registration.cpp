// The one TORCH_LIBRARY(fourbit) block: every schema of the library lives here.
//
// Implementations of the schemas are registered from python/fourbit/ops.py (one Python
// implementation per op that routes to a backend: the reference, a C++ kernel bound
// below, a Triton kernel), together with one fake per op for torch.compile.

#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(fourbit, m) {
  // out = x @ dequantize(qweight, scales, offsets).T + bias, fp32 accumulation.
  // x [M, K]; qweight int32 [N, K_padded/8] in the layout `backend` expects (the canonical
  // one for "torch" and "cpu"); scales, offsets [N, K_padded/group_len]; returns [M, N].
  m.def(
      "int4_mm(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_len, "
      "Tensor? bias, str backend) -> Tensor");
}

// Kernel entry points, called by the op implementations in python/fourbit/ops.py.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm_cpu", &fourbit::int4_mm_cpu, "int4 weight-only matmul, C++ CPU kernel",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("offsets"),
        py::arg("group_len"), py::arg("bias") = py::none());
  m.def("int4_mm_cpu_isa", &fourbit::int4_mm_cpu_isa,
        "vector instruction set of the CPU kernel on this machine");
}
