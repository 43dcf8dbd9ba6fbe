#pragma once
// Device-side error word of the quantization kernels.
//
// The CPU reference throws on a NaN/Inf input, naming the first bad index. A kernel cannot
// throw, and the launchers must not synchronise with the host, so each kernel that can meet a
// bad value records it in an optional 64-bit word in device memory (`status` in the params
// structs; null = no check). The caller reads the word whenever it synchronises anyway (e.g.
// once per training step) with status_throw_if_set, which turns it into a nibble::Error.
//
// Encoding: kStatusClear = no problem. Otherwise bits 60-63 hold a StatusKind and bits 0-59 an
// index; kernels combine reports with atomicMin, so the word keeps the lowest kind and, within
// it, the lowest index — for non-finite inputs that is the first bad flat index, as on the CPU.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace nibble::cuda {

enum class StatusKind : uint64_t {
  nonfinite = 0,     // index = flat index (r·cols + c) of a NaN/Inf input or transformed value
  out_of_range = 1,  // index = flat index of a code outside [-8, 7] (pack), a p outside [0, 1]
                     //         or a negative leverage score
  bad_scale = 2,     // index = which scale/step (device input or computed) is not positive finite
  overflow = 3,      // index = flat index of a Hadamard-transformed value that overflowed fp32
                     //         although every input was finite (ranked after the input errors: a
                     //         NaN input spreads over its whole block, so the input's own index
                     //         must win)
  capacity = 4,      // index = kept-row count of a sampled backward that exceeded the rows its
                     //         GEMMs were sized for (HqLinearConfig::sample_capacity_sigmas)
};

constexpr uint64_t kStatusClear = ~uint64_t{0};
constexpr int kStatusKindShift = 60;
constexpr uint64_t kStatusIndexMask = (uint64_t{1} << kStatusKindShift) - 1;

constexpr uint64_t status_code(StatusKind kind, uint64_t index) {
  return (static_cast<uint64_t>(kind) << kStatusKindShift) | (index & kStatusIndexMask);
}

// Sets the word to kStatusClear (cudaMemsetAsync on `stream`; no host synchronisation).
void status_clear(uint64_t* status, cudaStream_t stream);

// Human-readable description of a status word, e.g. "NaN/Inf at flat index 17 (row 0, col 17)".
// cols > 0 adds the (row, col) of a flat index.
std::string status_message(uint64_t word, int64_t cols = 0);

// Synchronises `stream`, reads the word and throws nibble::Error("<what>: <message>; ...") if a
// kernel recorded a problem. This is the one function of src/cuda/quant that waits for the GPU:
// call it where the caller synchronises anyway.
void status_throw_if_set(const uint64_t* status, const char* what, cudaStream_t stream,
                         int64_t cols = 0);

}  // namespace nibble::cuda
