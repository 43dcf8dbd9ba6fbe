// Checkpoint files: round trip of weights, moments and the description; a failed write keeps
// the previous checkpoint; corrupt or missing files and checkpoints of another model are clear
// errors that name the problem.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "common/fake_model.h"
#include "nibble/error.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

using namespace nibble;
using namespace nibble::train;
using nibble::testing::FakeData;
using nibble::testing::FakeModel;
using nibble::testing::FakeModelConfig;
using nibble::testing::TempDir;
namespace fs = std::filesystem;

namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// A trained fake model with its trainer, checkpointed into dir after `steps` steps.
struct Trained {
  FakeModel model{FakeModelConfig{}};
  FakeData data{8, 4, 16, 5};
  Trainer trainer;
  Trained(const std::string& dir, int64_t steps) : trainer(model, data, options(dir, steps)) { trainer.run(); }
  static TrainerOptions options(const std::string& dir, int64_t steps) {
    TrainerOptions o;
    o.steps = steps;
    o.seed = 5;
    o.schedule = LrSchedule{0.05, 0.005, 0, 10};
    o.out_dir = dir;
    o.run_json = "{\"config\": {\"model\": \"fake\"}, \"tokenizer\": {\"kind\": \"char\", \"state\": \"ab\\\\x0a\"}}";
    return o;
  }
};

}  // namespace

TEST(CheckpointFiles, RoundTripWeightsMomentsAndDescription) {
  TempDir dir;
  Trained t(dir.str(), 4);
  const Checkpoint ck = read_checkpoint(dir.str());
  EXPECT_EQ(ck.meta.step, 4);
  EXPECT_EQ(ck.meta.updates, 4);
  EXPECT_EQ(ck.meta.skipped, 0);
  EXPECT_EQ(ck.meta.seed, 5u);
  EXPECT_EQ(ck.meta.model_kind, "fake");
  EXPECT_EQ(first_json_difference(ck.meta.model_config, t.model.config_json()), "");
  EXPECT_EQ(ck.meta.extra_state.at("fake.first_step"), "0");
  EXPECT_EQ(ck.meta.nibble_version, kNibbleVersion);
  EXPECT_EQ(first_json_difference(ck.meta.run, Trained::options("", 1).run_json), "");
  for (nn::Param* p : t.model.parameters()) {
    const Tensor* v = ck.tensors.find(p->name);
    ASSERT_NE(v, nullptr) << p->name;
    EXPECT_EQ(std::memcmp(v->data<float>(), p->value.data<float>(), p->value.nbytes()), 0) << p->name;
  }
  for (const NamedTensor& m : t.trainer.optimizer().state_tensors()) {
    const Tensor* v = ck.tensors.find(m.name);
    ASSERT_NE(v, nullptr) << m.name;
    EXPECT_EQ(std::memcmp(v->data<float>(), m.tensor.data<float>(), m.tensor.nbytes()), 0) << m.name;
  }
  // checkpoint.json is readable on its own and says the same.
  const auto j = nlohmann::json::parse(read_bytes(dir.sub("checkpoint.json")));
  EXPECT_EQ(j.at("step"), 4);
  EXPECT_EQ(j.at("model").at("kind"), "fake");
  EXPECT_EQ(j.at("rng").at("next_step"), 4);
  EXPECT_EQ(j.at("run").at("tokenizer").at("state"), "ab\\x0a");
}

TEST(CheckpointFiles, FailedWriteKeepsThePreviousCheckpoint) {
  TempDir dir;
  Trained t(dir.str(), 3);
  const std::string weights = read_bytes(dir.sub(kCheckpointWeightsFile));
  const std::string meta = read_bytes(dir.sub(kCheckpointMetaFile));
  t.trainer.train_step();  // the state moves on

  // write(2) fails partway through the new weights file: a file-size limit far below its
  // size, with SIGXFSZ ignored so that the failure is EFBIG instead of a killed process.
  rlimit old_limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old_limit;
  small.rlim_cur = 200;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const std::string msg = error_of([&] { t.trainer.save_checkpoint(); });
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);

  EXPECT_NE(msg.find("checkpoint.safetensors"), std::string::npos) << msg;
  EXPECT_EQ(read_bytes(dir.sub(kCheckpointWeightsFile)), weights);
  EXPECT_EQ(read_bytes(dir.sub(kCheckpointMetaFile)), meta);
  EXPECT_EQ(read_checkpoint(dir.str()).meta.step, 3);
  for (const auto& e : fs::directory_iterator(dir.str()))  // no temporary left behind
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << e.path();
}

TEST(CheckpointFiles, StaleJsonBesideNewerWeightsUsesTheWeightsCopy) {
  // A crash between the two renames leaves new weights beside the old checkpoint.json.
  TempDir dir;
  Trained t(dir.str(), 2);
  const std::string old_meta = read_bytes(dir.sub(kCheckpointMetaFile));
  t.trainer.train_step();
  t.trainer.save_checkpoint();
  write_bytes(dir.sub(kCheckpointMetaFile), old_meta);
  std::string warnings;
  const Checkpoint ck = read_checkpoint(dir.str(), &warnings);
  EXPECT_EQ(ck.meta.step, 3);
  EXPECT_NE(warnings.find("is from step 2"), std::string::npos) << warnings;
}

TEST(CheckpointFiles, MissingOrCorruptFilesAreClearErrors) {
  TempDir dir;
  Trained t(dir.str(), 2);
  const std::string weights_path = dir.sub(kCheckpointWeightsFile), meta_path = dir.sub(kCheckpointMetaFile);
  const std::string weights = read_bytes(weights_path), meta = read_bytes(meta_path);
  auto msg = [&] { return error_of([&] { read_checkpoint(dir.str()); }); };

  EXPECT_NE(error_of([&] { read_checkpoint(dir.sub("nope")); }).find("no such checkpoint folder"), std::string::npos);

  fs::remove(meta_path);
  EXPECT_NE(msg().find("missing checkpoint.json"), std::string::npos) << msg();
  write_bytes(meta_path, "{\"step\": ");
  EXPECT_NE(msg().find("not valid JSON"), std::string::npos) << msg();
  write_bytes(meta_path, meta);

  fs::remove(weights_path);
  EXPECT_NE(msg().find("missing checkpoint.safetensors"), std::string::npos) << msg();
  write_bytes(weights_path, weights.substr(0, weights.size() - 10));  // truncated
  EXPECT_NE(msg().find(weights_path), std::string::npos) << msg();
  std::string flipped = weights;
  flipped[flipped.size() - 5] ^= 0x40;  // one bit of the last tensor's data
  write_bytes(weights_path, flipped);
  EXPECT_NE(msg().find("tensor data is corrupt"), std::string::npos) << msg();
  write_bytes(weights_path, weights);
  EXPECT_EQ(msg(), "(no error)");
}

TEST(CheckpointModel, AnotherModelConfigIsRejectedNamingTheField) {
  TempDir dir;
  Trained t(dir.str(), 2);
  const Checkpoint ck = read_checkpoint(dir.str());
  FakeModelConfig wider;
  wider.classes = 5;
  FakeModel other(wider);
  FakeData data(8, 5, 16, 5);
  Trainer trainer(other, data, Trained::options(dir.str(), 4));
  const auto before = std::vector<float>(other.parameters()[0]->value.data<float>(),
                                         other.parameters()[0]->value.data<float>() + 40);
  const std::string msg = error_of([&] { trainer.resume(ck); });
  EXPECT_NE(msg.find("different model config: classes: 4 vs 5"), std::string::npos) << msg;
  EXPECT_EQ(trainer.step(), 0);
  EXPECT_EQ(std::memcmp(before.data(), other.parameters()[0]->value.data<float>(), 40 * sizeof(float)), 0);
}

TEST(CheckpointModel, MissingOrMisshapenParametersAreRejected) {
  TempDir dir;
  Trained t(dir.str(), 1);
  Checkpoint ck = read_checkpoint(dir.str());
  FakeModel m(FakeModelConfig{});
  // Same config, but a tensor renamed in the file: the model's parameter is missing there.
  for (NamedTensor& nt : ck.tensors.tensors)
    if (nt.name == "lin.bias") nt.name = "lin.bias_renamed";
  std::string msg = error_of([&] { load_parameters(ck, m.parameters()); });
  EXPECT_NE(msg.find("no parameter 'lin.bias'"), std::string::npos) << msg;

  ck = read_checkpoint(dir.str());
  for (NamedTensor& nt : ck.tensors.tensors)
    if (nt.name == "lin.weight") nt.tensor = nt.tensor.reshape({2, 16});
  msg = error_of([&] { load_parameters(ck, m.parameters()); });
  EXPECT_NE(msg.find("parameter 'lin.weight' is f32[2, 16]"), std::string::npos) << msg;

  ck = read_checkpoint(dir.str());
  ck.tensors.tensors.push_back({"lin.extra", Tensor::zeros({2}, DType::f32)});
  msg = error_of([&] { load_parameters(ck, m.parameters()); });
  EXPECT_NE(msg.find("'lin.extra' that this model lacks"), std::string::npos) << msg;
}

TEST(CheckpointModel, JsonDifferenceNamesThePath) {
  EXPECT_EQ(first_json_difference("{\"a\": {\"b\": [1, 2]}}", "{\"a\": {\"b\": [1, 2]}}"), "");
  EXPECT_EQ(first_json_difference("{\"a\": {\"b\": [1, 2]}}", "{\"a\": {\"b\": [1, 3]}}"), "a.b[1]: 2 vs 3");
  EXPECT_EQ(first_json_difference("{\"a\": 1}", "{\"a\": 1, \"c\": true}"), "c: (absent) vs true");
  EXPECT_EQ(first_json_difference("{\"plan\": {\"qkv\": \"int4\"}}", "{\"plan\": {\"qkv\": \"fp32\"}}"),
            "plan.qkv: \"int4\" vs \"fp32\"");
}
