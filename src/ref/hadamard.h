#pragma once
// Block-diagonal orthonormal Hadamard transform and the HQ quantizer with LSQ step sizes
// (paper 1, algorithms.md A.2-A.4, B.2).
#include <cstdint>
#include <vector>

#include "nibble/format.h"

namespace nibble::ref {

// In-place x[rows, cols] <- x · BlockDiag(H_k, ..., H_k), block = 2^k in [1, 1024] dividing
// cols. H_k is orthonormal and symmetric (H_k·H_k = I), so the same call is its own inverse.
// Fixed order, which the CUDA twin must follow for bit-identical results:
//   for h = 1, 2, 4, ..., block/2: for each pair (i, i + h) inside a 2h group:
//     (a, b) <- (a + b, a − b)                      (fp32, no fused multiply-add)
//   then every element *= hadamard_norm(block)     (= 2^(−k/2) rounded to fp32)
void hadamard_blocks(float* x, int64_t rows, int64_t cols, int64_t block);
float hadamard_norm(int64_t block);
// The dense orthonormal matrix H_k [block, block] (row-major), for tests.
std::vector<float> hadamard_matrix(int64_t block);

// LSQ (Esser et al.) with the paper's conventions.
//   init: s = 2·mean|v| / sqrt(qmax)                             (algorithms.md A.3)
//   fake quant: v̂ = s·clamp(round(v/s), qmin, qmax)
//   STE mask:   1[qmin ≤ v/s ≤ qmax]
//   δ(r) = qmin if r < qmin; qmax if r > qmax; round(r) − r otherwise
//   ∂L/∂s = g · Σ_ij (∂L/∂v̂)_ij · δ(v_ij / s),   g = 1 / sqrt(qmax · numel)
float lsq_init_scale(const float* v, int64_t n, QRange range);
// In fp32 (docs/formats.md "Rounding"): inv_s = 1/s (one IEEE division per call), then per
// element r = v·inv_s (one multiply, one rounding; relative distance to v/s ≤ 2^-23, and
// equal to it when s is a power of two) and q = clamp(round_half_even(r), qmin, qmax). s must be positive,
// finite and ≥ 2^-128 (so that 1/s is finite).
// codes q (may be null) and the per-element r = v·inv_s (may be null) for the backward.
void lsq_quantize(const float* v, int64_t n, float s, QRange range, int8_t* q, float* r);
// grad_v_in -> grad_v (masked by the STE indicator); returns ∂L/∂s (already scaled by g).
// grad_v may alias grad_v_in.
float lsq_backward(const float* grad_v_in, const float* r, int64_t n, QRange range,
                   float* grad_v);

// HQ quantizer: codes of (x · H)·(1/s) (lsq_quantize on x·H). x[rows, cols] is not modified.
// q[rows, cols] int8 codes; r[rows, cols] (optional) = fl(fl(x·H)·fl(1/s)) in fp32.
void hq_quantize(const float* x, int64_t rows, int64_t cols, int64_t block, float s,
                 QRange range, int8_t* q, float* r);

// The paper's per-layer block-size search (algorithms.md A.3): for each block 2^k dividing
// cols (1..1024), quantize X·H and W·H with their LSQ-init step sizes and score
// ‖X̄ − X‖_F · ‖W̄ − W‖_F, X̄ = s·Q(X·H/s)·Hᵀ. Returns the block with the smallest score
// (the smaller block on a tie). x[n, d], w[c, d].
struct BlockSearchResult {
  int64_t block = 1;
  std::vector<int64_t> candidates;
  std::vector<double> scores;  // one per candidate
};
BlockSearchResult hq_search_block(const float* x, int64_t n, const float* w, int64_t c,
                                  int64_t d, QRange range, int64_t max_block = 1024);

}  // namespace nibble::ref
