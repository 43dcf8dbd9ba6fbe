#pragma once
// Bit splitting of the output gradient and leverage-score sampling (paper 1, LSS-MM,
// algorithms.md B.4-B.8).
#include <cstdint>
#include <vector>

#include "nibble/format.h"
#include "nibble/rng.h"

namespace nibble::ref {

// g[rows, cols] -> hi, lo int8 codes in [-6, 6] with one per-tensor scale s:
//   m      = max(|min(g) − 1e-8|, |max(g) + 1e-8|)  (min clamped ≤ 0, max ≥ 0; fp32)
//   s      = 2m / 196                  (fp32, multiply first: the dequantization scale)
//   scale1 = 196 / (2m)                (fp32 division, once per tensor: the code scale)
//   T      = g · scale1                (fp32)
//   hi     = clamp(round_half_even(T · fl(1/14)), −6, 6)      (kBitSplitInvBase)
//   lo     = clamp(floor(T − 14·hi + u), −6, 6),  u = philox_uniform16(key, element index),
//            the floor of the exact sum (T − 14·hi is exact in fp32)
//   g ≈ s·(14·hi + lo)
// Codes come from scale1, values are dequantized with s; s·scale1 = 1 only up to fp32
// rounding (|s·scale1 − 1| ≤ 2^-23): for an unclipped element E_u[s·(14·hi + lo)] = s·T − b,
// 0 ≤ b < 2^-16·s (the 16-bit grid, Hermite's identity), and s·T = g·(1 + ε), |ε| ≤ 3·2^-24,
// a common factor of the whole tensor.
// rint(T·fl(1/14)) = rint(T/14) for every fp32 |T| ≤ 99 except T = ±91 (a tie: 7 instead of
// 6, and both clamp to 6) and T = ±48.9999962 (0x1.87fffep+5: 4 instead of 3, residual
// ρ = ∓7.0000038 instead of ±6.9999962, both outside lo's range); checked exhaustively.
// combined (optional, may be null) = 14·hi + lo in [−90, 90]: the single INT8 operand.
// Returns s.
float bitsplit(const float* g, int64_t rows, int64_t cols, const PhiloxKey& key, int8_t* hi,
               int8_t* lo, int8_t* combined);

// Row L2 norms of int8 codes (fp64 sum, returned as fp32): norms[r] = sqrt(Σ_c q[r,c]²).
void row_norms_s8(const int8_t* q, int64_t rows, int64_t cols, float* norms);

// Leverage scores of the 2N stacked split rows (algorithms.md B.8 step 2-3):
//   a_i = ‖hi_i‖·14s, e_i = ‖lo_i‖·s
//   for dw:  c = [a ∘ x_norm ; e ∘ x_norm]   (x_norm[i] = ‖x_q row i‖·sx; pass x_norm)
//   for dx:  c = [a ; e]                     (pass x_norm = nullptr)
// scores has 2·rows entries. fp32 order: a_i = float(‖hi_i‖)·(14·s), then a_i·x_norm[i]
// (norms summed in fp64 and rounded once, as row_norms_s8).
void leverage_scores(const int8_t* hi, const int8_t* lo, int64_t rows, int64_t cols, float s,
                     const float* x_norm, float* scores);

// Probabilities p_i ∈ [0, 1] with Σp = budget, ideally p ∝ c (algorithms.md B.5):
//   p ← c·budget/Σc; repeat { clamp to [0,1]; F = {p_i = 1}; rescale the rest so that
//   Σ_{i∉F} p_i = budget − |F| } until max p ≤ 1. fp64 internally.
// If the number of non-zero scores ≤ budget, every non-zero row gets p = 1 (and zero rows 0).
// Scores must be finite and ≥ 0 (throws naming the first bad index); budget finite and ≥ 0.
void fit_probabilities(const float* scores, int64_t n, double budget, float* p);
// The same fit with fp64 output (Σp = budget to fp64 rounding; the fp32 output rounds each p).
void fit_probabilities(const float* scores, int64_t n, double budget, double* p);

// Bernoulli masks: keep[i] = philox_uniform(key, i) < p[i]. Returns the kept count.
int64_t sample_rows(const float* p, int64_t n, const PhiloxKey& key, uint8_t* keep);
// The released code's deterministic variant: keep every row with a non-zero score, p = 1.
int64_t keep_nonzero_rows(const float* scores, int64_t n, float* p, uint8_t* keep);

// The sampled dw's gradient operand (LssMode::bernoulli). dw = Σ_kept (β_i·s/p_i)·G↕_iᵀ·X̂_i
// cannot take 1/p_i as an epilogue scale: it varies along dw's K, the tokens (algorithms.md
// F.6). So the weights are folded into the codes, which are re-quantized to int8 with one
// per-tensor scale t, and dw stays one INT8 GEMM over the kept rows:
//   split row i ∈ [0, 2·rows): hi row i with β_i = 14 (i < rows), lo row i − rows with β_i = 1
//   f_i = float(β_i) / p_i                          (fp32 IEEE division, once per kept row)
//   a_i[col] = f_i · float(code_i[col])             (fp32, one rounding)
//   t = max_{kept i, col} |a_i[col]| / 127          (fp32 division; 1 when that max is 0)
//   q_i[col] = clamp(floor(a_i[col] / t + u), −127, 127)   (fp32 division, then fp32 add)
//   u = philox_uniform(key, i·cols + col)           (role sample_dw_rounding: the index names
//                                                    the split element, not its kept position)
//   q_i = 0 for dropped rows
// Then dw_t = float(Σ_kept q_iᵀ·x_q(i mod rows)) · ((t·s)·sx). Unbiased: E_u[q·t] = a, up to
// the fp32 rounding of a/t + u (≤ 2^-17 of a step for |a/t| ≤ 127) and the clamp, which only
// acts where fp32 rounding put |a/t| a few ulps above 127 (the largest |a| itself).
// keep and p are the dw sampling's (sample_rows, fit_probabilities); a kept row has p > 0.
// q is [2·rows, cols]. Returns t; throws if it is not finite (β/p overflowed fp32).
float requantize_sampled_rows(const int8_t* hi, const int8_t* lo, int64_t rows, int64_t cols,
                              const float* p, const uint8_t* keep, const PhiloxKey& key,
                              int8_t* q);

}  // namespace nibble::ref
