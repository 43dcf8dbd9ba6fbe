// The training engine: AdamW against a float64 hand computation, gradient clipping, the
// learning-rate schedule, skipped non-finite steps, the training loop's metrics, bit-identical
// resume (N steps straight = N/2 + checkpoint + fresh model + N/2), Ctrl-C, the run config
// and the SVG plot. The model is mostly the small fake of tests/common/fake_model.h; resume is
// also checked on a real tiny GPT at fp32 and int4.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/fake_model.h"
#include "common/random.h"
#include "nibble/error.h"
#include "train/commands.h"
#include "train/config.h"
#include "train/data.h"
#include "train/optim.h"
#include "train/plot.h"
#include "train/trainer.h"

using namespace nibble;
using namespace nibble::train;
using nibble::testing::FakeData;
using nibble::testing::FakeModel;
using nibble::testing::FakeModelConfig;
using nibble::testing::TempDir;

namespace {

nn::Param make_param(const std::string& name, Shape shape, bool decay, uint64_t seed) {
  nn::Param p;
  p.name = name;
  p.value = Tensor::empty(shape, DType::f32);
  p.grad = Tensor::zeros(shape, DType::f32);
  p.weight_decay = decay;
  const auto v = nibble::testing::randn(p.value.numel(), seed);
  std::copy(v.begin(), v.end(), p.value.data<float>());
  return p;
}

void fill_grad(nn::Param& p, uint64_t seed, float scale = 1.0f) {
  const auto g = nibble::testing::randn(p.grad.numel(), seed, scale);
  std::copy(g.begin(), g.end(), p.grad.data<float>());
}

std::vector<float> values(const nn::Param& p) {
  return std::vector<float>(p.value.data<float>(), p.value.data<float>() + p.value.numel());
}

// Bit-for-bit equality of two float buffers (NaN payloads included).
bool same_bits(const float* a, const float* b, int64_t n) {
  return std::memcmp(a, b, static_cast<size_t>(n) * sizeof(float)) == 0;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

// ---- AdamW --------------------------------------------------------------------------------

TEST(OptimAdamW, MatchesHandComputedFloat64Steps) {
  nn::Param w = make_param("w", {3, 5}, true, 11), b = make_param("b", {4}, false, 12);
  AdamWOptions opt;
  opt.beta1 = 0.9;
  opt.beta2 = 0.95;
  opt.eps = 1e-8;
  opt.weight_decay = 0.1;
  opt.grad_clip = 0;  // clipping is tested on its own
  AdamW adam({&w, &b}, opt);

  struct Ref {
    std::vector<double> w, m, v;
  };
  std::vector<Ref> ref;
  for (nn::Param* p : {&w, &b}) {
    Ref r;
    for (float x : values(*p)) r.w.push_back(x);
    r.m.assign(r.w.size(), 0.0);
    r.v.assign(r.w.size(), 0.0);
    ref.push_back(r);
  }
  const double lrs[] = {1e-2, 3e-3, 5e-2};
  for (int t = 1; t <= 3; ++t) {
    fill_grad(w, 100 + t);
    fill_grad(b, 200 + t, 0.5f);
    const StepStats st = adam.step(lrs[t - 1]);
    ASSERT_FALSE(st.skipped);
    EXPECT_EQ(adam.updates(), t);
    int k = 0;
    for (nn::Param* p : {&w, &b}) {
      Ref& r = ref[k++];
      const double wd = p->weight_decay ? 0.1 : 0.0;
      for (size_t i = 0; i < r.w.size(); ++i) {
        const double g = p->grad.data<float>()[i];
        r.m[i] = 0.9 * r.m[i] + 0.1 * g;
        r.v[i] = 0.95 * r.v[i] + 0.05 * g * g;
        const double u = (r.m[i] / (1 - std::pow(0.9, t))) / (std::sqrt(r.v[i] / (1 - std::pow(0.95, t))) + 1e-8);
        r.w[i] -= lrs[t - 1] * (wd * r.w[i] + u);
        // Bound: each step does ~10 fp32 operations, each off by at most 2^-24 relative; over t
        // steps the weight carries t·(2^-22·|w|) from its own updates plus lr·|u|·2^-20.
        // |u| <= 1/sqrt(1-β2)·(1-β1)/(1-β1^t)... <= 5 here, so 5·lr·2^-20 bounds the second term.
        const double tol = t * (std::ldexp(std::abs(r.w[i]), -22) + 5 * lrs[t - 1] * std::ldexp(1.0, -20));
        EXPECT_NEAR(p->value.data<float>()[i], r.w[i], tol) << p->name << "[" << i << "] step " << t;
      }
    }
  }
  // The moments the checkpoint stores are the optimizer's live state.
  const auto state = adam.state_tensors();
  ASSERT_EQ(state.size(), 4u);
  EXPECT_EQ(state[0].name, "w.adam_m");
  EXPECT_EQ(state[3].name, "b.adam_v");
  for (size_t i = 0; i < ref[1].v.size(); ++i)
    EXPECT_NEAR(state[3].tensor.data<float>()[i], ref[1].v[i], std::ldexp(ref[1].v[i], -20) + 1e-30);
}

TEST(OptimAdamW, WeightDecayOnlyWhereTheParameterAsksForIt) {
  // Zero gradients: the Adam term is 0/(0+eps) = 0, so only the decay moves the weights.
  nn::Param w = make_param("w", {8}, true, 21), b = make_param("b", {8}, false, 22);
  const auto w0 = values(w), b0 = values(b);
  AdamWOptions opt;
  opt.weight_decay = 0.5;
  AdamW adam({&w, &b}, opt);
  adam.step(0.1);
  for (size_t i = 0; i < w0.size(); ++i) {
    // w - lr·wd·w in fp32: within 2 ulp of the exact w·(1 - 0.05).
    EXPECT_NEAR(w.value.data<float>()[i], w0[i] * 0.95, std::ldexp(std::abs(w0[i]), -22));
    EXPECT_EQ(b.value.data<float>()[i], b0[i]);
  }
}

TEST(OptimAdamW, NonFiniteGradientSkipsTheStepAndTouchesNothing) {
  for (float bad : {std::nanf(""), INFINITY, -INFINITY}) {
    nn::Param w = make_param("w", {16, 16}, true, 31), b = make_param("b", {16}, false, 32);
    AdamW adam({&w, &b}, AdamWOptions{});
    fill_grad(w, 33);
    fill_grad(b, 34);
    adam.step(1e-2);  // non-zero moments, so "untouched" means something
    const auto w1 = values(w), b1 = values(b);
    const auto st1 = adam.state_tensors();
    std::vector<std::vector<float>> m1;
    for (const auto& t : st1) m1.emplace_back(t.tensor.data<float>(), t.tensor.data<float>() + t.tensor.numel());

    fill_grad(w, 35);
    fill_grad(b, 36);
    b.grad.data<float>()[7] = bad;
    const StepStats st = adam.step(1e-2);
    EXPECT_TRUE(st.skipped);
    EXPECT_FALSE(std::isfinite(st.grad_norm));
    EXPECT_EQ(adam.updates(), 1);
    EXPECT_TRUE(same_bits(w.value.data<float>(), w1.data(), w.value.numel()));
    EXPECT_TRUE(same_bits(b.value.data<float>(), b1.data(), b.value.numel()));
    const auto st2 = adam.state_tensors();
    for (size_t k = 0; k < st2.size(); ++k)
      EXPECT_TRUE(same_bits(st2[k].tensor.data<float>(), m1[k].data(), st2[k].tensor.numel())) << st2[k].name;
  }
}

TEST(OptimAdamW, RejectsImpossibleOptions) {
  nn::Param w = make_param("w", {4}, true, 41);
  AdamWOptions o;
  o.beta1 = 1.0;
  EXPECT_NE(error_of([&] { AdamW({&w}, o); }).find("beta1"), std::string::npos);
  o = {};
  o.eps = 0;
  EXPECT_NE(error_of([&] { AdamW({&w}, o); }).find("eps"), std::string::npos);
  o = {};
  o.grad_clip = -1;
  EXPECT_NE(error_of([&] { AdamW({&w}, o); }).find("clip"), std::string::npos);
}

// ---- clipping -----------------------------------------------------------------------------

TEST(OptimClip, ScalesTheGlobalNormDownToTheLimit) {
  nn::Param w = make_param("w", {10, 10}, true, 51), b = make_param("b", {10}, false, 52);
  fill_grad(w, 53, 3.0f);
  fill_grad(b, 54, 3.0f);
  double sq = 0;
  for (nn::Param* p : {&w, &b})
    for (int64_t i = 0; i < p->grad.numel(); ++i) sq += double(p->grad.data<float>()[i]) * p->grad.data<float>()[i];
  const double norm = std::sqrt(sq);
  // Global norm in fp64: exact up to fp64 rounding of ~100 terms.
  EXPECT_NEAR(global_grad_norm({&w, &b}), norm, norm * 1e-13);

  // Clipped run: limit = norm/4.
  nn::Param w2 = w, b2 = b;  // shares storage: copy the values explicitly below
  w2.value = Tensor::empty(w.value.shape(), DType::f32);
  w2.grad = Tensor::empty(w.grad.shape(), DType::f32);
  b2.value = Tensor::empty(b.value.shape(), DType::f32);
  b2.grad = Tensor::empty(b.grad.shape(), DType::f32);
  AdamWOptions clipped;
  clipped.grad_clip = norm / 4;
  AdamWOptions unclipped;
  unclipped.grad_clip = 0;
  const float scale = static_cast<float>(clipped.grad_clip / norm);
  for (auto [src, dst] : {std::pair{&w, &w2}, std::pair{&b, &b2}}) {
    std::copy_n(src->value.data<float>(), src->value.numel(), dst->value.data<float>());
    // The reference run gets gradients scaled by hand, the same fp32 product the clip makes.
    for (int64_t i = 0; i < src->grad.numel(); ++i) dst->grad.data<float>()[i] = scale * src->grad.data<float>()[i];
  }
  AdamW a({&w, &b}, clipped), ref({&w2, &b2}, unclipped);
  const StepStats st = a.step(1e-2);
  ref.step(1e-2);
  EXPECT_DOUBLE_EQ(st.grad_scale, clipped.grad_clip / norm);
  EXPECT_NEAR(st.grad_norm, norm, norm * 1e-13);
  EXPECT_TRUE(same_bits(w.value.data<float>(), w2.value.data<float>(), w.value.numel()));
  EXPECT_TRUE(same_bits(b.value.data<float>(), b2.value.data<float>(), b.value.numel()));
  const auto sa = a.state_tensors(), sr = ref.state_tensors();
  for (size_t k = 0; k < sa.size(); ++k)
    EXPECT_TRUE(same_bits(sa[k].tensor.data<float>(), sr[k].tensor.data<float>(), sa[k].tensor.numel())) << sa[k].name;
}

TEST(OptimClip, LeavesGradientsBelowTheLimitAlone) {
  nn::Param w = make_param("w", {6}, true, 61);
  fill_grad(w, 62, 0.01f);
  AdamWOptions o;
  o.grad_clip = 1.0;
  AdamW a({&w}, o);
  const StepStats st = a.step(1e-3);
  EXPECT_LT(st.grad_norm, 1.0);
  EXPECT_EQ(st.grad_scale, 1.0);
}

// ---- schedule -----------------------------------------------------------------------------

TEST(OptimSchedule, LinearWarmupThenCosineToTheFloor) {
  LrSchedule s{1e-3, 1e-4, 10, 110};
  EXPECT_DOUBLE_EQ(s.at(0), 1e-4);    // 1e-3 · 1/10
  EXPECT_DOUBLE_EQ(s.at(4), 5e-4);    // 1e-3 · 5/10
  EXPECT_DOUBLE_EQ(s.at(9), 1e-3);    // end of warm-up
  EXPECT_DOUBLE_EQ(s.at(10), 1e-3);   // cosine at p = 0
  EXPECT_DOUBLE_EQ(s.at(60), 5.5e-4); // p = 1/2: halfway between max and min
  EXPECT_NEAR(s.at(35), 1e-4 + 9e-4 * 0.5 * (1 + std::cos(M_PI * 0.25)), 1e-18);
  EXPECT_DOUBLE_EQ(s.at(110), 1e-4);  // p = 1
  EXPECT_DOUBLE_EQ(s.at(500), 1e-4);  // past the end: stays at the floor
  for (int64_t k = 10; k < 110; ++k) EXPECT_GT(s.at(k), s.at(k + 1)) << k;
  LrSchedule no_warmup{2e-3, 0, 0, 4};
  EXPECT_DOUBLE_EQ(no_warmup.at(0), 2e-3);
  EXPECT_DOUBLE_EQ(no_warmup.at(2), 1e-3);
  EXPECT_NE(error_of([] { validate(LrSchedule{1e-3, 1e-2, 0, 10}); }).find("minimum learning rate"), std::string::npos);
  EXPECT_NE(error_of([] { validate(LrSchedule{1e-3, 0, 20, 10}); }).find("warm-up"), std::string::npos);
}

// ---- the training loop --------------------------------------------------------------------

namespace {

constexpr int64_t kIn = 8, kClasses = 4, kBatch = 16;

TrainerOptions fake_options(const std::string& out, int64_t steps, int64_t total) {
  TrainerOptions o;
  o.steps = steps;
  o.eval_every = 5;
  o.seed = 3;
  o.schedule = LrSchedule{0.05, 0.005, 3, total};
  o.adamw.weight_decay = 0.01;
  o.out_dir = out;
  o.run_json = "{\"what\": \"fake\"}";
  return o;
}

std::vector<nlohmann::json> read_metrics(const std::string& dir) {
  std::ifstream in(dir + "/metrics.jsonl");
  std::vector<nlohmann::json> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(nlohmann::json::parse(line));  // throws if malformed
  return lines;
}

}  // namespace

TEST(TrainerLoop, LearnsAndWritesOneParsableMetricsLinePerStep) {
  TempDir dir;
  FakeModel model(FakeModelConfig{});
  FakeData data(kIn, kClasses, kBatch, 3);
  Trainer trainer(model, data, fake_options(dir.str(), 30, 30));
  const EvalResult before = trainer.evaluate();
  const TrainSummary s = trainer.run();
  EXPECT_EQ(s.step, 30);
  EXPECT_EQ(s.skipped, 0);
  EXPECT_FALSE(s.interrupted);
  EXPECT_LT(s.val.loss, 0.7 * before.loss);  // softmax regression on separable data learns fast
  EXPECT_GT(s.items_per_s, 0);

  const auto lines = read_metrics(dir.str());
  ASSERT_EQ(lines.size(), 30u);
  for (size_t i = 0; i < lines.size(); ++i) {
    const auto& j = lines[i];
    EXPECT_EQ(j.at("step").get<int64_t>(), static_cast<int64_t>(i + 1));
    for (const char* k : {"loss", "lr", "grad_norm", "images_per_s"}) EXPECT_TRUE(j.at(k).is_number()) << k;
    EXPECT_FALSE(j.at("skipped").get<bool>());
    EXPECT_EQ(j.contains("val_loss"), (i + 1) % 5 == 0) << i;
  }
  EXPECT_DOUBLE_EQ(lines[0].at("lr").get<double>(), 0.05 / 3);
  EXPECT_DOUBLE_EQ(lines.back().at("val_loss").get<double>(), s.val.loss);
  EXPECT_DOUBLE_EQ(lines.back().at("val_acc").get<double>(), s.val.accuracy);
  // The end of the run left a checkpoint.
  const Checkpoint ck = read_checkpoint(dir.str());
  EXPECT_EQ(ck.meta.step, 30);
  EXPECT_EQ(ck.meta.run, "{\"what\":\"fake\"}");
}

TEST(TrainerLoop, NonFiniteLossOrGradientSkipsTheStepAndIsReported) {
  for (const int where : {0, 1, 2}) {  // the loss, a gradient, an op inside the model
    TempDir dir;
    FakeModel model(FakeModelConfig{});
    (where == 0 ? model.nan_loss_step : where == 1 ? model.nan_grad_step : model.non_finite_op_step) = 4;  // 5th step
    FakeData data(kIn, kClasses, kBatch, 3);
    std::ostringstream log;
    TrainerOptions o = fake_options(dir.str(), 8, 8);
    o.log = &log;
    Trainer trainer(model, data, o);
    for (int k = 0; k < 4; ++k) trainer.train_step();
    const auto w = values(*model.parameters()[0]), b = values(*model.parameters()[1]);
    const int64_t updates = trainer.optimizer().updates();
    const StepRecord rec = trainer.train_step();
    EXPECT_TRUE(rec.stats.skipped);
    EXPECT_EQ(rec.skip_reason.substr(0, 5), where == 0 ? "loss" : where == 1 ? "gradi" : "value");
    EXPECT_EQ(trainer.skipped(), 1);
    EXPECT_EQ(trainer.optimizer().updates(), updates);
    EXPECT_TRUE(same_bits(model.parameters()[0]->value.data<float>(), w.data(), static_cast<int64_t>(w.size())));
    EXPECT_TRUE(same_bits(model.parameters()[1]->value.data<float>(), b.data(), static_cast<int64_t>(b.size())));

    // Through run(): the loop reports it in a warning line and in metrics.jsonl, and goes on.
    TempDir dir2;
    FakeModel model2(FakeModelConfig{});
    (where == 0 ? model2.nan_loss_step : where == 1 ? model2.nan_grad_step : model2.non_finite_op_step) = 4;
    o.out_dir = dir2.str();
    Trainer t2(model2, data, o);
    const TrainSummary s = t2.run();
    EXPECT_EQ(s.skipped, 1);
    EXPECT_NE(log.str().find("warning: step 5 skipped: non-finite"), std::string::npos) << log.str();
    const auto lines = read_metrics(dir2.str());
    ASSERT_EQ(lines.size(), 8u);
    EXPECT_TRUE(lines[4].at("skipped").get<bool>());
    EXPECT_EQ(lines[7].at("skipped_total").get<int64_t>(), 1);
    for (nn::Param* p : model2.parameters())
      for (int64_t i = 0; i < p->value.numel(); ++i) ASSERT_TRUE(std::isfinite(p->value.data<float>()[i]));
  }
}

// ---- resume -------------------------------------------------------------------------------

namespace {

void expect_same_state(nn::Model& a, Trainer& ta, nn::Model& b, Trainer& tb) {
  auto pa = a.parameters(), pb = b.parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_TRUE(same_bits(pa[i]->value.data<float>(), pb[i]->value.data<float>(), pa[i]->value.numel()))
        << pa[i]->name;
  const auto sa = ta.optimizer().state_tensors(), sb = tb.optimizer().state_tensors();
  for (size_t i = 0; i < sa.size(); ++i)
    EXPECT_TRUE(same_bits(sa[i].tensor.data<float>(), sb[i].tensor.data<float>(), sa[i].tensor.numel()))
        << sa[i].name;
  EXPECT_EQ(ta.optimizer().updates(), tb.optimizer().updates());
  EXPECT_EQ(ta.step(), tb.step());
  EXPECT_EQ(ta.skipped(), tb.skipped());
}

}  // namespace

TEST(TrainerResume, HalfPlusCheckpointPlusHalfIsBitIdenticalToAStraightRun) {
  constexpr int64_t N = 20;
  TempDir straight_dir, split_dir;
  FakeModel straight(FakeModelConfig{});
  straight.nan_loss_step = 3;  // a skipped step before the checkpoint: its count must persist
  FakeData data(kIn, kClasses, kBatch, 3);
  Trainer ts(straight, data, fake_options(straight_dir.str(), N, N));
  ts.run();

  {
    FakeModel first(FakeModelConfig{});
    first.nan_loss_step = 3;
    Trainer t1(first, data, fake_options(split_dir.str(), N / 2, N));  // stops halfway
    EXPECT_EQ(t1.run().step, N / 2);
  }
  // A fresh model with different initial weights: everything must come from the checkpoint.
  FakeModelConfig other;
  other.init_seed = 77;
  FakeModel second(other);
  Trainer t2(second, data, fake_options(split_dir.str(), N, N));
  t2.resume(read_checkpoint(split_dir.str()));
  EXPECT_EQ(t2.step(), N / 2);
  t2.run();
  expect_same_state(straight, ts, second, t2);
  // metrics.jsonl of the split run reads like the straight run's: steps 1..N once each.
  const auto lines = read_metrics(split_dir.str());
  ASSERT_EQ(lines.size(), static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) EXPECT_EQ(lines[i].at("step").get<int64_t>(), i + 1);
}

TEST(TrainerResume, InterruptFinishesTheStepSavesAndResumesBitIdentically) {
  constexpr int64_t N = 16;
  TempDir straight_dir, dir;
  FakeData data(kIn, kClasses, kBatch, 3);
  FakeModel straight(FakeModelConfig{});
  Trainer ts(straight, data, fake_options(straight_dir.str(), N, N));
  ts.run();

  std::ostringstream log;
  {
    FakeModel m(FakeModelConfig{});
    m.sigint_step = 6;  // SIGINT arrives in the middle of the seventh step
    TrainerOptions o = fake_options(dir.str(), N, N);
    o.log = &log;
    Trainer t(m, data, o);
    const TrainSummary s = t.run();
    EXPECT_TRUE(s.interrupted);
    EXPECT_EQ(s.step, 7);  // the step in flight was finished
    EXPECT_FALSE(interrupt_requested()) << "the guard's flag must not leak into later runs";
  }
  EXPECT_NE(log.str().find("interrupted after step 7; checkpoint saved"), std::string::npos) << log.str();
  EXPECT_EQ(read_checkpoint(dir.str()).meta.step, 7);
  FakeModel resumed(FakeModelConfig{});
  Trainer t(resumed, data, fake_options(dir.str(), N, N));
  t.resume(read_checkpoint(dir.str()));
  t.run();
  expect_same_state(straight, ts, resumed, t);
}

TEST(TrainerResume, SecondInterruptEndsTheProcessAtOnce) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        SignalGuard guard;
        std::raise(SIGINT);
        std::raise(SIGINT);
      },
      ::testing::ExitedWithCode(130), "second interrupt");
}

TEST(TrainerResume, CheckpointWithAnotherSeedIsRefused) {
  TempDir dir;
  FakeData data(kIn, kClasses, kBatch, 3);
  FakeModel m(FakeModelConfig{});
  Trainer t(m, data, fake_options(dir.str(), 4, 4));
  t.run();
  FakeModel m2(FakeModelConfig{});
  TrainerOptions o = fake_options(dir.str(), 4, 4);
  o.seed = 4;
  Trainer t2(m2, data, o);
  const std::string msg = error_of([&] { t2.resume(read_checkpoint(dir.str())); });
  EXPECT_NE(msg.find("seed 3"), std::string::npos) << msg;
  EXPECT_EQ(t2.step(), 0);
}

namespace {

// A tiny GPT's data: a synthetic text of words drawn from Philox, char-tokenized.
class TextBatches final : public DataSource {
 public:
  TextBatches(const TextDataset& ds, int64_t batch, int64_t seq, uint64_t seed)
      : ds_(ds), batch_(batch), seq_(seq), seed_(seed), val_(ds.valid_batches(batch, seq, 2 * batch)) {}
  nn::Batch train_batch(int64_t step) override {
    return ds_.train_batch(batch_, seq_, seed_, static_cast<uint32_t>(step));
  }
  const std::vector<nn::Batch>& val_batches() override { return val_; }
  int64_t items_per_batch() const override { return batch_ * seq_; }
  std::string unit() const override { return "tok"; }

 private:
  const TextDataset& ds_;
  int64_t batch_, seq_;
  uint64_t seed_;
  std::vector<nn::Batch> val_;
};

std::string synthetic_text() {
  const char* words[] = {"the ", "king ", "and ", "his ", "sons ", "went ", "unto ", "moab. ", "she ", "said "};
  std::string text;
  for (uint64_t i = 0; i < 1500; ++i) text += words[philox_u32(PhiloxKey{42, 0, 0, RngRole::data}, i) % 10];
  return text;
}

}  // namespace

TEST(TrainerResume, TinyGptAtFp32AndInt4ResumesBitIdentically) {
  const std::string text = synthetic_text();
  const CharTokenizer tok = CharTokenizer::from_text(text);
  const TextDataset ds = TextDataset::from_text(text, tok, 0.1);
  nn::GptConfig g;
  g.vocab = tok.vocab_size();
  g.context = 16;
  g.d_model = 32;
  g.n_layers = 1;
  g.n_heads = 2;
  constexpr int64_t N = 6;
  for (const nn::Precision prec : {nn::Precision::fp32, nn::Precision::int4}) {
    SCOPED_TRACE(nn::precision_name(prec));
    nn::PrecisionPlan plan = nn::PrecisionPlan::uniform(prec);
    plan.quant.lsq_cold_start_steps = 4;  // the LSQ steps start learning after the resume point
    auto options = [&](const std::string& dir, int64_t steps) {
      TrainerOptions o;
      o.steps = steps;
      o.eval_every = 3;
      o.seed = 9;
      o.schedule = LrSchedule{3e-3, 3e-4, 2, N};
      o.out_dir = dir;
      return o;
    };
    TempDir straight_dir, dir;
    TextBatches data(ds, 4, g.context, 9);
    auto straight = nn::make_gpt(g, plan, 9);
    Trainer ts(*straight, data, options(straight_dir.str(), N));
    ts.run();
    {
      auto first = nn::make_gpt(g, plan, 9);
      Trainer t1(*first, data, options(dir.str(), N / 2));
      t1.run();
    }
    auto second = nn::make_gpt(g, plan, 9);
    for (nn::Param* p : second->parameters())  // scribble: the values must come from the checkpoint
      std::fill_n(p->value.data<float>(), p->value.numel(), 0.25f);
    Trainer t2(*second, data, options(dir.str(), N));
    t2.resume(read_checkpoint(dir.str()));
    t2.run();
    expect_same_state(*straight, ts, *second, t2);
    EXPECT_EQ(straight->extra_state(), second->extra_state());
  }
}

TEST(TrainerResume, GptCheckpointRefusesAnotherWidthNamingTheField) {
  const std::string text = synthetic_text();
  const CharTokenizer tok = CharTokenizer::from_text(text);
  const TextDataset ds = TextDataset::from_text(text, tok, 0.1);
  nn::GptConfig g;
  g.vocab = tok.vocab_size();
  g.context = 16;
  g.d_model = 32;
  g.n_layers = 1;
  g.n_heads = 2;
  TempDir dir;
  TextBatches data(ds, 2, g.context, 1);
  TrainerOptions o;
  o.steps = 1;
  o.schedule = LrSchedule{1e-3, 1e-4, 0, 1};
  o.out_dir = dir.str();
  auto m = nn::make_gpt(g, nn::PrecisionPlan::uniform(nn::Precision::fp32), 1);
  Trainer(*m, data, o).run();
  g.d_model = 48;
  auto wider = nn::make_gpt(g, nn::PrecisionPlan::uniform(nn::Precision::fp32), 1);
  Trainer t(*wider, data, o);
  const std::string msg = error_of([&] { t.resume(read_checkpoint(dir.str())); });
  EXPECT_NE(msg.find("d_model: 32 vs 48"), std::string::npos) << msg;
  g.d_model = 32;  // the same shape at another precision
  auto int4 = nn::make_gpt(g, nn::PrecisionPlan::uniform(nn::Precision::int4), 1);
  Trainer t4(*int4, data, o);
  const std::string msg4 = error_of([&] { t4.resume(read_checkpoint(dir.str())); });
  EXPECT_NE(msg4.find("different model config"), std::string::npos) << msg4;
}

// ---- sampling -----------------------------------------------------------------------------

TEST(TrainerSample, TemperatureZeroAndTopOneAreTheArgmax) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 1.9f};
  for (double u : {0.0, 0.3, 0.999}) {
    EXPECT_EQ(sample_token(logits, 0.0, 0, u), 1);
    EXPECT_EQ(sample_token(logits, 1.0, 1, u), 1);
  }
}

TEST(TrainerSample, InverseCdfReproducesTheSoftmaxProbabilities) {
  // u on an even grid of 20000 points: each token's count / 20000 equals its probability to
  // within 1/20000 (the grid step), so a 2/20000 bound leaves room only for rounding.
  const std::vector<float> logits = {1.0f, 0.0f, 2.5f, -0.5f, 1.5f};
  for (const double temperature : {1.0, 0.5}) {
    for (const int64_t top_k : {int64_t{0}, int64_t{3}}) {
      std::vector<double> p(logits.size(), 0.0);
      std::vector<size_t> order = {2, 4, 0, 1, 3};  // logits by size
      const size_t k = top_k ? static_cast<size_t>(top_k) : logits.size();
      double z = 0;
      for (size_t i = 0; i < k; ++i) z += p[order[i]] = std::exp(logits[order[i]] / temperature);
      for (double& x : p) x /= z;
      constexpr int kGrid = 20000;
      std::vector<int> count(logits.size(), 0);
      for (int i = 0; i < kGrid; ++i) ++count[sample_token(logits, temperature, top_k, (i + 0.5) / kGrid)];
      for (size_t t = 0; t < p.size(); ++t)
        EXPECT_NEAR(count[t] / double(kGrid), p[t], 2.0 / kGrid) << "token " << t << " T " << temperature << " k " << top_k;
    }
  }
}

// ---- run configuration --------------------------------------------------------------------

TEST(TrainerConfig, JsonRoundTripKeepsEveryField) {
  TrainConfig c;
  c.model = "vit";
  c.layers = 3;
  c.d_model = 96;
  c.heads = 3;
  c.precision = "int4";
  c.roles = {{"qkv", "int8"}, {"head", "fp32"}};
  c.lss_sampling = true;
  c.hadamard_block = 32;
  c.steps = 77;
  c.lr = 3e-4;
  c.seed = 12345678901ull;
  c.data = "some/dir";
  const std::string text = config_to_json(c);
  const TrainConfig back = config_from_json(text, "test");
  EXPECT_EQ(config_to_json(back), text);
  // Keys may be written with '-' as on the command line.
  EXPECT_EQ(config_from_json("{\"d-model\": 32, \"eval-every\": 7}", "test").eval_every, 7);
}

TEST(TrainerConfig, UnknownKeysAndWrongTypesAreNamed) {
  std::string msg = error_of([] { config_from_json("{\"steps\": 5, \"stpes\": 3, \"lrr\": 1}", "cfg.json"); });
  EXPECT_NE(msg.find("cfg.json: unknown config keys 'stpes', 'lrr'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("known keys: model"), std::string::npos) << msg;
  msg = error_of([] { config_from_json("{\"steps\": \"ten\"}", "cfg.json"); });
  EXPECT_NE(msg.find("'steps' is a string"), std::string::npos) << msg;
  msg = error_of([] { config_from_json("{\"lss_sampling\": 1}", "cfg.json"); });
  EXPECT_NE(msg.find("true or false"), std::string::npos) << msg;
  msg = error_of([] { config_from_json("[1, 2]", "cfg.json"); });
  EXPECT_NE(msg.find("one JSON object"), std::string::npos) << msg;
  msg = error_of([] { config_from_json("{\"steps\": 5,", "cfg.json"); });
  EXPECT_NE(msg.find("not valid JSON"), std::string::npos) << msg;
}

TEST(TrainerConfig, ImpossibleSettingsAreRejectedBeforeAnyWork) {
  auto msg_for = [](auto edit) {
    TrainConfig c;
    edit(c);
    return error_of([&] { validate(c); });
  };
  EXPECT_EQ(msg_for([](TrainConfig&) {}), "(no error)");
  EXPECT_NE(msg_for([](TrainConfig& c) { c.d_model = 100, c.heads = 3; }).find("not divisible by heads"), std::string::npos);
  EXPECT_NE(msg_for([](TrainConfig& c) { c.hadamard_block = 48; }).find("power of two"), std::string::npos);
  EXPECT_NE(msg_for([](TrainConfig& c) { c.precision = "int3"; }).find("int3"), std::string::npos);
  EXPECT_NE(msg_for([](TrainConfig& c) { c.roles["mlp"] = "int4"; }).find("'mlp'"), std::string::npos);
  EXPECT_NE(msg_for([](TrainConfig& c) { c.warmup = 2000; }).find("warmup"), std::string::npos);
  EXPECT_NE(msg_for([](TrainConfig& c) { c.tokenizer = "gpt2"; }).find("--bpe-dir"), std::string::npos);
  EXPECT_NE(msg_for([](TrainConfig& c) { c.roles["head"] = "int4"; }).find("tied to the token embedding"), std::string::npos);
}

TEST(TrainerConfig, ResumeRefusesAChangedModelButAllowsMoreSteps) {
  TrainConfig ck, given;
  given.heads = 8;
  given.steps = 5000;
  check_resume_compatible(ck, given, {"steps"}, "ckpt");  // more steps: fine
  const std::string msg = error_of([&] { check_resume_compatible(ck, given, {"steps", "heads"}, "ckpt"); });
  EXPECT_NE(msg.find("heads = 8 differs from the checkpoint's heads = 4"), std::string::npos) << msg;
}

// ---- the SVG picture ----------------------------------------------------------------------

namespace {

// A minimal XML check: every tag closes in order, the root is <svg>. Returns the element names
// in document order, or throws on a mismatch.
std::vector<std::string> xml_elements(const std::string& s) {
  std::vector<std::string> stack, names;
  size_t i = 0;
  while ((i = s.find('<', i)) != std::string::npos) {
    const size_t j = s.find('>', i);
    if (j == std::string::npos) throw std::runtime_error("unclosed tag at " + std::to_string(i));
    std::string tag = s.substr(i + 1, j - i - 1);
    i = j + 1;
    if (tag[0] == '/') {
      if (stack.empty() || stack.back() != tag.substr(1)) throw std::runtime_error("mismatched </" + tag + ">");
      stack.pop_back();
      continue;
    }
    const bool self_closing = tag.back() == '/';
    const std::string name = tag.substr(0, tag.find_first_of(" /"));
    if (names.empty() && name != "svg") throw std::runtime_error("root is <" + name + ">");
    if (!names.empty() && stack.empty()) throw std::runtime_error("content after the root");
    names.push_back(name);
    if (!self_closing) stack.push_back(name);
  }
  if (!stack.empty()) throw std::runtime_error("<" + stack.back() + "> is never closed");
  return names;
}

}  // namespace

TEST(TrainerPlot, SvgIsWellFormedWithOnePolylinePerSeries) {
  PlotSpec spec;
  spec.title = "loss <fp32 & int4>";
  spec.x_label = "step";
  spec.y_label = "loss";
  for (int k = 0; k < 4; ++k) {
    PlotSeries s;
    s.label = k % 2 ? "val" : "train";
    s.color = series_color(static_cast<size_t>(k / 2));
    s.dashed = k % 2;
    for (int i = 0; i <= 50; ++i) {
      s.x.push_back(i * 10);
      s.y.push_back(4.0 * std::exp(-i / 20.0) + 0.1 * k);
    }
    if (k == 3) s.y[7] = std::nan("");  // left out, not printed as "nan"
    spec.series.push_back(s);
  }
  const std::string svg = render_svg(spec);
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_EQ(svg.substr(svg.size() - 7), "</svg>\n");
  std::vector<std::string> names;
  ASSERT_NO_THROW(names = xml_elements(svg));
  EXPECT_EQ(std::count(names.begin(), names.end(), "polyline"), 4);
  EXPECT_GE(std::count(names.begin(), names.end(), "text"), 2 + 4 + 4);  // axis labels, ticks, legend
  EXPECT_NE(svg.find("loss &lt;fp32 &amp; int4&gt;"), std::string::npos);
  EXPECT_EQ(svg.find("nan"), std::string::npos);

  PlotSpec empty;
  EXPECT_NE(error_of([&] { render_svg(empty); }).find("nothing to plot"), std::string::npos);
}

TEST(TrainerPlot, TicksAreRoundNumbersCoveringTheRange) {
  EXPECT_EQ(nice_ticks(0, 500, 5), (std::vector<double>{0, 100, 200, 300, 400, 500}));
  const auto t = nice_ticks(1.37, 4.21, 6);
  ASSERT_FALSE(t.empty());
  EXPECT_NEAR(t.front(), 1.5, 1e-12);
  EXPECT_NEAR(t[1] - t[0], 0.5, 1e-12);
  EXPECT_LE(t.back(), 4.21);
}
