#include "nibble/rng.h"

#include <cmath>

namespace nibble {

float philox_normal(const PhiloxKey& key, uint64_t index) {
  // Box-Muller on (u1, u2); u1 is shifted off zero so log() is finite.
  const float u1 = philox_uniform(key, 2 * index) + (1.0f / 33554432.0f);
  const float u2 = philox_uniform(key, 2 * index + 1);
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.283185307179586f * u2);
}

}  // namespace nibble
