// AVX2 + FMA CPU int4 matmul: 8 words (64 columns) per register (the traits:
// include/fourbit/int4_cpu_avx2.h). Everything in this translation unit is compiled for AVX2;
// it includes no torch code, and of the STL only std::min / std::max on integers (inlined, and
// scalar code even if a copy were emitted), so no inline function built here can stand in for
// a baseline copy elsewhere (the kernel body is templates on the traits: int4_cpu_kernel.h).
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "fourbit/int4_cpu_avx2.h"
#include "fourbit/int4_cpu_kernel.h"

namespace fourbit {
namespace cpu {

void int4_matmul_rows_avx2(const Int4MatmulArgs& a, bool dot, int64_t n_begin, int64_t n_end, float* scratch) {
  int4_rows<Avx2>(a, dot, n_begin, n_end, scratch);
}

}  // namespace cpu
}  // namespace fourbit
