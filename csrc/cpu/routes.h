// The CPU implementations of fourbit's schemas (routes.cpp): the C++ backends run from the
// dispatcher directly, every other call goes to the op's Python implementation, which
// python/fourbit/ops.py hands over once, at import, with install_cpu_routes.
#pragma once

#include <cstdint>

#include <torch/extension.h>

namespace fourbit {

// routes: {op name: its Python implementation, ops.py's router}, one per schema.
// int4_kernel_rows: "cpu" int4_mm calls with fewer rows of x than this run the kernel in every
// dtype (python/fourbit/dispatch.py's CPU_DENSE_MIN_M, its smallest entry); from there the
// Python router picks the path.
void install_cpu_routes(const py::dict& routes, int64_t int4_kernel_rows);

}  // namespace fourbit
