// Vision transformer for one-channel images: patch embedding (an nn::Linear with role
// `patch` on flattened p×p patches), a learned class token, learned positions, non-causal
// pre-LN blocks, a final LayerNorm on the class token, and a classifier nn::Linear with
// role `head` (fp32 in the uniform plans).
//
// Token layout per image: position 0 is the class token, positions 1..P the patches in
// row-major grid order.
#include <cmath>
#include <cstring>
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

constexpr uint32_t kStreamClsToken = (1u << 20) + 2;
constexpr uint32_t kStreamPosEmbed = (1u << 20) + 3;
constexpr float kInitStd = 0.02f;

class Vit final : public Model {
 public:
  Vit(const VitConfig& cfg, const PrecisionPlan& plan, uint64_t seed)
      : cfg_(cfg),
        plan_(plan),
        n_patches_((cfg.image / cfg.patch) * (cfg.image / cfg.patch)),
        seq_(n_patches_ + 1),
        patch_("patch_embed", cfg.patch * cfg.patch, cfg.d_model, true, plan[LinearRole::patch], plan.quant,
               static_cast<uint32_t>(4 * cfg.n_layers), seed, kInitStd),
        cls_("cls_token", 1, cfg.d_model, false, kInitStd, seed, kStreamClsToken),
        pos_("pos_embed", seq_, cfg.d_model, false, kInitStd, seed, kStreamPosEmbed),
        ln_f_("ln_f", cfg.d_model),
        head_("head", cfg.d_model, cfg.classes, true, plan[LinearRole::head], plan.quant,
              static_cast<uint32_t>(4 * cfg.n_layers + 1), seed, kInitStd) {
    const float residual_std = kInitStd / std::sqrt(2.0f * static_cast<float>(cfg.n_layers));
    for (int64_t i = 0; i < cfg.n_layers; ++i) {
      blocks_.push_back(std::make_unique<Block>("blocks." + std::to_string(i), cfg.d_model, cfg.n_heads,
                                                cfg.d_ff, false, plan, static_cast<uint32_t>(4 * i), seed,
                                                kInitStd, residual_std));
    }
  }

  std::string kind() const override { return "vit"; }

  std::string config_json() const override {
    nlohmann::ordered_json j;
    j["kind"] = "vit";
    j["image"] = cfg_.image;
    j["patch"] = cfg_.patch;
    j["classes"] = cfg_.classes;
    j["d_model"] = cfg_.d_model;
    j["n_layers"] = cfg_.n_layers;
    j["n_heads"] = cfg_.n_heads;
    j["d_ff"] = cfg_.d_ff;
    j["plan"] = nlohmann::ordered_json::parse(plan_json(plan_));
    return j.dump();
  }

  std::vector<Param*> parameters() override {
    std::vector<Param*> ps = patch_.parameters();
    ps.push_back(&cls_.weight);
    ps.push_back(&pos_.weight);
    for (auto& b : blocks_)
      for (Param* p : b->parameters()) ps.push_back(p);
    for (Param* p : ln_f_.parameters()) ps.push_back(p);
    for (Param* p : head_.parameters()) ps.push_back(p);
    return ps;
  }

  StepResult forward_backward(const Batch& batch, const StepContext& ctx) override {
    NB_CHECK(ctx.training, "forward_backward: StepContext::training is false; use evaluate()");
    return run_guarded([&] { return run(batch, ctx, true); }, batch.labels);
  }

  StepResult evaluate(const Batch& batch, const StepContext& ctx) override {
    StepContext c = ctx;
    c.training = false;
    return run_guarded([&] { return run(batch, c, false); }, batch.labels);
  }

  std::map<std::string, std::string> extra_state() const override {
    std::map<std::string, std::string> state = patch_.extra_state();
    for (const auto& b : blocks_)
      for (Linear* l : b->linears()) state.merge(l->extra_state());
    state.merge(head_.extra_state());
    return state;
  }

  void load_extra_state(const std::map<std::string, std::string>& state) override {
    patch_.load_extra_state(state);
    for (auto& b : blocks_)
      for (Linear* l : b->linears()) l->load_extra_state(state);
    head_.load_extra_state(state);
  }

 private:
  struct Saved {
    Embedding::Saved cls, pos;
    std::vector<Block::Saved> blocks;
    LayerNorm::Saved ln_f;
  };


  void check_batch(const Batch& b) const {
    NB_CHECK(b.size > 0, "ViT batch: size " << b.size << " must be positive");
    NB_CHECK(b.height == cfg_.image && b.width == cfg_.image,
             "ViT batch: images are " << b.height << "x" << b.width << " but the model takes " << cfg_.image << "x"
                                      << cfg_.image << "; resize the data or set image = " << b.height);
    NB_CHECK(static_cast<int64_t>(b.images.size()) == b.size * b.height * b.width,
             "ViT batch: " << b.images.size() << " pixels for " << b.size << " images of " << b.height << "x"
                           << b.width);
    NB_CHECK(static_cast<int64_t>(b.labels.size()) == b.size,
             "ViT batch: " << b.labels.size() << " labels for " << b.size << " images");
    for (size_t i = 0; i < b.labels.size(); ++i)
      NB_CHECK(b.labels[i] < cfg_.classes, "ViT batch: label " << b.labels[i] << " of image " << i
                                                               << " is not below the model's " << cfg_.classes
                                                               << " classes");
  }

  StepResult run(const Batch& batch, const StepContext& ctx, bool backward) {
    check_batch(batch);
    const int64_t B = batch.size, P = n_patches_, T = seq_, C = cfg_.d_model, pp = cfg_.patch * cfg_.patch;
    Saved saved;
    Saved* sv = backward ? &saved : nullptr;

    // Patches -> patch embeddings [B·P, C]
    Tensor images = tensor_f32({B, cfg_.image, cfg_.image});
    std::memcpy(images.data<float>(), batch.images.data(), batch.images.size() * sizeof(float));
    Tensor patches = tensor_f32({B, P, pp});
    ops::patchify(images, cfg_.patch, patches);
    Tensor pe = tensor_f32({B * P, C});
    patch_.forward(patches.data<float>(), B * P, pe.data<float>(), ctx);
    // x[b] = [cls; pe[b]] + pos
    const Tensor cls = cls_.forward(tensor_s32(std::vector<int32_t>(static_cast<size_t>(B), 0), {B}),
                                    sv ? &sv->cls : nullptr);
    Tensor x = tensor_f32({B * T, C});
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(x.data<float>() + b * T * C, cls.data<float>() + b * C, C * sizeof(float));
      std::memcpy(x.data<float>() + (b * T + 1) * C, pe.data<float>() + b * P * C, P * C * sizeof(float));
    }
    std::vector<int32_t> positions(static_cast<size_t>(B * T));
    for (int64_t i = 0; i < B * T; ++i) positions[static_cast<size_t>(i)] = static_cast<int32_t>(i % T);
    ops::add(x, pos_.forward(tensor_s32(positions, {B * T}), sv ? &sv->pos : nullptr), x);

    if (sv) sv->blocks.resize(blocks_.size());
    for (size_t i = 0; i < blocks_.size(); ++i) x = blocks_[i]->forward(x, B, T, ctx, sv ? &sv->blocks[i] : nullptr);

    // Class token -> LayerNorm -> classifier. (LayerNorm is per token, so normalizing only
    // the class tokens equals normalizing all and picking them.)
    Tensor xc = tensor_f32({B, C});
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(xc.data<float>() + b * C, x.data<float>() + b * T * C, C * sizeof(float));
    const Tensor h = ln_f_.forward(xc, sv ? &sv->ln_f : nullptr);
    Tensor logits = tensor_f32({B, cfg_.classes});
    head_.forward(h.data<float>(), B, logits.data<float>(), ctx);
    const Tensor labels = tensor_s32(batch.labels, {B});
    const ops::CrossEntropyResult ce = ops::cross_entropy_forward(logits, labels);
    StepResult r{ce.mean_loss(), ce.correct, ce.count};
    if (!backward || ce.count == 0) return r;

    ops::cross_entropy_backward(logits, labels, 1.0f / static_cast<float>(ce.count), logits);
    Tensor dh = tensor_f32({B, C});
    head_.backward(logits.data<float>(), dh.data<float>(), ctx);
    const Tensor dxc = ln_f_.backward(dh, saved.ln_f);
    Tensor dx = Tensor::zeros({B * T, C}, DType::f32);
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(dx.data<float>() + b * T * C, dxc.data<float>() + b * C, C * sizeof(float));
    for (size_t i = blocks_.size(); i-- > 0;) dx = blocks_[i]->backward(dx, saved.blocks[i], ctx);

    pos_.backward(dx, saved.pos);
    Tensor dcls = tensor_f32({B, C});
    Tensor dpe = tensor_f32({B * P, C});
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(dcls.data<float>() + b * C, dx.data<float>() + b * T * C, C * sizeof(float));
      std::memcpy(dpe.data<float>() + b * P * C, dx.data<float>() + (b * T + 1) * C, P * C * sizeof(float));
    }
    cls_.backward(dcls, saved.cls);
    patch_.backward(dpe.data<float>(), nullptr, ctx);
    return r;
  }

  VitConfig cfg_;
  PrecisionPlan plan_;
  int64_t n_patches_, seq_;
  Linear patch_;
  Embedding cls_, pos_;
  std::vector<std::unique_ptr<Block>> blocks_;
  LayerNorm ln_f_;
  Linear head_;
};

}  // namespace

std::unique_ptr<Model> make_vit(const VitConfig& cfg_in, const PrecisionPlan& plan, uint64_t seed) {
  VitConfig cfg = cfg_in;
  NB_CHECK(cfg.d_ff >= 0, "ViT config: d_ff = " << cfg.d_ff << " must be ≥ 0 (0 means 4·d_model)");
  if (cfg.d_ff == 0) cfg.d_ff = 4 * cfg.d_model;
  NB_CHECK(cfg.image > 0 && cfg.patch > 0, "ViT config: image " << cfg.image << " and patch " << cfg.patch
                                                                 << " must be positive");
  NB_CHECK(cfg.image % cfg.patch == 0, "ViT config: image size " << cfg.image << " is not divisible by the patch size "
                                                                 << cfg.patch << "; choose a patch size that divides it");
  NB_CHECK(cfg.classes >= 2, "ViT config: classes = " << cfg.classes << " must be at least 2");
  validate_block_sizes(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, plan,
                       {{LinearRole::qkv, cfg.d_model},
                        {LinearRole::attn_out, cfg.d_model},
                        {LinearRole::mlp_in, cfg.d_model},
                        {LinearRole::mlp_out, cfg.d_ff},
                        {LinearRole::patch, cfg.patch * cfg.patch},
                        {LinearRole::head, cfg.d_model}});
  return std::make_unique<Vit>(cfg, plan, seed);
}

}  // namespace nibble::nn
