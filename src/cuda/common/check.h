#pragma once
// Error checks for CUDA runtime and cuBLASLt calls: each failure throws nibble::Error
// with the call text and the library's own message.
#include <cuda_runtime.h>

#include "nibble/error.h"

// NB_CUDA_CHECK(cudaMemsetAsync(p, 0, n, stream));
#define NB_CUDA_CHECK(call)                                                              \
  do {                                                                                   \
    const cudaError_t nb_cuda_err_ = (call);                                             \
    NB_CHECK(nb_cuda_err_ == cudaSuccess, #call << " failed: "                           \
                                                << cudaGetErrorName(nb_cuda_err_) << " (" \
                                                << cudaGetErrorString(nb_cuda_err_) << ")"); \
  } while (0)

// After a kernel launch: reports launch-configuration errors at once (not execution errors,
// which surface at the next synchronizing call).
#define NB_CUDA_CHECK_LAUNCH() NB_CUDA_CHECK(cudaGetLastError())
