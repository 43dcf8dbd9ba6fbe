#include "nibble/parallel.h"

#include <algorithm>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace nibble {

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn, int64_t work_per_index) {
  constexpr int64_t kSerialBelow = int64_t{1} << 16;
  if (n <= 1 || n * std::max<int64_t>(work_per_index, 1) < kSerialBelow || num_threads() == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) fn(i);
#else
  for (int64_t i = 0; i < n; ++i) fn(i);
#endif
}

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_num_threads(int n) {
#ifdef _OPENMP
  omp_set_num_threads(std::max(1, n));
#else
  (void)n;
#endif
}

}  // namespace nibble
