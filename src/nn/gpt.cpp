// Decoder-only GPT: token + position embeddings, pre-LN causal blocks, final LayerNorm and
// an output head tied to the token embedding (logits = h·W_tokᵀ, fp32 whatever the plan:
// the "head" role applies to the ViT classifier only).
//
// Int4 plans fake-quantize the token-embedding output with one LSQ step (the papers'
// "LSQ for embeddings"), parameter "tok_embed.step_x".
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "nibble/error.h"
#include "nibble/nn.h"
#include "nibble/ops_layers.h"
#include "nn/layers.h"

namespace nibble::nn {
namespace {

// Init streams of the model's own parameters, above any linear layer id.
constexpr uint32_t kStreamTokEmbed = 1u << 20;
constexpr uint32_t kStreamPosEmbed = (1u << 20) + 1;
constexpr float kInitStd = 0.02f;

bool any_block_role_int4(const PrecisionPlan& plan) {
  for (LinearRole r : {LinearRole::qkv, LinearRole::attn_out, LinearRole::mlp_in, LinearRole::mlp_out})
    if (plan[r] == Precision::int4) return true;
  return false;
}

class Gpt final : public Model {
 public:
  Gpt(const GptConfig& cfg, const PrecisionPlan& plan, uint64_t seed)
      : cfg_(cfg),
        plan_(plan),
        seed_(seed),
        tok_("tok_embed", cfg.vocab, cfg.d_model, true, kInitStd, seed, kStreamTokEmbed),
        pos_("pos_embed", cfg.context, cfg.d_model, false, kInitStd, seed, kStreamPosEmbed),
        ln_f_("ln_f", cfg.d_model) {
    // GPT-2: residual projections scaled by 1/sqrt(2·n_layers) (two per block).
    const float residual_std = kInitStd / std::sqrt(2.0f * static_cast<float>(cfg.n_layers));
    for (int64_t i = 0; i < cfg.n_layers; ++i) {
      blocks_.push_back(std::make_unique<Block>("blocks." + std::to_string(i), cfg.d_model, cfg.n_heads,
                                                cfg.d_ff, true, plan, static_cast<uint32_t>(4 * i), seed,
                                                kInitStd, residual_std));
    }
    if (any_block_role_int4(plan)) {
      // Start the step where the cold start would put it for a lookup of the whole table.
      const float s0 = ops::lsq_init_step(tok_.weight.value, plan.quant.int4_range);
      emb_quant_ = std::make_unique<LsqFakeQuant>("tok_embed", plan.quant.int4_range,
                                                  plan.quant.lsq_cold_start_steps, s0);
    }
  }

  std::string kind() const override { return "gpt"; }

  std::string config_json() const override {
    nlohmann::ordered_json j;
    j["kind"] = "gpt";
    j["vocab"] = cfg_.vocab;
    j["context"] = cfg_.context;
    j["d_model"] = cfg_.d_model;
    j["n_layers"] = cfg_.n_layers;
    j["n_heads"] = cfg_.n_heads;
    j["d_ff"] = cfg_.d_ff;
    j["embedding_lsq"] = emb_quant_ != nullptr;
    j["plan"] = nlohmann::ordered_json::parse(plan_json(plan_));
    return j.dump();
  }

  std::vector<Param*> parameters() override {
    std::vector<Param*> ps = {&tok_.weight, &pos_.weight};
    if (emb_quant_) ps.push_back(&emb_quant_->step);
    for (auto& b : blocks_)
      for (Param* p : b->parameters()) ps.push_back(p);
    for (Param* p : ln_f_.parameters()) ps.push_back(p);
    return ps;
  }

  StepResult forward_backward(const Batch& batch, const StepContext& ctx) override {
    NB_CHECK(ctx.training, "forward_backward: StepContext::training is false; use evaluate()");
    return run_guarded([&] { return run(batch, ctx, true); }, batch.targets);
  }

  StepResult evaluate(const Batch& batch, const StepContext& ctx) override {
    StepContext c = ctx;
    c.training = false;
    return run_guarded([&] { return run(batch, c, false); }, batch.targets);
  }

  std::map<std::string, std::string> extra_state() const override {
    std::map<std::string, std::string> state;
    for (const auto& b : blocks_)
      for (Linear* l : b->linears()) state.merge(l->extra_state());
    return state;
  }

  void load_extra_state(const std::map<std::string, std::string>& state) override {
    for (auto& b : blocks_)
      for (Linear* l : b->linears()) l->load_extra_state(state);
  }

  std::vector<float> next_token_logits(const std::vector<int32_t>& context) override {
    NB_CHECK(!context.empty(), "next_token_logits: the context is empty; pass at least one token");
    const int64_t len = std::min<int64_t>(static_cast<int64_t>(context.size()), cfg_.context);
    Batch b;
    b.size = 1;
    b.seq = len;
    b.tokens.assign(context.end() - len, context.end());
    // A trained model: past every cold start, no randomness at inference.
    StepContext ctx{seed_, std::numeric_limits<uint32_t>::max(), false};
    Tensor logits = forward(b, ctx, nullptr);
    const float* last = logits.data<float>() + (len - 1) * cfg_.vocab;
    return {last, last + cfg_.vocab};
  }

 private:
  struct Saved {
    Embedding::Saved tok, pos;
    LsqFakeQuant::Saved quant;
    std::vector<Block::Saved> blocks;
    LayerNorm::Saved ln_f;
    Tensor h;  // [N, C] final LayerNorm output
  };

  void check_batch(const Batch& b, bool need_targets) const {
    NB_CHECK(b.size > 0 && b.seq > 0, "GPT batch: size " << b.size << " and seq " << b.seq << " must be positive");
    NB_CHECK(b.seq <= cfg_.context, "GPT batch: sequence length " << b.seq << " exceeds the model's context "
                                                                  << cfg_.context << "; cut the sequences");
    const auto n = static_cast<size_t>(b.size * b.seq);
    NB_CHECK(b.tokens.size() == n, "GPT batch: " << b.tokens.size() << " tokens for [" << b.size << ", "
                                                 << b.seq << "]; pass B·T tokens");
    for (size_t i = 0; i < n; ++i)
      NB_CHECK(b.tokens[i] >= 0 && b.tokens[i] < cfg_.vocab,
               "GPT batch: token " << b.tokens[i] << " at index " << i << " is outside the vocabulary [0, "
                                   << cfg_.vocab << "); the data and the model disagree on the tokenizer");
    if (need_targets)
      NB_CHECK(b.targets.size() == n, "GPT batch: " << b.targets.size() << " targets for [" << b.size << ", "
                                                    << b.seq << "]; pass B·T targets (negative = ignored)");
  }

  // Embeddings, blocks, final LayerNorm and the tied head: logits [B·T, vocab].
  Tensor forward(const Batch& batch, const StepContext& ctx, Saved* saved) {
    check_batch(batch, false);
    const int64_t B = batch.size, T = batch.seq, n = B * T;
    std::vector<int32_t> positions(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) positions[static_cast<size_t>(i)] = static_cast<int32_t>(i % T);
    Tensor x = tok_.forward(tensor_s32(batch.tokens, {n}), saved ? &saved->tok : nullptr);
    if (emb_quant_) x = emb_quant_->forward(x, ctx, saved ? &saved->quant : nullptr);
    const Tensor pos = pos_.forward(tensor_s32(positions, {n}), saved ? &saved->pos : nullptr);
    ops::add(x, pos, x);
    if (saved) saved->blocks.resize(blocks_.size());
    for (size_t i = 0; i < blocks_.size(); ++i)
      x = blocks_[i]->forward(x, B, T, ctx, saved ? &saved->blocks[i] : nullptr);
    Tensor h = ln_f_.forward(x, saved ? &saved->ln_f : nullptr);
    // logits = h·W_tokᵀ
    Tensor logits = tensor_f32({n, cfg_.vocab});
    ops::matmul(h, false, tok_.weight.value, true, logits);
    if (saved) saved->h = h;
    return logits;
  }

  StepResult run(const Batch& batch, const StepContext& ctx, bool backward) {
    check_batch(batch, true);
    const int64_t n = batch.size * batch.seq;
    Saved saved;
    Tensor logits = forward(batch, ctx, backward ? &saved : nullptr);
    const Tensor targets = tensor_s32(batch.targets, {n});
    const ops::CrossEntropyResult ce = ops::cross_entropy_forward(logits, targets);
    StepResult r{ce.mean_loss(), ce.correct, ce.count};
    if (!backward || ce.count == 0) return r;

    // d(mean loss)/dlogits, in place over the logits.
    ops::cross_entropy_backward(logits, targets, 1.0f / static_cast<float>(ce.count), logits);
    // Tied head: dh = dlogits·W_tok;  dW_tok += dlogitsᵀ·h
    Tensor dh = tensor_f32({n, cfg_.d_model});
    ops::matmul(logits, false, tok_.weight.value, false, dh);
    ops::matmul(logits, true, saved.h, false, tok_.weight.grad, 1.0f, 1.0f);
    Tensor dx = ln_f_.backward(dh, saved.ln_f);
    for (size_t i = blocks_.size(); i-- > 0;) dx = blocks_[i]->backward(dx, saved.blocks[i], ctx);
    // x = quant(tok[ids]) + pos[t]: both branches receive dx.
    pos_.backward(dx, saved.pos);
    if (emb_quant_) dx = emb_quant_->backward(dx, saved.quant);
    tok_.backward(dx, saved.tok);
    return r;
  }

  GptConfig cfg_;
  PrecisionPlan plan_;
  uint64_t seed_;
  Embedding tok_, pos_;
  std::unique_ptr<LsqFakeQuant> emb_quant_;
  std::vector<std::unique_ptr<Block>> blocks_;
  LayerNorm ln_f_;
};

}  // namespace

std::unique_ptr<Model> make_gpt(const GptConfig& cfg_in, const PrecisionPlan& plan, uint64_t seed) {
  GptConfig cfg = cfg_in;
  NB_CHECK(cfg.d_ff >= 0, "GPT config: d_ff = " << cfg.d_ff << " must be ≥ 0 (0 means 4·d_model)");
  if (cfg.d_ff == 0) cfg.d_ff = 4 * cfg.d_model;
  NB_CHECK(cfg.vocab > 0 && cfg.vocab <= std::numeric_limits<int32_t>::max(),
           "GPT config: vocab = " << cfg.vocab << " must be positive (the tokenizer's vocabulary size)");
  NB_CHECK(cfg.context > 0, "GPT config: context = " << cfg.context << " must be positive");
  validate_block_sizes(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, plan,
                       {{LinearRole::qkv, cfg.d_model},
                        {LinearRole::attn_out, cfg.d_model},
                        {LinearRole::mlp_in, cfg.d_model},
                        {LinearRole::mlp_out, cfg.d_ff}});
  return std::make_unique<Gpt>(cfg, plan, seed);
}

}  // namespace nibble::nn
