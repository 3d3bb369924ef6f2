// Software prefetch of the weight rows a CPU kernel reads next. A decode GEMV's share of a
// thread is often a few hundred KiB, over before the hardware's stream prefetcher has ramped
// up; the kernels ask for rows a few KiB ahead (int4_a8_cpu_kernel.h, int8_cpu_kernel.h).
#pragma once

#include <cstdint>

namespace fourbit {
namespace cpu {

// How far ahead the kernels prefetch: about 4 KiB of weights (measured in int4_a8_cpu_kernel.h).
constexpr int64_t kPrefetchBytes = int64_t{4} << 10;

// Every 64-byte line of [p, p + bytes) towards L1.
static inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

}  // namespace cpu
}  // namespace fourbit
