// Routing of the integer GEMMs between the sm_90a wgmma and the sm_80 mma.sync kernels
// (gemm_dispatch.h). Host code only.
#include "cuda/gemm/gemm_dispatch.h"

#include "cuda/common/check.h"
#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"
#include "nibble/error.h"

namespace nibble::cuda {

namespace {

int current_cc() {
  int device = 0, major = 0, minor = 0;
  NB_CUDA_CHECK(cudaGetDevice(&device));
  NB_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  NB_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return 10 * major + minor;
}

template <class OutT>
void s8_dequant(const GemmS8S8Params& p, const EpiDequantBias& epi, OutT* y, GemmPath path,
                cudaStream_t stream) {
  switch (resolve_gemm_path(path)) {
    case GemmPath::wgmma_sm90: gemm_s8s8_s32_tn_dequant_sm90(p, epi, y, stream); return;
    case GemmPath::mma_sm80: gemm_s8s8_s32_tn_dequant_sm80(p, epi, y, stream); return;
    case GemmPath::automatic: break;  // resolve_gemm_path never returns it
  }
  NB_FAIL("gemm_s8s8_s32_tn_dequant: unknown GEMM path " << static_cast<int>(path));
}

template <class OutT>
void s4_dequant(const GemmS4S4Params& p, const EpiDequantBias& epi, OutT* y, GemmPath path,
                cudaStream_t stream) {
  NB_CHECK(path == GemmPath::automatic || path == GemmPath::mma_sm80,
           "gemm_s4s4_s32_tn_dequant: GEMM path " << gemm_path_name(path)
               << " has no s4 kernel (Hopper has no INT4 tensor cores); use GemmPath::mma_sm80 "
                  "or automatic, or feed s8 codes to gemm_s8s8_s32_tn_dequant");
  gemm_s4s4_s32_tn_dequant_sm80(p, epi, y, stream);
}

}  // namespace

const char* gemm_path_name(GemmPath path) {
  switch (path) {
    case GemmPath::automatic: return "automatic";
    case GemmPath::wgmma_sm90: return "wgmma_sm90";
    case GemmPath::mma_sm80: return "mma_sm80";
  }
  return "unknown";
}

GemmPath resolve_gemm_path(GemmPath requested) {
  if (requested == GemmPath::wgmma_sm90 || requested == GemmPath::mma_sm80) return requested;
  NB_CHECK(requested == GemmPath::automatic,
           "resolve_gemm_path: unknown GEMM path " << static_cast<int>(requested));
  const int cc = current_cc();
  if (cc == 90 && gemm_sm90_available()) return GemmPath::wgmma_sm90;
  NB_CHECK(cc >= 80, "the integer GEMMs need a GPU of compute capability 8.0 or higher "
                     "(mma.sync: A100, RTX 30xx/40xx, L4; wgmma: H100/H200); this device is "
                         << cc / 10 << "." << cc % 10 << "; use the reference (CPU) backend");
  return GemmPath::mma_sm80;
}

void gemm_s8s8_s32_tn(const GemmS8S8Params& p, int32_t* c, GemmPath path, cudaStream_t stream) {
  switch (resolve_gemm_path(path)) {
    case GemmPath::wgmma_sm90: gemm_s8s8_s32_tn_sm90(p, c, stream); return;
    case GemmPath::mma_sm80: gemm_s8s8_s32_tn_sm80(p, c, stream); return;
    case GemmPath::automatic: break;  // resolve_gemm_path never returns it
  }
  NB_FAIL("gemm_s8s8_s32_tn: unknown GEMM path " << static_cast<int>(path));
}
void gemm_s8s8_s32_tn_dequant(const GemmS8S8Params& p, const EpiDequantBias& epi, float* y,
                              GemmPath path, cudaStream_t stream) {
  s8_dequant(p, epi, y, path, stream);
}
void gemm_s8s8_s32_tn_dequant(const GemmS8S8Params& p, const EpiDequantBias& epi, bf16_t* y,
                              GemmPath path, cudaStream_t stream) {
  s8_dequant(p, epi, y, path, stream);
}
void gemm_s4s4_s32_tn_dequant(const GemmS4S4Params& p, const EpiDequantBias& epi, float* y,
                              GemmPath path, cudaStream_t stream) {
  s4_dequant(p, epi, y, path, stream);
}
void gemm_s4s4_s32_tn_dequant(const GemmS4S4Params& p, const EpiDequantBias& epi, bf16_t* y,
                              GemmPath path, cudaStream_t stream) {
  s4_dequant(p, epi, y, path, stream);
}

}  // namespace nibble::cuda
