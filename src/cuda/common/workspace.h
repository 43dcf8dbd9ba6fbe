#pragma once
// Device scratch memory shared by the launchers of src/cuda, cached so that steady-state
// calls allocate nothing. One buffer per (device, stream): two streams never share scratch,
// so kernels in flight on different streams cannot overwrite each other's partial results.
// The buffer only grows; it lives until the process exits.
#include <cuda_runtime.h>

#include <cstddef>

namespace nibble::cuda {

// Returns at least `bytes` of device memory on the current device for use on `stream`
// (nullptr when bytes == 0). The pointer stays valid until the next call with the same
// (device, stream) that asks for more; calls on one stream are ordered, so reuse is safe.
// Growing the buffer while `stream` is being captured into a CUDA graph throws nibble::Error
// (warm up first: run the calls once on the stream, then capture them).
void* workspace(size_t bytes, cudaStream_t stream);

// Streaming-multiprocessor count of the current device, queried once per device.
int device_sm_count();

}  // namespace nibble::cuda
