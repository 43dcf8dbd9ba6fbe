#pragma once
// AdamW on fp32 master weights (nn::Param::value), global-norm gradient clipping, and the
// learning-rate schedule: linear warm-up, then cosine decay to a floor.
//
// The elementwise update is ops::adamw_update (its formula is in include/nibble/ops_layers.h):
//   g = scale·grad;  m = β1·m + (1-β1)·g;  v = β2·v + (1-β2)·g²
//   w = w - lr·(wd·w + (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + eps))
// with scale = min(1, clip / ‖grad‖) and wd = 0 for parameters without weight decay.
//
// A step whose gradient norm is not finite (a NaN or Inf anywhere in any gradient) is skipped:
// no weight and no moment changes, and the update counter t (bias correction) does not advance.
// The trainer reports it; nothing non-finite is ever written into the weights.
#include <cstdint>
#include <string>
#include <vector>

#include "nibble/nn.h"
#include "nibble/safetensors.h"

namespace nibble::train {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  // decoupled (Loshchilov & Hutter); only where Param::weight_decay
  double grad_clip = 1.0;     // max global L2 norm of the gradients; 0 = no clipping
};
// Throws nibble::Error if an option is out of range (betas in [0, 1), eps > 0, ...).
void validate(const AdamWOptions& opt);

// lr(s) for the 0-based update s:
//   s < warmup:  max_lr · (s + 1) / warmup
//   otherwise:   min_lr + (max_lr - min_lr) · (1 + cos(π · p)) / 2,  p = (s - warmup) / (total - warmup)
// p is clamped to [0, 1], so steps past `total` stay at min_lr.
struct LrSchedule {
  double max_lr = 1e-3;
  double min_lr = 1e-4;
  int64_t warmup = 0;
  int64_t total = 1;
  double at(int64_t step) const;
};
void validate(const LrSchedule& s);

// sqrt(Σ grad²) over every parameter, accumulated in fp64 in a fixed order (the result does
// not depend on the thread count). NaN or Inf if any gradient element is. (ops::global_norm.)
double global_grad_norm(const std::vector<nn::Param*>& params);

struct StepStats {
  double grad_norm = 0;   // before clipping
  double grad_scale = 1;  // the clipping factor applied (1 = not clipped)
  bool skipped = false;   // non-finite gradient: nothing was updated
};

class AdamW {
 public:
  AdamW(std::vector<nn::Param*> params, const AdamWOptions& opt);

  // Clips, then updates every parameter with learning rate lr. Reads Param::grad, leaves it.
  StepStats step(double lr);
  // Sets every gradient to zero.
  void zero_grad();

  const AdamWOptions& options() const { return opt_; }
  const std::vector<nn::Param*>& params() const { return params_; }
  int64_t updates() const { return t_; }  // applied (not skipped) updates so far

  // Moments as named tensors for a checkpoint: "<param>.adam_m" and "<param>.adam_v" (f32,
  // the parameter's shape). The tensors alias the optimizer's state.
  std::vector<NamedTensor> state_tensors() const;
  // Copies the moments back from a checkpoint; throws naming the first missing or misshapen
  // tensor. `updates` restores t.
  void load_state(const SafetensorsFile& file, int64_t updates);

 private:
  std::vector<nn::Param*> params_;
  std::vector<Tensor> m_, v_;
  AdamWOptions opt_;
  int64_t t_ = 0;
};

}  // namespace nibble::train
