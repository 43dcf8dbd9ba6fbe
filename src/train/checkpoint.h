#pragma once
// Training checkpoints: DIR/checkpoint.safetensors holds the parameters by name and the AdamW
// moments ("<name>.adam_m", "<name>.adam_v"); DIR/checkpoint.json holds everything else (step,
// seed, model config, precision plan, training config, data and tokenizer spec, the model's
// extra state, nibble's version).
//
// Consistency: each file is written atomically (temporary file, fsync, rename), the weights
// first. The weights file also embeds the same JSON and a CRC-32 of its tensor data, so it is
// a complete checkpoint on its own: a crash between the two renames, or a failed write, never
// leaves a mix of two saves (the reader trusts the weights file and warns if checkpoint.json
// is from another save). A failed write leaves the previous checkpoint as it was.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "nibble/nn.h"
#include "nibble/safetensors.h"
#include "train/optim.h"

namespace nibble::train {

// Keep equal to project(VERSION) in CMakeLists.txt.
constexpr const char* kNibbleVersion = "0.1.0";
constexpr const char* kCheckpointWeightsFile = "checkpoint.safetensors";
constexpr const char* kCheckpointMetaFile = "checkpoint.json";

struct CheckpointMeta {
  int64_t step = 0;          // optimizer steps taken (skipped ones included)
  int64_t updates = 0;       // AdamW updates applied (its bias-correction count)
  int64_t skipped = 0;       // steps skipped for a non-finite loss or gradient
  uint64_t seed = 0;         // Philox seed: data order, stochastic rounding and sampling
  std::string model_kind;    // Model::kind()
  std::string model_config;  // Model::config_json() (a JSON object)
  std::map<std::string, std::string> extra_state;  // Model::extra_state()
  std::string run;           // the caller's JSON object: training config, data, tokenizer
  std::string nibble_version = kNibbleVersion;
};

std::string checkpoint_meta_to_json(const CheckpointMeta& meta);
CheckpointMeta checkpoint_meta_from_json(const std::string& text, const std::string& where);

// Writes both files into dir (created if missing). opt may be null (weights only).
void write_checkpoint(const std::string& dir, const std::vector<nn::Param*>& params,
                      const AdamW* opt, const CheckpointMeta& meta);

struct Checkpoint {
  std::string dir;
  CheckpointMeta meta;
  SafetensorsFile tensors;
};
// Reads and checks a checkpoint folder; throws nibble::Error naming the folder and the problem
// (missing folder or file, corrupt data, CRC mismatch, not a nibble checkpoint).
// Warnings (checkpoint.json from another save) go to `warnings` when given.
Checkpoint read_checkpoint(const std::string& dir, std::string* warnings = nullptr);

// Throws unless the checkpoint was written by a model of the same kind and config: names the
// first differing config field with both values.
void check_same_model(const Checkpoint& ckpt, const nn::Model& model);
// Copies every parameter's value from the checkpoint; throws naming the first parameter that
// is missing, misshapen or unexpected.
void load_parameters(const Checkpoint& ckpt, const std::vector<nn::Param*>& params);

// The first difference between two JSON documents as "path: a vs b" ("" if equal).
std::string first_json_difference(const std::string& a, const std::string& b);

}  // namespace nibble::train
