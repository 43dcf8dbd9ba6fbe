// ops for the quantized linear layers: validate once, then run the CPU reference.
#include "nibble/ops_linear.h"

#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "nibble/error.h"
#include "ops/float_input.h"
#include "ref/hadamard.h"
#include "ref/int8_linear.h"
#include "ref/linear.h"
#include "ref/quant.h"

namespace nibble::ops {

using detail::to_f32;

struct LinearSaved::Impl {
  std::variant<std::monostate, ref::HqLinearSaved, ref::Int8LinearSaved, ref::W4A4Saved> state;
};

LinearSaved::LinearSaved() : impl_(std::make_unique<Impl>()) {}
LinearSaved::~LinearSaved() = default;
LinearSaved::LinearSaved(LinearSaved&&) noexcept = default;
LinearSaved& LinearSaved::operator=(LinearSaved&&) noexcept = default;

LinearSaved::Impl& LinearSaved::impl() {
  // A moved-from object gets a fresh (empty) state instead of a null pointer.
  if (!impl_) impl_ = std::make_unique<Impl>();
  return *impl_;
}
const LinearSaved::Impl& LinearSaved::impl() const {
  static const Impl kEmpty;
  return impl_ ? *impl_ : kEmpty;
}

bool LinearSaved::empty() const {
  return std::holds_alternative<std::monostate>(impl().state);
}

int64_t LinearSaved::rows() const {
  return std::visit(
      [](const auto& s) -> int64_t {
        if constexpr (std::is_same_v<std::decay_t<decltype(s)>, std::monostate>) return 0;
        else return s.n;
      },
      impl().state);
}

int64_t LinearSaved::bytes() const {
  return std::visit(
      [](const auto& s) -> int64_t {
        if constexpr (std::is_same_v<std::decay_t<decltype(s)>, std::monostate>) return 0;
        else return s.bytes();
      },
      impl().state);
}

void LinearSaved::clear() { impl().state = std::monostate{}; }

namespace {


// Sizes of one linear call: x [N, D], w [C, D], bias [C] or none, y [N, C] f32.
struct Dims {
  int64_t n, d, c;
};

Dims check_forward_args(const char* op, const TensorView& x, const TensorView& w,
                        const TensorView& bias, const TensorView& y) {
  NB_CHECK(x.dim() == 2, op << ": x must be 2-D [N, D] (tokens × in_features), got "
                            << x.describe());
  NB_CHECK(w.dim() == 2, op << ": w must be 2-D [C, D] (out_features × in_features), got "
                            << w.describe());
  const Dims dm{x.size(0), x.size(1), w.size(0)};
  NB_CHECK(w.size(1) == dm.d, op << ": x is " << x.describe() << " and w is " << w.describe()
                                 << "; w must be [C, D] with the same D = " << dm.d
                                 << " as x's columns");
  NB_CHECK(dm.n > 0 && dm.d > 0 && dm.c > 0,
           op << ": sizes N = " << dm.n << ", D = " << dm.d << ", C = " << dm.c
              << " must all be positive");
  if (bias.data != nullptr) {
    check_shape(bias, {dm.c}, (std::string(op) + ": bias").c_str());
  }
  check_shape(y, {dm.n, dm.c}, (std::string(op) + ": y").c_str());
  check_dtype(y, DType::f32, (std::string(op) + ": y").c_str());
  check_cpu_contiguous(y, (std::string(op) + ": y").c_str());
  return dm;
}

void check_int4_range(QRange range, const char* op) {
  NB_CHECK(range.qmin < 0 && range.qmax > 0 && range.qmin >= -8 && range.qmax <= 7,
           op << ": code range [" << range.qmin << ", " << range.qmax
              << "] is not a signed 4-bit LSQ range; use [-7, 7] (paper) or [-8, 7] (released "
                 "code)");
}

void check_block(int64_t block, int64_t d, const char* op) {
  NB_CHECK(block >= 1 && block <= 1024 && (block & (block - 1)) == 0,
           op << ": hadamard block " << block << " is not a power of two; use 1, 2, 4, ..., 1024");
  NB_CHECK(d % block == 0, op << ": hadamard block " << block << " does not divide in_features D = "
                              << d << "; pick a power of two that divides D");
}

void check_step(float s, const char* what, const char* op) {
  NB_CHECK(std::isfinite(s) && s > 0.0f,
           op << ": " << what << " = " << s
              << " must be a positive finite step size; initialise it with lsq_init_scale on the "
                 "first batch and keep it positive");
}

void check_key(const PhiloxKey& key, const char* op) {
  NB_CHECK(key.layer < (1u << 24), op << ": layer id " << key.layer
                                      << " does not fit the 24 bits of the Philox counter; number "
                                         "layers below 16777216");
}

// dy [N, C] against the saved forward's sizes; returns an f32 view (converted if needed).
Tensor check_dy(const char* op, const TensorView& dy, int64_t n, int64_t c) {
  NB_CHECK(dy.dim() == 2 && dy.size(0) == n && dy.size(1) == c,
           op << ": dy is " << dy.describe() << " but the saved forward produced y [" << n << ", "
              << c << "]; pass the gradient of that forward's output");
  return to_f32(dy, (std::string(op) + ": dy").c_str());
}

Tensor vector_to_tensor(const std::vector<float>& v, Shape shape) {
  Tensor t = Tensor::empty(std::move(shape), DType::f32);
  std::memcpy(t.data<float>(), v.data(), v.size() * sizeof(float));
  return t;
}

template <class T>
const T& saved_as(const LinearSaved& saved, const char* op, const char* forward_name) {
  const T* s = std::get_if<T>(&saved.impl().state);
  NB_CHECK(s != nullptr, op << ": " << (saved.empty() ? "the saved state is empty" : "the saved state "
                                                          "came from another kind of forward")
                            << "; run " << forward_name
                            << " with training state (a non-null saved) first");
  return *s;
}

const float* bias_ptr(const TensorView& bias, Tensor* holder, const char* what) {
  if (bias.data == nullptr) return nullptr;
  *holder = to_f32(bias, what);
  return holder->data<float>();
}

}  // namespace

// ---- int4 -------------------------------------------------------------------------------

void hq_linear_forward(const TensorView& x, const TensorView& w, const TensorView& bias,
                       float sx, float sw, const HqLinearOptions& opt, const PhiloxKey& key,
                       const TensorView& y, LinearSaved* saved) {
  const char* op = "hq_linear_forward";
  const Dims dm = check_forward_args(op, x, w, bias, y);
  check_block(opt.block, dm.d, op);
  check_int4_range(opt.range, op);
  check_step(sx, "activation step size sx", op);
  check_step(sw, "weight step size sw", op);
  check_key(key, op);
  const Tensor xf = to_f32(x, "hq_linear_forward: x"), wf = to_f32(w, "hq_linear_forward: w");
  Tensor bf;
  const float* b = bias_ptr(bias, &bf, "hq_linear_forward: bias");
  ref::HqLinearConfig cfg;
  cfg.block = opt.block;
  cfg.range = opt.range;
  if (saved == nullptr) {
    ref::hq_linear_forward(xf.data<float>(), wf.data<float>(), b, dm.n, dm.d, dm.c, sx, sw, cfg,
                           key, y.ptr<float>(), nullptr);
    return;
  }
  ref::HqLinearSaved s;
  ref::hq_linear_forward(xf.data<float>(), wf.data<float>(), b, dm.n, dm.d, dm.c, sx, sw, cfg,
                         key, y.ptr<float>(), &s);
  saved->impl().state = std::move(s);
}

LinearGrads hq_linear_backward(const TensorView& dy, const LinearSaved& saved,
                               const HqLinearOptions& opt, const PhiloxKey& key) {
  const char* op = "hq_linear_backward";
  const auto& s = saved_as<ref::HqLinearSaved>(saved, op, "hq_linear_forward");
  NB_CHECK(opt.block == s.block && opt.range.qmin == s.range.qmin && opt.range.qmax == s.range.qmax,
           op << ": options (block " << opt.block << ", range [" << opt.range.qmin << ", "
              << opt.range.qmax << "]) differ from the forward's (block " << s.block
              << ", range [" << s.range.qmin << ", " << s.range.qmax
              << "]); pass the options the forward used");
  NB_CHECK(opt.sample_fraction > 0.0 && opt.sample_fraction <= 1.0,
           op << ": sample_fraction " << opt.sample_fraction
              << " must be in (0, 1] (the fraction of the 2N split rows kept on average)");
  check_key(key, op);
  const Tensor dyf = check_dy(op, dy, s.n, s.c);
  ref::HqLinearConfig cfg;
  cfg.block = opt.block;
  cfg.range = opt.range;
  cfg.lss = opt.bernoulli ? ref::LssMode::bernoulli : ref::LssMode::keep_nonzero;
  cfg.sample_fraction = opt.sample_fraction;
  const ref::HqLinearGrads g = ref::hq_linear_backward(dyf.data<float>(), s, cfg, key);
  LinearGrads out;
  out.dx = vector_to_tensor(g.dx, {s.n, s.d});
  out.dw = vector_to_tensor(g.dw, {s.c, s.d});
  out.db = vector_to_tensor(g.db, {s.c});
  out.dsx = g.dsx;
  out.dsw = g.dsw;
  out.kept_rows_dw = g.kept_rows_dw;
  out.kept_rows_dx = g.kept_rows_dx;
  out.grad_scale = g.grad_scale;
  return out;
}

int64_t hq_search_block(const TensorView& x, const TensorView& w, QRange range) {
  const char* op = "hq_search_block";
  NB_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
           op << ": x must be [N, D] and w [C, D] with the same D, got " << x.describe() << " and "
              << w.describe());
  check_int4_range(range, op);
  const Tensor xf = to_f32(x, "hq_search_block: x"), wf = to_f32(w, "hq_search_block: w");
  return ref::hq_search_block(xf.data<float>(), x.size(0), wf.data<float>(), w.size(0), x.size(1),
                              range)
      .block;
}

float lsq_init_scale(const TensorView& v, int64_t block, QRange range) {
  const char* op = "lsq_init_scale";
  NB_CHECK(v.dim() == 2 && v.numel() > 0, op << ": v must be a non-empty 2-D [rows, D] tensor, got "
                                              << v.describe());
  check_block(block, v.size(1), op);
  check_int4_range(range, op);
  const Tensor vf = to_f32(v, "lsq_init_scale: v");
  std::vector<float> vt(vf.data<float>(), vf.data<float>() + v.numel());
  ref::hadamard_blocks(vt.data(), v.size(0), v.size(1), block);
  return ref::lsq_init_scale(vt.data(), v.numel(), range);
}

// ---- int8 -------------------------------------------------------------------------------

void int8_linear_forward(const TensorView& x, const TensorView& w, const TensorView& bias,
                         const TensorView& y, LinearSaved* saved) {
  const char* op = "int8_linear_forward";
  const Dims dm = check_forward_args(op, x, w, bias, y);
  const Tensor xf = to_f32(x, "int8_linear_forward: x"), wf = to_f32(w, "int8_linear_forward: w");
  Tensor bf;
  const float* b = bias_ptr(bias, &bf, "int8_linear_forward: bias");
  if (saved == nullptr) {
    ref::int8_linear_forward(xf.data<float>(), wf.data<float>(), b, dm.n, dm.d, dm.c,
                             y.ptr<float>(), nullptr);
    return;
  }
  ref::Int8LinearSaved s;
  ref::int8_linear_forward(xf.data<float>(), wf.data<float>(), b, dm.n, dm.d, dm.c, y.ptr<float>(),
                           &s);
  saved->impl().state = std::move(s);
}

LinearGrads int8_linear_backward(const TensorView& dy, const LinearSaved& saved,
                                 const PhiloxKey& key, bool need_dx) {
  const char* op = "int8_linear_backward";
  const auto& s = saved_as<ref::Int8LinearSaved>(saved, op, "int8_linear_forward");
  check_key(key, op);
  const Tensor dyf = check_dy(op, dy, s.n, s.c);
  LinearGrads out;
  if (need_dx) out.dx = Tensor::empty({s.n, s.d}, DType::f32);
  out.dw = Tensor::empty({s.c, s.d}, DType::f32);
  out.db = Tensor::empty({s.c}, DType::f32);
  ref::int8_linear_backward(dyf.data<float>(), s, key, need_dx ? out.dx.data<float>() : nullptr,
                            out.dw.data<float>(), out.db.data<float>());
  return out;
}

// ---- w4a4 -------------------------------------------------------------------------------

void w4a4_linear_forward(const TensorView& x, const TensorView& w, const TensorView& bias,
                         const W4A4LinearOptions& opt, const TensorView& y, LinearSaved* saved) {
  const char* op = "w4a4_linear_forward";
  const Dims dm = check_forward_args(op, x, w, bias, y);
  const Tensor xf = to_f32(x, "w4a4_linear_forward: x"), wf = to_f32(w, "w4a4_linear_forward: w");
  Tensor bf;
  const float* b = bias_ptr(bias, &bf, "w4a4_linear_forward: bias");
  ref::W4A4Config cfg;
  cfg.asymmetric = opt.asymmetric;
  if (saved == nullptr) {
    ref::w4a4_linear_forward(xf.data<float>(), wf.data<float>(), b, dm.n, dm.d, dm.c, cfg,
                             y.ptr<float>(), nullptr);
    return;
  }
  ref::W4A4Saved s;
  ref::w4a4_linear_forward(xf.data<float>(), wf.data<float>(), b, dm.n, dm.d, dm.c, cfg,
                           y.ptr<float>(), &s);
  saved->impl().state = std::move(s);
}

LinearGrads w4a4_linear_backward(const TensorView& dy, const LinearSaved& saved, bool need_dx) {
  const char* op = "w4a4_linear_backward";
  const auto& s = saved_as<ref::W4A4Saved>(saved, op, "w4a4_linear_forward");
  const Tensor dyf = check_dy(op, dy, s.n, s.c);
  LinearGrads out;
  if (need_dx) out.dx = Tensor::empty({s.n, s.d}, DType::f32);
  out.dw = Tensor::empty({s.c, s.d}, DType::f32);
  out.db = Tensor::empty({s.c}, DType::f32);
  ref::w4a4_linear_backward(dyf.data<float>(), s, need_dx ? out.dx.data<float>() : nullptr,
                            out.dw.data<float>(), out.db.data<float>());
  return out;
}

}  // namespace nibble::ops
