#include "cuda/blas/cublaslt_baselines.h"

#include <cublasLt.h>

#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <tuple>

#include "cuda/common/check.h"
#include "cuda/common/workspace.h"

#define NB_CUBLAS_CHECK(call)                                                            \
  do {                                                                                   \
    const cublasStatus_t nb_cublas_st_ = (call);                                         \
    NB_CHECK(nb_cublas_st_ == CUBLAS_STATUS_SUCCESS,                                     \
             #call << " failed: " << cublasLtGetStatusString(nb_cublas_st_));            \
  } while (0)

namespace nibble::cuda {

namespace {

// Types of one GEMM kind, in cuBLASLt's vocabulary.
struct KindTypes {
  cudaDataType_t ab, cd, scale;
  cublasComputeType_t compute;
  bool fast_accum;
};

KindTypes kind_types(CublasLtKind kind) {
  switch (kind) {
    case CublasLtKind::bf16:
      return {CUDA_R_16BF, CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F, false};
    case CublasLtKind::s8s8_s32:
      return {CUDA_R_8I, CUDA_R_32I, CUDA_R_32I, CUBLAS_COMPUTE_32I, false};
    case CublasLtKind::e4m3_bf16:
      return {CUDA_R_8F_E4M3, CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F, true};
  }
  NB_FAIL("unknown cuBLASLt GEMM kind " << static_cast<int>(kind));
}

// One planned GEMM: descriptors and the heuristic's first algorithm, reused on every call.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    // Destroy errors are ignored: nothing useful can be done about them at teardown.
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

using PlanKey = std::tuple<int, CublasLtKind, int64_t, int64_t, int64_t>;

struct State {
  std::mutex mutex;
  std::map<int, cublasLtHandle_t> handles;  // one per device, never destroyed (see workspace.cpp)
  std::map<PlanKey, std::unique_ptr<Plan>> plans;
};

State& state() {
  static auto* s = new State();
  return *s;
}

// Row-major C[M, N] = A[M, K]·B[N, K]ᵀ is, read column-major, Cᵀ[N, M] = B·Aᵀ: cuBLASLt's
// "A" is our B (K×N column-major, transposed: the TN form its INT8 and FP8 kernels need),
// its "B" is our A (K×M column-major, not transposed), and its output is N×M with ld N.
const Plan& get_plan(CublasLtKind kind, int64_t m, int64_t n, int64_t k) {
  NB_CHECK(m > 0 && n > 0 && k > 0,
           "cuBLASLt baseline GEMM needs M, N, K > 0; got M=" << m << ", N=" << n << ", K=" << k);
  int device = 0;
  NB_CUDA_CHECK(cudaGetDevice(&device));
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  auto& slot = s.plans[PlanKey{device, kind, m, n, k}];
  if (slot) return *slot;

  cublasLtHandle_t& handle = s.handles[device];
  if (handle == nullptr) NB_CUBLAS_CHECK(cublasLtCreate(&handle));

  const KindTypes t = kind_types(kind);
  auto plan = std::make_unique<Plan>();
  NB_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, t.compute, t.scale));
  const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
  NB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t,
                                                 sizeof(op_t)));
  NB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n,
                                                 sizeof(op_n)));
  if (t.fast_accum) {
    const int8_t on = 1;
    NB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                                                   &on, sizeof(on)));
  }
  NB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, t.ab, static_cast<uint64_t>(k),
                                             static_cast<uint64_t>(n), k));
  NB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, t.ab, static_cast<uint64_t>(k),
                                             static_cast<uint64_t>(m), k));
  NB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, t.cd, static_cast<uint64_t>(n),
                                             static_cast<uint64_t>(m), n));

  cublasLtMatmulPreference_t pref = nullptr;
  NB_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kCublasLtWorkspaceBytes;
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st = [&] {
    cublasStatus_t r = cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    if (r != CUBLAS_STATUS_SUCCESS) return r;
    return cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->c, plan->c,
                                          pref, 1, &result, &found);
  }();
  cublasLtMatmulPreferenceDestroy(pref);
  NB_CHECK(st == CUBLAS_STATUS_SUCCESS && found > 0,
           "cuBLASLt found no algorithm for the " << cublaslt_kind_name(kind) << " GEMM M=" << m
               << ", N=" << n << ", K=" << k << " (" << cublasLtGetStatusString(st)
               << "); INT8/FP8 need K and N multiples of 16 and a Hopper-class GPU for FP8");
  plan->algo = result.algo;
  slot = std::move(plan);
  return *slot;
}

template <class Scalar>
void run(CublasLtKind kind, const void* a, const void* b, int64_t m, int64_t n, int64_t k, void* c,
         cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  NB_CHECK(k > 0, "cuBLASLt baseline GEMM with K = 0 is not supported; got M=" << m << ", N=" << n);
  NB_CHECK(a != nullptr && b != nullptr && c != nullptr,
           "cuBLASLt baseline GEMM: a null operand or output pointer");
  const Plan& plan = get_plan(kind, m, n, k);
  cublasLtHandle_t handle = nullptr;
  {
    int device = 0;
    NB_CUDA_CHECK(cudaGetDevice(&device));
    std::lock_guard<std::mutex> lock(state().mutex);
    handle = state().handles[device];
  }
  const Scalar alpha = 1, beta = 0;
  void* ws = workspace(kCublasLtWorkspaceBytes, stream);
  // Operands swapped: see get_plan.
  NB_CUBLAS_CHECK(cublasLtMatmul(handle, plan.desc, &alpha, b, plan.a, a, plan.b, &beta, c,
                                 plan.c, c, plan.c, &plan.algo, ws, kCublasLtWorkspaceBytes,
                                 stream));
}

}  // namespace

const char* cublaslt_kind_name(CublasLtKind kind) {
  switch (kind) {
    case CublasLtKind::bf16: return "bf16";
    case CublasLtKind::s8s8_s32: return "s8s8_s32";
    case CublasLtKind::e4m3_bf16: return "e4m3_bf16";
  }
  return "?";
}

void cublaslt_gemm_bf16_tn(const bf16_t* a, const bf16_t* b, int64_t m, int64_t n, int64_t k,
                           bf16_t* c, cudaStream_t stream) {
  run<float>(CublasLtKind::bf16, a, b, m, n, k, c, stream);
}

void cublaslt_gemm_s8s8_s32_tn(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k,
                               int32_t* c, cudaStream_t stream) {
  run<int32_t>(CublasLtKind::s8s8_s32, a, b, m, n, k, c, stream);
}

void cublaslt_gemm_e4m3_bf16_tn(const uint8_t* a, const uint8_t* b, int64_t m, int64_t n,
                                int64_t k, bf16_t* c, cudaStream_t stream) {
  run<float>(CublasLtKind::e4m3_bf16, a, b, m, n, k, c, stream);
}

std::string cublaslt_algo_description(CublasLtKind kind, int64_t m, int64_t n, int64_t k) {
  const Plan& plan = get_plan(kind, m, n, k);
  // Reads one config attribute; `bytes` is its documented size (4, or 2 for the cluster id).
  const auto attr = [&](cublasLtMatmulAlgoConfigAttributes_t a, size_t bytes) {
    uint32_t v = 0;  // little-endian: a 2-byte attribute lands in the low half
    size_t written = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(&plan.algo, a, &v, bytes, &written) !=
        CUBLAS_STATUS_SUCCESS)
      return -1L;
    return static_cast<long>(v);
  };
  std::ostringstream os;
  os << "algo=" << attr(CUBLASLT_ALGO_CONFIG_ID, 4) << " tile=" << attr(CUBLASLT_ALGO_CONFIG_TILE_ID, 4)
     << " stages=" << attr(CUBLASLT_ALGO_CONFIG_STAGES_ID, 4)
     << " splitk=" << attr(CUBLASLT_ALGO_CONFIG_SPLITK_NUM, 4)
     << " cluster=" << attr(CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, 2);
  return os.str();
}

}  // namespace nibble::cuda
