#pragma once
// A tiny nn::Model and DataSource for the trainer and checkpoint tests, so that they do not
// depend on the GPT/ViT: softmax regression logits = (x + noise)·Wᵀ + b on synthetic
// features x whose label is the argmax of a fixed "teacher" matrix.
//
// It exercises what the trainer must keep bit-identical across a resume: a per-step random
// stream (the input noise, Philox keyed by the step counted from the model's first training
// step), state outside the parameters (that first step, in extra_state), a parameter without
// weight decay (the bias). It can inject a NaN loss, a NaN gradient or a SIGINT at a chosen
// step.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "nibble/nn.h"
#include "nibble/ops_layers.h"
#include "nibble/rng.h"
#include "train/trainer.h"

namespace nibble::testing {

struct FakeModelConfig {
  int64_t in = 8;
  int64_t classes = 4;
  uint64_t init_seed = 1;
  float noise = 0.05f;
};

class FakeModel final : public nn::Model {
 public:
  explicit FakeModel(const FakeModelConfig& c) : cfg_(c) {
    weight_.name = "lin.weight";
    weight_.value = Tensor::zeros({c.classes, c.in}, DType::f32);
    weight_.grad = Tensor::zeros({c.classes, c.in}, DType::f32);
    bias_.name = "lin.bias";
    bias_.value = Tensor::zeros({c.classes}, DType::f32);
    bias_.grad = Tensor::zeros({c.classes}, DType::f32);
    bias_.weight_decay = false;
    const PhiloxKey key{c.init_seed, 0, 0, RngRole::init};
    for (int64_t i = 0; i < weight_.value.numel(); ++i)
      weight_.value.data<float>()[i] = 0.1f * philox_normal(key, static_cast<uint64_t>(i));
  }

  int64_t nan_loss_step = -1, nan_grad_step = -1, sigint_step = -1;
  int64_t non_finite_op_step = -1;  // throws ops::NonFiniteError as an op meeting a NaN would

  std::string kind() const override { return "fake"; }
  std::string config_json() const override {
    return "{\"in\": " + std::to_string(cfg_.in) + ", \"classes\": " + std::to_string(cfg_.classes) +
           ", \"noise\": " + std::to_string(cfg_.noise) + "}";
  }
  std::vector<nn::Param*> parameters() override { return {&weight_, &bias_}; }

  nn::StepResult forward_backward(const nn::Batch& batch, const nn::StepContext& ctx) override {
    if (first_step_ < 0) first_step_ = ctx.step;
    if (static_cast<int64_t>(ctx.step) == sigint_step) std::raise(SIGINT);
    if (static_cast<int64_t>(ctx.step) == non_finite_op_step) {
      weight_.grad.data<float>()[0] += 1.0f;  // a partial backward before the op threw
      throw ops::NonFiniteError("layernorm_forward: x[5] is nan");
    }
    nn::StepResult r = run(batch, ctx, true);
    if (static_cast<int64_t>(ctx.step) == nan_loss_step) r.loss = std::nan("");
    if (static_cast<int64_t>(ctx.step) == nan_grad_step) weight_.grad.data<float>()[3] = std::nanf("");
    return r;
  }
  nn::StepResult evaluate(const nn::Batch& batch, const nn::StepContext& ctx) override {
    return run(batch, ctx, false);
  }
  std::map<std::string, std::string> extra_state() const override {
    return {{"fake.first_step", std::to_string(first_step_)}};
  }
  void load_extra_state(const std::map<std::string, std::string>& s) override {
    first_step_ = std::stoll(s.at("fake.first_step"));
  }

 private:
  nn::StepResult run(const nn::Batch& batch, const nn::StepContext& ctx, bool train) {
    const int64_t B = batch.size, D = cfg_.in, C = cfg_.classes;
    const float* w = weight_.value.data<float>();
    const float* b = bias_.value.data<float>();
    // Noise only in training, keyed by the step counted from the first training step.
    const PhiloxKey key{ctx.seed, static_cast<uint32_t>(ctx.step - first_step_), 0, RngRole::rounding};
    nn::StepResult r;
    double loss = 0;
    std::vector<float> x(static_cast<size_t>(D)), p(static_cast<size_t>(C));
    for (int64_t i = 0; i < B; ++i) {
      for (int64_t d = 0; d < D; ++d)
        x[d] = batch.images[i * D + d] +
               (train ? cfg_.noise * philox_normal(key, static_cast<uint64_t>(i * D + d)) : 0.0f);
      float mx = -INFINITY;
      int64_t arg = 0;
      for (int64_t c = 0; c < C; ++c) {
        float z = b[c];
        for (int64_t d = 0; d < D; ++d) z += w[c * D + d] * x[d];
        p[c] = z;
        if (z > mx) mx = z, arg = c;
      }
      float s = 0;
      for (int64_t c = 0; c < C; ++c) s += (p[c] = std::exp(p[c] - mx));
      for (int64_t c = 0; c < C; ++c) p[c] /= s;
      const int32_t y = batch.labels[i];
      loss -= std::log(static_cast<double>(p[y]));
      r.correct += arg == y;
      if (!train) continue;
      // dlogits = (softmax - onehot) / B
      for (int64_t c = 0; c < C; ++c) {
        const float g = (p[c] - (c == y ? 1.0f : 0.0f)) / static_cast<float>(B);
        bias_.grad.data<float>()[c] += g;
        for (int64_t d = 0; d < D; ++d) weight_.grad.data<float>()[c * D + d] += g * x[d];
      }
    }
    r.count = B;
    r.loss = loss / static_cast<double>(B);
    return r;
  }

  FakeModelConfig cfg_;
  nn::Param weight_, bias_;
  int64_t first_step_ = -1;
};

// Features x ~ N(0, 1) keyed by (seed, step); label = argmax of a fixed teacher matrix · x.
class FakeData final : public train::DataSource {
 public:
  FakeData(int64_t in, int64_t classes, int64_t batch, uint64_t seed)
      : in_(in), classes_(classes), batch_(batch), seed_(seed), teacher_(static_cast<size_t>(in * classes)) {
    const PhiloxKey key{999, 0, 0, RngRole::init};
    for (size_t i = 0; i < teacher_.size(); ++i) teacher_[i] = philox_normal(key, i);
    for (uint32_t v = 0; v < 2; ++v) val_.push_back(make({seed_, v, 1, RngRole::data}));
  }
  nn::Batch train_batch(int64_t step) override {
    return make({seed_, static_cast<uint32_t>(step), 0, RngRole::data});
  }
  const std::vector<nn::Batch>& val_batches() override { return val_; }
  int64_t items_per_batch() const override { return batch_; }
  std::string unit() const override { return "img"; }

 private:
  nn::Batch make(const PhiloxKey& key) const {
    nn::Batch b;
    b.size = batch_;
    b.height = 1;
    b.width = in_;
    b.images.resize(static_cast<size_t>(batch_ * in_));
    for (size_t i = 0; i < b.images.size(); ++i) b.images[i] = philox_normal(key, i);
    for (int64_t i = 0; i < batch_; ++i) {
      int32_t best = 0;
      float best_z = -INFINITY;
      for (int64_t c = 0; c < classes_; ++c) {
        float z = 0;
        for (int64_t d = 0; d < in_; ++d) z += teacher_[c * in_ + d] * b.images[i * in_ + d];
        if (z > best_z) best_z = z, best = static_cast<int32_t>(c);
      }
      b.labels.push_back(best);
    }
    return b;
  }
  int64_t in_, classes_, batch_;
  uint64_t seed_;
  std::vector<float> teacher_;
  std::vector<nn::Batch> val_;
};

// A fresh folder under the system temp dir named after the running test, removed at the end.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::filesystem::temp_directory_path() /
            ("nibble_train_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string str() const { return path_.string(); }
  std::string sub(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

}  // namespace nibble::testing
