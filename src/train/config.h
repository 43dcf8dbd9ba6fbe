#pragma once
// The full configuration of a training run: model architecture, precision plan, data,
// optimizer and schedule, evaluation and output. One JSON object with snake_case keys
// (`nibble train --config FILE`), the same names as the command-line flags with '_' for '-'
// (--d-model <-> "d_model"; the per-role precision flags --qkv, --attn-out, --mlp-in, --mlp-out,
// --head, --patch-embed are "roles": {"qkv": "int8", ..., "patch": ...}). Reading rejects unknown
// keys and wrongly typed values, naming them.
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "nibble/nn.h"

namespace nibble::train {

struct TrainConfig {
  // ---- model
  std::string model = "gpt";  // gpt | vit
  int64_t layers = 4;
  int64_t d_model = 128;
  int64_t heads = 4;
  int64_t d_ff = 0;       // 0 = 4·d_model
  int64_t context = 64;   // gpt: tokens per sequence
  int64_t patch = 7;      // vit: patch side in pixels
  // ---- precision plan
  std::string precision = "fp32";             // every hidden linear layer (head stays fp32)
  std::map<std::string, std::string> roles;   // per-role overrides: "qkv" -> "int8", ...
  bool lss_sampling = false;
  int64_t hadamard_block = 0;                 // 0 = the per-layer search on the first batch
  double sample_fraction = 0.5;
  int64_t lsq_cold_start_steps = 20;
  bool w4a4_asymmetric = false;
  // ---- data
  std::string data;                 // gpt: text file (default: the built-in demo text); vit: MNIST dir
  std::string tokenizer = "char";   // char | gpt2
  std::string bpe_dir;              // gpt2: folder with encoder.json and vocab.bpe
  // ---- optimization
  int64_t steps = 1000;
  int64_t batch = 16;
  double lr = 1e-3;
  double min_lr_fraction = 0.1;  // cosine decay ends at lr · min_lr_fraction
  int64_t warmup = 100;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;  // key "adam_eps"
  double grad_clip = 1.0;
  uint64_t seed = 1;
  // ---- evaluation and output
  int64_t eval_every = 100;  // validation every N steps (and at the end); 0 = only at the end
  int64_t eval_batches = 8;  // fixed validation batches per evaluation
  int64_t save_every = 0;    // checkpoint every N steps; 0 = at each evaluation
  int64_t log_every = 10;    // plain-text progress lines when stdout is not a terminal
  std::string out = "out";
  int64_t threads = 0;       // 0 = every core (OpenMP's default)
};

// Every key, in the order to_json writes them.
const std::vector<std::string>& config_keys();
// Keys that define the model, its precision, the data, the batch and the seed: a resumed run
// must keep them (training hyper-parameters such as steps or lr may change).
bool is_identity_key(const std::string& key);

std::string config_to_json(const TrainConfig& cfg, int indent = 2);
// Parses a JSON object; `where` names the source in messages (a file path). Keys may use '-'
// or '_'. Throws nibble::Error on bad JSON, an unknown key (named, with the known ones), or a
// value of the wrong type.
TrainConfig config_from_json(const std::string& text, const std::string& where);
// The keys present in a JSON config text, normalised to '_' (for "what did the user set").
std::set<std::string> config_json_keys(const std::string& text, const std::string& where);
// dst.key = src.key for each key.
void copy_config_fields(TrainConfig& dst, const TrainConfig& src, const std::set<std::string>& keys);
// The value of one key as compact JSON (for messages).
std::string config_value(const TrainConfig& cfg, const std::string& key);

// Range and name checks that need no data: model and precision names, positive sizes,
// width divisible by heads, ... Throws nibble::Error naming the field and a fix.
void validate(const TrainConfig& cfg);

// Resuming: `given` holds what the user passed (only `keys` count). Throws if an identity key
// differs from the checkpoint's value, naming the key and both values.
void check_resume_compatible(const TrainConfig& checkpoint, const TrainConfig& given,
                             const std::set<std::string>& keys, const std::string& ckpt_dir);

nn::PrecisionPlan precision_plan(const TrainConfig& cfg);
nn::GptConfig gpt_config(const TrainConfig& cfg, int64_t vocab);
nn::VitConfig vit_config(const TrainConfig& cfg, int64_t image, int64_t classes);

}  // namespace nibble::train
