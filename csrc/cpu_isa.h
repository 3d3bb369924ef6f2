// The vector instruction set the CPU kernels (csrc/cpu/) run with, picked once per call:
// the widest this CPU has, unless FOURBIT_CPU_ISA forces one (tests use it to run every
// path the machine can). Shared by the int4 matmul and the paged attention launchers.
#pragma once

#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

namespace fourbit {
namespace cpu {

enum class Isa { kPortable, kAvx2, kAvx512 };

// AVX2 includes FMA and F16C (the fp16 -> fp32 widening of the attention kernel): every
// CPU with AVX2 has both. AVX-512 means F and DQ (vcvtph2ps on 512 bits is in F).
inline bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == Isa::kAvx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == Isa::kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
  if (isa != Isa::kPortable) return false;
#endif
  return true;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "portable";
}

inline Isa pick_isa() {
  const char* forced = std::getenv("FOURBIT_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512}) {
      if (std::strcmp(forced, isa_name(isa)) == 0) {
        TORCH_CHECK(cpu_supports(isa), "FOURBIT_CPU_ISA=", forced, " but this CPU does not support it");
        return isa;
      }
    }
    TORCH_CHECK(false, "FOURBIT_CPU_ISA must be portable, avx2 or avx512, got '", forced, "'");
  }
  if (cpu_supports(Isa::kAvx512)) return Isa::kAvx512;
  if (cpu_supports(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kPortable;
}

}  // namespace cpu
}  // namespace fourbit
