#include "train/commands.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "nibble/error.h"
#include "nibble/parallel.h"
#include "nibble/rng.h"
#include "nibble/safetensors.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/plot.h"
#include "train/progress.h"
#include "train/tokenizer.h"
#include "train/trainer.h"

namespace nibble::train {

namespace {

using json = nlohmann::ordered_json;
namespace fs = std::filesystem;

constexpr double kValidFraction = 0.1;  // the last 10% of a text is its validation split
constexpr int kExitInterrupted = 130;   // 128 + SIGINT, as a shell reports Ctrl-C

// ---- data sources ---------------------------------------------------------------------

class TextSource final : public DataSource {
 public:
  TextSource(TextDataset ds, int64_t batch, int64_t seq, uint64_t seed, int64_t eval_batches)
      : ds_(std::move(ds)), batch_(batch), seq_(seq), seed_(seed), eval_batches_(eval_batches) {}
  nn::Batch train_batch(int64_t step) override {
    return ds_.train_batch(batch_, seq_, seed_, static_cast<uint32_t>(step));
  }
  const std::vector<nn::Batch>& val_batches() override {
    if (val_.empty()) val_ = ds_.valid_batches(batch_, seq_, eval_batches_ > 0 ? eval_batches_ * batch_ : 0);
    return val_;
  }
  int64_t items_per_batch() const override { return batch_ * seq_; }
  std::string unit() const override { return "tok"; }
  const TextDataset& dataset() const { return ds_; }

 private:
  TextDataset ds_;
  int64_t batch_, seq_;
  uint64_t seed_;
  int64_t eval_batches_;
  std::vector<nn::Batch> val_;
};

class ImageSource final : public DataSource {
 public:
  ImageSource(ImageDataset train, ImageDataset test, int64_t batch, uint64_t seed, int64_t eval_batches)
      : train_(std::move(train)), test_(std::move(test)), batch_(batch), eval_batches_(eval_batches),
        shuffler_(train_.count(), batch, seed) {}
  nn::Batch train_batch(int64_t step) override {
    const std::vector<int64_t> idx = shuffler_.batch_indices(static_cast<uint64_t>(step));
    return train_.gather(idx);
  }
  const std::vector<nn::Batch>& val_batches() override {
    if (val_.empty()) {
      int64_t n = test_.eval_batch_count(batch_);
      if (eval_batches_ > 0) n = std::min(n, eval_batches_);
      for (int64_t i = 0; i < n; ++i) val_.push_back(test_.eval_batch(batch_, i));
    }
    return val_;
  }
  int64_t items_per_batch() const override { return batch_; }
  std::string unit() const override { return "img"; }

 private:
  ImageDataset train_, test_;
  int64_t batch_, eval_batches_;
  EpochShuffler shuffler_;
  std::vector<nn::Batch> val_;
};

// ---- a model with its data ------------------------------------------------------------

struct Session {
  TrainConfig cfg;
  std::unique_ptr<Tokenizer> tokenizer;  // GPT only
  std::unique_ptr<DataSource> data;
  std::unique_ptr<nn::Model> model;
  json data_spec;

  std::string run_json() const {
    json j;
    j["config"] = json::parse(config_to_json(cfg));
    json plan = json::object();
    const nn::PrecisionPlan p = precision_plan(cfg);
    for (int r = 0; r < nn::kNumLinearRoles; ++r)
      plan[nn::role_name(static_cast<nn::LinearRole>(r))] = nn::precision_name(p.role[static_cast<size_t>(r)]);
    j["precision_plan"] = plan;
    if (tokenizer) j["tokenizer"] = {{"kind", tokenizer->kind()}, {"state", tokenizer->state()}};
    j["data"] = data_spec;
    return j.dump();
  }
  int64_t parameter_count() const {
    int64_t n = 0;
    for (nn::Param* p : model->parameters()) n += p->value.numel();
    return n;
  }
};

std::string text_path(const TrainConfig& cfg) { return cfg.data.empty() ? default_corpus_path() : cfg.data; }

// Builds tokenizer, model and data for cfg. The model is made before the data is tokenized,
// so impossible sizes fail before the slow part. `tokenizer` (kind, state) comes from a
// checkpoint when resuming, so that ids mean what they meant in training.
Session open_session(const TrainConfig& cfg, const json* tokenizer) {
  Session s;
  s.cfg = cfg;
  const nn::PrecisionPlan plan = precision_plan(cfg);
  if (cfg.model == "gpt") {
    const std::string path = text_path(cfg);
    const std::string text = read_text_file(path);
    if (tokenizer != nullptr)
      s.tokenizer = make_tokenizer(tokenizer->at("kind").get<std::string>(), tokenizer->at("state").get<std::string>());
    else if (cfg.tokenizer == "char")
      s.tokenizer = std::make_unique<CharTokenizer>(CharTokenizer::from_text(text));
    else
      s.tokenizer = std::make_unique<Gpt2BpeTokenizer>(Gpt2BpeTokenizer::load(cfg.bpe_dir));
    s.model = nn::make_gpt(gpt_config(cfg, s.tokenizer->vocab_size()), plan, cfg.seed);
    TextDataset ds = TextDataset::from_text(text, *s.tokenizer, kValidFraction);
    NB_CHECK(static_cast<int64_t>(ds.train_tokens().size()) > cfg.context + 1,
             path << ": the training split has " << ds.train_tokens().size() << " tokens, fewer than one window of "
                  << cfg.context + 1 << "; use a longer text or a smaller --context");
    NB_CHECK(ds.valid_window_count(cfg.context) >= 1,
             path << ": the validation split (last " << kValidFraction * 100 << "%, " << ds.valid_tokens().size()
                  << " tokens) is shorter than one window of " << cfg.context + 1
                  << " tokens; use a longer text or a smaller --context");
    s.data_spec = {{"kind", "text"},
                   {"path", path},
                   {"bytes", text.size()},
                   {"valid_fraction", kValidFraction},
                   {"train_tokens", ds.train_tokens().size()},
                   {"valid_tokens", ds.valid_tokens().size()}};
    s.data = std::make_unique<TextSource>(std::move(ds), cfg.batch, cfg.context, cfg.seed, cfg.eval_batches);
  } else {
    NB_CHECK(!cfg.data.empty(), "--model vit needs --data DIR: a folder with MNIST or Fashion-MNIST's "
                                "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] "
                                "and t10k-labels-idx1-ubyte[.gz]");
    ImageDataset train = ImageDataset::load_mnist(cfg.data, "train");
    ImageDataset test = ImageDataset::load_mnist(cfg.data, "test");
    NB_CHECK(train.height() == train.width() && test.height() == train.height() && test.width() == train.width(),
             cfg.data << ": images are " << train.height() << "x" << train.width() << " (train) and " << test.height()
                      << "x" << test.width() << " (test); the ViT needs square images of one size");
    NB_CHECK(train.count() >= cfg.batch, cfg.data << ": " << train.count() << " training images are fewer than one batch of "
                                                  << cfg.batch << "; use a smaller --batch");
    const int64_t classes = std::max(train.classes(), test.classes());
    s.model = nn::make_vit(vit_config(cfg, train.height(), classes), plan, cfg.seed);
    s.data_spec = {{"kind", "idx-images"},   {"path", cfg.data},        {"train_images", train.count()},
                   {"test_images", test.count()}, {"image", train.height()}, {"classes", classes}};
    s.data = std::make_unique<ImageSource>(std::move(train), std::move(test), cfg.batch, cfg.seed, cfg.eval_batches);
  }
  return s;
}

TrainerOptions trainer_options(const Session& s, std::ostream& out, const std::string& label) {
  const TrainConfig& c = s.cfg;
  TrainerOptions o;
  o.steps = c.steps;
  o.eval_every = c.eval_every;
  o.save_every = c.save_every;
  o.log_every = c.log_every;
  o.seed = c.seed;
  o.schedule = LrSchedule{c.lr, c.lr * c.min_lr_fraction, c.warmup, c.steps};
  o.adamw.beta1 = c.beta1;
  o.adamw.beta2 = c.beta2;
  o.adamw.eps = c.eps;
  o.adamw.weight_decay = c.weight_decay;
  o.adamw.grad_clip = c.grad_clip;
  o.out_dir = c.out;
  o.run_json = s.run_json();
  o.log = &out;
  o.tty = &out == &std::cout && is_terminal(stdout);
  o.label = label;
  return o;
}

std::string plan_summary(const TrainConfig& c) {
  std::string s = c.precision;
  for (const auto& [role, p] : c.roles) s += ", " + role + " " + p;
  if (c.precision == "int4" || c.roles.size()) {
    s += c.hadamard_block > 0 ? ", Hadamard block " + std::to_string(c.hadamard_block) : "";
    s += c.lss_sampling ? ", LSS sampling" : "";
  }
  if (c.w4a4_asymmetric) s += ", asymmetric activations";
  return s;
}

void print_header(const Session& s, std::ostream& out) {
  const TrainConfig& c = s.cfg;
  out << "model: " << c.model << ", " << c.layers << " layers, d_model " << c.d_model << ", " << c.heads << " heads";
  if (c.model == "gpt") out << ", context " << c.context;
  else out << ", patch " << c.patch;
  out << " (" << s.parameter_count() << " parameters), precision " << plan_summary(c) << "\n";
  out << "data: " << s.data_spec.value("path", std::string()) << " (";
  if (c.model == "gpt")
    out << s.data_spec.at("train_tokens").get<int64_t>() << " training / " << s.data_spec.at("valid_tokens").get<int64_t>()
        << " validation tokens, " << s.tokenizer->kind() << " tokenizer with " << s.tokenizer->vocab_size() << " tokens)\n";
  else
    out << s.data_spec.at("train_images").get<int64_t>() << " training / " << s.data_spec.at("test_images").get<int64_t>()
        << " test images, " << s.data_spec.at("classes").get<int64_t>() << " classes)\n";
  out << "training: " << c.steps << " steps of batch " << c.batch << ", lr " << c.lr << " (warm-up " << c.warmup
      << ", cosine to " << c.lr * c.min_lr_fraction << "), seed " << c.seed << ", output " << c.out << "\n";
  out.flush();
}

json run_of(const Checkpoint& ck) {
  json run;
  try {
    run = json::parse(ck.meta.run);
  } catch (const json::parse_error& e) {
    NB_FAIL(ck.dir << ": the checkpoint's run description is not JSON (" << e.what() << ")");
  }
  NB_CHECK(run.is_object() && run.contains("config"),
           ck.dir << ": the checkpoint has no training config; it was not written by `nibble train`");
  return run;
}

TrainConfig config_of(const Checkpoint& ck) {
  return config_from_json(run_of(ck).at("config").dump(), ck.dir + "/" + kCheckpointMetaFile);
}

// A model restored from a checkpoint, with its data (for eval and sample).
Session open_checkpoint(const Checkpoint& ck, const TrainConfig& cfg) {
  const json run = run_of(ck);
  const json* tok = run.contains("tokenizer") ? &run.at("tokenizer") : nullptr;
  Session s = open_session(cfg, tok);
  check_same_model(ck, *s.model);
  load_parameters(ck, s.model->parameters());
  s.model->load_extra_state(ck.meta.extra_state);
  return s;
}

Checkpoint read_checkpoint_reporting(const std::string& dir, std::ostream& out) {
  std::string warnings;
  Checkpoint ck = read_checkpoint(dir, &warnings);
  if (!warnings.empty()) out << "warning: " << warnings;
  return ck;
}

void set_threads(const TrainConfig& c) {
  if (c.threads > 0) set_num_threads(static_cast<int>(c.threads));
}

std::string fmt(double v, int digits) {
  if (!std::isfinite(v)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string pad(std::string s, size_t w, bool right = false) {
  if (s.size() >= w) return s;
  return right ? std::string(w - s.size(), ' ') + s : s + std::string(w - s.size(), ' ');
}

struct Curve {
  std::vector<double> step, loss, val_step, val_loss;
};

Curve read_curve(const std::string& metrics_path) {
  Curve c;
  std::ifstream in(metrics_path);
  std::string line;
  while (std::getline(in, line)) {
    const json j = json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("step")) continue;
    const double step = j["step"].get<double>();
    if (j.contains("loss") && j["loss"].is_number()) {
      c.step.push_back(step);
      c.loss.push_back(j["loss"].get<double>());
    }
    if (j.contains("val_loss") && j["val_loss"].is_number()) {
      c.val_step.push_back(step);
      c.val_loss.push_back(j["val_loss"].get<double>());
    }
  }
  return c;
}

// Mean of the last `w` points at each point (the first w-1 use what there is).
std::vector<double> trailing_mean(const std::vector<double>& y, size_t w) {
  std::vector<double> out(y.size());
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    s += y[i];
    if (i >= w) s -= y[i - w];
    out[i] = s / static_cast<double>(std::min(i + 1, w));
  }
  return out;
}

// Ends `text` before a UTF-8 sequence that is not complete yet (while sampling, a character
// may be split across tokens).
size_t complete_utf8_prefix(const std::string& text) {
  size_t n = text.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const auto c = static_cast<unsigned char>(text[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
    return len > back ? n - back : n;
  }
  return n;
}

}  // namespace

// ---- train ----------------------------------------------------------------------------

int run_train(const TrainRequest& req, std::ostream& out) {
  TrainConfig cfg = req.config;
  std::optional<Checkpoint> ck;
  json ck_run;
  if (!req.resume.empty()) {
    ck = read_checkpoint_reporting(req.resume, out);
    ck_run = run_of(*ck);
    const TrainConfig ck_cfg = config_of(*ck);
    check_resume_compatible(ck_cfg, req.config, req.given, req.resume);
    std::set<std::string> changeable;
    for (const std::string& k : req.given)
      if (!is_identity_key(k)) changeable.insert(k);
    cfg = ck_cfg;
    copy_config_fields(cfg, req.config, changeable);
    if (!req.given.count("out")) cfg.out = req.resume;
  }
  validate(cfg);
  if (!ck) {
    const std::string existing = (fs::path(cfg.out) / kCheckpointWeightsFile).string();
    NB_CHECK(!fs::exists(existing), cfg.out << " already holds a checkpoint (" << existing
                                            << "); continue it with --resume " << cfg.out
                                            << ", or pick another --out (or delete the folder)");
  }
  set_threads(cfg);
  Session s = open_session(cfg, ck && ck_run.contains("tokenizer") ? &ck_run.at("tokenizer") : nullptr);
  Trainer trainer(*s.model, *s.data, trainer_options(s, out, ""));
  if (ck) trainer.resume(*ck);  // checks the model against the checkpoint before any step
  print_header(s, out);
  if (ck) out << "resuming from " << req.resume << " at step " << ck->meta.step << "\n";
  const TrainSummary sum = trainer.run();
  return sum.interrupted ? kExitInterrupted : 0;
}

// ---- compare --------------------------------------------------------------------------

int run_compare(const CompareRequest& req, std::ostream& out) {
  NB_CHECK(!req.precisions.empty(), "--precisions is empty; give at least one, e.g. fp32,int4");
  for (size_t i = 0; i < req.precisions.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      NB_CHECK(req.precisions[i] != req.precisions[j],
               "--precisions lists " << req.precisions[i] << " twice; list each precision once");
  // Every run is set up (configs checked, models built, data read) before the first trains,
  // so that a bad setting for the last precision does not surface after an hour.
  std::vector<Session> sessions;
  for (const std::string& p : req.precisions) {
    TrainConfig c = req.config;
    c.precision = p;
    c.out = (fs::path(req.config.out) / p).string();
    validate(c);
    sessions.push_back(open_session(c, nullptr));
  }
  set_threads(req.config);
  print_header(sessions.front(), out);
  const bool gpt = req.config.model == "gpt";
  const std::string unit = sessions.front().data->unit();

  struct Result {
    std::string precision;
    TrainSummary sum;
    Curve curve;
  };
  std::vector<Result> results;
  bool interrupted = false;
  for (Session& s : sessions) {
    const std::string plan = plan_summary(s.cfg);
    out << "\n== " << s.cfg.precision << (plan != s.cfg.precision ? " (" + plan + ")" : "") << " ==\n";
    out.flush();
    for (const char* f : {kCheckpointWeightsFile, kCheckpointMetaFile})  // outputs of an earlier compare
      fs::remove(fs::path(s.cfg.out) / f);
    Trainer trainer(*s.model, *s.data, trainer_options(s, out, "[" + s.cfg.precision + "] "));
    Result r{s.cfg.precision, trainer.run(), {}};
    r.curve = read_curve((fs::path(s.cfg.out) / "metrics.jsonl").string());
    results.push_back(std::move(r));
    s.model.reset();  // free the weights before the next run
    if (results.back().sum.interrupted) {
      interrupted = true;
      out << "compare stopped by interrupt; the remaining precisions were not trained\n";
      break;
    }
  }

  // ---- table
  const Result& base = results.front();
  const std::string gap_head = gpt ? "val loss gap" : "val acc gap";
  out << "\n"
      << pad("precision", 11) << pad("train loss", 12, true) << pad("val loss", 10, true)
      << pad("val acc", 9, true) << pad(gap_head, 14, true) << pad(unit + "/s", 10, true)
      << pad("time", 8, true) << "\n";
  json runs = json::array();
  for (const Result& r : results) {
    double gap;
    std::string gap_str;
    if (gpt) {
      gap = 100.0 * (r.sum.val.loss - base.sum.val.loss) / base.sum.val.loss;
      gap_str = &r == &base ? "baseline" : (gap >= 0 ? "+" : "") + fmt(gap, 2) + "%";
    } else {
      gap = 100.0 * (r.sum.val.accuracy - base.sum.val.accuracy);
      gap_str = &r == &base ? "baseline" : (gap >= 0 ? "+" : "") + fmt(gap, 2) + " pt";
    }
    out << pad(r.precision, 11) << pad(fmt(r.sum.train_loss, 4), 12, true) << pad(fmt(r.sum.val.loss, 4), 10, true)
        << pad(fmt(100 * r.sum.val.accuracy, 2) + "%", 9, true) << pad(gap_str, 14, true)
        << pad(format_rate(r.sum.items_per_s), 10, true) << pad(format_duration(r.sum.seconds), 8, true) << "\n";
    json j;
    j["precision"] = r.precision;
    j["out"] = (fs::path(req.config.out) / r.precision).string();
    j["steps"] = r.sum.step;
    j["skipped_steps"] = r.sum.skipped;
    j["train_loss"] = r.sum.train_loss;
    j["val_loss"] = r.sum.val.loss;
    j["val_acc"] = r.sum.val.accuracy;
    j[gpt ? "val_loss_gap_percent" : "val_acc_gap_points"] = &r == &base ? 0.0 : gap;
    j[unit == "img" ? "images_per_s" : "tokens_per_s"] = r.sum.items_per_s;
    j["seconds"] = r.sum.seconds;
    j["interrupted"] = r.sum.interrupted;
    runs.push_back(j);
  }
  out << "(train loss: mean of the last steps; val: " << (gpt ? "held-out last 10% of the text" : "test split")
      << "; gap relative to " << base.precision << ")\n";

  // ---- picture
  PlotSpec spec;
  spec.title = "nibble compare: " + req.config.model + " " + std::to_string(req.config.layers) + "x" +
               std::to_string(req.config.d_model) + ", loss by precision";
  spec.x_label = "step";
  spec.y_label = "cross-entropy loss";
  const size_t w = static_cast<size_t>(std::max<int64_t>(1, req.config.steps / 40));
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    PlotSeries train;
    train.label = r.precision + " train" + (w > 1 ? " (mean of " + std::to_string(w) + ")" : "");
    train.x = r.curve.step;
    train.y = trailing_mean(r.curve.loss, w);
    train.color = series_color(i);
    train.width = 1.2;
    spec.series.push_back(train);
    if (!r.curve.val_step.empty()) {
      PlotSeries val;
      val.label = r.precision + " validation";
      val.x = r.curve.val_step;
      val.y = r.curve.val_loss;
      val.color = series_color(i);
      val.dashed = true;
      val.width = 2.5;
      spec.series.push_back(val);
    }
  }
  const std::string svg_path = (fs::path(req.config.out) / "compare.svg").string();
  const std::string json_path = (fs::path(req.config.out) / "compare.json").string();
  fs::create_directories(req.config.out);
  write_file_atomic(svg_path, render_svg(spec));
  json report;
  report["config"] = json::parse(config_to_json(req.config));
  report["precisions"] = req.precisions;
  report["runs"] = runs;
  report["svg"] = svg_path;
  write_file_atomic(json_path, report.dump(2) + "\n");
  out << "loss curves: " << svg_path << "\nresults: " << json_path << "\n";
  out.flush();
  return interrupted ? kExitInterrupted : 0;
}

// ---- sample ---------------------------------------------------------------------------

int32_t sample_token(const std::vector<float>& logits, double temperature, int64_t top_k, double u) {
  NB_CHECK(!logits.empty(), "sample_token: no logits");
  NB_CHECK(temperature >= 0 && std::isfinite(temperature), "temperature " << temperature << " must be >= 0");
  for (size_t i = 0; i < logits.size(); ++i)
    NB_CHECK(std::isfinite(logits[i]), "sample_token: logit " << i << " is " << logits[i]
                                                              << "; the checkpoint's weights are damaged");
  const auto argmax = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  if (temperature == 0) return argmax;
  std::vector<int32_t> order(logits.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
  size_t k = order.size();
  if (top_k > 0 && static_cast<size_t>(top_k) < k) {
    k = static_cast<size_t>(top_k);
    // Ties broken by the lower id, so the choice does not depend on the sort's stability.
    std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(), [&](int32_t a, int32_t b) {
      return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
    });
  }
  // p_i ∝ exp((l_i - l_max) / T), accumulated in fp64; u·Σ picks the token.
  std::vector<double> cum(k);
  double total = 0;
  for (size_t i = 0; i < k; ++i) {
    total += std::exp((static_cast<double>(logits[order[i]]) - logits[argmax]) / temperature);
    cum[i] = total;
  }
  const double target = u * total;
  for (size_t i = 0; i < k; ++i)
    if (target < cum[i]) return order[i];
  return order[k - 1];
}

int run_sample(const SampleRequest& req, std::ostream& out) {
  NB_CHECK(req.tokens >= 0, "--tokens " << req.tokens << " must be >= 0");
  NB_CHECK(req.temperature >= 0 && std::isfinite(req.temperature),
           "--temperature " << req.temperature << " must be >= 0 (0: always the most likely token)");
  NB_CHECK(req.top_k >= 0, "--top-k " << req.top_k << " must be >= 0 (0: no limit)");
  const Checkpoint ck = read_checkpoint_reporting(req.checkpoint, out);
  TrainConfig cfg = config_of(ck);
  NB_CHECK(cfg.model == "gpt", req.checkpoint << " holds a " << cfg.model
                                              << " model; nibble sample generates text from a GPT checkpoint");
  // Sampling needs no data; the data file is read only to rebuild the same session cheaply.
  const json run = run_of(ck);
  NB_CHECK(run.contains("tokenizer"), req.checkpoint << ": the checkpoint has no tokenizer description");
  std::unique_ptr<Tokenizer> tok =
      make_tokenizer(run.at("tokenizer").at("kind").get<std::string>(), run.at("tokenizer").at("state").get<std::string>());
  std::unique_ptr<nn::Model> model = nn::make_gpt(gpt_config(cfg, tok->vocab_size()), precision_plan(cfg), cfg.seed);
  check_same_model(ck, *model);
  load_parameters(ck, model->parameters());
  model->load_extra_state(ck.meta.extra_state);

  std::vector<int32_t> context = req.prompt.empty() ? std::vector<int32_t>{} : tok->encode(req.prompt);
  if (context.empty()) {
    // No prompt: start after a newline if the vocabulary has one, else after token 0.
    std::vector<int32_t> nl;
    try {
      nl = tok->encode("\n");
    } catch (const Error&) {
    }
    context = nl.empty() ? std::vector<int32_t>{0} : nl;
  }
  out << req.prompt;
  std::vector<int32_t> generated;
  size_t printed = 0;
  for (int64_t i = 0; i < req.tokens; ++i) {
    const std::vector<float> logits = model->next_token_logits(context);
    const double u = philox_uniform(PhiloxKey{req.seed, static_cast<uint32_t>(i), 2, RngRole::data}, 0);
    const int32_t next = sample_token(logits, req.temperature, req.top_k, u);
    context.push_back(next);
    generated.push_back(next);
    const std::string text = tok->decode(generated);
    const size_t upto = complete_utf8_prefix(text);
    if (upto > printed) {
      out << text.substr(printed, upto - printed);
      out.flush();
      printed = upto;
    }
  }
  const std::string text = tok->decode(generated);
  out << text.substr(printed) << "\n";
  return 0;
}

// ---- eval -----------------------------------------------------------------------------

int run_eval(const EvalRequest& req, std::ostream& out) {
  NB_CHECK(req.batches >= 0, "--batches " << req.batches << " must be >= 0 (0: the whole validation split)");
  const Checkpoint ck = read_checkpoint_reporting(req.checkpoint, out);
  TrainConfig cfg = config_of(ck);
  if (!req.data.empty()) cfg.data = req.data;
  cfg.eval_batches = req.batches;
  set_threads(cfg);
  Session s = open_checkpoint(ck, cfg);
  nn::StepContext ctx;
  ctx.seed = cfg.seed;
  ctx.step = static_cast<uint32_t>(ck.meta.step);
  ctx.training = false;
  double loss_sum = 0;
  int64_t correct = 0, count = 0;
  for (const nn::Batch& b : s.data->val_batches()) {
    const nn::StepResult r = s.model->evaluate(b, ctx);
    loss_sum += r.loss * static_cast<double>(r.count);
    correct += r.correct;
    count += r.count;
  }
  NB_CHECK(count > 0, "nothing to evaluate: the validation split is empty");
  const double loss = loss_sum / static_cast<double>(count);
  const double acc = static_cast<double>(correct) / static_cast<double>(count);
  out << "checkpoint: " << req.checkpoint << " (" << cfg.model << ", precision " << plan_summary(cfg) << ", step "
      << ck.meta.step << ")\n";
  if (cfg.model == "gpt")
    out << "validation: " << count << " tokens of " << s.data_spec.at("path").get<std::string>()
        << " (last 10%)\nloss " << fmt(loss, 4) << ", perplexity " << fmt(std::exp(loss), 3)
        << ", next-token accuracy " << fmt(100 * acc, 2) << "%\n";
  else
    out << "test split: " << count << " images of " << cfg.data << "\nloss " << fmt(loss, 4) << ", accuracy "
        << fmt(100 * acc, 2) << "%\n";
  return 0;
}

}  // namespace nibble::train
