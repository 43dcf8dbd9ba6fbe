#pragma once
// Every op's host API. Each function validates its arguments once (shapes, dtypes,
// contiguity, finiteness, supported sizes) and then runs the backend that holds the data:
// the CPU reference today; the CUDA backend joins it in src/cuda with the same names.
//
// Float inputs may be f32, f16 or bf16 (converted to f32 on entry); results are f32
// unless stated. Codes are s8 tensors holding 4-bit (or 8-bit) values; packed s4 tensors
// hold two codes per byte, element 2i in the low nibble (docs/formats.md).
#include <cstdint>

#include "nibble/format.h"
#include "nibble/rng.h"
#include "nibble/tensor.h"

namespace nibble::ops {

// ---- quantizers ------------------------------------------------------------------------
struct QuantSpec {
  Granularity granularity = Granularity::row;
  int64_t group = 0;           // for Granularity::group: elements per group along cols
  QRange range = kInt4Sym;
  bool asymmetric = false;     // zero points (use a range like kUint4)
  Rounding rounding = Rounding::nearest;
};

struct Quantized {
  Tensor codes;       // s8 [rows, cols]
  Tensor scale;       // f32: [1], [rows], [cols] or [rows, cols/group]
  Tensor zero_point;  // s32, same shape as scale; undefined (numel 0) when symmetric
};

// x [rows, cols] -> codes with freshly computed scales. key feeds stochastic rounding.
Quantized quantize(const TensorView& x, const QuantSpec& spec, const PhiloxKey& key = {});
// codes -> x̂ = s·(q − zp), f32 [rows, cols].
Tensor dequantize(const Quantized& q, const QuantSpec& spec);
// s8 codes [rows, cols] in [-8, 7] <-> s4 [rows, cols] (each row ceil(cols/2) bytes).
Tensor pack_s4(const TensorView& codes);
Tensor unpack_s4(const TensorView& packed);
// 10·log10(Σx² / Σ(x − x̂)²) over two tensors of the same shape.
double sqnr_db(const TensorView& x, const TensorView& x_hat);

// ---- Hadamard --------------------------------------------------------------------------
// x [rows, cols] · BlockDiag(H_block), f32 result; block a power of two ≤ 1024 dividing cols.
Tensor hadamard(const TensorView& x, int64_t block);

// ---- integer GEMM ----------------------------------------------------------------------
// C[M, N] (s32) = A[M, K] · B[N, K]ᵀ. A and B are s8 or s4 (packed); shape [M, K], [N, K].
Tensor gemm_tn(const TensorView& a, const TensorView& b);

}  // namespace nibble::ops
