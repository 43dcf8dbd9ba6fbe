#include "cuda/common/workspace.h"

#include <map>
#include <mutex>
#include <utility>

#include "cuda/common/check.h"
#include "nibble/error.h"

namespace nibble::cuda {

namespace {

struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
};

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

// Never freed: the buffers are reused for the life of the process, and freeing them from a
// static destructor would race with the CUDA runtime's own teardown.
std::map<std::pair<int, cudaStream_t>, Buffer>& cache() {
  static auto* c = new std::map<std::pair<int, cudaStream_t>, Buffer>();
  return *c;
}

}  // namespace

void* workspace(size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return nullptr;
  int device = 0;
  NB_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(cache_mutex());
  Buffer& buf = cache()[{device, stream}];
  if (buf.bytes < bytes) {
    // Growing frees and allocates (and waits for the stream): not possible while the stream
    // is being captured into a CUDA graph, and the graph would keep a pointer to freed memory.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    NB_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    NB_CHECK(capture == cudaStreamCaptureStatusNone,
             "nibble: an op needs " << bytes << " bytes of scratch on a stream that is being "
                                    << "captured into a CUDA graph, and its cached scratch has "
                                    << buf.bytes << "; run the same calls once on that stream "
                                    << "before capturing them (a warm-up), so that the scratch "
                                    << "exists when the capture starts");
    if (buf.ptr != nullptr) {
      // The old buffer may still be read by work queued on this stream.
      NB_CUDA_CHECK(cudaStreamSynchronize(stream));
      NB_CUDA_CHECK(cudaFree(buf.ptr));
      buf = Buffer{};
    }
    NB_CUDA_CHECK(cudaMalloc(&buf.ptr, bytes));
    buf.bytes = bytes;
  }
  return buf.ptr;
}

int device_sm_count() {
  int device = 0;
  NB_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex m;
  static std::map<int, int> counts;
  std::lock_guard<std::mutex> lock(m);
  auto it = counts.find(device);
  if (it == counts.end()) {
    int sms = 0;
    NB_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    it = counts.emplace(device, sms).first;
  }
  return it->second;
}

}  // namespace nibble::cuda
