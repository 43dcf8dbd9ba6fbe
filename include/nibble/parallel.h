#pragma once
// CPU parallel loops for the reference backend (OpenMP underneath, if available).
// Each index is processed by exactly one thread, and callers write each output from one
// index only, so results never depend on the thread count.
#include <cstdint>
#include <functional>

namespace nibble {

// Calls fn(i) for i in [0, n), split across threads in contiguous chunks.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);
int num_threads();
void set_num_threads(int n);

}  // namespace nibble
