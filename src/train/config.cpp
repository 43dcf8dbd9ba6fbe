#include "train/config.h"

#include <algorithm>
#include <functional>
#include <nlohmann/json.hpp>

#include "nibble/error.h"

namespace nibble::train {

namespace {

using json = nlohmann::ordered_json;

struct Field {
  std::string key;
  bool identity;
  std::function<json(const TrainConfig&)> get;
  std::function<void(TrainConfig&, const json&)> set;
};

const char* json_kind(const json& v) {
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_object()) return "an object";
  if (v.is_array()) return "an array";
  return "null";
}

template <class T>
Field member(const char* key, bool identity, T TrainConfig::*m) {
  Field f;
  f.key = key;
  f.identity = identity;
  f.get = [m](const TrainConfig& c) { return json(c.*m); };
  f.set = [m, key](TrainConfig& c, const json& v) {
    bool ok;
    if constexpr (std::is_same_v<T, bool>) ok = v.is_boolean();
    else if constexpr (std::is_same_v<T, std::string>) ok = v.is_string();
    else if constexpr (std::is_same_v<T, uint64_t>) ok = v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0);
    else if constexpr (std::is_integral_v<T>) ok = v.is_number_integer();
    else ok = v.is_number();
    NB_CHECK(ok, "config key '" << key << "' is " << json_kind(v) << " (" << v.dump() << "); it takes "
                                << (std::is_same_v<T, bool> ? "true or false"
                                    : std::is_same_v<T, std::string> ? "a string"
                                    : std::is_same_v<T, uint64_t> ? "a non-negative integer"
                                    : std::is_integral_v<T> ? "an integer" : "a number"));
    c.*m = v.get<T>();
  };
  return f;
}

const std::vector<Field>& fields() {
  static const std::vector<Field> table = [] {
    std::vector<Field> t = {
        member("model", true, &TrainConfig::model),
        member("layers", true, &TrainConfig::layers),
        member("d_model", true, &TrainConfig::d_model),
        member("heads", true, &TrainConfig::heads),
        member("d_ff", true, &TrainConfig::d_ff),
        member("context", true, &TrainConfig::context),
        member("patch", true, &TrainConfig::patch),
        member("precision", true, &TrainConfig::precision),
    };
    Field roles;
    roles.key = "roles";
    roles.identity = true;
    roles.get = [](const TrainConfig& c) {
      json o = json::object();
      for (const auto& [k, v] : c.roles) o[k] = v;
      return o;
    };
    roles.set = [](TrainConfig& c, const json& v) {
      NB_CHECK(v.is_object(), "config key 'roles' is " << json_kind(v)
                                  << "; it takes an object such as {\"qkv\": \"int8\", \"head\": \"fp32\"}");
      c.roles.clear();
      for (const auto& [k, p] : v.items()) {
        NB_CHECK(p.is_string(), "config key 'roles." << k << "' is " << json_kind(p)
                                                      << "; it takes a precision name (fp32, int8, int4, w4a4)");
        c.roles[k] = p.get<std::string>();
      }
    };
    t.push_back(roles);
    for (Field f : {member("lss_sampling", true, &TrainConfig::lss_sampling),
                    member("hadamard_block", true, &TrainConfig::hadamard_block),
                    member("sample_fraction", true, &TrainConfig::sample_fraction),
                    member("lsq_cold_start_steps", true, &TrainConfig::lsq_cold_start_steps),
                    member("w4a4_asymmetric", true, &TrainConfig::w4a4_asymmetric),
                    member("data", true, &TrainConfig::data),
                    member("tokenizer", true, &TrainConfig::tokenizer),
                    member("bpe_dir", true, &TrainConfig::bpe_dir),
                    member("steps", false, &TrainConfig::steps),
                    member("batch", true, &TrainConfig::batch),
                    member("lr", false, &TrainConfig::lr),
                    member("min_lr_fraction", false, &TrainConfig::min_lr_fraction),
                    member("warmup", false, &TrainConfig::warmup),
                    member("weight_decay", false, &TrainConfig::weight_decay),
                    member("beta1", false, &TrainConfig::beta1),
                    member("beta2", false, &TrainConfig::beta2),
                    member("adam_eps", false, &TrainConfig::eps),
                    member("grad_clip", false, &TrainConfig::grad_clip),
                    member("seed", true, &TrainConfig::seed),
                    member("eval_every", false, &TrainConfig::eval_every),
                    member("eval_batches", false, &TrainConfig::eval_batches),
                    member("save_every", false, &TrainConfig::save_every),
                    member("log_every", false, &TrainConfig::log_every),
                    member("out", false, &TrainConfig::out),
                    member("threads", false, &TrainConfig::threads)})
      t.push_back(f);
    return t;
  }();
  return table;
}

const Field* find_field(const std::string& key) {
  for (const Field& f : fields())
    if (f.key == key) return &f;
  return nullptr;
}

std::string normalise_key(std::string k) {
  std::replace(k.begin(), k.end(), '-', '_');
  return k;
}

std::string known_keys() {
  std::string s;
  for (const Field& f : fields()) s += (s.empty() ? "" : ", ") + f.key;
  return s;
}

json parse_object(const std::string& text, const std::string& where) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    NB_FAIL(where << ": not valid JSON (" << e.what() << "); a config is one JSON object such as "
                  << "{\"model\": \"gpt\", \"steps\": 500}");
  }
  NB_CHECK(j.is_object(), where << ": the config is " << json_kind(j) << "; it must be one JSON object");
  return j;
}

const std::set<std::string> kModels = {"gpt", "vit"};
const std::set<std::string> kPrecisions = {"fp32", "int8", "int4", "w4a4"};
const std::set<std::string> kRoles = {"qkv", "attn_out", "mlp_in", "mlp_out", "head", "patch"};

}  // namespace

const std::vector<std::string>& config_keys() {
  static const std::vector<std::string> keys = [] {
    std::vector<std::string> k;
    for (const Field& f : fields()) k.push_back(f.key);
    return k;
  }();
  return keys;
}

bool is_identity_key(const std::string& key) {
  const Field* f = find_field(key);
  return f != nullptr && f->identity;
}

std::string config_to_json(const TrainConfig& cfg, int indent) {
  json j = json::object();
  for (const Field& f : fields()) j[f.key] = f.get(cfg);
  return j.dump(indent);
}

TrainConfig config_from_json(const std::string& text, const std::string& where) {
  const json j = parse_object(text, where);
  TrainConfig cfg;
  std::vector<std::string> unknown;
  for (const auto& [k, v] : j.items()) {
    const Field* f = find_field(normalise_key(k));
    if (f == nullptr) {
      unknown.push_back(k);
      continue;
    }
    try {
      f->set(cfg, v);
    } catch (const Error& e) {
      NB_FAIL(where << ": " << e.what());
    }
  }
  if (!unknown.empty()) {
    std::string list;
    for (const auto& k : unknown) list += (list.empty() ? "'" : ", '") + k + "'";
    NB_FAIL(where << ": unknown config key" << (unknown.size() > 1 ? "s " : " ") << list
                  << "; known keys: " << known_keys());
  }
  return cfg;
}

std::set<std::string> config_json_keys(const std::string& text, const std::string& where) {
  std::set<std::string> keys;
  const json j = parse_object(text, where);  // named: items() must not outlive a temporary
  for (const auto& [k, v] : j.items()) keys.insert(normalise_key(k));
  return keys;
}

void copy_config_fields(TrainConfig& dst, const TrainConfig& src, const std::set<std::string>& keys) {
  for (const std::string& k : keys) {
    const Field* f = find_field(k);
    NB_CHECK(f != nullptr, "unknown config key '" << k << "'; known keys: " << known_keys());
    f->set(dst, f->get(src));
  }
}

std::string config_value(const TrainConfig& cfg, const std::string& key) {
  const Field* f = find_field(key);
  NB_CHECK(f != nullptr, "unknown config key '" << key << "'; known keys: " << known_keys());
  return f->get(cfg).dump();
}

void validate(const TrainConfig& c) {
  NB_CHECK(kModels.count(c.model), "model '" << c.model << "' is not known; use gpt or vit");
  NB_CHECK(kPrecisions.count(c.precision),
           "precision '" << c.precision << "' is not known; use fp32, int8, int4 or w4a4");
  for (const auto& [role, p] : c.roles) {
    NB_CHECK(kRoles.count(role), "precision override for role '"
                                     << role << "': no such role; use qkv, attn_out, mlp_in, mlp_out, head or patch");
    NB_CHECK(kPrecisions.count(p), "precision '" << p << "' for role " << role
                                                 << " is not known; use fp32, int8, int4 or w4a4");
  }
  NB_CHECK(c.model == "vit" || !c.roles.count("patch"),
           "the 'patch' role exists only in a ViT; drop its precision override for a GPT");
  NB_CHECK(c.model == "vit" || !c.roles.count("head") || c.roles.at("head") == "fp32",
           "a GPT's output head is tied to the token embedding and stays fp32; the 'head' precision "
           "applies to a ViT's classifier only");
  NB_CHECK(c.layers >= 1, "layers = " << c.layers << " must be at least 1");
  NB_CHECK(c.d_model >= 1, "d_model = " << c.d_model << " must be at least 1");
  NB_CHECK(c.heads >= 1, "heads = " << c.heads << " must be at least 1");
  NB_CHECK(c.d_model % c.heads == 0, "d_model = " << c.d_model << " is not divisible by heads = " << c.heads
                                                   << "; pick a width that is a multiple of the head count");
  NB_CHECK(c.d_ff >= 0, "d_ff = " << c.d_ff << " must be >= 0 (0 means 4·d_model)");
  NB_CHECK(c.context >= 1, "context = " << c.context << " must be at least 1 token");
  NB_CHECK(c.patch >= 1, "patch = " << c.patch << " must be at least 1 pixel");
  NB_CHECK(c.hadamard_block >= 0 && (c.hadamard_block & (c.hadamard_block - 1)) == 0,
           "hadamard_block = " << c.hadamard_block << " is not a power of two; use 0 (search), 1, 2, 4, ..., 1024");
  NB_CHECK(c.sample_fraction > 0 && c.sample_fraction <= 1,
           "sample_fraction = " << c.sample_fraction << " must be in (0, 1]");
  NB_CHECK(c.lsq_cold_start_steps >= 0, "lsq_cold_start_steps = " << c.lsq_cold_start_steps << " must be >= 0");
  NB_CHECK(c.tokenizer == "char" || c.tokenizer == "gpt2",
           "tokenizer '" << c.tokenizer << "' is not known; use char or gpt2");
  NB_CHECK(c.tokenizer != "gpt2" || !c.bpe_dir.empty(),
           "the gpt2 tokenizer needs --bpe-dir DIR (a folder with encoder.json and vocab.bpe)");
  NB_CHECK(c.steps >= 1, "steps = " << c.steps << " must be at least 1");
  NB_CHECK(c.batch >= 1, "batch = " << c.batch << " must be at least 1");
  NB_CHECK(c.warmup >= 0 && c.warmup <= c.steps,
           "warmup = " << c.warmup << " must be in [0, steps = " << c.steps << "]");
  NB_CHECK(c.lr > 0 && c.lr < 1e3, "lr = " << c.lr << " must be a positive learning rate, e.g. 1e-3");
  NB_CHECK(c.min_lr_fraction >= 0 && c.min_lr_fraction <= 1,
           "min_lr_fraction = " << c.min_lr_fraction << " must be in [0, 1]");
  NB_CHECK(c.eval_every >= 0, "eval_every = " << c.eval_every << " must be >= 0 (0: only at the end)");
  NB_CHECK(c.eval_batches >= 1, "eval_batches = " << c.eval_batches << " must be at least 1");
  NB_CHECK(c.save_every >= 0, "save_every = " << c.save_every << " must be >= 0 (0: at each evaluation)");
  NB_CHECK(c.log_every >= 1, "log_every = " << c.log_every << " must be at least 1");
  NB_CHECK(!c.out.empty(), "the output folder (--out) must not be empty");
  NB_CHECK(c.threads >= 0, "threads = " << c.threads << " must be >= 0 (0: every core)");
  // beta/eps/decay/clip ranges are the optimizer's (validate(AdamWOptions)).
}

void check_resume_compatible(const TrainConfig& checkpoint, const TrainConfig& given,
                             const std::set<std::string>& keys, const std::string& ckpt_dir) {
  for (const std::string& k : keys) {
    if (!is_identity_key(k)) continue;
    const std::string a = config_value(checkpoint, k), b = config_value(given, k);
    NB_CHECK(a == b, "cannot resume from " << ckpt_dir << ": " << k << " = " << b
                                          << " differs from the checkpoint's " << k << " = " << a
                                          << "; drop that option to continue the run, or train into a new --out");
  }
}

nn::PrecisionPlan precision_plan(const TrainConfig& c) {
  nn::PrecisionPlan plan = nn::PrecisionPlan::uniform(nn::precision_from_name(c.precision));
  for (const auto& [role, p] : c.roles) plan[nn::role_from_name(role)] = nn::precision_from_name(p);
  plan.quant.hadamard_block = c.hadamard_block;
  plan.quant.lss_sampling = c.lss_sampling;
  plan.quant.sample_fraction = c.sample_fraction;
  plan.quant.lsq_cold_start_steps = c.lsq_cold_start_steps;
  plan.quant.w4a4_asymmetric = c.w4a4_asymmetric;
  return plan;
}

nn::GptConfig gpt_config(const TrainConfig& c, int64_t vocab) {
  nn::GptConfig g;
  g.vocab = vocab;
  g.context = c.context;
  g.d_model = c.d_model;
  g.n_layers = c.layers;
  g.n_heads = c.heads;
  g.d_ff = c.d_ff;
  return g;
}

nn::VitConfig vit_config(const TrainConfig& c, int64_t image, int64_t classes) {
  nn::VitConfig v;
  v.image = image;
  v.patch = c.patch;
  v.classes = classes;
  v.d_model = c.d_model;
  v.n_layers = c.layers;
  v.n_heads = c.heads;
  v.d_ff = c.d_ff;
  return v;
}

}  // namespace nibble::train
