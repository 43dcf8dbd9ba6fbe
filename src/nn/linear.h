#pragma once
// A linear layer y = x·wᵀ + b whose matmuls run at a chosen precision (nn.h Precision).
//   x [N, in] (N = tokens), w [out, in], b [out], y [N, out]
// forward() keeps what backward() needs: fp32 layers keep x; quantized layers keep integer
// codes (INT4 layers keep 4-bit codes plus a 4-bit side channel, never a float copy of x).
// Calls nibble::ops only.
//
// Per precision (src/nn/linear.cpp has the details):
//   int8  backward rounds the output gradient stochastically, stream (seed, step, layer_id)
//   int4  parameters "<name>.step_x", "<name>.step_w" (LSQ steps, weight_decay false; the
//         forward uses |s|, the gradient is sign(s)·∂L/∂|s|). The first training forward
//         fixes the Hadamard block (QuantOptions.hadamard_block, or the paper's search on
//         that batch) and initialises both steps from the batch; while ctx.step <
//         lsq_cold_start_steps, s_x is reset from each batch and gets no gradient.
//         extra_state: "<name>.hadamard_block", "<name>.lsq_initialized".
//   w4a4  deterministic (no random stream)
// Errors: non-finite x or dy throw ops::NonFiniteError (a nibble::Error) naming the layer;
// backward() without a training forward before it throws. ctx.training = false keeps
// nothing (and drops what an earlier training forward kept).
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "nibble/nn.h"

namespace nibble::nn {

class Linear {
 public:
  // layer_id keys this layer's random streams (unique per linear layer in a model).
  // Weights ~ N(0, init_std²), bias zero.
  Linear(std::string name, int64_t in_features, int64_t out_features, bool bias, Precision p,
         const QuantOptions& quant, uint32_t layer_id, uint64_t init_seed, float init_std);
  ~Linear();
  Linear(Linear&&) noexcept;
  Linear& operator=(Linear&&) noexcept;

  // x [n, in] -> y [n, out]. ctx.training = false skips saving state.
  void forward(const float* x, int64_t n, float* y, const StepContext& ctx);
  // dy [n, out] (n from the last training forward) -> dx [n, in] (null: not needed);
  // adds into the weight, bias and step-size gradients.
  void backward(const float* dy, float* dx, const StepContext& ctx);

  std::vector<Param*> parameters();
  std::map<std::string, std::string> extra_state() const;   // keys prefixed by name()
  void load_extra_state(const std::map<std::string, std::string>& state);

  const std::string& name() const;
  int64_t in_features() const;
  int64_t out_features() const;
  Precision precision() const;
  // Bytes held between forward and backward (for the activation-memory report).
  int64_t saved_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nibble::nn
