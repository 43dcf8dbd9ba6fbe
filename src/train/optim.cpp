#include "train/optim.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "nibble/error.h"
#include "nibble/ops_layers.h"

namespace nibble::train {

void validate(const AdamWOptions& opt) {
  NB_CHECK(opt.beta1 >= 0 && opt.beta1 < 1,
           "AdamW beta1 = " << opt.beta1 << " is outside [0, 1); the usual value is 0.9");
  NB_CHECK(opt.beta2 >= 0 && opt.beta2 < 1,
           "AdamW beta2 = " << opt.beta2 << " is outside [0, 1); the usual values are 0.95 to 0.999");
  NB_CHECK(opt.eps > 0 && std::isfinite(opt.eps),
           "AdamW eps = " << opt.eps << " must be a positive number, e.g. 1e-8");
  NB_CHECK(opt.weight_decay >= 0 && std::isfinite(opt.weight_decay),
           "weight decay = " << opt.weight_decay << " must be >= 0 (0 turns it off)");
  NB_CHECK(opt.grad_clip >= 0 && std::isfinite(opt.grad_clip),
           "gradient clip = " << opt.grad_clip << " must be >= 0 (0 turns clipping off)");
}

void validate(const LrSchedule& s) {
  NB_CHECK(s.max_lr > 0 && std::isfinite(s.max_lr),
           "learning rate " << s.max_lr << " must be a positive number, e.g. 1e-3");
  NB_CHECK(s.min_lr >= 0 && s.min_lr <= s.max_lr,
           "minimum learning rate " << s.min_lr << " must be in [0, lr = " << s.max_lr << "]");
  NB_CHECK(s.total >= 1, "the schedule needs at least 1 step (got " << s.total << ")");
  NB_CHECK(s.warmup >= 0 && s.warmup <= s.total,
           "warm-up of " << s.warmup << " steps must be in [0, steps = " << s.total << "]");
}

double LrSchedule::at(int64_t step) const {
  if (step < warmup)
    return max_lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const int64_t decay = std::max<int64_t>(total - warmup, 1);
  const double p = std::clamp(static_cast<double>(step - warmup) / static_cast<double>(decay), 0.0, 1.0);
  return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
}

double global_grad_norm(const std::vector<nn::Param*>& params) {
  std::vector<TensorView> grads;
  grads.reserve(params.size());
  for (const nn::Param* p : params) grads.push_back(p->grad.view());
  return ops::global_norm(grads);
}

AdamW::AdamW(std::vector<nn::Param*> params, const AdamWOptions& opt)
    : params_(std::move(params)), opt_(opt) {
  validate(opt_);
  for (const nn::Param* p : params_) {
    NB_CHECK(p != nullptr, "AdamW: null parameter in the list");
    NB_CHECK(p->value.dtype() == DType::f32 && p->grad.dtype() == DType::f32,
             "AdamW: parameter " << p->name << " must hold f32 value and grad (master weights)");
    NB_CHECK(p->value.shape() == p->grad.shape(),
             "AdamW: parameter " << p->name << " has value " << shape_str(p->value.shape())
                                 << " but grad " << shape_str(p->grad.shape()));
    m_.push_back(Tensor::zeros(p->value.shape(), DType::f32));
    v_.push_back(Tensor::zeros(p->value.shape(), DType::f32));
  }
}

void AdamW::zero_grad() {
  for (nn::Param* p : params_) std::fill_n(p->grad.data<float>(), p->grad.numel(), 0.0f);
}

StepStats AdamW::step(double lr) {
  NB_CHECK(std::isfinite(lr) && lr >= 0, "AdamW: learning rate " << lr << " must be finite and >= 0");
  StepStats st;
  st.grad_norm = global_grad_norm(params_);
  if (!std::isfinite(st.grad_norm)) {
    st.skipped = true;
    return st;
  }
  if (opt_.grad_clip > 0 && st.grad_norm > opt_.grad_clip) st.grad_scale = opt_.grad_clip / st.grad_norm;
  ++t_;
  ops::AdamWConfig c;
  c.lr = static_cast<float>(lr);
  c.beta1 = static_cast<float>(opt_.beta1);
  c.beta2 = static_cast<float>(opt_.beta2);
  c.eps = static_cast<float>(opt_.eps);
  c.step = t_;
  c.grad_scale = static_cast<float>(st.grad_scale);
  for (size_t i = 0; i < params_.size(); ++i) {
    nn::Param* p = params_[i];
    c.weight_decay = p->weight_decay ? static_cast<float>(opt_.weight_decay) : 0.0f;
    ops::adamw_update(p->value.view(), p->grad.view(), m_[i].view(), v_[i].view(), c);
  }
  return st;
}

std::vector<NamedTensor> AdamW::state_tensors() const {
  std::vector<NamedTensor> out;
  out.reserve(2 * params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    out.push_back({params_[i]->name + ".adam_m", m_[i]});
    out.push_back({params_[i]->name + ".adam_v", v_[i]});
  }
  return out;
}

void AdamW::load_state(const SafetensorsFile& file, int64_t updates) {
  NB_CHECK(updates >= 0, "AdamW: the checkpoint's update count " << updates << " is negative");
  // Check every moment before copying any, so a bad checkpoint leaves the state untouched.
  std::vector<const Tensor*> src;
  for (size_t i = 0; i < params_.size(); ++i) {
    for (const char* suffix : {".adam_m", ".adam_v"}) {
      const std::string name = params_[i]->name + suffix;
      const Tensor* t = file.find(name);
      NB_CHECK(t != nullptr, "the checkpoint has no optimizer moment '"
                                 << name << "'; it was not written by this model's trainer");
      NB_CHECK(t->dtype() == DType::f32 && t->shape() == params_[i]->value.shape(),
               "optimizer moment '" << name << "' in the checkpoint is " << t->view().describe()
                                    << " but the parameter is f32" << shape_str(params_[i]->value.shape()));
      src.push_back(t);
    }
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    std::copy_n(src[2 * i]->data<float>(), m_[i].numel(), m_[i].data<float>());
    std::copy_n(src[2 * i + 1]->data<float>(), v_[i].numel(), v_[i].data<float>());
  }
  t_ = updates;
}

}  // namespace nibble::train
