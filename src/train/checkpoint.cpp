#include "train/checkpoint.h"

#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "nibble/error.h"

namespace nibble::train {

namespace {

using json = nlohmann::ordered_json;
namespace fs = std::filesystem;

constexpr const char* kFormat = "nibble-checkpoint";
constexpr int kFormatVersion = 1;
// Metadata keys inside the safetensors file.
constexpr const char* kMetaKey = "nibble_checkpoint";
constexpr const char* kCrcKey = "nibble_data_crc32";

bool is_moment(const std::string& name) {
  auto ends = [&](const char* s) {
    const std::string suffix(s);
    return name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return ends(".adam_m") || ends(".adam_v");
}

// CRC-32 of every tensor's name and bytes, in name order (independent of the file order).
uint32_t tensors_crc32(std::vector<const NamedTensor*> ts) {
  std::sort(ts.begin(), ts.end(), [](const NamedTensor* a, const NamedTensor* b) { return a->name < b->name; });
  uLong crc = crc32(0L, Z_NULL, 0);
  auto feed = [&crc](const void* p, size_t n) {
    const auto* bytes = static_cast<const Bytef*>(p);
    while (n > 0) {  // zlib takes uInt lengths
      const size_t chunk = std::min<size_t>(n, size_t{1} << 30);
      crc = crc32(crc, bytes, static_cast<uInt>(chunk));
      bytes += chunk;
      n -= chunk;
    }
  };
  for (const NamedTensor* t : ts) {
    feed(t->name.data(), t->name.size());
    feed(t->tensor.data<void>(), t->tensor.nbytes());
  }
  return static_cast<uint32_t>(crc);
}

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08x", v);
  return buf;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  NB_CHECK(in, path << ": cannot open");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json parse_json(const std::string& text, const std::string& where) {
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    NB_FAIL(where << ": not valid JSON (" << e.what() << ")");
  }
}

void diff(const json& a, const json& b, const std::string& path, std::string* out) {
  if (!out->empty()) return;
  const std::string where = path.empty() ? "(top level)" : path;
  if (a.is_object() && b.is_object()) {
    for (const auto& [k, v] : a.items()) {
      const std::string p = path.empty() ? k : path + "." + k;
      if (!b.contains(k)) {
        *out = p + ": " + v.dump() + " vs (absent)";
        return;
      }
      diff(v, b.at(k), p, out);
      if (!out->empty()) return;
    }
    for (const auto& [k, v] : b.items())
      if (!a.contains(k)) {
        *out = (path.empty() ? k : path + "." + k) + ": (absent) vs " + v.dump();
        return;
      }
    return;
  }
  if (a.is_array() && b.is_array() && a.size() == b.size()) {
    for (size_t i = 0; i < a.size(); ++i) diff(a[i], b[i], path + "[" + std::to_string(i) + "]", out);
    return;
  }
  if (a != b) *out = where + ": " + a.dump() + " vs " + b.dump();
}

}  // namespace

std::string checkpoint_meta_to_json(const CheckpointMeta& m) {
  json j = json::object();
  j["format"] = kFormat;
  j["format_version"] = kFormatVersion;
  j["nibble_version"] = m.nibble_version;
  j["step"] = m.step;
  j["adam_updates"] = m.updates;
  j["skipped_steps"] = m.skipped;
  j["seed"] = m.seed;
  // Every random stream (data order, stochastic rounding, sampling) is Philox keyed by
  // (seed, step, layer, role): the generator's position is the step count.
  j["rng"] = {{"generator", "philox-4x32-10"}, {"seed", m.seed}, {"next_step", m.step}};
  json model = json::object();
  model["kind"] = m.model_kind;
  model["config"] = m.model_config.empty() ? json::object() : parse_json(m.model_config, "Model::config_json()");
  json extra = json::object();
  for (const auto& [k, v] : m.extra_state) extra[k] = v;
  model["extra_state"] = extra;
  j["model"] = model;
  j["run"] = m.run.empty() ? json::object() : parse_json(m.run, "checkpoint run description");
  return j.dump(2);
}

CheckpointMeta checkpoint_meta_from_json(const std::string& text, const std::string& where) {
  const json j = parse_json(text, where);
  NB_CHECK(j.is_object() && j.value("format", "") == kFormat,
           where << ": not a nibble training checkpoint (no \"format\": \"" << kFormat << "\")");
  const int version = j.value("format_version", 0);
  NB_CHECK(version == kFormatVersion, where << ": checkpoint format version " << version
                                            << " is not supported by nibble " << kNibbleVersion
                                            << " (it reads version " << kFormatVersion << ")");
  CheckpointMeta m;
  try {
    m.nibble_version = j.at("nibble_version").get<std::string>();
    m.step = j.at("step").get<int64_t>();
    m.updates = j.at("adam_updates").get<int64_t>();
    m.skipped = j.at("skipped_steps").get<int64_t>();
    m.seed = j.at("seed").get<uint64_t>();
    const json& model = j.at("model");
    m.model_kind = model.at("kind").get<std::string>();
    m.model_config = model.at("config").dump();
    for (const auto& [k, v] : model.at("extra_state").items()) m.extra_state[k] = v.get<std::string>();
    m.run = j.at("run").dump();
  } catch (const json::exception& e) {
    NB_FAIL(where << ": checkpoint description is incomplete or mistyped (" << e.what() << ")");
  }
  NB_CHECK(m.step >= 0 && m.updates >= 0 && m.skipped >= 0 && m.updates + m.skipped <= m.step,
           where << ": inconsistent counters (step " << m.step << ", updates " << m.updates
                 << ", skipped " << m.skipped << ")");
  return m;
}

void write_checkpoint(const std::string& dir, const std::vector<nn::Param*>& params, const AdamW* opt,
                      const CheckpointMeta& meta) {
  NB_CHECK(!dir.empty(), "write_checkpoint: empty folder name; pass the run's --out folder");
  std::error_code ec;
  fs::create_directories(dir, ec);
  NB_CHECK(!ec && fs::is_directory(dir), dir << ": cannot create the checkpoint folder (" << ec.message() << ")");

  std::vector<NamedTensor> tensors;
  std::set<std::string> names;
  for (const nn::Param* p : params) {
    NB_CHECK(names.insert(p->name).second, "write_checkpoint: two parameters are named '" << p->name << "'");
    tensors.push_back({p->name, p->value});
  }
  if (opt != nullptr)
    for (NamedTensor& t : opt->state_tensors()) tensors.push_back(std::move(t));
  std::vector<const NamedTensor*> ptrs;
  for (const NamedTensor& t : tensors) ptrs.push_back(&t);

  const std::string meta_json = checkpoint_meta_to_json(meta);
  write_safetensors((fs::path(dir) / kCheckpointWeightsFile).string(), tensors,
                    {{kMetaKey, meta_json}, {kCrcKey, hex32(tensors_crc32(ptrs))}});
  write_file_atomic((fs::path(dir) / kCheckpointMetaFile).string(), meta_json + "\n");
}

Checkpoint read_checkpoint(const std::string& dir, std::string* warnings) {
  NB_CHECK(fs::is_directory(dir), dir << ": no such checkpoint folder; pass the --out folder of a training run");
  const std::string weights = (fs::path(dir) / kCheckpointWeightsFile).string();
  const std::string meta_path = (fs::path(dir) / kCheckpointMetaFile).string();
  NB_CHECK(fs::exists(weights), dir << ": missing " << kCheckpointWeightsFile
                                    << "; the folder holds no finished checkpoint (was the run saved?)");
  NB_CHECK(fs::exists(meta_path), dir << ": missing " << kCheckpointMetaFile << " beside " << kCheckpointWeightsFile
                                      << "; the checkpoint is incomplete");
  Checkpoint ck;
  ck.dir = dir;
  ck.tensors = read_safetensors(weights);
  const auto meta_it = ck.tensors.metadata.find(kMetaKey);
  NB_CHECK(meta_it != ck.tensors.metadata.end(),
           weights << ": not a nibble training checkpoint (no '" << kMetaKey << "' metadata)");
  const auto crc_it = ck.tensors.metadata.find(kCrcKey);
  NB_CHECK(crc_it != ck.tensors.metadata.end(), weights << ": no '" << kCrcKey << "' metadata; the file is damaged");
  std::vector<const NamedTensor*> ptrs;
  for (const NamedTensor& t : ck.tensors.tensors) ptrs.push_back(&t);
  const std::string crc = hex32(tensors_crc32(ptrs));
  NB_CHECK(crc == crc_it->second, weights << ": tensor data is corrupt (CRC-32 " << crc << ", expected "
                                          << crc_it->second << "); use an earlier checkpoint or retrain");
  ck.meta = checkpoint_meta_from_json(meta_it->second, weights);

  // checkpoint.json must be readable; if it is from another save (an interrupted write), the
  // weights file's own copy wins.
  const std::string text = read_text(meta_path);
  const CheckpointMeta side = checkpoint_meta_from_json(text, meta_path);
  if (side.step != ck.meta.step && warnings != nullptr)
    *warnings += meta_path + " is from step " + std::to_string(side.step) + " but " + kCheckpointWeightsFile +
                 " from step " + std::to_string(ck.meta.step) + " (an interrupted save); using the latter\n";
  return ck;
}

void check_same_model(const Checkpoint& ck, const nn::Model& model) {
  NB_CHECK(ck.meta.model_kind == model.kind(), ck.dir << ": the checkpoint holds a " << ck.meta.model_kind
                                                      << " model, not a " << model.kind());
  const std::string d = first_json_difference(ck.meta.model_config, model.config_json());
  NB_CHECK(d.empty(), ck.dir << ": the checkpoint is from a different model config: " << d
                             << " (checkpoint vs this run); use the checkpoint's settings or a new --out");
}

void load_parameters(const Checkpoint& ck, const std::vector<nn::Param*>& params) {
  std::set<std::string> wanted;
  for (const nn::Param* p : params) {
    wanted.insert(p->name);
    const Tensor* t = ck.tensors.find(p->name);
    NB_CHECK(t != nullptr, ck.dir << ": the checkpoint has no parameter '" << p->name
                                  << "'; it was written by a different model");
    NB_CHECK(t->dtype() == DType::f32 && t->shape() == p->value.shape(),
             ck.dir << ": parameter '" << p->name << "' is " << t->view().describe() << " in the checkpoint but f32"
                    << shape_str(p->value.shape()) << " in the model; it was written by a different model");
  }
  for (const NamedTensor& t : ck.tensors.tensors)
    NB_CHECK(wanted.count(t.name) || is_moment(t.name),
             ck.dir << ": the checkpoint has a parameter '" << t.name
                    << "' that this model lacks; it was written by a different model");
  for (nn::Param* p : params) {
    const Tensor* t = ck.tensors.find(p->name);
    std::copy_n(t->data<float>(), t->numel(), p->value.data<float>());
  }
}

std::string first_json_difference(const std::string& a, const std::string& b) {
  json ja, jb;
  try {
    ja = json::parse(a);
    jb = json::parse(b);
  } catch (const json::parse_error&) {
    return a == b ? "" : "(text): " + a + " vs " + b;
  }
  std::string out;
  diff(ja, jb, "", &out);
  return out;
}

}  // namespace nibble::train
