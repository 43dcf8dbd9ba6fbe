#pragma once
// CPU reference quantizers. Plain loops, fp32 arithmetic in a fixed order so the CUDA
// twins can match the integer codes bit for bit.
//
// Conventions (docs/formats.md):
//   symmetric:  q = clamp(round(x / s), qmin, qmax),            x̂ = s·q
//   asymmetric: q = clamp(round(x / s) + zp, qmin, qmax),       x̂ = s·(q − zp)
//   "x / s" is one IEEE fp32 division; round() follows `Rounding`.
//   Scales: symmetric s = absmax / qmax (0 -> s = 1 so codes are 0);
//           asymmetric s = (max − min) / (qmax − qmin), zp = qmin − round(min / s),
//           with min clamped ≤ 0 and max ≥ 0 so that 0 is exactly representable.
#include <cstdint>

#include "nibble/format.h"
#include "nibble/rng.h"

namespace nibble::ref {

// Rounds v to an integer: halves to even, or floor(v + philox_uniform(key, index)) (the
// fp32 sum, then floor). Saturates to the int32 range; throws on NaN/Inf.
int32_t round_code(float v, Rounding mode, const PhiloxKey& key, uint64_t index);

// Number of scales for a granularity: 1, rows, cols or rows*(cols/group). Throws if a
// group size does not divide cols. `group` is ignored for the other granularities.
int64_t scale_count(Granularity g, int64_t rows, int64_t cols, int64_t group);

// Throws nibble::Error naming the first NaN/Inf of x[rows, cols] (flat index, row, col);
// `what` prefixes the message, e.g. "quantize: x".
void check_finite_values(const float* x, int64_t rows, int64_t cols, const char* what);

// Scales for x[rows, cols] under a granularity. `scale` has 1, rows, cols or
// rows*(cols/group) entries. Symmetric: zero_point may be null. Asymmetric: zero_point
// (int32, same count as scale) is filled. A slice whose scale comes out 0 (all zeros, or
// an fp32 underflow) gets s = 1, so its codes are 0 (or zp).
void compute_scales(const float* x, int64_t rows, int64_t cols, Granularity g, int64_t group,
                    QRange range, bool asymmetric, float* scale, int32_t* zero_point);

// Quantizes x[rows, cols] to int8-container codes q[rows, cols] with the given scales
// (layout as in compute_scales). zero_point null means symmetric. Stochastic rounding draws
// element (r, c) from philox_uniform(key, r*cols + c).
void quantize(const float* x, int64_t rows, int64_t cols, Granularity g, int64_t group,
              const float* scale, const int32_t* zero_point, QRange range, Rounding mode,
              const PhiloxKey& key, int8_t* q);

// x̂ = s·(q − zp), same layouts.
void dequantize(const int8_t* q, int64_t rows, int64_t cols, Granularity g, int64_t group,
                const float* scale, const int32_t* zero_point, float* x_hat);

// Pack n codes (each in [-8, 7]) into ceil(n/2) bytes, element 2i in the low nibble; an
// odd tail leaves the high nibble 0. Throws on a code outside [-8, 7].
void pack_s4(const int8_t* q, int64_t n, uint8_t* packed);
// Unpack with sign extension.
void unpack_s4(const uint8_t* packed, int64_t n, int8_t* q);
// Row-wise versions for [rows, cols] codes: each row packs to ceil(cols/2) bytes.
void pack_s4_rows(const int8_t* q, int64_t rows, int64_t cols, uint8_t* packed);
void unpack_s4_rows(const uint8_t* packed, int64_t rows, int64_t cols, int8_t* q);

// Signal-to-quantization-noise ratio in dB: 10·log10(Σx² / Σ(x − x̂)²), fp64 sums.
// Returns +inf when the error is exactly zero.
double sqnr_db(const float* x, const float* x_hat, int64_t n);

}  // namespace nibble::ref
