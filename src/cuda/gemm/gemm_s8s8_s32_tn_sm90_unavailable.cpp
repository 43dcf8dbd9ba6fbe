// Stand-ins for the sm_90a INT8 GEMM launchers when CMake found no CUTLASS headers: they
// throw, saying how to build the real ones. Compiled only in that case (CMakeLists.txt).
#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"

#include "nibble/error.h"

namespace nibble::cuda {

namespace {
[[noreturn]] void unavailable(const char* fn) {
  NB_FAIL(fn << " is not in this build: CMake found no CUTLASS headers. Run scripts/setup.sh "
                "(it fetches CUTLASS 4.2.0 into .cache/), re-run cmake and rebuild");
}
}  // namespace

void gemm_s8s8_s32_tn_sm90(const GemmS8S8Params&, int32_t*, cudaStream_t) {
  unavailable("gemm_s8s8_s32_tn_sm90");
}
void gemm_s8s8_s32_tn_dequant_sm90(const GemmS8S8Params&, const EpiDequantBias&, bf16_t*,
                                   cudaStream_t) {
  unavailable("gemm_s8s8_s32_tn_dequant_sm90");
}
void gemm_s8s8_s32_tn_dequant_sm90(const GemmS8S8Params&, const EpiDequantBias&, float*,
                                   cudaStream_t) {
  unavailable("gemm_s8s8_s32_tn_dequant_sm90");
}
void gemm_s8s8_s32_tn_mask_hadamard_sm90(const GemmS8S8Params&, const EpiMaskHadamard&, bf16_t*,
                                         cudaStream_t) {
  unavailable("gemm_s8s8_s32_tn_mask_hadamard_sm90");
}
void gemm_s8s8_s32_tn_mask_hadamard_sm90(const GemmS8S8Params&, const EpiMaskHadamard&, float*,
                                         cudaStream_t) {
  unavailable("gemm_s8s8_s32_tn_mask_hadamard_sm90");
}
int64_t gemm_s8s8_mask_hadamard_partials(const GemmS8S8Params&) {
  unavailable("gemm_s8s8_mask_hadamard_partials");
}
bool gemm_sm90_available() { return false; }

}  // namespace nibble::cuda
