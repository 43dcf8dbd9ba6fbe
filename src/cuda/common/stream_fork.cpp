#include "cuda/common/stream_fork.h"

#include <map>
#include <mutex>
#include <utility>

#include "cuda/common/check.h"

namespace nibble::cuda {

namespace {

// The side stream of (device, caller stream). Never destroyed, like the workspace cache:
// destroying streams from a static destructor races with the CUDA runtime's teardown. A
// caller stream's handle can come back for a new stream with another priority after the old
// one was destroyed; then the cached side stream is replaced (cudaStreamDestroy releases it
// once its queued work is done).
cudaStream_t side_stream_for(cudaStream_t stream) {
  int device = 0;
  NB_CUDA_CHECK(cudaGetDevice(&device));
  // One step above the caller's stream (numerically lower), clamped to the device's range:
  // above its own op's fillers, never above streams the user ranked higher (communication).
  int least = 0, greatest = 0;
  NB_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  int caller = least;
  NB_CUDA_CHECK(cudaStreamGetPriority(stream, &caller));
  const int priority = caller > greatest ? caller - 1 : greatest;
  struct Side {
    cudaStream_t stream = nullptr;
    int priority = 0;
  };
  static std::mutex m;
  static auto* sides = new std::map<std::pair<int, cudaStream_t>, Side>();
  std::lock_guard<std::mutex> lock(m);
  Side& side = (*sides)[{device, stream}];
  if (side.stream != nullptr && side.priority != priority) {
    NB_CUDA_CHECK(cudaStreamDestroy(side.stream));
    side = Side{};
  }
  if (side.stream == nullptr) {
    NB_CUDA_CHECK(cudaStreamCreateWithPriority(&side.stream, cudaStreamNonBlocking, priority));
    side.priority = priority;
  }
  return side.stream;
}

}  // namespace

StreamFork::StreamFork(cudaStream_t stream) : main_(stream), side_(side_stream_for(stream)) {
  side_waits_main();
}

StreamFork::~StreamFork() {
  if (!joined_) {
    // Best effort on an error path: the original exception is the one to report.
    cudaEvent_t e = nullptr;
    if (cudaEventCreateWithFlags(&e, cudaEventDisableTiming) == cudaSuccess) {
      if (cudaEventRecord(e, side_) == cudaSuccess) (void)cudaStreamWaitEvent(main_, e, 0);
      events_.push_back(e);
    }
  }
  for (cudaEvent_t e : events_) (void)cudaEventDestroy(e);
}

void StreamFork::wait(cudaStream_t waiter, cudaStream_t signaller) {
  cudaEvent_t e = nullptr;
  NB_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  events_.push_back(e);
  NB_CUDA_CHECK(cudaEventRecord(e, signaller));
  NB_CUDA_CHECK(cudaStreamWaitEvent(waiter, e, 0));
}

void StreamFork::side_waits_main() { wait(side_, main_); }

void StreamFork::main_waits_side() { wait(main_, side_); }

void StreamFork::join() {
  main_waits_side();
  joined_ = true;
}

}  // namespace nibble::cuda
