#pragma once
// The quantized linear layers of both papers, CPU reference.
//
// Dimension legend (the papers' names mapped once): y = x·wᵀ + b with
//   x [N, D]  N = tokens (batch·seq), D = in_features  (the forward GEMM's K)
//   w [C, D]  C = out_features
//   y [N, C]
// Paper 1 (HQ-MM / LSS-MM, algorithms.md A.4, B.8):
//   forward   x_r = (x·H)/sx, w_r = (w·H)/sw, x_q = Q(x_r), w_q = Q(w_r)
//             y = (sx·sw)·(x_q·w_qᵀ) + b
//   backward  dy -> bit split (s, hi, lo), combined = 14·hi + lo  (one INT8 operand)
//             dw_t = s·sx·(combinedᵀ·x_q)      dx_t = s·sw·(combined·w_q)        (every row kept)
//             or the Bernoulli leverage-score estimator with 1/p reweighting (sampled)
//             dsx, dsw from LSQ (δ terms on x_r, w_r); dw_t, dx_t masked by the STE indicators
//             dx = dx_t·Hᵀ, dw = dw_t·Hᵀ, db = Σ_rows dy
// Paper 2 (W4A4, algorithms.md E.1): per-token activation codes (symmetric or asymmetric
// with integer zero points) and per-output-channel symmetric weight codes; the forward runs
// the integer GEMM with a dequantizing epilogue; the backward is straight-through.
#include <cstdint>
#include <vector>

#include "nibble/format.h"
#include "nibble/rng.h"

namespace nibble::ref {

enum class LssMode : uint8_t {
  keep_nonzero,  // the released code: every split row with a non-zero score, p = 1 (default)
  bernoulli,     // the paper: Bernoulli rows with p ∝ leverage score, Σp = budget, 1/p weights
};

struct HqLinearConfig {
  int64_t block = 32;                // Hadamard block along D; 2^k in [1, 1024] dividing D
  QRange range = kInt4Sym;           // forward code range (the STE mask and LSQ δ use it too)
  LssMode lss = LssMode::keep_nonzero;
  double sample_fraction = 0.5;      // bernoulli: Σp = fraction·(2N) split rows (paper: N of 2N)
};

// What the forward keeps for the backward. Codes are int8 containers of 4-bit values.
struct HqLinearSaved {
  int64_t n = 0, d = 0, c = 0;
  float sx = 1, sw = 1;
  std::vector<int8_t> x_q;  // [N, D] codes of x_r
  std::vector<int8_t> w_q;  // [C, D] codes of w_r
  std::vector<float> x_r;   // [N, D] (x·H)/sx: the STE mask and LSQ δ need the unrounded value
  std::vector<float> w_r;   // [C, D] (w·H)/sw
};

struct HqLinearGrads {
  std::vector<float> dx;  // [N, D]
  std::vector<float> dw;  // [C, D]
  std::vector<float> db;  // [C]
  float dsx = 0, dsw = 0;
  // Diagnostics: split rows (of 2N) that entered each product, and the bit-split scale.
  int64_t kept_rows_dw = 0, kept_rows_dx = 0;
  float grad_scale = 0;
};

// y [N, C] fp32. bias may be null. Scales must be > 0 (use lsq_init_scale on the first batch).
void hq_linear_forward(const float* x, const float* w, const float* bias, int64_t n, int64_t d,
                       int64_t c, float sx, float sw, const HqLinearConfig& cfg, float* y,
                       HqLinearSaved* saved);
// dy [N, C]. key names the random stream of this layer and step: the low-half rounding uses
// role grad_output_rounding, sampling uses sample_dw / sample_dx (roles are set inside).
HqLinearGrads hq_linear_backward(const float* dy, const HqLinearSaved& saved,
                                 const HqLinearConfig& cfg, const PhiloxKey& key);

struct W4A4Config {
  bool asymmetric = false;          // activations: asymmetric per token ([0, 15], zero points)
  QRange act_range = kInt4Sym;      // symmetric activation codes
  QRange weight_range = kInt4Sym;   // symmetric per-output-channel weight codes
};

struct W4A4Saved {
  int64_t n = 0, d = 0, c = 0;
  std::vector<int8_t> x_q;           // [N, D] activation codes
  std::vector<float> x_scale;        // [N]
  std::vector<int32_t> x_zero;       // [N] (asymmetric only)
  std::vector<int8_t> w_q;           // [C, D] weight codes
  std::vector<float> w_scale;        // [C]
};

// Integer inference form: codes, s8 GEMM, and the epilogue
//   y[n,c] = float(acc[n,c] − zx[n]·Σ_k w_q[c,k]) · (sx[n]·sw[c]) + b[c]
// This is also the forward of QAT (the fake-quantized product, computed exactly).
void w4a4_linear_forward(const float* x, const float* w, const float* bias, int64_t n,
                         int64_t d, int64_t c, const W4A4Config& cfg, float* y,
                         W4A4Saved* saved);
// Straight-through backward: dx = dy·ŵ, dw = dyᵀ·x̂, db = Σ_rows dy (x̂, ŵ dequantized
// from the saved codes; fp64 accumulation).
void w4a4_linear_backward(const float* dy, const W4A4Saved& saved, float* dx, float* dw,
                          float* db);

}  // namespace nibble::ref
