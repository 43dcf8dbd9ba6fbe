// Options of `nibble train | compare | sample | eval`. Argument parsing only: the work is in
// src/train/commands.cpp.
//
// A run's settings come from the defaults, then --config FILE (JSON, the keys of
// src/train/config.h), then the flags: a flag wins over the file. Each flag is bound to a
// field of a scratch TrainConfig and copied over only if it was given, so that "given" can be
// told from "left at its default" (resuming refuses changes to the model, not defaults).
#include "training_cli.h"

#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>

#include "nibble/error.h"
#include "train/commands.h"
#include "train/config.h"

namespace nibble::cli {

namespace {

using train::TrainConfig;

const std::vector<std::string> kPrecisions = {"fp32", "int8", "int4", "w4a4"};

struct RunFlags {
  TrainConfig values;                          // the flags' values (defaults where not given)
  std::map<std::string, CLI::Option*> keyed;   // config key -> its flag
  std::map<std::string, std::string> roles;    // role -> precision flag value
  std::map<std::string, CLI::Option*> role_opts;
  std::string config_file;
};

template <class T>
void keyed_option(CLI::App* cmd, RunFlags& f, const std::string& key, const std::string& flag, T& field,
                  const std::string& help, const std::string& group) {
  CLI::Option* o = cmd->add_option(flag, field, help)->capture_default_str()->group(group);
  f.keyed[key] = o;
}

void keyed_flag(CLI::App* cmd, RunFlags& f, const std::string& key, const std::string& flag, bool& field,
                const std::string& help, const std::string& group) {
  f.keyed[key] = cmd->add_flag(flag, field, help)->group(group);
}

// The options shared by train and compare. with_precision: train's --precision and per-role
// overrides (compare sets the precision per run, but the role overrides apply to every run).
void add_run_options(CLI::App* cmd, RunFlags& f, bool with_precision) {
  TrainConfig& v = f.values;
  const std::string model = "Model", quant = "Precision", data = "Data", optim = "Optimization", run = "Run";
  keyed_option(cmd, f, "model", "--model", v.model, "gpt (decoder-only, text) or vit (images)", model);
  f.keyed["model"]->check(CLI::IsMember({"gpt", "vit"}));
  keyed_option(cmd, f, "layers", "--layers", v.layers, "transformer blocks", model);
  keyed_option(cmd, f, "d_model", "--d-model", v.d_model, "width", model);
  keyed_option(cmd, f, "heads", "--heads", v.heads, "attention heads (must divide --d-model)", model);
  keyed_option(cmd, f, "d_ff", "--d-ff", v.d_ff, "MLP hidden width (0: 4 x d_model)", model);
  keyed_option(cmd, f, "context", "--context", v.context, "gpt: tokens per sequence", model);
  keyed_option(cmd, f, "patch", "--patch", v.patch, "vit: patch side in pixels", model);

  if (with_precision) {
    keyed_option(cmd, f, "precision", "--precision", v.precision,
                 "every hidden linear layer: fp32, int8, int4 (HQ forward, bit-split + LSS backward) or w4a4 "
                 "(fake-quantized QAT); the classifier head stays fp32",
                 quant);
    f.keyed["precision"]->check(CLI::IsMember(kPrecisions));
  }
  const std::pair<const char*, const char*> roles[] = {{"qkv", "--qkv"},         {"attn_out", "--attn-out"},
                                                       {"mlp_in", "--mlp-in"},   {"mlp_out", "--mlp-out"},
                                                       {"head", "--head"},       {"patch", "--patch-embed"}};
  for (const auto& [role, flag] : roles)
    f.role_opts[role] = cmd->add_option(flag, f.roles[role], std::string("precision of the ") + role +
                                                                 " layers (overrides the plan)")
                            ->check(CLI::IsMember(kPrecisions))
                            ->group(quant);
  keyed_flag(cmd, f, "lss_sampling", "--lss-sampling", v.lss_sampling,
             "int4: leverage-score sampling of the bit-split gradient rows", quant);
  keyed_option(cmd, f, "sample_fraction", "--sample-fraction", v.sample_fraction,
               "int4 with --lss-sampling: fraction of rows kept", quant);
  keyed_option(cmd, f, "hadamard_block", "--hadamard-block", v.hadamard_block,
               "int4: Hadamard block size (power of two dividing every input width; 0: searched per layer)", quant);
  keyed_option(cmd, f, "lsq_cold_start_steps", "--lsq-cold-start-steps", v.lsq_cold_start_steps,
               "int4: steps before the LSQ step sizes are learned", quant);
  keyed_flag(cmd, f, "w4a4_asymmetric", "--w4a4-asymmetric", v.w4a4_asymmetric,
             "w4a4: asymmetric per-token activation quantization", quant);

  keyed_option(cmd, f, "data", "--data", v.data,
               "gpt: a UTF-8 text file (default: the built-in demo text); vit: an MNIST/Fashion-MNIST folder", data);
  keyed_option(cmd, f, "tokenizer", "--tokenizer", v.tokenizer, "gpt: char or gpt2 (byte-level BPE)", data);
  f.keyed["tokenizer"]->check(CLI::IsMember({"char", "gpt2"}));
  keyed_option(cmd, f, "bpe_dir", "--bpe-dir", v.bpe_dir, "gpt2 tokenizer: folder with encoder.json and vocab.bpe", data);

  keyed_option(cmd, f, "steps", "--steps", v.steps, "optimizer steps", optim);
  keyed_option(cmd, f, "batch", "--batch", v.batch, "sequences or images per step", optim);
  keyed_option(cmd, f, "lr", "--lr", v.lr, "peak learning rate (AdamW)", optim);
  keyed_option(cmd, f, "min_lr_fraction", "--min-lr-fraction", v.min_lr_fraction,
               "the cosine decay ends at lr x this", optim);
  keyed_option(cmd, f, "warmup", "--warmup", v.warmup, "linear warm-up steps", optim);
  keyed_option(cmd, f, "weight_decay", "--weight-decay", v.weight_decay, "decoupled weight decay", optim);
  keyed_option(cmd, f, "beta1", "--beta1", v.beta1, "AdamW beta1", optim);
  keyed_option(cmd, f, "beta2", "--beta2", v.beta2, "AdamW beta2", optim);
  keyed_option(cmd, f, "adam_eps", "--adam-eps", v.eps, "AdamW epsilon", optim);
  keyed_option(cmd, f, "grad_clip", "--grad-clip", v.grad_clip, "max global gradient norm (0: off)", optim);
  keyed_option(cmd, f, "seed", "--seed", v.seed, "seed of the initialization, data order and rounding", optim);

  keyed_option(cmd, f, "eval_every", "--eval-every", v.eval_every, "validate every N steps (0: at the end)", run);
  keyed_option(cmd, f, "eval_batches", "--eval-batches", v.eval_batches,
               "fixed validation batches per evaluation (0: the whole split)", run);
  keyed_option(cmd, f, "save_every", "--save-every", v.save_every, "checkpoint every N steps (0: at each validation)", run);
  keyed_option(cmd, f, "log_every", "--log-every", v.log_every, "progress line every N steps when not on a terminal", run);
  keyed_option(cmd, f, "out", "--out", v.out, "output folder (metrics.jsonl, checkpoint, pictures)", run);
  keyed_option(cmd, f, "threads", "--threads", v.threads, "CPU threads (0: all cores)", run);
  cmd->add_option("--config", f.config_file, "JSON file of settings: keys as the flags with _ for - (d_model, eval_every, ...), per-role precisions as "
                  "\"roles\": {\"qkv\": \"int8\", ...}; flags win over the file")
      ->check(CLI::ExistingFile)
      ->group(run);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  NB_CHECK(in, path << ": cannot open the config file");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// defaults < --config FILE < flags; returns the merged config and the keys the user set.
std::pair<TrainConfig, std::set<std::string>> merge(const RunFlags& f) {
  TrainConfig cfg;
  std::set<std::string> given;
  if (!f.config_file.empty()) {
    const std::string text = read_file(f.config_file);
    cfg = train::config_from_json(text, f.config_file);
    given = train::config_json_keys(text, f.config_file);
  }
  std::set<std::string> flags;
  for (const auto& [key, opt] : f.keyed)
    if (opt->count() > 0) flags.insert(key);
  train::copy_config_fields(cfg, f.values, flags);
  given.insert(flags.begin(), flags.end());
  for (const auto& [role, opt] : f.role_opts)
    if (opt->count() > 0) {
      cfg.roles[role] = f.roles.at(role);
      given.insert("roles");
    }
  return {cfg, given};
}

}  // namespace

std::vector<Subcommand> add_training_commands(CLI::App& app) {
  std::vector<Subcommand> out;

  // ---- train
  {
    auto f = std::make_shared<RunFlags>();
    auto resume = std::make_shared<std::string>();
    CLI::App* cmd = app.add_subcommand(
        "train", "train a GPT or ViT at a chosen precision; progress, validation, metrics.jsonl and checkpoints in --out");
    add_run_options(cmd, *f, true);
    cmd->add_option("--resume", *resume,
                    "continue the run checkpointed in this folder (bit-identical to an uninterrupted run); "
                    "its settings are used, and only training options such as --steps may change")
        ->check(CLI::ExistingDirectory)
        ->group("Run");
    out.push_back({cmd, [f, resume] {
                     train::TrainRequest req;
                     std::tie(req.config, req.given) = merge(*f);
                     req.resume = *resume;
                     return train::run_train(req, std::cout);
                   }});
  }

  // ---- compare
  {
    auto f = std::make_shared<RunFlags>();
    auto precisions = std::make_shared<std::vector<std::string>>(std::vector<std::string>{"fp32", "int4"});
    CLI::App* cmd = app.add_subcommand(
        "compare", "train the same model from the same seed on the same data at several precisions, one after "
                   "the other; print a table and write OUT/compare.svg (loss curves) and OUT/compare.json");
    add_run_options(cmd, *f, false);
    cmd->add_option("--precisions", *precisions, "comma-separated precisions; the first is the baseline")
        ->delimiter(',')
        ->check(CLI::IsMember(kPrecisions))
        ->capture_default_str()
        ->group("Precision");
    out.push_back({cmd, [f, precisions] {
                     train::CompareRequest req;
                     std::set<std::string> given;
                     std::tie(req.config, given) = merge(*f);
                     if (!given.count("out")) req.config.out = "out/compare";
                     req.precisions = *precisions;
                     return train::run_compare(req, std::cout);
                   }});
  }

  // ---- sample
  {
    auto req = std::make_shared<train::SampleRequest>();
    CLI::App* cmd = app.add_subcommand("sample", "generate text from a GPT checkpoint");
    cmd->add_option("--ckpt", req->checkpoint, "checkpoint folder (a training run's --out)")
        ->required()
        ->check(CLI::ExistingDirectory);
    cmd->add_option("--prompt", req->prompt, "text to continue (default: start after a newline)");
    cmd->add_option("--tokens", req->tokens, "tokens to generate")->capture_default_str();
    cmd->add_option("--temperature", req->temperature, "softmax temperature (0: the most likely token)")
        ->capture_default_str();
    cmd->add_option("--top-k", req->top_k, "sample among the k most likely tokens (0: all)")->capture_default_str();
    cmd->add_option("--seed", req->seed, "seed of the sampling")->capture_default_str();
    out.push_back({cmd, [req] { return train::run_sample(*req, std::cout); }});
  }

  // ---- eval
  {
    auto req = std::make_shared<train::EvalRequest>();
    CLI::App* cmd = app.add_subcommand("eval", "loss and accuracy of a checkpoint on its validation data");
    cmd->add_option("--ckpt", req->checkpoint, "checkpoint folder (a training run's --out)")
        ->required()
        ->check(CLI::ExistingDirectory);
    cmd->add_option("--data", req->data,
                    "evaluate on this text file or MNIST folder instead (its validation/test split)");
    cmd->add_option("--batches", req->batches, "validation batches (0: the whole split)")->capture_default_str();
    out.push_back({cmd, [req] { return train::run_eval(*req, std::cout); }});
  }
  return out;
}

}  // namespace nibble::cli
