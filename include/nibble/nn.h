#pragma once
// Models for training: the contract between src/nn (layers, GPT, ViT) and src/train
// (optimizer, data, checkpoints, CLI). Backend-neutral: layers call nibble::ops only.
//
// A model owns named fp32 parameters (master weights) with gradient buffers. The trainer
// zeroes the gradients, calls forward_backward on a batch (which accumulates gradients),
// and updates the values with AdamW. LSQ step sizes of quantized layers are parameters too
// (names end in ".step_x" / ".step_w"), so the optimizer and checkpoints treat them alike.
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "nibble/format.h"
#include "nibble/tensor.h"

namespace nibble::nn {

// ---- precision of each linear layer ---------------------------------------------------
enum class Precision : uint8_t {
  fp32,  // plain float matmuls
  int8,  // per-token activations / per-channel weights INT8 forward; INT8 backward with
         // stochastic rounding of the output gradient
  int4,  // paper 1: HQ forward (Hadamard + LSQ INT4), bit-split + LSS backward
  w4a4,  // paper 2: fake-quantized W4A4 QAT (symmetric or asymmetric activations), STE backward
};
const char* precision_name(Precision p);
Precision precision_from_name(const std::string& name);  // throws on unknown names

// Where a linear layer sits; each role can get its own precision.
enum class LinearRole : uint8_t { qkv, attn_out, mlp_in, mlp_out, head, patch };
constexpr int kNumLinearRoles = 6;
const char* role_name(LinearRole r);
LinearRole role_from_name(const std::string& name);

struct QuantOptions {
  int64_t hadamard_block = 0;     // int4: 0 = the paper's per-layer search on the first batch
  bool lss_sampling = false;      // int4: Bernoulli leverage-score sampling (default: keep rows)
  double sample_fraction = 0.5;   // int4 sampling budget: fraction of the 2N split rows
  QRange int4_range = kInt4Sym;   // int4 forward code range
  int64_t lsq_cold_start_steps = 20;  // int4: steps with s = 2·mean|v|/sqrt(qmax) before learning s
  bool w4a4_asymmetric = false;   // w4a4: asymmetric per-token activations
};

struct PrecisionPlan {
  std::array<Precision, kNumLinearRoles> role{};  // all fp32 by default
  QuantOptions quant;
  Precision& operator[](LinearRole r) { return role[static_cast<size_t>(r)]; }
  Precision operator[](LinearRole r) const { return role[static_cast<size_t>(r)]; }
  // Every hidden linear layer at p; the classifier/output head stays fp32 and the patch
  // embedding of a ViT uses p (the papers' defaults: embeddings LSQ-only, classifier full
  // precision).
  static PrecisionPlan uniform(Precision p);
};

// ---- parameters and batches -----------------------------------------------------------
struct Param {
  std::string name;     // unique, stable across runs: "blocks.0.attn.qkv.weight"
  Tensor value;         // f32 master copy
  Tensor grad;          // f32, same shape
  bool weight_decay = true;  // false for biases, LayerNorm, step sizes, embeddings' positions
};

struct Batch {
  int64_t size = 0;              // B
  // GPT: inputs and next-token targets, both [B, T].
  int64_t seq = 0;               // T
  std::vector<int32_t> tokens;   // [B, T]
  std::vector<int32_t> targets;  // [B, T]
  // ViT: images [B, H, W] (one channel, values in [0, 1]) and labels [B].
  int64_t height = 0, width = 0;
  std::vector<float> images;
  std::vector<int32_t> labels;
};

struct StepResult {
  double loss = 0;       // mean over the batch's targets
  int64_t correct = 0;   // classification: correct predictions (GPT: correct next tokens)
  int64_t count = 0;     // number of targets
};

// What makes a step reproducible: stochastic rounding and sampling streams are keyed by
// (seed, step, layer, role).
struct StepContext {
  uint64_t seed = 0;
  uint32_t step = 0;
  bool training = true;
};

class Model {
 public:
  virtual ~Model() = default;
  virtual std::string kind() const = 0;          // "gpt" or "vit"
  virtual std::string config_json() const = 0;   // the full architecture config + plan
  virtual std::vector<Param*> parameters() = 0;   // fixed order
  // Forward and backward on a batch; adds into every Param::grad. Throws nibble::Error on
  // a non-finite loss only if asked by the caller (the trainer checks StepResult.loss).
  virtual StepResult forward_backward(const Batch& batch, const StepContext& ctx) = 0;
  // Forward only (no gradients).
  virtual StepResult evaluate(const Batch& batch, const StepContext& ctx) = 0;
  // State that is not a parameter but must survive a checkpoint (chosen Hadamard blocks,
  // whether LSQ steps were initialised): string key -> string value.
  virtual std::map<std::string, std::string> extra_state() const = 0;
  virtual void load_extra_state(const std::map<std::string, std::string>& state) = 0;
  // GPT only: logits [vocab] of the token after `context` (the last `context_len` tokens
  // are used). Others throw.
  virtual std::vector<float> next_token_logits(const std::vector<int32_t>& context);
};

struct GptConfig {
  int64_t vocab = 65, context = 64, d_model = 128, n_layers = 4, n_heads = 4;
  int64_t d_ff = 0;  // 0 = 4·d_model
};
struct VitConfig {
  int64_t image = 28, patch = 7, classes = 10, d_model = 64, n_layers = 4, n_heads = 4;
  int64_t d_ff = 0;  // 0 = 4·d_model
};

// Validate the config (width divisible by heads, Hadamard block dividing every K, ...) and
// throw nibble::Error before any work if it is impossible.
std::unique_ptr<Model> make_gpt(const GptConfig& cfg, const PrecisionPlan& plan, uint64_t seed);
std::unique_ptr<Model> make_vit(const VitConfig& cfg, const PrecisionPlan& plan, uint64_t seed);

}  // namespace nibble::nn
