#include "nn/layers.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <utility>

#include "nibble/error.h"
#include "nibble/ops_layers.h"
#include "nibble/rng.h"

namespace nibble::nn {

// ---- helpers ----------------------------------------------------------------------------

Param make_param(std::string name, Shape shape, bool weight_decay) {
  Param p;
  p.name = std::move(name);
  p.value = Tensor::zeros(shape, DType::f32);
  p.grad = Tensor::zeros(shape, DType::f32);
  p.weight_decay = weight_decay;
  return p;
}

void init_normal(Param& p, float std, uint64_t seed, uint32_t stream) {
  const PhiloxKey key{seed, 0, stream, RngRole::init};
  float* v = p.value.data<float>();
  for (int64_t i = 0; i < p.value.numel(); ++i) v[i] = std * philox_normal(key, static_cast<uint64_t>(i));
}

void fill(Param& p, float value) { std::fill_n(p.value.data<float>(), p.value.numel(), value); }

Tensor tensor_f32(Shape shape) { return Tensor::empty(std::move(shape), DType::f32); }

Tensor tensor_s32(const std::vector<int32_t>& values, Shape shape) {
  Tensor t = Tensor::empty(std::move(shape), DType::s32);
  NB_CHECK(static_cast<int64_t>(values.size()) == t.numel(),
           "tensor_s32: " << values.size() << " values for shape " << shape_str(t.shape()));
  std::copy(values.begin(), values.end(), t.data<int32_t>());
  return t;
}

namespace {
void require_saved(const void* saved, const StepContext& ctx, const char* layer) {
  NB_CHECK(saved != nullptr || !ctx.training,
           layer << ": a training forward needs a Saved struct for the backward; pass one, or "
                 << "set StepContext::training = false for inference");
}
}  // namespace

// ---- Embedding --------------------------------------------------------------------------

Embedding::Embedding(std::string name, int64_t rows, int64_t dim, bool weight_decay,
                     float init_std, uint64_t seed, uint32_t stream)
    : weight(make_param(name + ".weight", {rows, dim}, weight_decay)) {
  init_normal(weight, init_std, seed, stream);
}

Tensor Embedding::forward(const Tensor& ids, Saved* saved) const {
  Tensor out = tensor_f32({ids.numel(), dim()});
  ops::embedding_forward(ids, weight.value, out);
  if (saved != nullptr) saved->ids = ids;
  return out;
}

void Embedding::backward(const Tensor& dout, const Saved& saved) {
  ops::embedding_backward(saved.ids, dout, weight.grad);
}

// ---- LayerNorm --------------------------------------------------------------------------

LayerNorm::LayerNorm(std::string name, int64_t dim)
    : weight(make_param(name + ".weight", {dim}, false)), bias(make_param(name + ".bias", {dim}, false)) {
  fill(weight, 1.0f);
}

Tensor LayerNorm::forward(const Tensor& x, Saved* saved) const {
  const int64_t n = x.size(0), dim = x.size(1);
  Tensor y = tensor_f32({n, dim});
  Tensor mean = tensor_f32({n}), rstd = tensor_f32({n});
  ops::layernorm_forward(x, weight.value, bias.value, kEps, y, mean, rstd);
  if (saved != nullptr) *saved = Saved{x, mean, rstd};
  return y;
}

Tensor LayerNorm::backward(const Tensor& dy, const Saved& saved) {
  Tensor dx = tensor_f32(saved.x.shape());
  ops::layernorm_backward(dy, saved.x, saved.mean, saved.rstd, weight.value, dx, weight.grad, bias.grad);
  return dx;
}

// ---- LSQ fake quantization --------------------------------------------------------------

LsqFakeQuant::LsqFakeQuant(std::string name, QRange range, int64_t cold_start_steps,
                           float initial_step)
    : step(make_param(name + ".step_x", {1}, false)), range_(range), cold_start_steps_(cold_start_steps) {
  NB_CHECK(std::isfinite(initial_step) && initial_step > 0.0f,
           "LsqFakeQuant " << name << ": initial step " << initial_step << " must be positive");
  NB_CHECK(cold_start_steps >= 0, "LsqFakeQuant " << name << ": cold-start steps "
                                                  << cold_start_steps << " must be ≥ 0");
  fill(step, initial_step);
}

Tensor LsqFakeQuant::forward(const Tensor& x, const StepContext& ctx, Saved* saved) {
  require_saved(saved, ctx, "LsqFakeQuant");
  const bool cold = static_cast<int64_t>(ctx.step) < cold_start_steps_;
  float& p = step.value.data<float>()[0];
  float s;
  if (cold) {
    // Cold start: s from this batch; a training step also stores it, so learning starts
    // from the last heuristic value.
    s = ops::lsq_init_step(x, range_);
    if (ctx.training) p = s;
  } else {
    // |p| as in the released code (keeps s > 0 whatever the update did); the floor
    // only guards an exact zero.
    s = std::max(std::fabs(p), 1e-12f);
  }
  Tensor y = tensor_f32(x.shape());
  Tensor r = tensor_f32(x.shape());
  ops::lsq_fake_quantize(x, s, range_, y, r);
  if (saved != nullptr) *saved = Saved{r, !cold, p < 0.0f ? -1.0f : 1.0f};
  return y;
}

Tensor LsqFakeQuant::backward(const Tensor& dy, const Saved& saved) {
  Tensor dx = tensor_f32(dy.shape());
  const float ds = ops::lsq_fake_quantize_backward(dy, saved.r, range_, dx);
  if (saved.learned) step.grad.data<float>()[0] += saved.sign * ds;
  return dx;
}

// ---- Attention --------------------------------------------------------------------------

Attention::Attention(const std::string& name, int64_t d_model_, int64_t n_heads_, bool causal_,
                     const PrecisionPlan& plan, uint32_t layer_id, uint64_t seed, float init_std,
                     float out_std)
    : qkv(name + ".qkv", d_model_, 3 * d_model_, true, plan[LinearRole::qkv], plan.quant, layer_id,
          seed, init_std),
      out(name + ".out", d_model_, d_model_, true, plan[LinearRole::attn_out], plan.quant,
          layer_id + 1, seed, out_std),
      d_model(d_model_),
      n_heads(n_heads_),
      causal(causal_) {}

Tensor Attention::forward(const Tensor& x, int64_t batch, int64_t seq, const StepContext& ctx,
                          Saved* saved) {
  require_saved(saved, ctx, "Attention");
  const int64_t n = batch * seq;
  NB_CHECK(x.size(0) == n && x.size(1) == d_model,
           "Attention: x is " << shape_str(x.shape()) << ", expected [" << n << ", " << d_model << "]");
  Tensor qkv_out = tensor_f32({batch, seq, 3 * d_model});
  qkv.forward(x.data<float>(), n, qkv_out.data<float>(), ctx);
  Tensor a = tensor_f32({batch, seq, d_model});
  Tensor att = tensor_f32({batch, n_heads, seq, seq});
  ops::attention_forward(qkv_out, n_heads, causal, a, att);
  Tensor y = tensor_f32({n, d_model});
  out.forward(a.data<float>(), n, y.data<float>(), ctx);
  if (saved != nullptr) *saved = Saved{qkv_out, att};
  return y;
}

Tensor Attention::backward(const Tensor& dy, const Saved& saved, const StepContext& ctx) {
  const int64_t batch = saved.qkv.size(0), seq = saved.qkv.size(1), n = batch * seq;
  Tensor da = tensor_f32({batch, seq, d_model});
  out.backward(dy.data<float>(), da.data<float>(), ctx);
  Tensor dqkv = tensor_f32({batch, seq, 3 * d_model});
  ops::attention_backward(da, saved.qkv, saved.att, n_heads, causal, dqkv);
  Tensor dx = tensor_f32({n, d_model});
  qkv.backward(dqkv.data<float>(), dx.data<float>(), ctx);
  return dx;
}

std::vector<Param*> Attention::parameters() {
  std::vector<Param*> ps = qkv.parameters();
  for (Param* p : out.parameters()) ps.push_back(p);
  return ps;
}

// ---- MLP --------------------------------------------------------------------------------

Mlp::Mlp(const std::string& name, int64_t d_model, int64_t d_ff_, const PrecisionPlan& plan,
         uint32_t layer_id, uint64_t seed, float init_std, float out_std)
    : in(name + ".in", d_model, d_ff_, true, plan[LinearRole::mlp_in], plan.quant, layer_id, seed,
         init_std),
      out(name + ".out", d_ff_, d_model, true, plan[LinearRole::mlp_out], plan.quant, layer_id + 1,
          seed, out_std),
      d_ff(d_ff_) {}

Tensor Mlp::forward(const Tensor& x, const StepContext& ctx, Saved* saved) {
  require_saved(saved, ctx, "Mlp");
  const int64_t n = x.size(0);
  Tensor h = tensor_f32({n, d_ff});
  in.forward(x.data<float>(), n, h.data<float>(), ctx);
  Tensor g = tensor_f32({n, d_ff});
  ops::gelu_forward(h, g);
  Tensor y = tensor_f32({n, out.out_features()});
  out.forward(g.data<float>(), n, y.data<float>(), ctx);
  if (saved != nullptr) saved->h = h;
  return y;
}

Tensor Mlp::backward(const Tensor& dy, const Saved& saved, const StepContext& ctx) {
  const int64_t n = saved.h.size(0);
  Tensor dg = tensor_f32({n, d_ff});
  out.backward(dy.data<float>(), dg.data<float>(), ctx);
  ops::gelu_backward(dg, saved.h, dg);  // in place: dh = dg·gelu'(h)
  Tensor dx = tensor_f32({n, in.in_features()});
  in.backward(dg.data<float>(), dx.data<float>(), ctx);
  return dx;
}

std::vector<Param*> Mlp::parameters() {
  std::vector<Param*> ps = in.parameters();
  for (Param* p : out.parameters()) ps.push_back(p);
  return ps;
}

// ---- Block ------------------------------------------------------------------------------

Block::Block(const std::string& name, int64_t d_model, int64_t n_heads, int64_t d_ff, bool causal,
             const PrecisionPlan& plan, uint32_t layer_id, uint64_t seed, float init_std,
             float residual_std)
    : ln1(name + ".ln1", d_model),
      attn(name + ".attn", d_model, n_heads, causal, plan, layer_id, seed, init_std, residual_std),
      ln2(name + ".ln2", d_model),
      mlp(name + ".mlp", d_model, d_ff, plan, layer_id + 2, seed, init_std, residual_std) {}

Tensor Block::forward(const Tensor& x, int64_t batch, int64_t seq, const StepContext& ctx,
                      Saved* saved) {
  require_saved(saved, ctx, "Block");
  // x1 = x + attn(ln1(x))
  Tensor a = attn.forward(ln1.forward(x, saved ? &saved->ln1 : nullptr), batch, seq, ctx,
                          saved ? &saved->attn : nullptr);
  ops::add(a, x, a);
  // y = x1 + mlp(ln2(x1))
  Tensor m = mlp.forward(ln2.forward(a, saved ? &saved->ln2 : nullptr), ctx, saved ? &saved->mlp : nullptr);
  ops::add(m, a, m);
  return m;
}

Tensor Block::backward(const Tensor& dy, const Saved& saved, const StepContext& ctx) {
  // dx1 = dy + ln2ᵀ(mlpᵀ(dy));  dx = dx1 + ln1ᵀ(attnᵀ(dx1))
  Tensor dx1 = ln2.backward(mlp.backward(dy, saved.mlp, ctx), saved.ln2);
  ops::add(dx1, dy, dx1);
  Tensor dx = ln1.backward(attn.backward(dx1, saved.attn, ctx), saved.ln1);
  ops::add(dx, dx1, dx);
  return dx;
}

std::vector<Param*> Block::parameters() {
  std::vector<Param*> ps;
  for (auto group : {ln1.parameters(), attn.parameters(), ln2.parameters(), mlp.parameters()})
    ps.insert(ps.end(), group.begin(), group.end());
  return ps;
}

// ---- config checks ----------------------------------------------------------------------

void validate_block_sizes(int64_t d_model, int64_t n_heads, int64_t d_ff, int64_t n_layers,
                          const PrecisionPlan& plan,
                          const std::vector<std::pair<LinearRole, int64_t>>& k_of_role) {
  NB_CHECK(d_model > 0, "d_model = " << d_model << " must be positive");
  NB_CHECK(n_heads > 0, "n_heads = " << n_heads << " must be positive");
  NB_CHECK(n_layers > 0, "n_layers = " << n_layers << " must be positive");
  NB_CHECK(d_ff > 0, "d_ff = " << d_ff << " must be positive (0 in the config means 4·d_model)");
  NB_CHECK(d_model % n_heads == 0, "d_model = " << d_model << " is not divisible by n_heads = " << n_heads
                                                << "; choose a width that is a multiple of the head count"
                                                << " (e.g. d_model = " << n_heads * ((d_model + n_heads - 1) / n_heads)
                                                << ")");
  const int64_t block = plan.quant.hadamard_block;
  bool any_int4 = false;
  for (const auto& [role, k] : k_of_role) any_int4 |= plan[role] == Precision::int4;
  if (!any_int4 || block == 0) return;
  NB_CHECK(block > 0 && block <= 1024 && (block & (block - 1)) == 0,
           "hadamard_block = " << block << " is not a power of two in [1, 1024]; use 1, 2, 4, ..., 1024, "
                               << "or 0 for the per-layer search");
  for (const auto& [role, k] : k_of_role) {
    if (plan[role] != Precision::int4) continue;
    NB_CHECK(k % block == 0, "hadamard_block = " << block << " does not divide " << k
                                                 << ", the input width of the int4 '" << role_name(role)
                                                 << "' layers; choose a power of two dividing it (or 0 for "
                                                 << "the per-layer search), or give '" << role_name(role)
                                                 << "' another precision");
  }
}

std::string plan_json(const PrecisionPlan& plan) {
  nlohmann::ordered_json j;
  for (int r = 0; r < kNumLinearRoles; ++r) {
    const auto role = static_cast<LinearRole>(r);
    j[role_name(role)] = precision_name(plan[role]);
  }
  const QuantOptions& q = plan.quant;
  j["quant"] = {{"hadamard_block", q.hadamard_block},
                {"lss_sampling", q.lss_sampling},
                {"sample_fraction", q.sample_fraction},
                {"int4_range", {q.int4_range.qmin, q.int4_range.qmax}},
                {"lsq_cold_start_steps", q.lsq_cold_start_steps},
                {"w4a4_asymmetric", q.w4a4_asymmetric}};
  return j.dump();
}

}  // namespace nibble::nn
