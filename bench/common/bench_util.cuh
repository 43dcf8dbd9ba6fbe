#pragma once
// Shared pieces of the GEMM benchmarks: device buffers, random fills, and the timer.
//
// Timing method (CUTLASS's measurement guide; METHOD.md): warm-up launches first; then a
// spin kernel holds the stream for a few milliseconds while the host queues every timed
// launch behind it, each between two CUDA events, so host-side launch cost (CUTLASS builds
// its TMA descriptors on the host) never shows as idle GPU time inside a measured interval.
// The kernels being compared are interleaved launch by launch (time_interleaved).
// Input sets rotate launch by launch, and there are enough of them that their bytes exceed
// the L2 several times over, so no kernel reads operands left in L2 by the previous launch.
// The reported number is the median interval.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "cuda/common/check.h"
#include "nibble/rng.h"

namespace nibble::bench {

// Raw device bytes; freed on destruction.
class DeviceBytes {
 public:
  DeviceBytes() = default;
  explicit DeviceBytes(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) NB_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  }
  ~DeviceBytes() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBytes(DeviceBytes&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBytes& operator=(DeviceBytes&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// What a fill writes, element by element, from the Philox word of its index.
enum class Fill {
  s8_full,     // int8 uniform in [-128, 127]
  bf16_unit,   // bf16 uniform in [-1, 1)
  e4m3_unit,   // fp8 e4m3 bytes of values in [-1, 1) (finite: never the NaN codes 0x7f/0xff)
  f32_scale,   // fp32 in [1e-3, 1e-1): dequant scales
  f32_bias,    // fp32 in [-1, 1)
};

// Nearest e4m3 byte to a value in [-1, 1): sign, 4-bit exponent (bias 7), 3-bit mantissa.
// Round-toward-zero is enough here: the bytes only need to be finite, varied data.
__device__ inline uint8_t e4m3_from_unit(float v) {
  const uint8_t sign = v < 0 ? 0x80 : 0;
  float a = fabsf(v);
  if (a < 0.015625f) return sign;  // below 2^-6: flush to zero (subnormals not needed)
  int e = 0;
  const float m = frexpf(a, &e);   // a = m · 2^e, m in [0.5, 1)
  const int exp_field = e - 1 + 7; // a = 1.f · 2^(e-1)
  const int mant = static_cast<int>((m * 2.0f - 1.0f) * 8.0f);
  return static_cast<uint8_t>(sign | (exp_field << 3) | mant);
}

__global__ inline void fill_kernel(void* data, int64_t count, Fill fill, uint64_t seed) {
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t r = philox_u32(key, static_cast<uint64_t>(i));
    const float u = static_cast<float>(r >> 8) * (1.0f / 16777216.0f);  // [0, 1)
    switch (fill) {
      case Fill::s8_full: static_cast<int8_t*>(data)[i] = static_cast<int8_t>(r & 0xff); break;
      case Fill::bf16_unit: {
        const float v = 2.0f * u - 1.0f;  // truncation to bf16: the top 16 bits
        static_cast<uint16_t*>(data)[i] = static_cast<uint16_t>(__float_as_uint(v) >> 16);
        break;
      }
      case Fill::e4m3_unit: static_cast<uint8_t*>(data)[i] = e4m3_from_unit(2.0f * u - 1.0f); break;
      case Fill::f32_scale: static_cast<float*>(data)[i] = 1e-3f + u * (1e-1f - 1e-3f); break;
      case Fill::f32_bias: static_cast<float*>(data)[i] = 2.0f * u - 1.0f; break;
    }
  }
}

inline void fill(void* data, int64_t count, Fill f, uint64_t seed, cudaStream_t stream) {
  if (count == 0) return;
  fill_kernel<<<1024, 256, 0, stream>>>(data, count, f, seed);
  NB_CUDA_CHECK_LAUNCH();
}

// Holds the stream for about `ns` nanoseconds.
__global__ inline void spin_kernel(int64_t ns) {
  const uint64_t start = clock64();
  // clock64 counts SM cycles; 2 GHz is an upper bound on H100/H200 boost clocks, so this
  // waits at least ns nanoseconds.
  while (static_cast<int64_t>(clock64() - start) < 2 * ns) {
  }
}

// Counts elements where two int32 buffers differ.
__global__ inline void count_mismatch_kernel(const int32_t* x, const int32_t* y, int64_t count,
                                             unsigned long long* bad) {
  unsigned long long local = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    local += x[i] != y[i];
  if (local) atomicAdd(bad, local);
}

inline uint64_t count_mismatches(const int32_t* x, const int32_t* y, int64_t count,
                                 cudaStream_t stream) {
  DeviceBytes d(sizeof(unsigned long long));
  NB_CUDA_CHECK(cudaMemsetAsync(d.as<void>(), 0, d.bytes(), stream));
  count_mismatch_kernel<<<1024, 256, 0, stream>>>(x, y, count, d.as<unsigned long long>());
  NB_CUDA_CHECK_LAUNCH();
  unsigned long long h = 0;
  NB_CUDA_CHECK(cudaMemcpyAsync(&h, d.as<void>(), sizeof(h), cudaMemcpyDeviceToHost, stream));
  NB_CUDA_CHECK(cudaStreamSynchronize(stream));
  return h;
}

struct Timing {
  double median_ms = 0, min_ms = 0, max_ms = 0;
  int runs = 0;
};

// The timed part of time_interleaved: `runs` rounds, round r launching kernel 0..J-1 on input
// set r % sets, each between its own pair of events, all queued behind a spin kernel of
// spin_ns nanoseconds (0: no spin, for launches that wait for the GPU themselves). The
// caller has warmed up. Returns one Timing per kernel (median, min, max).
inline std::vector<Timing> time_queued(const std::vector<std::function<void(int)>>& launches,
                                       int sets, int runs, cudaStream_t stream, int64_t spin_ns) {
  const size_t nk = launches.size();
  std::vector<cudaEvent_t> ev(static_cast<size_t>(runs) * nk * 2);
  for (auto& e : ev) NB_CUDA_CHECK(cudaEventCreate(&e));
  if (spin_ns > 0) {
    spin_kernel<<<1, 1, 0, stream>>>(spin_ns);
    NB_CUDA_CHECK_LAUNCH();
  }
  for (int r = 0; r < runs; ++r) {
    for (size_t j = 0; j < nk; ++j) {
      const size_t e = (static_cast<size_t>(r) * nk + j) * 2;
      NB_CUDA_CHECK(cudaEventRecord(ev[e], stream));
      launches[j](r % sets);
      NB_CUDA_CHECK(cudaEventRecord(ev[e + 1], stream));
    }
  }
  NB_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<Timing> out(nk);
  for (size_t j = 0; j < nk; ++j) {
    std::vector<double> ms(static_cast<size_t>(runs));
    for (int r = 0; r < runs; ++r) {
      const size_t e = (static_cast<size_t>(r) * nk + j) * 2;
      float t = 0;
      NB_CUDA_CHECK(cudaEventElapsedTime(&t, ev[e], ev[e + 1]));
      ms[static_cast<size_t>(r)] = t;
    }
    std::sort(ms.begin(), ms.end());
    Timing& t = out[j];
    t.runs = runs;
    t.min_ms = ms.front();
    t.max_ms = ms.back();
    const size_t h = static_cast<size_t>(runs / 2);
    t.median_ms = runs % 2 ? ms[h] : 0.5 * (ms[h - 1] + ms[h]);
  }
  for (auto& e : ev) cudaEventDestroy(e);
  return out;
}

// Times several kernels under the same conditions: run r launches kernel 0, 1, ..., J-1 in
// turn, each on input set r % sets and between its own pair of events, after `warmup`
// untimed rounds. Interleaving matters on a GPU whose clock drifts with power and heat
// (seen here: two identical configs timed one after the other differed by up to 10%), so
// ratios between kernels come from paired measurements. Returns one Timing per kernel.
inline std::vector<Timing> time_interleaved(const std::vector<std::function<void(int)>>& launches,
                                            int sets, int warmup, int runs, cudaStream_t stream) {
  const size_t nk = launches.size();
  for (int i = 0; i < warmup; ++i)
    for (const auto& l : launches) l(i % sets);
  NB_CUDA_CHECK(cudaStreamSynchronize(stream));
  // 20 µs of host time per queued launch is generous; the spin covers all of them.
  return time_queued(launches, sets, runs, stream,
                     int64_t{20000} * runs * static_cast<int64_t>(nk) + 1000000);
}

// How many input sets to rotate through so that together they span at least four L2s
// (and never fewer than three).
inline int rotation_sets(size_t bytes_per_set) {
  int device = 0;
  NB_CUDA_CHECK(cudaGetDevice(&device));
  int l2 = 0;
  NB_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  const size_t want = 4 * static_cast<size_t>(l2);
  const size_t sets = (want + bytes_per_set - 1) / std::max<size_t>(bytes_per_set, 1);
  return static_cast<int>(std::clamp<size_t>(sets, 3, 64));
}

}  // namespace nibble::bench
