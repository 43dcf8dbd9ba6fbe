#pragma once
// The training loop: for each step, zero the gradients, forward/backward one batch, check the
// loss and gradients (and catch ops::NonFiniteError, a NaN/Inf met inside the model: the step
// is skipped like a non-finite loss), clip, AdamW, log; validate every few steps on fixed batches; save
// checkpoints; stop cleanly on Ctrl-C (SIGINT/SIGTERM).
//
// Reproducibility: a step depends only on (weights, moments, step, seed): the data source keys
// batches by (seed, step) and the model keys its random streams by (seed, step, layer, role).
// A run of N steps and a run of N/2 steps + checkpoint + resume + N/2 steps are bit-identical.
#include <cstdint>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "nibble/nn.h"
#include "train/checkpoint.h"
#include "train/optim.h"

namespace nibble::train {

// What the trainer needs from the data.
class DataSource {
 public:
  virtual ~DataSource() = default;
  // The training batch of 0-based step `step`: a pure function of (seed, step).
  virtual nn::Batch train_batch(int64_t step) = 0;
  // The fixed validation batches (the same every evaluation).
  virtual const std::vector<nn::Batch>& val_batches() = 0;
  // Tokens (GPT) or images (ViT) in one training batch, for the throughput.
  virtual int64_t items_per_batch() const = 0;
  // "tok" or "img": the throughput's unit in progress lines; metrics.jsonl names the field
  // tokens_per_s or images_per_s accordingly.
  virtual std::string unit() const = 0;
};

struct TrainerOptions {
  int64_t steps = 100;        // train until this many steps are done
  int64_t eval_every = 0;     // validate after every N steps (and at the end); 0 = at the end
  int64_t save_every = 0;     // checkpoint after every N steps (and at the end); 0 = at each validation
  int64_t log_every = 10;     // plain progress lines every N steps (not on a terminal)
  uint64_t seed = 1;
  LrSchedule schedule;
  AdamWOptions adamw;
  std::string out_dir;        // metrics.jsonl + checkpoint; empty = write nothing
  std::string run_json = "{}";  // stored in the checkpoint's "run" (config, data, tokenizer)
  std::ostream* log = nullptr;  // progress and messages; null = silent
  bool tty = false;             // progress bar instead of plain lines
  bool handle_signals = true;   // SIGINT/SIGTERM: finish the step, save, stop
  std::string label;            // prefix of progress lines, e.g. "[int4] "
};

struct EvalResult {
  double loss = std::numeric_limits<double>::quiet_NaN();
  double accuracy = std::numeric_limits<double>::quiet_NaN();  // correct / count
  int64_t count = 0;
};

struct StepRecord {
  int64_t step = 0;  // 1-based: steps done after this one
  double loss = 0;
  double lr = 0;
  StepStats stats;         // stats.skipped: nothing was updated
  std::string skip_reason; // "loss", "gradient" or "value inside the model (...)" when skipped
  double seconds = 0;      // wall time of the step
  double items_per_s = 0;  // this step's throughput
};

struct TrainSummary {
  int64_t step = 0;           // steps done (skipped ones included)
  int64_t skipped = 0;        // non-finite loss or gradient, over the whole run (resumes included)
  double train_loss = std::numeric_limits<double>::quiet_NaN();  // mean of the last steps (see run())
  EvalResult val;             // the last validation
  double items_per_s = 0;     // training throughput of this process (validation excluded)
  double seconds = 0;         // wall time of this process's run(), validation included
  bool interrupted = false;   // stopped by a signal (a checkpoint was saved)
};

class Trainer {
 public:
  Trainer(nn::Model& model, DataSource& data, TrainerOptions opt);

  // Continues from a checkpoint: checks the model (kind, config, parameter names and shapes),
  // then restores weights, moments, counters and the model's extra state. Throws before
  // touching anything if the checkpoint does not fit.
  void resume(const Checkpoint& ckpt);

  // Trains from step() to options.steps. Writes OUT/metrics.jsonl (one JSON object per step:
  // step, loss, lr, grad_norm, tokens_per_s | images_per_s, skipped, skipped_total, and
  // val_loss / val_acc at validations), validates and checkpoints as configured, and prints a
  // summary. train_loss in the summary is the mean loss of the last min(50, max(1, steps/10))
  // finite steps.
  TrainSummary run();

  // One optimizer step (the loop's body, without logging).
  StepRecord train_step();
  // Mean loss and accuracy over the validation batches.
  EvalResult evaluate();
  // Writes OUT/checkpoint.{safetensors,json} for the current state.
  void save_checkpoint();

  int64_t step() const { return step_; }
  int64_t skipped() const { return skipped_; }
  AdamW& optimizer() { return opt_; }
  const TrainerOptions& options() const { return options_; }

 private:
  nn::Model& model_;
  DataSource& data_;
  TrainerOptions options_;
  std::vector<nn::Param*> params_;
  AdamW opt_;
  int64_t step_ = 0;
  int64_t skipped_ = 0;
};

// Signal handling for a training run: while a guard lives, the first SIGINT/SIGTERM only sets
// a flag (interrupt_requested()); the second ends the process at once (exit status 130).
// The destructor restores the previous handlers and clears the flag.
class SignalGuard {
 public:
  SignalGuard();
  ~SignalGuard();
  SignalGuard(const SignalGuard&) = delete;
  SignalGuard& operator=(const SignalGuard&) = delete;
};
bool interrupt_requested();
void clear_interrupt();

// Reads OUT/metrics.jsonl and drops lines with a step above `step` (a resumed run repeats them).
void truncate_metrics(const std::string& path, int64_t step);

}  // namespace nibble::train
