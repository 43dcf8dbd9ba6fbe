#pragma once
// CUDA twins of ref/quant.h: per-row (per-token / per-output-channel) and per-column
// (per-input-channel) scales, symmetric or asymmetric, the quantizer, and s4 row packing
// (docs/formats.md, algorithms.md E.1, F.8).
//
// All pointers are device pointers; work is queued on `stream` and nothing waits for the GPU.
// Bit-exactness: min/max are exact in any order, the scale is one IEEE fp32 division (and one
// subtraction for asymmetric) as in ref::compute_scales, the zero point rounds min/s half to
// even, and codes are clamp(round(x / s) + zp) with one IEEE division: scales, zero points and
// codes equal the reference bit for bit. Stochastic rounding draws element (r, c) from
// philox_uniform(key, r·cols + c), the reference's stream.
#include <cuda_runtime.h>

#include <cstdint>

#include "nibble/dtype.h"
#include "nibble/format.h"
#include "nibble/rng.h"

namespace nibble::cuda {

// Scales of x[rows, cols] for Granularity::row (one per row, [rows]) or ::column (one per
// column, [cols]):
//   symmetric:  s = absmax / qmax
//   asymmetric: min clamped ≤ 0, max ≥ 0, s = (max − min)/(qmax − qmin), zp = qmin − round(min/s)
//   a slice whose s comes out 0 gets s = 1.
// If q is set, the same kernel also writes the codes q = clamp(round(x/s) + zp, qmin, qmax)
// (compute_scales + quantize fused: x is read twice per slice, the second time from cache).
template <class T>
struct ScaleParams {
  const T* x = nullptr;                       // [rows, cols] row-major, float or bf16_t
  int64_t rows = 0;
  int64_t cols = 0;
  Granularity granularity = Granularity::row; // row or column (tensor/group: ref only)
  QRange range = kInt4Sym;                    // inside [-128, 127]; symmetric needs qmax > 0
  bool asymmetric = false;
  float* scale = nullptr;                     // [rows] or [cols] output
  int32_t* zero_point = nullptr;              // [rows] or [cols] output, asymmetric only
  int8_t* q = nullptr;                        // optional [rows, cols] codes (the fused quantizer)
  Rounding rounding = Rounding::nearest;      // for q
  PhiloxKey key{};                            // for q with stochastic rounding
  uint64_t* status = nullptr;                 // optional (status.h): NaN/Inf input (first flat
                                              // index); a scale overflowing fp32 = bad_scale i
};
void compute_scales(const ScaleParams<float>& p, cudaStream_t stream);
void compute_scales(const ScaleParams<bf16_t>& p, cudaStream_t stream);

// Codes with given scales (ref::quantize), any granularity:
//   q[r, c] = clamp(round(x[r, c] / s[i]) + zp[i], qmin, qmax),
//   i = 0 (tensor), r (row), c (column), r·(cols/group) + c/group (group).
template <class T>
struct QuantizeParams {
  const T* x = nullptr;                       // [rows, cols] row-major, float or bf16_t
  int64_t rows = 0;
  int64_t cols = 0;
  Granularity granularity = Granularity::row;
  int64_t group = 0;                          // Granularity::group only; divides cols
  const float* scale = nullptr;               // device scales, layout as in ref::compute_scales
  const int32_t* zero_point = nullptr;        // null = symmetric
  QRange range = kInt4Sym;                    // inside [-128, 127]
  Rounding rounding = Rounding::nearest;
  PhiloxKey key{};
  int8_t* q = nullptr;                        // [rows, cols] codes
  uint64_t* status = nullptr;                 // optional: NaN/Inf input; a scale that is not
                                              // positive finite = bad_scale i
};
void quantize(const QuantizeParams<float>& p, cudaStream_t stream);
void quantize(const QuantizeParams<bf16_t>& p, cudaStream_t stream);

// s4 row packing (docs/formats.md): row r of q[rows, cols] packs to ceil(cols/2) bytes of
// packed[rows, ceil(cols/2)], element 2i in the low nibble, an odd row's last high nibble 0.
// A code outside [-8, 7] is reported as out_of_range (its flat index) and packed modulo 16.
struct PackS4Params {
  const int8_t* q = nullptr;    // [rows, cols] codes in [-8, 7]
  int64_t rows = 0;
  int64_t cols = 0;
  uint8_t* packed = nullptr;    // [rows, ceil(cols/2)]
  uint64_t* status = nullptr;   // optional
};
void pack_s4_rows(const PackS4Params& p, cudaStream_t stream);

// Inverse with sign extension: q[r, c] from packed[rows, ceil(cols/2)].
struct UnpackS4Params {
  const uint8_t* packed = nullptr;  // [rows, ceil(cols/2)]
  int64_t rows = 0;
  int64_t cols = 0;
  int8_t* q = nullptr;              // [rows, cols]
};
void unpack_s4_rows(const UnpackS4Params& p, cudaStream_t stream);

}  // namespace nibble::cuda
