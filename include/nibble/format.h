#pragma once
// Bit-level conventions shared by every backend (docs/formats.md explains each).
#include <cstdint>

namespace nibble {

// Integer code range of a quantizer. Symmetric INT4 defaults to the paper's [-7, 7];
// [-8, 7] is the released code's choice; [0, 15] is the asymmetric range.
struct QRange {
  int32_t qmin = -7;
  int32_t qmax = 7;
  int32_t levels() const { return qmax - qmin; }
};
constexpr QRange kInt4Sym{-7, 7};
constexpr QRange kInt4Full{-8, 7};
constexpr QRange kUint4{0, 15};
constexpr QRange kInt8Sym{-127, 127};
constexpr QRange kUint8{0, 255};

// Rounding. Nearest rounds halves to even (IEEE default, CUDA __float2int_rn / rintf).
// Stochastic is floor(v + u) with u = philox_uniform in [0, 1): E[q] = v up to 2^-24.
enum class Rounding : uint8_t { nearest, stochastic };

// Scale granularity for a 2-D tensor [rows, cols] quantized along cols (K).
//   tensor: one scale; row: one per row (per token / per output channel of W[C, D]);
//   column: one per column (per input channel); group: one per `group` consecutive
//   elements of a row (scales laid out [rows, cols / group]).
enum class Granularity : uint8_t { tensor, row, column, group };

// Bit splitting of an output gradient (paper 1, released constants, algorithms.md B.4).
constexpr int32_t kBitSplitBase = 14;    // beta = 2^4 - 2
constexpr int32_t kBitSplitLevels = 196; // L = beta^2: s = 2 * max|g| / L
constexpr int32_t kBitSplitHalf = 6;     // each half clamped to [-6, 6]
constexpr int32_t kBitSplitMax = kBitSplitBase * kBitSplitHalf + kBitSplitHalf;  // 90
// fl(1/14) in fp32 (0x3D924925, 1/14·(1 + 4.5e-8)): hi = rint(T·kBitSplitInvBase), a multiply
// instead of T/14 (docs/formats.md "Bit split").
constexpr float kBitSplitInvBase = 0x1.24924ap-4f;

// Packed s4: byte i holds element 2i in bits 0-3 and 2i+1 in bits 4-7, two's complement.
inline uint8_t pack_s4_pair(int32_t even, int32_t odd) {
  return static_cast<uint8_t>((static_cast<uint32_t>(even) & 0xF) |
                              ((static_cast<uint32_t>(odd) & 0xF) << 4));
}
inline int32_t unpack_s4_low(uint8_t b) { return static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4; }
inline int32_t unpack_s4_high(uint8_t b) { return static_cast<int8_t>(b) >> 4; }

}  // namespace nibble
