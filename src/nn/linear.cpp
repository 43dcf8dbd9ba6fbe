// nn::Linear: y = x·wᵀ + b at a chosen precision (linear.h), over nibble::ops.
//
// What each precision keeps between forward and backward (saved_bytes()):
//   fp32  x                                                    4 bytes per element of x
//   int8  x codes [N, D] + per-token scales, w codes + scales  1 byte per element of x and w
//   int4  packed s4 codes + the 4-bit LSQ residual side channel (ref/linear.h), for x and w
//                                                              1 byte per element of x and w
//   w4a4  packed s4 codes + per-token / per-channel scales     ½ byte per element of x and w
// LSQ step sizes (int4) are the parameters "<name>.step_x" / "<name>.step_w": the forward
// uses |s| (the released code's way to keep s > 0; a step can cross 0 under AdamW), floored
// at kMinStep so that a step that lands on 0 clips everything instead of dividing by zero,
// and the backward multiplies ∂L/∂|s| by sign(s).
#include "nn/linear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "nibble/error.h"
#include "nibble/ops_layers.h"
#include "nibble/ops_linear.h"
#include "nibble/parallel.h"
#include "nibble/rng.h"

namespace nibble::nn {
namespace {

constexpr float kMinStep = 1e-12f;

const char* precision_label(Precision p) {
  switch (p) {
    case Precision::fp32: return "fp32";
    case Precision::int8: return "int8";
    case Precision::int4: return "int4";
    case Precision::w4a4: return "w4a4";
  }
  return "unknown";
}

TensorView f32_view(const float* data, int64_t rows, int64_t cols) {
  TensorView v;
  v.data = const_cast<float*>(data);  // views are non-owning; inputs are only read
  v.dtype = DType::f32;
  v.shape = {rows, cols};
  return v;
}

bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// db[c] += Σ_n dy[n, c] (fp64 sums, one parallel index per column)
void add_column_sums(const float* dy, int64_t n, int64_t c, float* db) {
  parallel_rows(c, n * c, [&](int64_t j) {
    double sum = 0;
    for (int64_t r = 0; r < n; ++r) sum += dy[r * c + j];
    db[j] += static_cast<float>(sum);
  });
}

void add_into(Tensor& grad, const Tensor& g) {
  float* dst = grad.data<float>();
  const float* src = g.data<float>();
  const int64_t n = grad.numel();
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace

struct Linear::Impl {
  std::string name;
  int64_t in = 0, out = 0;
  bool has_bias = false;
  Precision precision = Precision::fp32;
  QuantOptions quant;
  uint32_t layer_id = 0;

  Param weight, bias, step_x, step_w;

  // State between a training forward and its backward.
  bool saved = false;
  int64_t saved_n = 0;
  std::vector<float> x_saved;  // fp32
  ops::LinearSaved qsaved;     // int8 / int4 / w4a4
  bool saved_cold_x = false;   // int4: s_x was set heuristically (cold start), not learned
  float sign_x = 1, sign_w = 1;  // int4: sign(s) at the forward, for ∂L/∂s = sign·∂L/∂|s|
  int64_t saved_block = 0;     // int4: the block of the saved forward

  // int4 state that survives checkpoints (extra_state).
  int64_t block = 0;           // 0 until chosen (QuantOptions.hadamard_block or the search)
  bool lsq_initialized = false;

  std::string what() const { return "linear '" + name + "' (" + precision_label(precision) + ")"; }

  ops::HqLinearOptions hq_options(int64_t blk) const {
    ops::HqLinearOptions o;
    o.block = blk;
    o.range = quant.int4_range;
    o.bernoulli = quant.lss_sampling;
    o.sample_fraction = quant.sample_fraction;
    return o;
  }

  PhiloxKey key(const StepContext& ctx) const {
    return PhiloxKey{ctx.seed, ctx.step, layer_id, RngRole::rounding};
  }

  void clear_saved() {
    saved = false;
    saved_n = 0;
    x_saved.clear();
    x_saved.shrink_to_fit();
    qsaved.clear();
  }

  void forward_int4(const TensorView& xv, const TensorView& wv, const TensorView& bv,
                    const TensorView& yv, const StepContext& ctx) {
    const QRange range = quant.int4_range;
    // Hadamard block: fixed by the options, or searched on the first training batch and
    // kept (algorithms.md A.3). An evaluation before any training searches on its own
    // batch without keeping the result, so evaluating first does not change training.
    int64_t blk = block;
    if (blk == 0) blk = ops::hq_search_block(xv, wv, range);
    float sx, sw;
    bool cold = false;
    if (ctx.training) {
      block = blk;
      float* vx = step_x.value.data<float>();
      float* vw = step_w.value.data<float>();
      // LSQ init s = 2·mean|v·H|/sqrt(qmax) on the first batch; during the cold start
      // (the first lsq_cold_start_steps steps) s_x is reset that way every step instead
      // of being learned (algorithms.md A.3, F.10).
      if (!lsq_initialized) vw[0] = ops::lsq_init_scale(wv, blk, range);
      cold = ctx.step < static_cast<uint64_t>(quant.lsq_cold_start_steps);
      if (!lsq_initialized || cold) vx[0] = ops::lsq_init_scale(xv, blk, range);
      lsq_initialized = true;
      sign_x = vx[0] < 0 ? -1.0f : 1.0f;
      sign_w = vw[0] < 0 ? -1.0f : 1.0f;
      sx = std::max(std::fabs(vx[0]), kMinStep);
      sw = std::max(std::fabs(vw[0]), kMinStep);
    } else if (!lsq_initialized) {
      sx = ops::lsq_init_scale(xv, blk, range);
      sw = ops::lsq_init_scale(wv, blk, range);
    } else {
      sx = std::max(std::fabs(step_x.value.data<float>()[0]), kMinStep);
      sw = std::max(std::fabs(step_w.value.data<float>()[0]), kMinStep);
    }
    ops::hq_linear_forward(xv, wv, bv, sx, sw, hq_options(blk), key(ctx), yv,
                           ctx.training ? &qsaved : nullptr);
    saved_cold_x = cold;
    saved_block = blk;
  }
};

Linear::Linear(std::string name, int64_t in_features, int64_t out_features, bool bias,
               Precision p, const QuantOptions& quant, uint32_t layer_id, uint64_t init_seed,
               float init_std)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.name = std::move(name);
  NB_CHECK(!m.name.empty(), "nn::Linear: the name is empty; give every layer a unique name "
                            "such as \"blocks.0.attn.qkv\"");
  NB_CHECK(in_features > 0 && out_features > 0,
           "linear '" << m.name << "': in_features = " << in_features << " and out_features = "
                      << out_features << " must both be positive");
  NB_CHECK(layer_id < (1u << 24), "linear '" << m.name << "': layer_id " << layer_id
                                             << " must be below 2^24 (it keys the Philox counter)");
  NB_CHECK(std::isfinite(init_std) && init_std >= 0.0f,
           "linear '" << m.name << "': init_std = " << init_std << " must be finite and >= 0");
  m.in = in_features;
  m.out = out_features;
  m.has_bias = bias;
  m.precision = p;
  m.quant = quant;
  m.layer_id = layer_id;
  if (p == Precision::int4) {
    const int64_t blk = quant.hadamard_block;
    NB_CHECK(blk == 0 || (is_power_of_two(blk) && blk <= 1024),
             m.what() << ": hadamard block " << blk
                      << " is not a power of two; use 0 (search on the first batch) or 1, 2, 4, "
                         "..., 1024");
    NB_CHECK(blk == 0 || in_features % blk == 0,
             m.what() << ": hadamard block " << blk << " does not divide in_features "
                      << in_features << "; pick a power of two that divides it (or 0 to search)");
    const QRange r = quant.int4_range;
    NB_CHECK(r.qmin < 0 && r.qmax > 0 && r.qmin >= -8 && r.qmax <= 7,
             m.what() << ": int4 range [" << r.qmin << ", " << r.qmax
                      << "] is not a signed 4-bit range; use [-7, 7] (paper) or [-8, 7]");
    NB_CHECK(quant.sample_fraction > 0.0 && quant.sample_fraction <= 1.0,
             m.what() << ": sample_fraction " << quant.sample_fraction << " must be in (0, 1]");
    NB_CHECK(quant.lsq_cold_start_steps >= 0,
             m.what() << ": lsq_cold_start_steps " << quant.lsq_cold_start_steps
                      << " must be >= 0");
    m.block = blk;
  }

  // Weights ~ N(0, init_std²) from the init stream of this layer; bias zero.
  m.weight.name = m.name + ".weight";
  m.weight.value = Tensor::empty({out_features, in_features}, DType::f32);
  m.weight.grad = Tensor::zeros({out_features, in_features}, DType::f32);
  const PhiloxKey init_key{init_seed, 0, layer_id, RngRole::init};
  float* wv = m.weight.value.data<float>();
  for (int64_t i = 0; i < out_features * in_features; ++i)
    wv[i] = init_std * philox_normal(init_key, static_cast<uint64_t>(i));
  if (bias) {
    m.bias.name = m.name + ".bias";
    m.bias.value = Tensor::zeros({out_features}, DType::f32);
    m.bias.grad = Tensor::zeros({out_features}, DType::f32);
    m.bias.weight_decay = false;
  }
  if (p == Precision::int4) {
    // Placeholders: both steps are set from data by the first training forward.
    for (Param* s : {&m.step_x, &m.step_w}) {
      s->value = Tensor::empty({1}, DType::f32);
      s->value.data<float>()[0] = 1.0f;
      s->grad = Tensor::zeros({1}, DType::f32);
      s->weight_decay = false;
    }
    m.step_x.name = m.name + ".step_x";
    m.step_w.name = m.name + ".step_w";
  }
}

Linear::~Linear() = default;
Linear::Linear(Linear&&) noexcept = default;
Linear& Linear::operator=(Linear&&) noexcept = default;

void Linear::forward(const float* x, int64_t n, float* y, const StepContext& ctx) {
  Impl& m = *impl_;
  NB_CHECK(x != nullptr && y != nullptr, m.what() << ": forward got a null x or y");
  NB_CHECK(n > 0, m.what() << ": forward needs at least one row, got n = " << n);
  const TensorView xv = f32_view(x, n, m.in);
  // One clear message naming the layer, for every precision (the quantizers would name the
  // op instead). NonFiniteError, so the model can report a diverged step and skip it.
  ops::check_all_finite(xv, (m.what() + ": input x").c_str());
  m.clear_saved();
  const TensorView wv = f32_view(m.weight.value.data<float>(), m.out, m.in);
  TensorView bv;
  if (m.has_bias) {
    bv.data = m.bias.value.data<float>();
    bv.shape = {m.out};
  }
  const TensorView yv = f32_view(y, n, m.out);
  switch (m.precision) {
    case Precision::fp32: {
      // y = x·wᵀ + b: y starts as the broadcast bias, then one GEMM with beta = 1.
      const float* b = m.has_bias ? m.bias.value.data<float>() : nullptr;
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < m.out; ++j) y[r * m.out + j] = b ? b[j] : 0.0f;
      ops::matmul(xv, false, wv, true, yv, 1.0f, b ? 1.0f : 0.0f);
      if (ctx.training) m.x_saved.assign(x, x + n * m.in);
      break;
    }
    case Precision::int8:
      ops::int8_linear_forward(xv, wv, bv, yv, ctx.training ? &m.qsaved : nullptr);
      break;
    case Precision::int4:
      m.forward_int4(xv, wv, bv, yv, ctx);
      break;
    case Precision::w4a4: {
      ops::W4A4LinearOptions o;
      o.asymmetric = m.quant.w4a4_asymmetric;
      ops::w4a4_linear_forward(xv, wv, bv, o, yv, ctx.training ? &m.qsaved : nullptr);
      break;
    }
  }
  if (ctx.training) {
    m.saved = true;
    m.saved_n = n;
  }
}

void Linear::backward(const float* dy, float* dx, const StepContext& ctx) {
  Impl& m = *impl_;
  NB_CHECK(m.saved, m.what() << ": backward() without a saved forward; call forward() with "
                                "ctx.training = true on this batch first (each backward consumes "
                                "the state of one training forward)");
  NB_CHECK(dy != nullptr, m.what() << ": backward got a null dy; pass the [n, out] gradient");
  const int64_t n = m.saved_n;
  const TensorView dyv = f32_view(dy, n, m.out);
  ops::check_all_finite(dyv, (m.what() + ": output gradient dy").c_str());
  float* db = m.has_bias ? m.bias.grad.data<float>() : nullptr;
  switch (m.precision) {
    case Precision::fp32: {
      const TensorView wv = f32_view(m.weight.value.data<float>(), m.out, m.in);
      // dx = dy·w;  dw += dyᵀ·x;  db += Σ_rows dy
      if (dx) ops::matmul(dyv, false, wv, false, f32_view(dx, n, m.in));
      ops::matmul(dyv, true, f32_view(m.x_saved.data(), n, m.in), false,
                  f32_view(m.weight.grad.data<float>(), m.out, m.in), 1.0f, 1.0f);
      if (db) add_column_sums(dy, n, m.out, db);
      break;
    }
    case Precision::int8:
    case Precision::w4a4: {
      const ops::LinearGrads g =
          m.precision == Precision::int8
              ? ops::int8_linear_backward(dyv, m.qsaved, m.key(ctx), dx != nullptr)
              : ops::w4a4_linear_backward(dyv, m.qsaved, dx != nullptr);
      if (dx) std::memcpy(dx, g.dx.data<float>(), static_cast<size_t>(n * m.in) * sizeof(float));
      add_into(m.weight.grad, g.dw);
      if (m.has_bias) add_into(m.bias.grad, g.db);
      break;
    }
    case Precision::int4: {
      const ops::LinearGrads g =
          ops::hq_linear_backward(dyv, m.qsaved, m.hq_options(m.saved_block), m.key(ctx));
      if (dx) std::memcpy(dx, g.dx.data<float>(), static_cast<size_t>(n * m.in) * sizeof(float));
      add_into(m.weight.grad, g.dw);
      if (m.has_bias) add_into(m.bias.grad, g.db);
      // ∂L/∂s = sign(s)·∂L/∂|s|; during the cold start s_x is not learned.
      if (!m.saved_cold_x) m.step_x.grad.data<float>()[0] += m.sign_x * g.dsx;
      m.step_w.grad.data<float>()[0] += m.sign_w * g.dsw;
      break;
    }
  }
  m.clear_saved();
}

std::vector<Param*> Linear::parameters() {
  Impl& m = *impl_;
  std::vector<Param*> ps{&m.weight};
  if (m.has_bias) ps.push_back(&m.bias);
  if (m.precision == Precision::int4) {
    ps.push_back(&m.step_x);
    ps.push_back(&m.step_w);
  }
  return ps;
}

std::map<std::string, std::string> Linear::extra_state() const {
  const Impl& m = *impl_;
  std::map<std::string, std::string> st;
  if (m.precision == Precision::int4) {
    st.emplace(m.name + ".hadamard_block", std::to_string(m.block));
    st.emplace(m.name + ".lsq_initialized", std::to_string(m.lsq_initialized ? 1 : 0));
  }
  return st;
}

void Linear::load_extra_state(const std::map<std::string, std::string>& state) {
  Impl& m = *impl_;
  if (m.precision != Precision::int4) return;
  auto get = [&](const std::string& key) -> const std::string& {
    const auto it = state.find(key);
    NB_CHECK(it != state.end(), m.what() << ": the extra state has no \"" << key
                                         << "\"; it was not written by an int4 layer of this name "
                                            "(check that the checkpoint matches the model)");
    return it->second;
  };
  const std::string& block_str = get(m.name + ".hadamard_block");
  int64_t blk = -1;
  try {
    size_t used = 0;
    blk = std::stoll(block_str, &used);
    if (used != block_str.size()) blk = -1;
  } catch (const std::exception&) {
    blk = -1;
  }
  NB_CHECK(blk == 0 || (is_power_of_two(blk) && blk <= 1024 && m.in % blk == 0),
           m.what() << ": extra state hadamard_block = \"" << block_str
                    << "\" is not 0 or a power of two <= 1024 dividing in_features " << m.in
                    << "; the checkpoint is corrupt or from another model");
  NB_CHECK(m.quant.hadamard_block == 0 || blk == 0 || blk == m.quant.hadamard_block,
           m.what() << ": the checkpoint's hadamard block " << blk
                    << " differs from the configured block " << m.quant.hadamard_block
                    << "; use the checkpoint's config");
  const std::string& init_str = get(m.name + ".lsq_initialized");
  NB_CHECK(init_str == "0" || init_str == "1",
           m.what() << ": extra state lsq_initialized = \"" << init_str << "\" must be \"0\" or \"1\"");
  m.block = blk != 0 ? blk : m.quant.hadamard_block;
  m.lsq_initialized = init_str == "1";
}

const std::string& Linear::name() const { return impl_->name; }
int64_t Linear::in_features() const { return impl_->in; }
int64_t Linear::out_features() const { return impl_->out; }
Precision Linear::precision() const { return impl_->precision; }

int64_t Linear::saved_bytes() const {
  const Impl& m = *impl_;
  if (!m.saved) return 0;
  if (m.precision == Precision::fp32) return static_cast<int64_t>(m.x_saved.size() * sizeof(float));
  return m.qsaved.bytes();
}

}  // namespace nibble::nn
