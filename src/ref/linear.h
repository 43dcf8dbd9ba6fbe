#pragma once
// The quantized linear layers of both papers, CPU reference.
//
// Dimension legend (the papers' names mapped once): y = x·wᵀ + b with
//   x [N, D]  N = tokens (batch·seq), D = in_features  (the forward GEMM's K)
//   w [C, D]  C = out_features
//   y [N, C]
// Paper 1 (HQ-MM / LSS-MM, algorithms.md A.4, B.8):
//   forward   x_r = (x·H)/sx, w_r = (w·H)/sw (computed as (x·H)·fl(1/sx), formats.md),
//             x_q = Q(x_r), w_q = Q(w_r)
//             y = (sx·sw)·(x_q·w_qᵀ) + b
//   backward  dy -> bit split (s, hi, lo), combined = 14·hi + lo  (one INT8 operand)
//             dw_t = s·sx·(combinedᵀ·x_q)      dx_t = s·sw·(combined·w_q)        (every row kept)
//             or the Bernoulli leverage-score estimator with 1/p reweighting (sampled):
//               dx_t = sw·Σ_{kept i} (β_i·s/p_i)·(G↕_i·w_q) into row i mod N   (fp64 weights)
//               dw_t = float(Σ_{kept i} q_iᵀ·x_q(i mod N))·((t·s)·sx), q = the kept rows'
//                      β/p-weighted codes re-quantized to int8 with one scale t
//                      (requantize_sampled_rows, ref/bitsplit.h: unbiased, one INT8 GEMM)
//             dsx, dsw from LSQ (δ terms on x_r, w_r); dw_t, dx_t masked by the STE indicators
//             dx = dx_t·Hᵀ, dw = dw_t·Hᵀ, db = Σ_rows dy
// Paper 2 (W4A4, algorithms.md E.1): per-token activation codes (symmetric or asymmetric
// with integer zero points) and per-output-channel symmetric weight codes; the forward runs
// the integer GEMM with a dequantizing epilogue; the backward is straight-through.
//
// Saved state of both layers is 4-bit: packed s4 codes (formats.md), never a float copy.
#include <cstdint>
#include <vector>

#include "nibble/format.h"
#include "nibble/rng.h"

namespace nibble::ref {

enum class LssMode : uint8_t {
  keep_nonzero,  // the released code: every split row with a non-zero score, p = 1 (default)
  bernoulli,     // the paper: Bernoulli rows with p ∝ leverage score, Σp = budget, 1/p weights
                 // (dx: per-row scales; dw: folded into int8 codes, requantize_sampled_rows)
};

struct HqLinearConfig {
  int64_t block = 32;                // Hadamard block along D; 2^k in [1, 1024] dividing D
  QRange range = kInt4Sym;           // forward code range inside [-8, 7], qmin < 0 < qmax
                                     // (the STE mask and LSQ δ use it too)
  LssMode lss = LssMode::keep_nonzero;
  double sample_fraction = 0.5;      // bernoulli: Σp = fraction·(2N) split rows (paper: N of 2N)
};

// ---- the LSQ residual side channel ------------------------------------------------------
// The backward needs, per element of x_r = (x·H)/sx (and of w_r), the STE indicator
// 1[qmin ≤ r ≤ qmax] and LSQ's δ(r) = qmin | qmax (clipped below | above) or round(r) − r.
// Instead of the fp32 r, the forward keeps one signed nibble e per element:
//   e = −8 (kLsqClipped)  r was clipped: mask 0, and δ = q exactly, because a clipped code
//                         is qmin (< 0, r < qmin) or qmax (> 0, r > qmax)
//   e ∈ [−7, 7]           r in range: mask 1, δ̃ = e / 14 (fp32 division), where
//                         e = floor(14·δ + u), the floor of the EXACT sum (no fp32 rounding
//                         of 14·δ nor of the sum), u = philox_uniform16(key, index) on the
//                         2^-16 grid; |δ| ≤ 1/2 and u < 1 put e in [−7, 7] without a clamp
// So the mask is exact, and E_u[e] = floor(2^16·14·δ)·2^-16 (Hermite's identity), i.e.
// 14·δ − 2^-16 < E_u[e] ≤ 14·δ: E_u[δ̃] = δ − b with 0 ≤ b < 2^-16/14 (< 2^-19) of a step,
// up to the fp32 rounding of e / 14.
// Consequences: dx, dw (masked) are exact functions of the codes; the step-size gradients
// g·Σ grad·δ̃ are unbiased estimates of g·Σ grad·δ given grad, with variance at most
// g²·Σ grad²/(4·14²) (the variance of a stochastic rounding is ≤ 1/4 of a step²).
// Random stream (philox_uniform16): role RngRole::rounding of the forward's key; element i of
// x_r draws index i, element i of w_r draws index N·D + i (disjoint, so the two tensors are
// independent).
constexpr int32_t kLsqResidualSteps = 14;  // δ̃ = e / 14
constexpr int32_t kLsqClipped = -8;

// The nibble e of one element r = v·fl(1/s) whose code is q (q = clamp(round(r), qmin, qmax)).
// r may be ±Inf (clipped); NaN is rejected by the callers before.
int8_t lsq_residual_encode(float r, QRange range, const PhiloxKey& key, uint64_t index);
// δ̃ for the nibble e and the code q: q when e = kLsqClipped, else float(e) / 14.
float lsq_residual_decode(int32_t e, int32_t q);
// lsq_backward on the side channel: grad_v[i] = grad_v_in[i]·1[e_i ≠ −8] (may alias) and
// returns g·Σ_i grad_v_in[i]·δ̃_i, g = 1/sqrt(qmax·n), fp64 sum in index order.
float lsq_backward_coded(const float* grad_v_in, const int8_t* q, const int8_t* e, int64_t n,
                         QRange range, float* grad_v);
// The same where grad_v_in[i] = float(acc[i])·scale is a dequantized integer product with one
// per-tensor scale (the keep-all dx and dw, the sampled dw): the step sum is taken on the
// integers, exactly, so every order and every device gives the same bits:
//   T = Σ_i acc_i·w_i (int64, exact),  w_i = 14·δ̃_i = e_i, or 14·q_i where e_i = −8,
//   returns float(g · ((double(scale) · double(T)) / 14)),  g = 1/sqrt(qmax·n) (fp64).
// It equals g·Σ_i (acc_i·scale)·δ̃_i up to one fp64 rounding; lsq_backward_coded's sum of the
// fp32-rounded grad_v_in differs from it by at most g·Σ_i |grad_v_in[i]·δ̃_i|·2^-24 or so.
// grad_v[i] = grad_v_in[i]·1[e_i ≠ −8] (may alias grad_v_in). |T| must stay below 2^63:
// lsq_exact_sum_fits says when it does for a GEMM's K.
float lsq_backward_exact(const int32_t* acc, float scale, const float* grad_v_in, const int8_t* q,
                         const int8_t* e, int64_t n, QRange range, float* grad_v);
// True when n elements of |acc| ≤ acc_bound (e.g. 90·8·K for the keep-all products) times
// |w| ≤ 14·8 cannot overflow T's int64.
bool lsq_exact_sum_fits(int64_t n, double acc_bound);

// ---- HQ-MM / LSS-MM ----------------------------------------------------------------------
// What the forward keeps for the backward: 1 byte per element of x and of w (two packed
// nibbles), plus two step sizes. Rows are packed on their own (ceil(D/2) bytes each).
struct HqLinearSaved {
  int64_t n = 0, d = 0, c = 0;
  float sx = 1, sw = 1;
  int64_t block = 0;                  // the forward's Hadamard block (checked by the backward)
  QRange range = kInt4Sym;            // the forward's code range (checked by the backward)
  std::vector<uint8_t> x_q_packed;    // [N, ceil(D/2)] s4 codes of x_r
  std::vector<uint8_t> x_e_packed;    // [N, ceil(D/2)] s4 side channel of x_r
  std::vector<uint8_t> w_q_packed;    // [C, ceil(D/2)] s4 codes of w_r
  std::vector<uint8_t> w_e_packed;    // [C, ceil(D/2)] s4 side channel of w_r

  int64_t bytes() const;              // heap bytes held (the four packed tensors + scalars)
  // Unpacked int8 copies [N, D] / [C, D], for the backward and for tests.
  std::vector<int8_t> x_q() const;
  std::vector<int8_t> x_e() const;
  std::vector<int8_t> w_q() const;
  std::vector<int8_t> w_e() const;
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
// key (any role; set to rounding inside) names the side channel's stream: pass the layer's
// (seed, step, layer). saved may be null (inference: nothing is encoded).
void hq_linear_forward(const float* x, const float* w, const float* bias, int64_t n, int64_t d,
                       int64_t c, float sx, float sw, const HqLinearConfig& cfg,
                       const PhiloxKey& key, float* y, HqLinearSaved* saved);
// dy [N, C]. key names the random stream of this layer and step: the low-half rounding uses
// role grad_output_rounding, sampling uses sample_dw / sample_dx and the sampled dw's
// re-quantization sample_dw_rounding (roles are set inside).
// cfg.block and cfg.range must be the forward's.
HqLinearGrads hq_linear_backward(const float* dy, const HqLinearSaved& saved,
                                 const HqLinearConfig& cfg, const PhiloxKey& key);

// ---- W4A4 --------------------------------------------------------------------------------
struct W4A4Config {
  bool asymmetric = false;          // activations: asymmetric per token ([0, 15], zero points)
  QRange act_range = kInt4Sym;      // symmetric activation codes (inside [-8, 7])
  QRange weight_range = kInt4Sym;   // symmetric per-output-channel weight codes (inside [-8, 7])
};

struct W4A4Saved {
  int64_t n = 0, d = 0, c = 0;
  // Activation codes are stored as q − x_code_offset so that both ranges pack as s4:
  // 0 for symmetric codes, 8 for asymmetric [0, 15] codes.
  int32_t x_code_offset = 0;
  std::vector<uint8_t> x_q_packed;   // [N, ceil(D/2)] s4 activation codes (minus the offset)
  std::vector<float> x_scale;        // [N]
  std::vector<int32_t> x_zero;       // [N] (asymmetric only)
  std::vector<uint8_t> w_q_packed;   // [C, ceil(D/2)] s4 weight codes
  std::vector<float> w_scale;        // [C]

  int64_t bytes() const;             // heap bytes held
  std::vector<int8_t> x_q() const;   // [N, D] activation codes (offset added back)
  std::vector<int8_t> w_q() const;   // [C, D]
};

// Integer inference form: codes, s8 GEMM, and the epilogue
//   y[n,c] = float(acc[n,c] − zx[n]·Σ_k w_q[c,k]) · (sx[n]·sw[c]) + b[c]
// This is also the forward of QAT (the fake-quantized product, computed exactly).
void w4a4_linear_forward(const float* x, const float* w, const float* bias, int64_t n,
                         int64_t d, int64_t c, const W4A4Config& cfg, float* y,
                         W4A4Saved* saved);
// Straight-through backward: dx = dy·ŵ, dw = dyᵀ·x̂, db = Σ_rows dy (x̂, ŵ dequantized
// from the saved codes; fp64 accumulation). dx and db may be null (not computed).
void w4a4_linear_backward(const float* dy, const W4A4Saved& saved, float* dx, float* dw,
                          float* db);

}  // namespace nibble::ref
