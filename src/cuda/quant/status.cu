#include "cuda/quant/status.h"

#include <sstream>

#include "cuda/common/check.h"
#include "nibble/error.h"

namespace nibble::cuda {

void status_clear(uint64_t* status, cudaStream_t stream) {
  NB_CHECK(status != nullptr, "status_clear: status is null; pass a device uint64_t");
  // 0xff bytes = kStatusClear
  NB_CUDA_CHECK(cudaMemsetAsync(status, 0xff, sizeof(uint64_t), stream));
}

std::string status_message(uint64_t word, int64_t cols) {
  if (word == kStatusClear) return "no problem recorded";
  const uint64_t kind = word >> kStatusKindShift;
  const uint64_t index = word & kStatusIndexMask;
  std::ostringstream os;
  auto where = [&] {
    os << "flat index " << index;
    if (cols > 0) {
      const uint64_t c = static_cast<uint64_t>(cols);
      os << " (row " << index / c << ", col " << index % c << ")";
    }
  };
  switch (static_cast<StatusKind>(kind)) {
    case StatusKind::nonfinite:
      os << "NaN/Inf at ";
      where();
      os << "; clean or clip the input before quantizing";
      break;
    case StatusKind::out_of_range:
      os << "value out of range at ";
      where();
      os << " (an s4 code outside [-8, 7], a probability outside [0, 1] or a negative "
            "leverage score)";
      break;
    case StatusKind::bad_scale:
      os << "scale " << index
         << " is not a positive finite number (a step size <= 0 or NaN, or a scale that "
            "overflows fp32); initialise step sizes with lsq_init_scale and rescale the input";
      break;
    case StatusKind::overflow:
      os << "the Hadamard transform overflowed fp32 at ";
      where();
      os << " although the input is finite; rescale the input";
      break;
    case StatusKind::capacity:
      os << "the sampled backward kept " << index
         << " rows, more than its GEMMs were sized for, so the rows past the capacity were "
            "dropped and this step's gradients are biased; raise "
            "HqLinearConfig::sample_capacity_sigmas (8 makes this an e^-32 event)";
      break;
    default:
      os << "unknown status word 0x" << std::hex << word;
      break;
  }
  return os.str();
}

void status_throw_if_set(const uint64_t* status, const char* what, cudaStream_t stream,
                         int64_t cols) {
  NB_CHECK(status != nullptr, "status_throw_if_set: status is null");
  uint64_t word = kStatusClear;
  NB_CUDA_CHECK(cudaMemcpyAsync(&word, status, sizeof(word), cudaMemcpyDeviceToHost, stream));
  NB_CUDA_CHECK(cudaStreamSynchronize(stream));
  NB_CHECK(word == kStatusClear, what << ": " << status_message(word, cols));
}

}  // namespace nibble::cuda
