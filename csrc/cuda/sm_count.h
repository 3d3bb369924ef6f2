// The launchers' one question to the device: how many SMs to fill.
#pragma once

#include <c10/cuda/CUDAException.h>

namespace fourbit {

inline int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace fourbit
