// Whole models (src/nn: GPT and ViT) against float64 re-implementations of the same
// architecture, plus the structural promises of nn.h: tied embeddings, stable unique
// names, causal masking, config validation, and that a tiny GPT can overfit.
//
// Gradient method: the model's parameters are read by name into a float64 model written
// here from the spec (tests/common/layers_f64.h pieces); central finite differences of that
// model's loss (h = 1e-5, error ≈ 1e-11) are the reference for the fp32 gradients of
// Model::forward_backward. Tolerances are at kLossTol / kGradTol below.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/layers_f64.h"
#include "common/random.h"
#include "nibble/error.h"
#include "nibble/nn.h"
#include "nibble/ops_layers.h"
#include "nibble/parallel.h"
#include "nibble/rng.h"
#include "nn/layers.h"

using namespace nibble;
using namespace nibble::nn;
using nibble::testing::Vec;

namespace {

// The fp32 forward is ≈ 40 chained ops (2 blocks) with sums of ≤ 64 terms; rounding
// errors of size √K·u ≈ 5e-7 per op accumulate to ≈ 1e-5 relative. Loss: 1e-5 relative.
constexpr double kLossTol = 1e-5;
// Gradients: the backward doubles the chain, ≈ 2e-5 relative by the same estimate; the
// worst error measured on these seeds is 1.3e-6 of the tensor's gradient scale (printed by
// the test). 1e-4 of the scale is above both, while a missing or wrong term moves a
// gradient by O(1) of its scale.
constexpr double kGradTol = 1e-4;

using ParamMap = std::map<std::string, Vec>;

ParamMap snapshot(Model& m) {
  ParamMap p;
  for (Param* q : m.parameters()) {
    const float* v = q->value.data<float>();
    p[q->name] = Vec(v, v + q->value.numel());
  }
  return p;
}

const Vec& at(const ParamMap& p, const std::string& name) {
  auto it = p.find(name);
  if (it == p.end()) throw std::runtime_error("no parameter named " + name);
  return it->second;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Random values far from the N(0, 0.02) init, so every path carries a visible gradient:
// LayerNorm gains 1 + N(0, 0.2²), biases N(0, 0.1²), everything else N(0, 0.3²).
void randomize(Model& m, uint64_t seed) {
  uint32_t stream = 0;
  for (Param* p : m.parameters()) {
    const PhiloxKey key{seed, 0, stream++, RngRole::data};
    const bool ln = p->name.find("ln") != std::string::npos;
    float* v = p->value.data<float>();
    for (int64_t i = 0; i < p->value.numel(); ++i) {
      const float z = philox_normal(key, static_cast<uint64_t>(i));
      if (ln && ends_with(p->name, ".weight")) v[i] = 1.0f + 0.2f * z;
      else if (ends_with(p->name, ".bias")) v[i] = 0.1f * z;
      else v[i] = 0.3f * z;
    }
  }
}

void zero_grads(Model& m) {
  for (Param* p : m.parameters()) std::fill_n(p->grad.data<float>(), p->grad.numel(), 0.0f);
}

// ---- float64 models ---------------------------------------------------------------------

using namespace nibble::testing;

// One pre-LN block on x [B·T, C], in place.
void block_f64(Vec& x, const ParamMap& P, const std::string& pre, int64_t B, int64_t T, int64_t C, int64_t H,
               int64_t F, bool causal) {
  const int64_t N = B * T;
  const Vec h = layernorm_f64(x, at(P, pre + "ln1.weight"), at(P, pre + "ln1.bias"), N, C);
  const Vec qkv = linear_f64(h, at(P, pre + "attn.qkv.weight"), at(P, pre + "attn.qkv.bias"), N, C, 3 * C);
  const Vec a = attention_f64(qkv, B, T, C, H, causal);
  const Vec o = linear_f64(a, at(P, pre + "attn.out.weight"), at(P, pre + "attn.out.bias"), N, C, C);
  for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
  const Vec h2 = layernorm_f64(x, at(P, pre + "ln2.weight"), at(P, pre + "ln2.bias"), N, C);
  const Vec u = gelu_f64(linear_f64(h2, at(P, pre + "mlp.in.weight"), at(P, pre + "mlp.in.bias"), N, C, F));
  const Vec m = linear_f64(u, at(P, pre + "mlp.out.weight"), at(P, pre + "mlp.out.bias"), N, F, C);
  for (size_t i = 0; i < x.size(); ++i) x[i] += m[i];
}

double gpt_loss_f64(const ParamMap& P, const GptConfig& c, const Batch& b) {
  const int64_t B = b.size, T = b.seq, C = c.d_model, N = B * T, F = c.d_ff ? c.d_ff : 4 * C;
  const Vec& tok = at(P, "tok_embed.weight");
  const Vec& pos = at(P, "pos_embed.weight");
  Vec x(static_cast<size_t>(N * C));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t d = 0; d < C; ++d) x[i * C + d] = tok[b.tokens[i] * C + d] + pos[(i % T) * C + d];
  for (int64_t l = 0; l < c.n_layers; ++l)
    block_f64(x, P, "blocks." + std::to_string(l) + ".", B, T, C, c.n_heads, F, true);
  const Vec h = layernorm_f64(x, at(P, "ln_f.weight"), at(P, "ln_f.bias"), N, C);
  const Vec logits = linear_f64(h, tok, {}, N, C, c.vocab);  // tied head
  return cross_entropy_f64(logits, b.targets, N, c.vocab);
}

double vit_loss_f64(const ParamMap& P, const VitConfig& c, const Batch& b) {
  const int64_t B = b.size, p = c.patch, G = c.image / p, Pn = G * G, T = Pn + 1, C = c.d_model;
  const int64_t F = c.d_ff ? c.d_ff : 4 * C;
  Vec patches(static_cast<size_t>(B * Pn * p * p));
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t gi = 0; gi < G; ++gi)
      for (int64_t gj = 0; gj < G; ++gj)
        for (int64_t r = 0; r < p; ++r)
          for (int64_t q = 0; q < p; ++q)
            patches[((bb * Pn + gi * G + gj) * p + r) * p + q] =
                b.images[(bb * c.image + gi * p + r) * c.image + gj * p + q];
  const Vec pe = linear_f64(patches, at(P, "patch_embed.weight"), at(P, "patch_embed.bias"), B * Pn, p * p, C);
  const Vec& cls = at(P, "cls_token.weight");
  const Vec& pos = at(P, "pos_embed.weight");
  Vec x(static_cast<size_t>(B * T * C));
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < C; ++d)
        x[(bb * T + t) * C + d] = (t == 0 ? cls[d] : pe[(bb * Pn + t - 1) * C + d]) + pos[t * C + d];
  for (int64_t l = 0; l < c.n_layers; ++l)
    block_f64(x, P, "blocks." + std::to_string(l) + ".", B, T, C, c.n_heads, F, false);
  Vec xc(static_cast<size_t>(B * C));
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t d = 0; d < C; ++d) xc[bb * C + d] = x[bb * T * C + d];
  const Vec h = layernorm_f64(xc, at(P, "ln_f.weight"), at(P, "ln_f.bias"), B, C);
  const Vec logits = linear_f64(h, at(P, "head.weight"), at(P, "head.bias"), B, C, c.classes);
  return cross_entropy_f64(logits, b.labels, B, c.classes);
}

// ---- tiny problems ----------------------------------------------------------------------

GptConfig tiny_gpt() {
  GptConfig c;
  c.vocab = 11;
  c.context = 8;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.d_ff = 24;
  return c;
}

Batch gpt_batch(const GptConfig& c, int64_t B, int64_t T, uint64_t seed) {
  Batch b;
  b.size = B;
  b.seq = T;
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t i = 0; i < B * T; ++i) {
    b.tokens.push_back(static_cast<int32_t>(philox_u32(key, static_cast<uint64_t>(2 * i)) % c.vocab));
    b.targets.push_back(static_cast<int32_t>(philox_u32(key, static_cast<uint64_t>(2 * i + 1)) % c.vocab));
  }
  return b;
}

VitConfig tiny_vit() {
  VitConfig c;
  c.image = 8;
  c.patch = 4;
  c.classes = 3;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.d_ff = 24;
  return c;
}

Batch vit_batch(const VitConfig& c, int64_t B, uint64_t seed) {
  Batch b;
  b.size = B;
  b.height = b.width = c.image;
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t i = 0; i < B * c.image * c.image; ++i) b.images.push_back(philox_uniform(key, static_cast<uint64_t>(i)));
  for (int64_t i = 0; i < B; ++i)
    b.labels.push_back(static_cast<int32_t>(philox_u32(key, static_cast<uint64_t>(1000000 + i)) % c.classes));
  return b;
}

// Checks every parameter tensor at a few Philox-chosen elements, plus one random direction
// over all parameters at once.
void check_model_gradients(Model& model, const Batch& batch, const std::function<double(const ParamMap&)>& loss64,
                           uint64_t seed) {
  randomize(model, seed);
  zero_grads(model);
  const StepResult r = model.forward_backward(batch, StepContext{seed, 0, true});
  ParamMap P = snapshot(model);
  const double l64 = loss64(P);
  EXPECT_NEAR(r.loss, l64, kLossTol * std::fabs(l64)) << "loss";

  const PhiloxKey pick{seed, 1, 0, RngRole::data};
  double worst = 0;
  std::string worst_name;
  double dir_analytic = 0;
  std::map<std::string, Vec> direction;
  uint64_t tensor_index = 0;
  for (Param* p : model.parameters()) {
    ++tensor_index;
    const float* g = p->grad.data<float>();
    const int64_t n = p->grad.numel();
    double scale = 0;
    for (int64_t i = 0; i < n; ++i) scale = std::max(scale, std::fabs(static_cast<double>(g[i])));
    ASSERT_GT(scale, 0.0) << p->name << " received no gradient";
    Vec& base = P[p->name];
    for (int k = 0; k < 4; ++k) {
      const auto i = static_cast<size_t>(philox_u32(pick, tensor_index * 16 + static_cast<uint64_t>(k)) % n);
      const double x0 = base[i];
      constexpr double h = 1e-5;
      base[i] = x0 + h;
      const double up = loss64(P);
      base[i] = x0 - h;
      const double down = loss64(P);
      base[i] = x0;
      const double fd = (up - down) / (2 * h);
      const double err = std::fabs(g[i] - fd) / scale;
      if (err > worst) worst = err, worst_name = p->name + "[" + std::to_string(i) + "]";
      EXPECT_LE(err, kGradTol) << p->name << "[" << i << "]: fp32 " << g[i] << ", float64 FD " << fd
                               << " (tensor gradient scale " << scale << ")";
    }
    Vec u(static_cast<size_t>(n));
    const PhiloxKey dkey{seed, 2, static_cast<uint32_t>(direction.size()), RngRole::data};
    for (int64_t i = 0; i < n; ++i) {
      u[i] = philox_normal(dkey, static_cast<uint64_t>(i));
      dir_analytic += u[i] * g[i];
    }
    direction[p->name] = u;
  }
  // Directional derivative along u over all parameters at once.
  auto shifted = [&](double t) {
    ParamMap Q = P;
    for (auto& [name, v] : Q)
      for (size_t i = 0; i < v.size(); ++i) v[i] += t * direction[name][i];
    return loss64(Q);
  };
  constexpr double h = 1e-6;
  const double dir_fd = (shifted(h) - shifted(-h)) / (2 * h);
  EXPECT_NEAR(dir_analytic, dir_fd, kGradTol * std::fabs(dir_fd)) << "directional derivative";
  std::printf("  worst per-element gradient error %.2e of the tensor scale (%s)\n", worst, worst_name.c_str());
}

// ---- gradient checks --------------------------------------------------------------------

TEST(Models, GptGradientsMatchFloat64) {
  const GptConfig c = tiny_gpt();
  auto model = make_gpt(c, PrecisionPlan::uniform(Precision::fp32), 7);
  Batch b = gpt_batch(c, 2, 7, 3);  // T = 7 < context 8: positions beyond T unused
  b.targets[4] = -1;                // an ignored target
  check_model_gradients(*model, b, [&](const ParamMap& P) { return gpt_loss_f64(P, c, b); }, 101);
}

TEST(Models, VitGradientsMatchFloat64) {
  const VitConfig c = tiny_vit();
  auto model = make_vit(c, PrecisionPlan::uniform(Precision::fp32), 9);
  const Batch b = vit_batch(c, 3, 5);
  check_model_gradients(*model, b, [&](const ParamMap& P) { return vit_loss_f64(P, c, b); }, 202);
}

// ---- structure --------------------------------------------------------------------------

TEST(Models, GptTiedEmbeddingIsOneParam) {
  const GptConfig c = tiny_gpt();
  auto model = make_gpt(c, PrecisionPlan::uniform(Precision::fp32), 1);
  int vocab_sized = 0;
  Param* tok = nullptr;
  for (Param* p : model->parameters()) {
    if (p->value.shape() == Shape{c.vocab, c.d_model}) ++vocab_sized, tok = p;
    EXPECT_EQ(p->name.find("head"), std::string::npos) << p->name;
  }
  ASSERT_EQ(vocab_sized, 1);
  EXPECT_EQ(tok->name, "tok_embed.weight");
  // A token that never appears in the input still gets a gradient row: from the output head.
  Batch b = gpt_batch(c, 2, 6, 4);
  for (int32_t& t : b.tokens) t = t == 10 ? 9 : t;
  zero_grads(*model);
  model->forward_backward(b, StepContext{1, 0, true});
  double row10 = 0;
  for (int64_t d = 0; d < c.d_model; ++d) row10 += std::fabs(tok->grad.data<float>()[10 * c.d_model + d]);
  EXPECT_GT(row10, 0.0);
}

TEST(Models, ParameterNamesUniqueAndStable) {
  const GptConfig c = tiny_gpt();
  auto a = make_gpt(c, PrecisionPlan::uniform(Precision::fp32), 5);
  auto b = make_gpt(c, PrecisionPlan::uniform(Precision::fp32), 5);
  auto other_seed = make_gpt(c, PrecisionPlan::uniform(Precision::fp32), 6);
  const auto pa = a->parameters(), pb = b->parameters(), po = other_seed->parameters();
  ASSERT_EQ(pa.size(), pb.size());
  std::set<std::string> names;
  bool any_differs = false;
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(names.insert(pa[i]->name).second) << "duplicate " << pa[i]->name;
    EXPECT_EQ(pa[i]->name, pb[i]->name);
    EXPECT_EQ(pa[i]->value.shape(), pa[i]->grad.shape()) << pa[i]->name;
    const int64_t n = pa[i]->value.numel();
    EXPECT_TRUE(std::equal(pa[i]->value.data<float>(), pa[i]->value.data<float>() + n, pb[i]->value.data<float>()))
        << pa[i]->name << ": the same seed must give the same initial values";
    any_differs |= !std::equal(pa[i]->value.data<float>(), pa[i]->value.data<float>() + n, po[i]->value.data<float>());
  }
  EXPECT_TRUE(any_differs) << "a different seed gave the same model";
  for (const char* want : {"tok_embed.weight", "pos_embed.weight", "blocks.0.ln1.weight", "blocks.0.attn.qkv.weight",
                           "blocks.0.attn.out.bias", "blocks.1.ln2.bias", "blocks.1.mlp.in.weight",
                           "blocks.1.mlp.out.weight", "ln_f.weight", "ln_f.bias"})
    EXPECT_EQ(names.count(want), 1u) << want;
  EXPECT_EQ(pa.front()->name, "tok_embed.weight");
  EXPECT_EQ(pa.back()->name, "ln_f.bias");
  // Weight decay only on matrices: not on biases, LayerNorm, positions.
  for (Param* p : pa) {
    const bool expect_decay = p->name == "tok_embed.weight" ||
                              (p->name.find(".attn.") != std::string::npos && ends_with(p->name, ".weight")) ||
                              (p->name.find(".mlp.") != std::string::npos && ends_with(p->name, ".weight"));
    EXPECT_EQ(p->weight_decay, expect_decay) << p->name;
  }
  // The ViT's names.
  auto vit = make_vit(tiny_vit(), PrecisionPlan::uniform(Precision::fp32), 5);
  std::set<std::string> vnames;
  for (Param* p : vit->parameters()) EXPECT_TRUE(vnames.insert(p->name).second) << "duplicate " << p->name;
  for (const char* want : {"patch_embed.weight", "cls_token.weight", "pos_embed.weight", "head.weight", "head.bias"})
    EXPECT_EQ(vnames.count(want), 1u) << want;
}

TEST(Models, GptIsCausal) {
  const GptConfig c = tiny_gpt();
  auto model = make_gpt(c, PrecisionPlan::uniform(Precision::fp32), 8);
  randomize(*model, 8);
  const Batch base = gpt_batch(c, 1, 8, 12);
  for (int64_t t = 0; t < 8; ++t) {
    // Only position t is scored.
    Batch b = base;
    std::fill(b.targets.begin(), b.targets.end(), -1);
    b.targets[t] = base.targets[t];
    const double loss = model->evaluate(b, StepContext{0, 0, false}).loss;
    Batch later = b;
    for (int64_t s = t + 1; s < 8; ++s) later.tokens[s] = (later.tokens[s] + 1 + static_cast<int32_t>(s)) % 11;
    EXPECT_EQ(model->evaluate(later, StepContext{0, 0, false}).loss, loss) << "a later token changed position " << t;
    Batch earlier = b;
    earlier.tokens[t] = (earlier.tokens[t] + 5) % 11;
    EXPECT_NE(model->evaluate(earlier, StepContext{0, 0, false}).loss, loss) << "token " << t << " had no effect";
  }
  // next_token_logits sees the last tokens only, and predicts after the last one.
  std::vector<int32_t> ctx(base.tokens.begin(), base.tokens.begin() + 5);
  const std::vector<float> logits = model->next_token_logits(ctx);
  ASSERT_EQ(static_cast<int64_t>(logits.size()), c.vocab);
  Batch one;
  one.size = 1;
  one.seq = 5;
  one.tokens = ctx;
  one.targets.assign(5, -1);
  one.targets[4] = 3;
  double lse = 0, mx = *std::max_element(logits.begin(), logits.end());
  for (float z : logits) lse += std::exp(double(z) - mx);
  const double loss_from_logits = std::log(lse) + mx - logits[3];
  EXPECT_NEAR(model->evaluate(one, StepContext{0, 0, false}).loss, loss_from_logits, 1e-6 * loss_from_logits);
}

TEST(Models, EvaluateLeavesGradientsAndBackwardAccumulates) {
  const GptConfig c = tiny_gpt();
  auto model = make_gpt(c, PrecisionPlan::uniform(Precision::fp32), 2);
  const Batch b = gpt_batch(c, 2, 8, 13);
  zero_grads(*model);
  const StepResult e = model->evaluate(b, StepContext{0, 0, false});
  for (Param* p : model->parameters())
    for (int64_t i = 0; i < p->grad.numel(); ++i) ASSERT_EQ(p->grad.data<float>()[i], 0.0f) << p->name;
  const StepResult r1 = model->forward_backward(b, StepContext{0, 0, true});
  EXPECT_EQ(r1.loss, e.loss);
  EXPECT_EQ(r1.count, 16);
  std::vector<std::vector<float>> g1;
  for (Param* p : model->parameters()) g1.emplace_back(p->grad.data<float>(), p->grad.data<float>() + p->grad.numel());
  model->forward_backward(b, StepContext{0, 0, true});
  size_t k = 0;
  for (Param* p : model->parameters()) {
    // The second step adds the same contributions again, but a gradient built from several
    // pieces (the tied embedding: head + lookup) adds them in another order: a few fp32
    // roundings of the tensor's largest entries, ≤ 1e-6 of its scale.
    double scale = 0;
    for (float g : g1[k]) scale = std::max(scale, std::fabs(2.0 * g));
    for (int64_t i = 0; i < p->grad.numel(); ++i)
      ASSERT_NEAR(p->grad.data<float>()[i], 2.0f * g1[k][i], 1e-6 * scale) << p->name;
    ++k;
  }
}

TEST(Models, NonFiniteWeightsGiveNanLossNotThrow) {
  // A diverged weight anywhere (a lookup table, a LayerNorm, a linear layer) makes the step
  // report a NaN loss for the trainer to skip, rather than throw.
  const GptConfig c = tiny_gpt();
  const Batch b = gpt_batch(c, 2, 8, 13);
  // (A NaN inside an int4 linear layer's own weight is that layer's to report; the trainer
  // never writes one, so only a corrupt checkpoint could hold it.)
  for (Precision prec : {Precision::fp32, Precision::int4}) {
    for (const char* name : {"tok_embed.weight", "blocks.0.ln2.weight", "blocks.1.attn.qkv.weight", "ln_f.bias"}) {
      if (prec == Precision::int4 && std::string(name).find(".attn.") != std::string::npos) continue;
      auto model = make_gpt(c, PrecisionPlan::uniform(prec), 2);
      for (Param* p : model->parameters())
        if (p->name == name) p->value.data<float>()[3] = std::nanf("");
      StepResult r;
      ASSERT_NO_THROW(r = model->forward_backward(b, StepContext{0, 0, true})) << precision_name(prec) << " " << name;
      EXPECT_TRUE(std::isnan(r.loss)) << precision_name(prec) << " " << name;
      EXPECT_EQ(r.count, 16);
    }
  }
}

// ---- config and batch validation --------------------------------------------------------

void expect_error(const std::function<void()>& f, const std::vector<std::string>& fragments) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning " << fragments.front();
  } catch (const Error& e) {
    for (const std::string& frag : fragments)
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << "message: " << e.what();
  }
}

TEST(Models, ConfigValidation) {
  GptConfig g = tiny_gpt();
  g.d_model = 30;
  g.n_heads = 4;
  expect_error([&] { make_gpt(g, PrecisionPlan::uniform(Precision::fp32), 1); },
               {"d_model = 30 is not divisible by n_heads = 4"});

  PrecisionPlan int4 = PrecisionPlan::uniform(Precision::int4);
  GptConfig w = tiny_gpt();
  w.d_model = 64;
  w.n_heads = 4;
  w.d_ff = 96;
  int4.quant.hadamard_block = 48;
  expect_error([&] { make_gpt(w, int4, 1); }, {"hadamard_block = 48 is not a power of two"});
  int4.quant.hadamard_block = 64;  // divides d_model 64, not d_ff 96
  expect_error([&] { make_gpt(w, int4, 1); }, {"does not divide 96", "'mlp_out'"});
  int4.quant.hadamard_block = 128;
  expect_error([&] { make_gpt(w, int4, 1); }, {"does not divide 64", "'qkv'"});
  // The same block is irrelevant when no layer is int4.
  PrecisionPlan fp32 = PrecisionPlan::uniform(Precision::fp32);
  fp32.quant.hadamard_block = 48;
  EXPECT_NO_THROW(make_gpt(w, fp32, 1));

  VitConfig v = tiny_vit();
  v.image = 28;
  v.patch = 5;
  expect_error([&] { make_vit(v, PrecisionPlan::uniform(Precision::fp32), 1); },
               {"image size 28 is not divisible by the patch size 5"});
  v = tiny_vit();
  v.d_model = 18;
  v.n_heads = 4;
  expect_error([&] { make_vit(v, PrecisionPlan::uniform(Precision::fp32), 1); }, {"not divisible by n_heads"});
}

TEST(Models, NamesOfPrecisionsAndRoles) {
  for (Precision p : {Precision::fp32, Precision::int8, Precision::int4, Precision::w4a4})
    EXPECT_EQ(precision_from_name(precision_name(p)), p);
  for (int r = 0; r < kNumLinearRoles; ++r)
    EXPECT_EQ(role_from_name(role_name(static_cast<LinearRole>(r))), static_cast<LinearRole>(r));
  expect_error([] { precision_from_name("int3"); }, {"unknown precision 'int3'", "fp32, int8, int4 or w4a4"});
  expect_error([] { role_from_name("ffn"); }, {"unknown layer role 'ffn'"});
  const PrecisionPlan plan = PrecisionPlan::uniform(Precision::int4);
  EXPECT_EQ(plan[LinearRole::head], Precision::fp32);
  EXPECT_EQ(plan[LinearRole::patch], Precision::int4);
  EXPECT_EQ(plan[LinearRole::mlp_out], Precision::int4);
}

TEST(Models, BatchValidation) {
  const GptConfig c = tiny_gpt();
  auto model = make_gpt(c, PrecisionPlan::uniform(Precision::fp32), 1);
  Batch b = gpt_batch(c, 2, 8, 1);
  b.tokens[3] = 11;
  expect_error([&] { model->forward_backward(b, StepContext{}); }, {"outside the vocabulary"});
  Batch longer = gpt_batch(c, 1, 9, 1);
  expect_error([&] { model->forward_backward(longer, StepContext{}); }, {"exceeds the model's context 8"});
  auto vit = make_vit(tiny_vit(), PrecisionPlan::uniform(Precision::fp32), 1);
  Batch v = vit_batch(tiny_vit(), 2, 1);
  v.height = v.width = 4;
  expect_error([&] { vit->forward_backward(v, StepContext{}); }, {"images are 4x4"});
  expect_error([&] { make_gpt(c, PrecisionPlan{}, 1)->next_token_logits({}); }, {"context is empty"});
  expect_error([&] { vit->next_token_logits({1}); }, {"only GPT"});
}

// ---- the embedding's LSQ quantizer --------------------------------------------------------

TEST(Models, LsqEmbeddingQuantizerColdStartThenLearned) {
  const int64_t n = 8, dim = 16;
  LsqFakeQuant quant("tok_embed", kInt4Sym, 2, 0.1f);
  EXPECT_EQ(quant.step.name, "tok_embed.step_x");
  EXPECT_FALSE(quant.step.weight_decay);
  Tensor x = Tensor::empty({n, dim}, DType::f32), dy = Tensor::empty({n, dim}, DType::f32);
  const std::vector<float> xv = nibble::testing::randn(n * dim, 31, 0.5f), dyv = nibble::testing::randn(n * dim, 32);
  std::copy(xv.begin(), xv.end(), x.data<float>());
  std::copy(dyv.begin(), dyv.end(), dy.data<float>());

  // Cold start (step 0 < 2): s = 2·mean|x|/sqrt(7) is stored and gets no gradient.
  LsqFakeQuant::Saved saved;
  quant.forward(x, StepContext{0, 0, true}, &saved);
  EXPECT_EQ(quant.step.value.data<float>()[0], ops::lsq_init_step(x, kInt4Sym));
  quant.backward(dy, saved);
  EXPECT_EQ(quant.step.grad.data<float>()[0], 0.0f);

  // Learned (step 2): s = |p|, ∂L/∂p = sign(p)·g·Σ dy·δ(x/s), g = 1/sqrt(7·numel).
  const float p = -0.3f;
  quant.step.value.data<float>()[0] = p;
  const Tensor y = quant.forward(x, StepContext{0, 2, true}, &saved);
  const Tensor dx = quant.backward(dy, saved);
  double ds = 0;
  for (int64_t i = 0; i < n * dim; ++i) {
    const float r = xv[i] / 0.3f;
    const float q = std::clamp(std::nearbyint(r), -7.0f, 7.0f);
    EXPECT_EQ(y.data<float>()[i], 0.3f * q);
    EXPECT_EQ(dx.data<float>()[i], (r >= -7 && r <= 7) ? dyv[i] : 0.0f);
    ds += dyv[i] * (r < -7 ? -7.0 : r > 7 ? 7.0 : std::nearbyint(r) - r);
  }
  ds = -ds / std::sqrt(7.0 * n * dim);
  // n·dim fp32 products summed in fp32 by lsq_backward: ≤ γ_128·Σ|terms| ≪ 1e-4 relative.
  EXPECT_NEAR(quant.step.grad.data<float>()[0], ds, 1e-4 * std::fabs(ds) + 1e-7);
  EXPECT_EQ(quant.step.value.data<float>()[0], p) << "a learned step is not overwritten";
}

TEST(Models, Int4GptHasEmbeddingStepFp32DoesNot) {
  auto has_step = [](Model& m) {
    for (Param* p : m.parameters())
      if (p->name == "tok_embed.step_x") return true;
    return false;
  };
  EXPECT_FALSE(has_step(*make_gpt(tiny_gpt(), PrecisionPlan::uniform(Precision::fp32), 1)));
  EXPECT_TRUE(has_step(*make_gpt(tiny_gpt(), PrecisionPlan::uniform(Precision::int4), 1)));
}

// ---- training -------------------------------------------------------------------------

// 100 AdamW steps on one fixed batch of a repeating sequence; returns {first, last} loss.
std::pair<double, double> overfit(const PrecisionPlan& plan) {
  // One thread: a model this small gains nothing from two, and on a loaded machine every
  // OpenMP fork/join can wait a scheduler slice (measured: 50 ms quiet, 10 s under load 4).
  struct OneThread {
    int before = num_threads();
    OneThread() { set_num_threads(1); }
    ~OneThread() { set_num_threads(before); }
  } one_thread;
  GptConfig c;
  c.vocab = 16;
  c.context = 16;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  auto model = make_gpt(c, plan, 42);
  // A 12-token pattern repeated; row b starts at offset 3b.
  const int32_t pattern[12] = {3, 14, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9};
  Batch b;
  b.size = 4;
  b.seq = 16;
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t t = 0; t < 16; ++t) {
      b.tokens.push_back(pattern[(3 * r + t) % 12]);
      b.targets.push_back(pattern[(3 * r + t + 1) % 12]);
    }
  std::vector<std::pair<Tensor, Tensor>> moments;
  for (Param* p : model->parameters())
    moments.emplace_back(Tensor::zeros(p->value.shape(), DType::f32), Tensor::zeros(p->value.shape(), DType::f32));
  double first = 0, last = 0;
  for (uint32_t step = 0; step < 100; ++step) {
    zero_grads(*model);
    const StepResult r = model->forward_backward(b, StepContext{42, step, true});
    if (step == 0) first = r.loss;
    last = r.loss;
    ops::AdamWConfig cfg;
    cfg.lr = 3e-3f;
    cfg.beta2 = 0.95f;
    cfg.step = step + 1;
    size_t k = 0;
    for (Param* p : model->parameters()) {
      cfg.weight_decay = p->weight_decay ? 0.01f : 0.0f;
      ops::adamw_update(p->value, p->grad, moments[k].first, moments[k].second, cfg);
      ++k;
    }
  }
  std::printf("  loss %.4f -> %.4f after 100 steps\n", first, last);
  return {first, last};
}

TEST(Models, TinyGptOverfitsFp32) {
  const auto [first, last] = overfit(PrecisionPlan::uniform(Precision::fp32));
  EXPECT_NEAR(first, std::log(16.0), 0.1);  // a fresh model is near uniform
  EXPECT_LT(last, 0.5 * first) << "loss " << first << " -> " << last;
}

TEST(Models, TinyGptOverfitsInt4) {
  // INT4 plan: HQ forward and bit-split/LSS backward in every block linear, LSQ on the
  // token embedding. A coarser model, but it must still learn a 12-token pattern.
  const auto [first, last] = overfit(PrecisionPlan::uniform(Precision::int4));
  EXPECT_NEAR(first, std::log(16.0), 0.2);
  EXPECT_LT(last, 0.5 * first) << "loss " << first << " -> " << last;
}

}  // namespace
