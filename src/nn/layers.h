#pragma once
// The float layers the models are built from, each with forward, backward and an explicit
// saved-state struct (what forward keeps for backward). Linear layers are nn::Linear and
// keep their own saved state (integer codes for quantized layers).
//
// Activations are f32 Tensors of shape [N, width] with N = B·T tokens, row-major.
// forward(..., saved): saved == nullptr means inference (nothing is kept; ctx.training
// must then be false). backward returns the input gradient and ADDS into Param::grad.
// Calls nibble::ops only.
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "nibble/nn.h"
#include "nibble/tensor.h"
#include "nibble/ops_layers.h"
#include "nn/linear.h"

namespace nibble::nn {

// A named f32 parameter with a zeroed gradient of the same shape.
Param make_param(std::string name, Shape shape, bool weight_decay);
// value ~ N(0, std²) from the Philox stream {seed, step 0, stream, RngRole::init}.
void init_normal(Param& p, float std, uint64_t seed, uint32_t stream);
void fill(Param& p, float value);

// Token, position or class-token table: out[i] = weight[ids[i]].
class Embedding {
 public:
  struct Saved {
    Tensor ids;  // s32 [N]
  };
  Embedding(std::string name, int64_t rows, int64_t dim, bool weight_decay, float init_std,
            uint64_t seed, uint32_t stream);
  // ids s32 [N] -> [N, dim]
  Tensor forward(const Tensor& ids, Saved* saved) const;
  // weight.grad[ids[i]] += dout[i]
  void backward(const Tensor& dout, const Saved& saved);
  std::vector<Param*> parameters() { return {&weight}; }
  int64_t rows() const { return weight.value.size(0); }
  int64_t dim() const { return weight.value.size(1); }

  Param weight;  // [rows, dim]
};

class LayerNorm {
 public:
  static constexpr float kEps = 1e-5f;
  struct Saved {
    Tensor x;     // [N, dim] the input
    Tensor mean;  // [N]
    Tensor rstd;  // [N]
  };
  LayerNorm(std::string name, int64_t dim);  // weight = 1, bias = 0, no weight decay
  Tensor forward(const Tensor& x, Saved* saved) const;
  Tensor backward(const Tensor& dy, const Saved& saved);
  std::vector<Param*> parameters() { return {&weight, &bias}; }

  Param weight, bias;  // [dim]
};

// LSQ fake quantization of an activation with one learned step size (the papers' "LSQ for
// embeddings"): y = s·clamp(round(x/s), qmin, qmax); STE backward for x, LSQ gradient for s.
// For the first `cold_start_steps` training steps s is set from the batch
// (2·mean|x|/sqrt(qmax)) and not learned (algorithms.md F.10); afterwards the Param is
// learned and used as |s|.
class LsqFakeQuant {
 public:
  struct Saved {
    Tensor r;              // [N, dim] x/s (the STE mask and δ need the unrounded value)
    bool learned = false;  // whether s came from the Param (so it gets a gradient)
    float sign = 1.0f;     // d|p|/dp
  };
  LsqFakeQuant(std::string name, QRange range, int64_t cold_start_steps, float initial_step);
  Tensor forward(const Tensor& x, const StepContext& ctx, Saved* saved);
  Tensor backward(const Tensor& dy, const Saved& saved);
  std::vector<Param*> parameters() { return {&step}; }

  Param step;  // [1], "<name>.step_x", no weight decay
 private:
  QRange range_;
  int64_t cold_start_steps_;
};

// Multi-head self-attention sublayer: qkv = Linear(x); a = attention(qkv); y = Linear(a).
class Attention {
 public:
  struct Saved {
    Tensor qkv;  // [B, T, 3C]
    Tensor att;  // [B, H, T, T] probabilities
  };
  // Linear layer ids: layer_id (qkv) and layer_id + 1 (out). out_std scales the residual
  // projection (GPT-2: 0.02/sqrt(2·n_layers)).
  Attention(const std::string& name, int64_t d_model, int64_t n_heads, bool causal,
            const PrecisionPlan& plan, uint32_t layer_id, uint64_t seed, float init_std,
            float out_std);
  // x [B·T, C] -> [B·T, C]
  Tensor forward(const Tensor& x, int64_t batch, int64_t seq, const StepContext& ctx,
                 Saved* saved);
  Tensor backward(const Tensor& dy, const Saved& saved, const StepContext& ctx);
  std::vector<Param*> parameters();

  Linear qkv, out;
  int64_t d_model, n_heads;
  bool causal;
};

// GELU MLP sublayer: y = Linear_out(gelu(Linear_in(x))).
class Mlp {
 public:
  struct Saved {
    Tensor h;  // [N, d_ff] GELU input
  };
  Mlp(const std::string& name, int64_t d_model, int64_t d_ff, const PrecisionPlan& plan,
      uint32_t layer_id, uint64_t seed, float init_std, float out_std);
  Tensor forward(const Tensor& x, const StepContext& ctx, Saved* saved);
  Tensor backward(const Tensor& dy, const Saved& saved, const StepContext& ctx);
  std::vector<Param*> parameters();

  Linear in, out;
  int64_t d_ff;
};

// Pre-LN transformer block:
//   x1 = x + Attention(LN1(x));  y = x1 + Mlp(LN2(x1))
// Uses linear layer ids layer_id .. layer_id + 3.
class Block {
 public:
  struct Saved {
    LayerNorm::Saved ln1, ln2;
    Attention::Saved attn;
    Mlp::Saved mlp;
  };
  Block(const std::string& name, int64_t d_model, int64_t n_heads, int64_t d_ff, bool causal,
        const PrecisionPlan& plan, uint32_t layer_id, uint64_t seed, float init_std,
        float residual_std);
  Tensor forward(const Tensor& x, int64_t batch, int64_t seq, const StepContext& ctx,
                 Saved* saved);
  Tensor backward(const Tensor& dy, const Saved& saved, const StepContext& ctx);
  std::vector<Param*> parameters();
  std::vector<Linear*> linears() { return {&attn.qkv, &attn.out, &mlp.in, &mlp.out}; }

  LayerNorm ln1;
  Attention attn;
  LayerNorm ln2;
  Mlp mlp;
};

// Helpers shared by the models.
Tensor tensor_f32(Shape shape);        // uninitialised
Tensor tensor_s32(const std::vector<int32_t>& values, Shape shape);
// Validates a config's hidden sizes and plan: width divisible by heads, every int4 layer's
// input width divisible by a fixed Hadamard block. `k_of_role` lists (role, K) pairs.
void validate_block_sizes(int64_t d_model, int64_t n_heads, int64_t d_ff, int64_t n_layers,
                          const PrecisionPlan& plan,
                          const std::vector<std::pair<LinearRole, int64_t>>& k_of_role);
std::string plan_json(const PrecisionPlan& plan);  // {"qkv": "int4", ..., "quant": {...}}

// Runs one forward(+backward) of a model. A diverged step (a NaN or Inf reached an op)
// returns a NaN loss instead of throwing, so the trainer can report it and skip the update
// (nn.h); gradients may then hold partial sums, which the trainer zeroes before the next step.
// count = the targets (>= 0) the step would have scored.
template <class F>
StepResult run_guarded(F&& f, const std::vector<int32_t>& targets) {
  try {
    return f();
  } catch (const ops::NonFiniteError&) {
    StepResult r;
    r.loss = std::numeric_limits<double>::quiet_NaN();
    for (int32_t t : targets) r.count += t >= 0 ? 1 : 0;
    return r;
  }
}

}  // namespace nibble::nn
