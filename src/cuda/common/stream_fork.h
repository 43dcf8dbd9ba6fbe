#pragma once
// Fork/join of one op's work over the caller's stream and a second ("side") stream, so that
// independent kernels of the op can run at the same time. The side stream's priority is one
// step above the caller's stream (or the device's highest, if the caller's is already there):
// the op puts its critical path on the side stream (e.g. the backward's bit split and GEMMs)
// and the kernels that may wait on the caller's stream, so that when both have work pending
// the block scheduler serves the critical path first and the others fill the SMs it leaves
// (priorities order pending blocks only; nothing running is preempted). Streams the user
// ranked above the caller's (e.g. for communication) stay above both. Usage:
//
//   StreamFork fork(stream);        // the side stream waits for everything queued on stream
//   kernel_a<<<..., fork.side()>>>  // runs beside what follows on stream
//   fork.main_waits_side();         // stream waits for everything queued on the side so far
//   fork.side_waits_main();         // the side waits for everything queued on stream so far
//   ...
//   fork.join();                    // stream waits for the side; call before returning
//
// Ordering is by events only (the side stream is non-blocking), so the op stays ordered on the
// caller's stream as a whole: work queued on `stream` after join() starts after all of the op.
// The same holds during CUDA graph capture (the side stream joins the capture through the
// first event and leaves it at join()), so an op that forks can be captured and replayed.
// One side stream per (device, caller stream), created on first use and kept for the life
// of the process; events are created per fork and destroyed at its end (their recorded
// states live on in the waits that used them).
#include <cuda_runtime.h>

#include <vector>

namespace nibble::cuda {

class StreamFork {
 public:
  explicit StreamFork(cudaStream_t stream);
  // Joins if join() was not called (an exception on the way): later work on the caller's
  // stream, e.g. a workspace reuse, must not overtake the side stream's kernels.
  ~StreamFork();
  StreamFork(const StreamFork&) = delete;
  StreamFork& operator=(const StreamFork&) = delete;

  cudaStream_t side() const { return side_; }
  void side_waits_main();
  void main_waits_side();
  void join();

 private:
  void wait(cudaStream_t waiter, cudaStream_t signaller);

  cudaStream_t main_;
  cudaStream_t side_;
  std::vector<cudaEvent_t> events_;
  bool joined_ = false;
};

}  // namespace nibble::cuda
