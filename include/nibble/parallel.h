#pragma once
// CPU parallel loops for the reference backend (OpenMP underneath, if available).
// Each index is processed by exactly one thread, and callers write each output from one
// index only, so results never depend on the thread count.
#include <cstdint>
#include <functional>

namespace nibble {

// Calls fn(i) for i in [0, n), split across threads in contiguous chunks.
// work_per_index is a rough count of inner-loop operations per index: below about 2^16
// operations in total the loop runs on the calling thread, because an OpenMP fork/join
// costs far more than the work on a busy 2-core machine (measured: milliseconds each).
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn,
                  int64_t work_per_index = int64_t{1} << 16);
// The same, with the total work of the loop given instead of the work per index.
inline void parallel_rows(int64_t n, int64_t total_work, const std::function<void(int64_t)>& fn) {
  parallel_for(n, fn, n > 0 ? total_work / n : 0);
}

int num_threads();
void set_num_threads(int n);

}  // namespace nibble
