#pragma once
// INT8 linear layer for training, CPU reference: y = x·wᵀ + b with
//   x [N, D] (N tokens, D = in_features), w [C, D] (C = out_features), y [N, C].
//
// Forward: per-token activation codes and per-output-channel weight codes, symmetric
// [-127, 127] with nearest rounding (formats.md), one s8 GEMM and a dequantizing epilogue:
//   x_q = Q(x / sx[n]),  w_q = Q(w / sw[c]),  sx = absmax(row)/127, sw = absmax(row)/127
//   y[n,c] = float(Σ_k x_q[n,k]·w_q[c,k]) · (sx[n]·sw[c]) + b[c]
// The forward keeps x_q, sx, w_q, sw (codes and scales; x itself is not kept).
//
// Backward (straight-through: the gradients of y = x̂·ŵᵀ + b, x̂ = sx·x_q, ŵ = sw·w_q), with
// the output gradient quantized to INT8 by stochastic rounding so that both GEMMs are
// integer GEMMs whose dequantization is an epilogue:
//   dx = dy·ŵ:    K = C. ŵ's per-channel scale sw[c] varies along K, so it cannot be an
//                 epilogue factor; it is folded into the gradient operand before rounding:
//                 A = dy ∘ sw (A[n,c] = dy[n,c]·sw[c]), A_q = SR(A / a[n]) per token
//                 (a[n] = absmax(A row n)/127, along M: an epilogue scale), and
//                 dx[n,k] = float(Σ_c A_q[n,c]·w_q[c,k]) · a[n]
//   dw = dyᵀ·x̂:   K = N. The per-token sx[n] varies along K: folded likewise,
//                 B = (dy ∘ sx)ᵀ [C, N] (B[c,n] = dy[n,c]·sx[n]), B_q = SR(B / b[c]) per
//                 output channel (b[c] = absmax(B row c)/127, along M), and
//                 dw[c,k] = float(Σ_n B_q[c,n]·x_q[n,k]) · b[c]
//   db = Σ_rows dy (fp64 sums)
// SR(v) = clamp(floor(v + u), −127, 127), u = philox_uniform: E[SR(v)] = v, so E[dx] = dy·ŵ
// and E[dw] = dyᵀ·x̂ exactly (up to fp32 rounding). Both scales lie along M, so a per-row
// (not per-tensor) gradient scale costs nothing and keeps rows with small gradients from
// being rounded to zero by one large row. Random streams: role RngRole::rounding of the
// key; A draws index n·C + c, B draws index N·C + c·N + n (disjoint ranges).
#include <cstdint>
#include <vector>

#include "nibble/rng.h"

namespace nibble::ref {

struct Int8LinearSaved {
  int64_t n = 0, d = 0, c = 0;
  std::vector<int8_t> x_q;      // [N, D] per-token codes
  std::vector<float> x_scale;   // [N]
  std::vector<int8_t> w_q;      // [C, D] per-output-channel codes
  std::vector<float> w_scale;   // [C]
  int64_t bytes() const;        // heap bytes held
};

// y [N, C] fp32; bias may be null; saved may be null (inference).
void int8_linear_forward(const float* x, const float* w, const float* bias, int64_t n,
                         int64_t d, int64_t c, float* y, Int8LinearSaved* saved);

// dy [N, C] -> dx [N, D] (may be null: not computed), dw [C, D], db [C] (may be null).
void int8_linear_backward(const float* dy, const Int8LinearSaved& saved, const PhiloxKey& key,
                          float* dx, float* dw, float* db);

// The stochastic rounding above for v[rows, cols] with one scale per row (absmax/127, an
// all-zero row gets 1): codes q and scales. Element i = r·cols + c draws
// philox_uniform(key, index_base + i). Exposed for tests.
void quantize_rows_int8_stochastic(const float* v, int64_t rows, int64_t cols,
                                   const PhiloxKey& key, uint64_t index_base, int8_t* q,
                                   float* scale);

}  // namespace nibble::ref
