#pragma once
// Owning device buffer of n elements of T for the GPU tests. Fresh buffers are poisoned: 0xA5
// bytes are int8 −91 (outside every code range), int32 −1515870811 (beyond any |Σ| a test can
// produce, ≤ 2^27) and a large negative float / bf16 no output can equal, so an element a
// kernel forgot to write fails the comparison instead of passing as a lucky zero.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cuda/common/check.h"
#include "nibble/error.h"

namespace nibble::test {

template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(int64_t n) : n_(n) {
    NB_CUDA_CHECK(cudaMalloc(&ptr_, bytes()));
    poison();
  }
  explicit DeviceBuffer(const std::vector<T>& h) : DeviceBuffer(static_cast<int64_t>(h.size())) {
    upload(h);
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return ptr_; }
  int64_t size() const { return n_; }
  void upload(const std::vector<T>& h) {
    NB_CHECK(static_cast<int64_t>(h.size()) <= n_,
             "DeviceBuffer::upload: " << h.size() << " elements into a buffer of " << n_);
    NB_CUDA_CHECK(cudaMemcpy(ptr_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> h(static_cast<size_t>(n_));
    NB_CUDA_CHECK(cudaMemcpy(h.data(), ptr_, h.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void poison() { NB_CUDA_CHECK(cudaMemset(ptr_, 0xA5, bytes())); }

 private:
  size_t bytes() const { return static_cast<size_t>(std::max<int64_t>(n_, 1)) * sizeof(T); }
  T* ptr_ = nullptr;
  int64_t n_ = 0;
};

}  // namespace nibble::test
