#pragma once
// Quantized linear layers as ops: y = x·wᵀ + b with
//   x [N, D] (N tokens, D = in_features), w [C, D] (C = out_features), b [C], y [N, C].
// Each function validates its arguments once (shapes, dtypes, finiteness, sizes the method
// supports) and runs the backend that holds the data (the CPU reference today). What a
// forward keeps for its backward lives in an opaque LinearSaved owned by that backend:
// integer codes and scales, never a float copy of x.
//
// Float inputs may be f32, f16, bf16 or f64 (converted to f32 on entry); outputs are f32
// views the caller owns. Pass TensorView{} (data null) for "no bias".
#include <cstdint>
#include <memory>

#include "nibble/format.h"
#include "nibble/rng.h"
#include "nibble/tensor.h"

namespace nibble::ops {

// Saved state between a quantized forward and its backward. Move-only; empty until a
// forward with a non-null `saved` fills it. A backward checks that the state came from the
// matching forward.
class LinearSaved {
 public:
  LinearSaved();
  ~LinearSaved();
  LinearSaved(LinearSaved&&) noexcept;
  LinearSaved& operator=(LinearSaved&&) noexcept;

  bool empty() const;
  int64_t rows() const;   // N of the forward (0 when empty)
  int64_t bytes() const;  // bytes held: codes, side channels, scales (0 when empty)
  void clear();

  struct Impl;  // backend state, defined by the ops implementation
  Impl& impl();
  const Impl& impl() const;

 private:
  std::unique_ptr<Impl> impl_;
};

// Gradients of one backward. dx is undefined (numel 0) when it was not asked for.
struct LinearGrads {
  Tensor dx;  // f32 [N, D]
  Tensor dw;  // f32 [C, D]
  Tensor db;  // f32 [C]
  // int4 only: step-size gradients ∂L/∂sx, ∂L/∂sw (LSQ-scaled), split rows kept by each
  // product (of 2N) and the bit-split scale.
  float dsx = 0, dsw = 0;
  int64_t kept_rows_dw = 0, kept_rows_dx = 0;
  float grad_scale = 0;
};

// ---- int4, paper 1: HQ forward, bit split + LSS backward, LSQ step sizes -------------------
struct HqLinearOptions {
  int64_t block = 32;            // Hadamard block: power of two ≤ 1024 dividing D
  QRange range = kInt4Sym;       // code range inside [-8, 7] with qmin < 0 < qmax
  bool bernoulli = false;        // leverage-score Bernoulli sampling (default: keep rows)
  double sample_fraction = 0.5;  // sampling budget, fraction of the 2N split rows, in (0, 1]
};

// y = (sx·sw)·Q((x·H)/sx)·Q((w·H)/sw)ᵀ + b. sx, sw > 0. key = (seed, step, layer): the
// stream of the saved LSQ residual side channel (ref/linear.h). saved may be null.
void hq_linear_forward(const TensorView& x, const TensorView& w, const TensorView& bias,
                       float sx, float sw, const HqLinearOptions& opt, const PhiloxKey& key,
                       const TensorView& y, LinearSaved* saved);
// dy [N, C] -> dx, dw (STE-masked, back through Hᵀ), db, dsx, dsw. opt.block and opt.range
// must be the forward's. key = (seed, step, layer) of this backward.
LinearGrads hq_linear_backward(const TensorView& dy, const LinearSaved& saved,
                               const HqLinearOptions& opt, const PhiloxKey& key);
// The paper's per-layer Hadamard block search on a batch (algorithms.md A.3): the block in
// {1, 2, ..., min(1024, largest power of two dividing D)} minimising ‖X̄−X‖·‖W̄−W‖.
int64_t hq_search_block(const TensorView& x, const TensorView& w, QRange range);
// LSQ initial step of v·H: 2·mean|v·H| / sqrt(qmax) (algorithms.md A.3), v [rows, D].
float lsq_init_scale(const TensorView& v, int64_t block, QRange range);

// ---- int8: per-token / per-channel forward, stochastically rounded INT8 backward --------
// (ref/int8_linear.h has the formulas and the scale choices.)
void int8_linear_forward(const TensorView& x, const TensorView& w, const TensorView& bias,
                         const TensorView& y, LinearSaved* saved);
// key = (seed, step, layer) of the rounding stream. dx only when need_dx.
LinearGrads int8_linear_backward(const TensorView& dy, const LinearSaved& saved,
                                 const PhiloxKey& key, bool need_dx);

// ---- w4a4, paper 2: fake-quantized QAT, straight-through backward ------------------------
struct W4A4LinearOptions {
  bool asymmetric = false;  // per-token activations: asymmetric [0, 15] with zero points
};
void w4a4_linear_forward(const TensorView& x, const TensorView& w, const TensorView& bias,
                         const W4A4LinearOptions& opt, const TensorView& y, LinearSaved* saved);
LinearGrads w4a4_linear_backward(const TensorView& dy, const LinearSaved& saved, bool need_dx);

}  // namespace nibble::ops
