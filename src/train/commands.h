#pragma once
// What the `nibble train | compare | sample | eval` commands do, behind their argument parsing
// (tools/nibble). Each writes its report to `out` and returns the process exit status:
// 0 done, 130 stopped by Ctrl-C (a checkpoint was saved). Errors throw nibble::Error before any
// training starts whenever they can be known in advance (bad config, missing data, impossible
// sizes, a checkpoint from another model).
#include <cstdint>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "train/config.h"

namespace nibble::train {

struct TrainRequest {
  TrainConfig config;           // defaults < --config FILE < flags, already merged
  std::set<std::string> given;  // the keys the user set (in the file or as flags)
  std::string resume;           // checkpoint folder to continue from ("" = fresh run)
};
int run_train(const TrainRequest& req, std::ostream& out);

struct CompareRequest {
  TrainConfig config;                   // everything but the precision
  std::vector<std::string> precisions;  // the first is the baseline of the gap column
};
// Trains one run per precision into OUT/<precision>/, then prints the table and writes
// OUT/compare.svg (loss curves) and OUT/compare.json.
int run_compare(const CompareRequest& req, std::ostream& out);

struct SampleRequest {
  std::string checkpoint;
  std::string prompt;
  int64_t tokens = 200;
  double temperature = 0.8;  // 0 = always the most likely token
  int64_t top_k = 0;         // 0 = the whole vocabulary
  uint64_t seed = 1;
};
int run_sample(const SampleRequest& req, std::ostream& out);

struct EvalRequest {
  std::string checkpoint;
  std::string data;  // "" = the data the checkpoint was trained on
  int64_t batches = 0;  // 0 = the whole validation split
};
int run_eval(const EvalRequest& req, std::ostream& out);

// Samples an index from softmax(logits / temperature) restricted to the top_k largest logits,
// by inverting the CDF (fp64) at u in [0, 1). temperature 0 returns the argmax.
int32_t sample_token(const std::vector<float>& logits, double temperature, int64_t top_k, double u);

}  // namespace nibble::train
