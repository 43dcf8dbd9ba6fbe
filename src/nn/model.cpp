// Names of precisions and roles, the uniform plan, and Model's defaults.
#include <iterator>
#include <string>

#include "nibble/error.h"
#include "nibble/nn.h"

namespace nibble::nn {

namespace {
constexpr const char* kPrecisionNames[] = {"fp32", "int8", "int4", "w4a4"};
constexpr const char* kRoleNames[] = {"qkv", "attn_out", "mlp_in", "mlp_out", "head", "patch"};
static_assert(sizeof(kRoleNames) / sizeof(kRoleNames[0]) == kNumLinearRoles);
}  // namespace

const char* precision_name(Precision p) {
  const auto i = static_cast<size_t>(p);
  NB_CHECK(i < std::size(kPrecisionNames), "precision_name: unknown precision value " << i);
  return kPrecisionNames[i];
}

Precision precision_from_name(const std::string& name) {
  for (size_t i = 0; i < std::size(kPrecisionNames); ++i)
    if (name == kPrecisionNames[i]) return static_cast<Precision>(i);
  NB_FAIL("unknown precision '" << name << "'; use fp32, int8, int4 or w4a4");
}

const char* role_name(LinearRole r) {
  const auto i = static_cast<size_t>(r);
  NB_CHECK(i < std::size(kRoleNames), "role_name: unknown role value " << i);
  return kRoleNames[i];
}

LinearRole role_from_name(const std::string& name) {
  for (size_t i = 0; i < std::size(kRoleNames); ++i)
    if (name == kRoleNames[i]) return static_cast<LinearRole>(i);
  NB_FAIL("unknown layer role '" << name << "'; use qkv, attn_out, mlp_in, mlp_out, head or patch");
}

PrecisionPlan PrecisionPlan::uniform(Precision p) {
  PrecisionPlan plan;
  plan.role.fill(p);
  // The papers keep the classifier in full precision (algorithms.md A.5, F.4).
  plan[LinearRole::head] = Precision::fp32;
  return plan;
}

std::vector<float> Model::next_token_logits(const std::vector<int32_t>&) {
  NB_FAIL("next_token_logits: a " << kind() << " model does not predict tokens; only GPT models "
                                  << "can be sampled");
}

}  // namespace nibble::nn
