#include "train/trainer.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <deque>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "nibble/error.h"
#include "nibble/ops_layers.h"
#include "train/progress.h"

namespace nibble::train {

namespace {

using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

std::atomic<int> g_signals{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal flag must be lock-free");

extern "C" void on_interrupt(int) {
  // Only async-signal-safe calls here: write(2) and _exit(2).
  const int n = g_signals.fetch_add(1) + 1;
  if (n >= 2) {
    constexpr char kMsg[] = "\nnibble: second interrupt: stopping now without saving\n";
    [[maybe_unused]] const ssize_t r = ::write(2, kMsg, sizeof kMsg - 1);
    ::_exit(130);
  }
  constexpr char kMsg[] =
      "\nnibble: interrupt: finishing the current step, then saving a checkpoint (again to abort)\n";
  [[maybe_unused]] const ssize_t r = ::write(2, kMsg, sizeof kMsg - 1);
}

struct sigaction g_old_int, g_old_term;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

}  // namespace

SignalGuard::SignalGuard() {
  g_signals = 0;
  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: a blocking read returns EINTR, which is harmless here
  sigaction(SIGINT, &sa, &g_old_int);
  sigaction(SIGTERM, &sa, &g_old_term);
}

SignalGuard::~SignalGuard() {
  sigaction(SIGINT, &g_old_int, nullptr);
  sigaction(SIGTERM, &g_old_term, nullptr);
  g_signals = 0;  // handled: the run that saw it reports TrainSummary::interrupted
}

bool interrupt_requested() { return g_signals.load() > 0; }
void clear_interrupt() { g_signals = 0; }

void truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string kept, line;
  bool dropped = false;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() > step) {
      dropped = true;
      continue;
    }
    kept += line + "\n";
  }
  in.close();
  if (dropped) write_file_atomic(path, kept);
}

Trainer::Trainer(nn::Model& model, DataSource& data, TrainerOptions opt)
    : model_(model), data_(data), options_(std::move(opt)), params_(model.parameters()),
      opt_(params_, options_.adamw) {
  validate(options_.schedule);
  NB_CHECK(options_.steps >= 1, "the run needs at least 1 step (got " << options_.steps << ")");
  NB_CHECK(options_.eval_every >= 0 && options_.save_every >= 0,
           "eval_every and save_every must be >= 0 (0: at the end only / at each validation)");
  NB_CHECK(options_.steps <= int64_t{0xffffffff},
           "steps = " << options_.steps << " exceeds the 32-bit step counter of the random streams");
}

void Trainer::resume(const Checkpoint& ck) {
  // Every check first, so that a checkpoint that does not fit changes nothing.
  check_same_model(ck, model_);
  NB_CHECK(ck.meta.seed == options_.seed, ck.dir << ": the checkpoint was trained with seed " << ck.meta.seed
                                                 << ", this run uses seed " << options_.seed
                                                 << "; resume with the checkpoint's seed");
  load_parameters(ck, params_);  // validates all names and shapes before copying
  opt_.load_state(ck.tensors, ck.meta.updates);
  model_.load_extra_state(ck.meta.extra_state);
  step_ = ck.meta.step;
  skipped_ = ck.meta.skipped;
}

StepRecord Trainer::train_step() {
  const auto t0 = Clock::now();
  StepRecord rec;
  opt_.zero_grad();
  const nn::Batch batch = data_.train_batch(step_);
  nn::StepContext ctx;
  ctx.seed = options_.seed;
  ctx.step = static_cast<uint32_t>(step_);
  ctx.training = true;
  rec.lr = options_.schedule.at(step_);
  bool non_finite_inside = false;
  try {
    rec.loss = model_.forward_backward(batch, ctx).loss;
  } catch (const ops::NonFiniteError& e) {
    // An op met a NaN/Inf inside the model (a diverged step, not a bug): the ops layer tells
    // the two apart by this type. The partial gradients are dropped by the next zero_grad.
    non_finite_inside = true;
    rec.loss = std::numeric_limits<double>::quiet_NaN();
    rec.skip_reason = std::string("value inside the model (") + e.what() + ")";
  }
  if (non_finite_inside) {
    rec.stats.skipped = true;
    rec.stats.grad_norm = std::numeric_limits<double>::quiet_NaN();
  } else if (!std::isfinite(rec.loss)) {
    // The gradients of a non-finite loss are meaningless even where they are finite.
    rec.stats.skipped = true;
    rec.stats.grad_norm = std::numeric_limits<double>::quiet_NaN();
    rec.skip_reason = "loss";
  } else {
    rec.stats = opt_.step(rec.lr);
    if (rec.stats.skipped) rec.skip_reason = "gradient";
  }
  if (rec.stats.skipped) ++skipped_;
  ++step_;
  rec.step = step_;
  rec.seconds = seconds_since(t0);
  rec.items_per_s = rec.seconds > 0 ? static_cast<double>(data_.items_per_batch()) / rec.seconds : 0;
  return rec;
}

EvalResult Trainer::evaluate() {
  nn::StepContext ctx;
  ctx.seed = options_.seed;
  ctx.step = static_cast<uint32_t>(step_);
  ctx.training = false;
  double loss_sum = 0;
  int64_t correct = 0, count = 0;
  for (const nn::Batch& b : data_.val_batches()) {
    const nn::StepResult r = model_.evaluate(b, ctx);
    loss_sum += r.loss * static_cast<double>(r.count);
    correct += r.correct;
    count += r.count;
  }
  EvalResult e;
  e.count = count;
  if (count > 0) {
    e.loss = loss_sum / static_cast<double>(count);
    e.accuracy = static_cast<double>(correct) / static_cast<double>(count);
  }
  return e;
}

void Trainer::save_checkpoint() {
  NB_CHECK(!options_.out_dir.empty(), "save_checkpoint: no output folder was given");
  CheckpointMeta meta;
  meta.step = step_;
  meta.updates = opt_.updates();
  meta.skipped = skipped_;
  meta.seed = options_.seed;
  meta.model_kind = model_.kind();
  meta.model_config = model_.config_json();
  meta.extra_state = model_.extra_state();
  meta.run = options_.run_json;
  write_checkpoint(options_.out_dir, params_, &opt_, meta);
}

TrainSummary Trainer::run() {
  const auto t_start = Clock::now();
  std::optional<SignalGuard> guard;
  if (options_.handle_signals) guard.emplace();

  const bool files = !options_.out_dir.empty();
  std::ofstream metrics;
  std::string metrics_path;
  if (files) {
    std::error_code ec;
    fs::create_directories(options_.out_dir, ec);
    NB_CHECK(!ec && fs::is_directory(options_.out_dir),
             options_.out_dir << ": cannot create the output folder (" << ec.message() << ")");
    metrics_path = (fs::path(options_.out_dir) / "metrics.jsonl").string();
    truncate_metrics(metrics_path, step_);
    metrics.open(metrics_path, std::ios::app);
    NB_CHECK(metrics, metrics_path << ": cannot open for appending");
  }
  const std::string rate_key = data_.unit() == "img" ? "images_per_s" : "tokens_per_s";
  Progress progress(options_.log, options_.tty, options_.steps, options_.log_every, data_.unit(), options_.label);

  TrainSummary sum;
  const int64_t first_step = step_;
  const int64_t window = std::min<int64_t>(50, std::max<int64_t>(1, options_.steps / 10));
  std::deque<double> recent;  // the last `window` finite losses
  double train_seconds = 0;
  int64_t items = 0;
  double rate_ema = 0;
  bool saved_now = false;

  if (step_ >= options_.steps)
    progress.message("already at step " + std::to_string(step_) + " of " + std::to_string(options_.steps) +
                     "; nothing to train (raise --steps to continue)");
  while (step_ < options_.steps) {
    const StepRecord rec = train_step();
    train_seconds += rec.seconds;
    items += data_.items_per_batch();
    rate_ema = rate_ema == 0 ? rec.items_per_s : 0.9 * rate_ema + 0.1 * rec.items_per_s;
    if (std::isfinite(rec.loss)) {
      recent.push_back(rec.loss);
      if (static_cast<int64_t>(recent.size()) > window) recent.pop_front();
    }

    json line = json::object();
    line["step"] = rec.step;
    line["loss"] = std::isfinite(rec.loss) ? json(rec.loss) : json(nullptr);
    line["lr"] = rec.lr;
    line["grad_norm"] = std::isfinite(rec.stats.grad_norm) ? json(rec.stats.grad_norm) : json(nullptr);
    line[rate_key] = rec.items_per_s;
    line["skipped"] = rec.stats.skipped;
    line["skipped_total"] = skipped_;
    if (rec.stats.skipped) {
      progress.message("warning: step " + std::to_string(rec.step) + " skipped: non-finite " + rec.skip_reason +
                       " (weights and optimizer state unchanged; " + std::to_string(skipped_) +
                       " skipped so far)");
    }
    const double per_step = train_seconds / static_cast<double>(step_ - first_step);
    progress.update(step_, rec.loss, rate_ema, per_step * static_cast<double>(options_.steps - step_));

    const bool last = step_ == options_.steps;
    const bool eval_now = last || (options_.eval_every > 0 && step_ % options_.eval_every == 0);
    if (eval_now) {
      sum.val = evaluate();
      line["val_loss"] = sum.val.loss;
      line["val_acc"] = sum.val.accuracy;
      progress.message("step " + std::to_string(step_) + ": val loss " + fixed(sum.val.loss, 4) + ", val acc " +
                       fixed(100 * sum.val.accuracy, 2) + "%");
    }
    if (files) {
      metrics << line.dump() << "\n";
      metrics.flush();
    }
    saved_now = false;
    const bool save_now =
        last || (options_.save_every > 0 ? step_ % options_.save_every == 0 : eval_now);
    if (files && save_now) {
      save_checkpoint();
      saved_now = true;
    }
    if (interrupt_requested()) {
      if (files && !saved_now) save_checkpoint();
      sum.interrupted = true;
      progress.message("interrupted after step " + std::to_string(step_) +
                       (files ? "; checkpoint saved in " + options_.out_dir + " (continue with --resume " +
                                    options_.out_dir + ")"
                              : std::string("")));
      break;
    }
  }
  progress.finish();

  sum.step = step_;
  sum.skipped = skipped_;
  if (!recent.empty()) {
    double s = 0;
    for (double l : recent) s += l;
    sum.train_loss = s / static_cast<double>(recent.size());
  }
  sum.items_per_s = train_seconds > 0 ? static_cast<double>(items) / train_seconds : 0;
  sum.seconds = seconds_since(t_start);
  if (step_ > first_step) {
    std::ostringstream os;
    os << (sum.interrupted ? "stopped" : "done") << ": step " << step_ << "/" << options_.steps << " in "
       << format_duration(sum.seconds) << ", train loss " << fixed(sum.train_loss, 4);
    if (sum.val.count > 0)
      os << ", val loss " << fixed(sum.val.loss, 4) << ", val acc " << fixed(100 * sum.val.accuracy, 2) << "%";
    os << ", " << format_rate(sum.items_per_s) << " " << data_.unit() << "/s, " << skipped_ << " skipped step"
       << (skipped_ == 1 ? "" : "s");
    if (files) os << "; checkpoint and metrics.jsonl in " << options_.out_dir;
    progress.message(os.str());
  }
  return sum;
}

}  // namespace nibble::train
