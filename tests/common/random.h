#pragma once
// Test inputs drawn from the Philox stream: fresh for every seed, never all zeros.
#include <cstdint>
#include <vector>

#include "nibble/rng.h"

namespace nibble::testing {

inline std::vector<float> randn(int64_t n, uint64_t seed, float stddev = 1.0f, float mean = 0.0f) {
  std::vector<float> v(static_cast<size_t>(n));
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = mean + stddev * philox_normal(key, static_cast<uint64_t>(i));
  return v;
}

// Integer codes uniform in [lo, hi].
inline std::vector<int8_t> randint8(int64_t n, uint64_t seed, int lo, int hi) {
  std::vector<int8_t> v(static_cast<size_t>(n));
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  const uint32_t span = static_cast<uint32_t>(hi - lo + 1);
  for (int64_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] = static_cast<int8_t>(lo + static_cast<int>(philox_u32(key, static_cast<uint64_t>(i)) % span));
  return v;
}

// Activation-style data: N(0,1) with a few outlier channels (columns) scaled by `gain`.
inline std::vector<float> randn_with_outlier_channels(int64_t rows, int64_t cols, uint64_t seed,
                                                      int64_t n_outliers, float gain) {
  std::vector<float> v = randn(rows * cols, seed);
  for (int64_t o = 0; o < n_outliers; ++o) {
    const int64_t col = (o * 7919 + 13) % cols;
    for (int64_t r = 0; r < rows; ++r) v[static_cast<size_t>(r * cols + col)] *= gain;
  }
  return v;
}

}  // namespace nibble::testing
