#pragma once
// Host-side argument checks shared by the quantization launchers. They run before anything is
// queued and throw nibble::Error with what was wrong and what to do; none of them waits for
// the GPU (cudaPointerGetAttributes is a host-side table lookup).
#include <cuda_runtime.h>

#include <cstdint>

#include "nibble/error.h"
#include "nibble/format.h"

namespace nibble::cuda::detail {

// Rejects null pointers and host memory the GPU cannot read (plain malloc/new); accepts device,
// managed and registered host memory. `n` is the element count the pointer must hold (a null
// pointer is accepted when n == 0).
inline void check_device_pointer(const void* p, int64_t n, const char* fn, const char* name) {
  if (n == 0 && p == nullptr) return;
  NB_CHECK(p != nullptr, fn << ": " << name << " is null; pass a device buffer of " << n
                            << " elements");
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky non-fatal error of the query
    NB_FAIL(fn << ": cannot query " << name << " (" << cudaGetErrorString(err)
               << "); pass memory from cudaMalloc");
  }
  NB_CHECK(attr.type != cudaMemoryTypeUnregistered,
           fn << ": " << name << " points to host memory the GPU cannot read; copy it to a "
              << "cudaMalloc buffer first");
}

inline void check_shape(int64_t rows, int64_t cols, const char* fn) {
  NB_CHECK(rows >= 0 && cols >= 0, fn << ": shape [" << rows << ", " << cols
                                      << "] has a negative extent; pass rows, cols >= 0");
}

// Codes live in int8 containers.
inline void check_range_s8(QRange range, const char* fn) {
  NB_CHECK(range.qmin < range.qmax, fn << ": empty code range [" << range.qmin << ", "
                                       << range.qmax
                                       << "]; qmin must be below qmax (e.g. [-7, 7] for INT4)");
  NB_CHECK(range.qmin >= -128 && range.qmax <= 127,
           fn << ": code range [" << range.qmin << ", " << range.qmax
              << "] does not fit the int8 container; use a range inside [-128, 127]");
}

// Kernels index grids with 32-bit block counts; a tensor this large would overflow them.
inline void check_grid_extent(int64_t blocks, const char* fn, const char* what) {
  NB_CHECK(blocks <= 2147483647LL, fn << ": " << what << " needs " << blocks
                                      << " thread blocks, above the CUDA grid limit; split the "
                                      << "tensor into several calls");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace nibble::cuda::detail
