// The HQ-MM / LSS-MM linear layer on the GPU: argument checks and the sequence of kernels
// (hq_linear.h). Host code only; the kernels are in hq_linear_quant.cu, hq_linear_backward.cu,
// src/cuda/quant and src/cuda/gemm.
#include "cuda/linear/hq_linear.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>

#include "cuda/common/check.h"
#include "cuda/common/stream_fork.h"
#include "cuda/common/workspace.h"
#include "cuda/gemm/gemm_dispatch.h"
#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"
#include "cuda/gemm/gemm_sm90_host.h"
#include "cuda/linear/hq_linear_kernels.h"
#include "cuda/quant/bitsplit.h"
#include "cuda/quant/launch_checks.h"
#include "nibble/error.h"

namespace nibble::cuda {
namespace {

namespace ld = linear_detail;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t round16(int64_t v) { return (v + 15) / 16 * 16; }

void check_dims(const char* fn, int64_t n, int64_t d, int64_t c, const HqLinearConfig& cfg) {
  NB_CHECK(n > 0 && d > 0 && c > 0,
           fn << ": sizes must be positive, got N=" << n << " D=" << d << " C=" << c
              << " (x [N, D], w [C, D])");
  NB_CHECK(n % 16 == 0 && d % 16 == 0 && c % 16 == 0,
           fn << ": N=" << n << ", D=" << d << ", C=" << c
              << " must all be multiples of 16 (the INT8 GEMMs take each as K, in 16-byte "
                 "rows); zero-pad x, w and dy to N=" << round16(n) << ", D=" << round16(d)
              << ", C=" << round16(c) << " (padded rows/columns contribute nothing)");
  NB_CHECK(cfg.block > 0 && (cfg.block & (cfg.block - 1)) == 0 && cfg.block <= 1024 &&
               d % cfg.block == 0,
           fn << ": hadamard block " << cfg.block << " must be a power of two in [1, 1024] "
              << "dividing D = " << d << "; pick 1, 2, 4, ... dividing D");
  NB_CHECK(cfg.range.qmin < 0 && cfg.range.qmax > 0 && cfg.range.qmin >= -8 &&
               cfg.range.qmax <= 7,
           fn << ": code range [" << cfg.range.qmin << ", " << cfg.range.qmax
              << "] must satisfy qmin < 0 < qmax inside [-8, 7] (LSQ, packed s4 codes); use "
                 "[-7, 7] or [-8, 7]");
  // |Σ| ≤ 90·8·K for the backward GEMMs; K ≤ 2^21 keeps it far inside int32.
  NB_CHECK(n < (int64_t{1} << 21) && d < (int64_t{1} << 21) && c < (int64_t{1} << 21),
           fn << ": N, D, C must stay below 2^21 (int32 accumulators, int32 row indices); "
                 "split the batch");
}

// The sampled variant's settings; the backward, its workspace query (for LssVariant::sampled)
// and hq_linear_sampled_capacity apply the same rules.
void check_sampling(const char* fn, int64_t n, const HqLinearConfig& cfg) {
  NB_CHECK(cfg.sample_fraction > 0.0 && cfg.sample_fraction <= 1.0,
           fn << ": sample_fraction " << cfg.sample_fraction << " must be in (0, 1]");
  NB_CHECK(std::isfinite(cfg.sample_capacity_sigmas),
           fn << ": sample_capacity_sigmas " << cfg.sample_capacity_sigmas
              << " must be finite (8 is the default)");
  // The sampled dw sums up to 2N products of |q| ≤ 127 and |x| ≤ 8 in int32.
  NB_CHECK(n > 0 && 2 * n * 127 * 8 <= INT32_MAX,
           fn << ": N = " << n << " must be positive and small enough for the sampled variant's "
              << "int32 dw sums (2N·127·8 ≤ 2^31 − 1, i.e. N ≤ 1056899); split the batch");
}

// Device pointer, 16-byte aligned (a tensor base from cudaMalloc or a 16-byte offset).
void check_tensor(const char* fn, const void* p, int64_t count, const char* name) {
  detail::check_device_pointer(p, count, fn, name);
  NB_CHECK(aligned16(p), fn << ": " << name << " (" << p
                            << ") must start on a 16-byte boundary; pass a cudaMalloc base or a "
                               "16-byte multiple offset");
}

// Sub-buffers of the backward's one workspace, each 256-byte aligned. With base = null it
// only measures.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  template <class T>
  T* take(int64_t count) {
    offset_ = (offset_ + 255) / 256 * 256;
    T* p = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += static_cast<size_t>(count) * sizeof(T);
    return p;
  }
  size_t bytes() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

struct Workspace {
  // shared by both variants
  float* split_scale = nullptr;    // [2] bitsplit: s, max|g|
  int32_t* dw_acc = nullptr;       // [C, D] the dw GEMM's sums (separate dw pass only)
  int64_t* part_dw = nullptr;      // exact LSQ partials of dsw
  double* part_db = nullptr;       // column-sum partials
  // keep_all
  int8_t* comb = nullptr;          // [N, C]
  int8_t* comb_t = nullptr;        // [C, N]
  int8_t* x_q_t = nullptr;         // [D, N]
  int32_t* dx_acc = nullptr;       // [N, D] the dx GEMM's sums (separate dx pass only)
  int64_t* part_dx_exact = nullptr;  // exact LSQ partials of dsx
  // sampled
  double* part_dx = nullptr;       // fp64 LSQ partials of dsx
  int8_t* hi = nullptr;          // [N, C]
  int8_t* lo = nullptr;          // [N, C]
  int64_t* row_sumsq = nullptr;  // [2N]
  float* x_norm = nullptr;       // [N]
  float* scores_w = nullptr;     // [2N]
  float* p_w = nullptr;
  float* scores_x = nullptr;
  float* p_x = nullptr;
  int32_t* kept_w = nullptr;     // [round16(2N)]
  int32_t* kept_x = nullptr;
  int32_t* counts = nullptr;     // [4]: kept_w count, padded; kept_x count, padded
  int32_t* pos = nullptr;        // [2N]
  float* coef = nullptr;         // [K_cap] (K_cap = hq_linear_sampled_capacity)
  float* dw_scale = nullptr;     // [2]: the dw re-quantization scale t, and t·s
  int8_t* a_dw = nullptr;        // [C, K_cap]
  int8_t* b_dw = nullptr;        // [D, K_cap]
  int8_t* a_dx = nullptr;        // [K_cap, C]
  float* out_dx = nullptr;       // [K_cap, D]
};

// The fused epilogue reads the side channel with its own copy of the format's constants.
static_assert(kEpiClippedNibble == kLsqClipped && kEpiResidualSteps == kLsqResidualSteps);

// The dx and dw GEMMs apply the mask, the step sums and the Hadamard in their epilogues
// (HqLinearConfig::fuse_mask_epilogues); the sampled dx (per-row weights, two rows per token)
// always takes the separate pass.
// Where the fused epilogue wins (H200, bench/README.md run S11): it has 128-row tiles only, so
// at M ≤ 256 the plain GEMM's 64-row tiles and the separate pass are faster; and its epilogue
// hides under the other warpgroup's mainloop only when K is long enough: at K ≤ 1024 it
// measured 1-13 µs slower than GEMM + pass, at K = 3072 even, from K = 4096 on 7-250 µs faster.
bool fused_mask(const HqLinearConfig& cfg, int64_t m, int64_t k) {
  return cfg.fuse_mask_epilogues && cfg.block <= kEpiMaskMaxBlock && m > 256 && k > 1024 &&
         resolve_gemm_path(cfg.gemm) == GemmPath::wgmma_sm90;
}

// LSQ partial sums of an [rows, cols] product over K terms: the fused epilogue's warp slots,
// or the separate pass's blocks.
int64_t mask_partials_count(int64_t rows, int64_t cols, int64_t k, const HqLinearConfig& cfg) {
  return fused_mask(cfg, rows, k) ? gemm_s8s8_mask_hadamard_partials({nullptr, nullptr, rows, cols, 16})
                         : ld::lsq_partials_count(rows, cols, cfg.block);
}

Workspace carve(void* base, int64_t n, int64_t d, int64_t c, const HqLinearConfig& cfg,
                size_t* bytes) {
  Carver cv(base);
  Workspace w;
  w.split_scale = cv.take<float>(2);
  // the dw GEMM sums over N tokens (keep-all) or at most K_cap ≤ 2N kept rows (sampled); the
  // sampled variant decides with N, as its launch does
  if (!fused_mask(cfg, c, n)) w.dw_acc = cv.take<int32_t>(c * d);
  w.part_dw = cv.take<int64_t>(mask_partials_count(c, d, n, cfg));
  w.part_db = cv.take<double>(bitsplit_column_chunks(n) * c);
  if (cfg.lss == LssVariant::keep_all) {
    w.comb = cv.take<int8_t>(n * c);
    w.comb_t = cv.take<int8_t>(c * n);
    w.x_q_t = cv.take<int8_t>(d * n);
    if (!fused_mask(cfg, n, c)) w.dx_acc = cv.take<int32_t>(n * d);
    w.part_dx_exact = cv.take<int64_t>(mask_partials_count(n, d, c, cfg));
  } else {
    w.part_dx = cv.take<double>(ld::lsq_partials_count(n, d, cfg.block));
    const int64_t list = round16(2 * n);  // select_rows writes the whole padded list
    const int64_t k = hq_linear_sampled_capacity(n, cfg);
    w.hi = cv.take<int8_t>(n * c);
    w.lo = cv.take<int8_t>(n * c);
    w.row_sumsq = cv.take<int64_t>(2 * n);
    w.x_norm = cv.take<float>(n);
    w.scores_w = cv.take<float>(2 * n);
    w.p_w = cv.take<float>(2 * n);
    w.scores_x = cv.take<float>(2 * n);
    w.p_x = cv.take<float>(2 * n);
    w.kept_w = cv.take<int32_t>(list);
    w.kept_x = cv.take<int32_t>(list);
    w.counts = cv.take<int32_t>(4);
    w.pos = cv.take<int32_t>(2 * n);
    w.coef = cv.take<float>(k);
    w.dw_scale = cv.take<float>(2);
    w.a_dw = cv.take<int8_t>(c * k);
    w.b_dw = cv.take<int8_t>(d * k);
    w.a_dx = cv.take<int8_t>(k * c);
    w.out_dx = cv.take<float>(k * d);
  }
  *bytes = cv.bytes();
  return w;
}

PhiloxKey with_role(PhiloxKey key, RngRole role) {
  key.role = role;
  return key;
}

template <class T>
void quantize_weight_impl(const HqLinearWeightParams<T>& p, const HqLinearConfig& cfg,
                          const PhiloxKey& key, cudaStream_t stream) {
  const char* fn = "cuda::hq_linear_quantize_weight";
  check_dims(fn, p.n, p.d, p.c, cfg);
  check_tensor(fn, p.w, p.c * p.d, "w [C, D]");
  check_tensor(fn, p.out.w_q, p.c * p.d, "w_q [C, D]");
  check_tensor(fn, p.out.w_q_t, p.c * p.d, "w_q_t [D, C]");
  check_tensor(fn, p.out.w_q_packed, p.c * p.d / 2, "w_q_packed [C, D/2]");
  check_tensor(fn, p.out.w_e_packed, p.c * p.d / 2, "w_e_packed [C, D/2]");
  HqLsqQuantizeParams<T> q;
  q.x = p.w;
  q.rows = p.c;
  q.cols = p.d;
  q.block = cfg.block;
  q.range = cfg.range;
  q.step = p.sw;
  q.key = key;
  q.index_base = static_cast<uint64_t>(p.n * p.d);  // w_r draws [N·D, N·D + C·D)
  q.q = p.out.w_q;
  q.q_t = p.out.w_q_t;
  q.q_packed = p.out.w_q_packed;
  q.e_packed = p.out.w_e_packed;
  q.status = p.status;
  hq_lsq_quantize(q, stream);
}

template <class T>
void forward_impl(const HqLinearForwardParams<T>& p, const HqLinearConfig& cfg,
                  const PhiloxKey& key, cudaStream_t stream) {
  const char* fn = "cuda::hq_linear_forward";
  check_dims(fn, p.n, p.d, p.c, cfg);
  NB_CHECK((p.y != nullptr) != (p.y_f32 != nullptr),
           fn << ": set exactly one output, y (bf16) or y_f32 (f32)");
  NB_CHECK((p.x_q_packed != nullptr) == (p.x_e_packed != nullptr),
           fn << ": x_q_packed and x_e_packed are the saved state together; set both (training) "
                 "or neither (inference)");
  // The INT4 GEMM on packed codes needs rows of 16-byte multiples (D % 32 == 0); otherwise,
  // and on the wgmma path, the GEMM reads the int8 codes x_q / w_q (hq_linear.h).
  const GemmPath path = resolve_gemm_path(cfg.gemm);
  const bool packed_gemm = path == GemmPath::mma_sm80 && p.d % 32 == 0;
  check_tensor(fn, p.x, p.n * p.d, "x [N, D]");
  if (packed_gemm) {
    NB_CHECK(p.w_q_packed != nullptr,
             fn << ": the mma_sm80 GEMM path multiplies packed INT4 codes: set w_q_packed "
                   "[C, D/2] (from hq_linear_quantize_weight)");
    check_tensor(fn, p.w_q_packed, p.c * p.d / 2, "w_q_packed [C, D/2]");
  } else {
    check_tensor(fn, p.w_q, p.c * p.d, "w_q [C, D]");
  }
  check_tensor(fn, p.x_q, p.n * p.d, "x_q [N, D] scratch");
  detail::check_device_pointer(p.sx, 1, fn, "sx");
  detail::check_device_pointer(p.sw, 1, fn, "sw");
  if (p.bias != nullptr) check_tensor(fn, p.bias, p.c, "bias [C]");
  if (p.x_q_packed != nullptr) {
    check_tensor(fn, p.x_q_packed, p.n * p.d / 2, "x_q_packed [N, D/2]");
    check_tensor(fn, p.x_e_packed, p.n * p.d / 2, "x_e_packed [N, D/2]");
  }

  // x -> x_q (GEMM operand) + saved packed codes and side channel, one pass
  HqLsqQuantizeParams<T> q;
  q.x = p.x;
  q.rows = p.n;
  q.cols = p.d;
  q.block = cfg.block;
  q.range = cfg.range;
  q.step = p.sx;
  q.key = key;
  q.index_base = 0;  // x_r draws [0, N·D)
  q.q = p.x_q;
  q.q_packed = p.x_q_packed;
  q.e_packed = p.x_e_packed;
  q.status = p.status;
  // The packed GEMM's A operand: the saved codes, or (inference) x_q's memory, which holds
  // N·D ≥ N·D/2 bytes and is 16-byte aligned (checked above). x_q is not needed as int8 then.
  uint8_t* const x_packed_a =
      p.x_q_packed != nullptr ? p.x_q_packed : reinterpret_cast<uint8_t*>(p.x_q);
  if (packed_gemm) {
    q.q = nullptr;
    q.q_packed = x_packed_a;
  }
  hq_lsq_quantize(q, stream);

  // y = float(x_q·w_qᵀ)·(sx·sw) + b
  EpiDequantBias epi;
  epi.scale_a = p.sx;
  epi.a_per_row = false;
  epi.scale_b = p.sw;
  epi.b_per_col = false;
  epi.bias = p.bias;
  const GemmS8S8Params g{p.x_q, p.w_q, p.n, p.c, p.d};
  const GemmS4S4Params g4{x_packed_a, p.w_q_packed, p.n, p.c, p.d};
  if (p.y != nullptr) {
    check_tensor(fn, p.y, p.n * p.c, "y [N, C]");
    if (packed_gemm) gemm_s4s4_s32_tn_dequant(g4, epi, p.y, path, stream);
    else gemm_s8s8_s32_tn_dequant(g, epi, p.y, path, stream);
  } else {
    check_tensor(fn, p.y_f32, p.n * p.c, "y_f32 [N, C]");
    if (packed_gemm) gemm_s4s4_s32_tn_dequant(g4, epi, p.y_f32, path, stream);
    else gemm_s8s8_s32_tn_dequant(g, epi, p.y_f32, path, stream);
  }
}

// One fused side-channel pass (mask, δ̃ partials, inverse Hadamard) into out.
// A product's mask, exact step partials and inverse Hadamard,
//   out [rows, cols] = H(mask(float(A·Bᵀ)·(scale_a·scale_b)))·norm,  A·Bᵀ = the GEMM g,
// in two calls: masked_gemm runs the GEMM with all of it in the epilogue (fused_mask), or the
// plain int32 GEMM into acc; masked_pass then runs the separate pass on acc (nothing when
// fused). Split so that the schedule can queue the pass on another stream.
struct MaskedProduct {
  const float* scale_a;
  const float* scale_b;
  const uint8_t* q_packed;  // [rows, cols/2] codes and side channel of the forward tensor
  const uint8_t* e_packed;
  int32_t* acc;             // [rows, cols] (separate pass only)
  int64_t* partials;        // mask_partials_count(rows, cols, k, cfg)
  bool fused;               // fused_mask(cfg, rows, k): as the workspace was carved
};

template <class OutT>
void masked_gemm(const GemmS8S8Params& g, const MaskedProduct& mp, const HqLinearConfig& cfg,
                 OutT* out, cudaStream_t stream) {
  if (!mp.fused) {
    gemm_s8s8_s32_tn(g, mp.acc, resolve_gemm_path(cfg.gemm), stream);
    return;
  }
  EpiMaskHadamard epi;
  epi.scale_a = mp.scale_a;
  epi.scale_b = mp.scale_b;
  epi.q_packed = mp.q_packed;
  epi.e_packed = mp.e_packed;
  epi.block = static_cast<int>(cfg.block);
  epi.partials = mp.partials;
  gemm_s8s8_s32_tn_mask_hadamard_sm90(g, epi, out, stream);
}

template <class OutT>
void masked_pass(int64_t rows, int64_t cols, const MaskedProduct& mp, const HqLinearConfig& cfg,
                 OutT* out, cudaStream_t stream) {
  if (mp.fused) return;
  ld::LsqMaskHadamardParams<OutT> m;
  m.acc = mp.acc;
  m.scale_a = mp.scale_a;
  m.scale_b = mp.scale_b;
  m.rows = rows;
  m.cols = cols;
  m.block = cfg.block;
  m.q_packed = mp.q_packed;
  m.e_packed = mp.e_packed;
  m.out = out;
  m.exact_partials = mp.partials;
  ld::lsq_mask_hadamard(m, stream);
}

template <class OutT>
void mask_pass(const float* g_t, const float* gathered, const int32_t* pos, int64_t rows,
               int64_t cols, const HqLinearConfig& cfg, const uint8_t* q_packed,
               const uint8_t* e_packed, OutT* out, double* partials, cudaStream_t stream) {
  ld::LsqMaskHadamardParams<OutT> m;
  m.g_t = g_t;
  m.gathered = gathered;
  m.pos = pos;
  m.rows = rows;
  m.cols = cols;
  m.block = cfg.block;
  m.q_packed = q_packed;
  m.e_packed = e_packed;
  m.out = out;
  m.partials = partials;
  ld::lsq_mask_hadamard(m, stream);
}

template <class G>
void backward_impl(const HqLinearBackwardParams<G>& p, const HqLinearConfig& cfg,
                   const PhiloxKey& key, cudaStream_t stream) {
  const char* fn = "cuda::hq_linear_backward";
  const int64_t n = p.n, d = p.d, c = p.c;
  check_dims(fn, n, d, c, cfg);
  NB_CHECK((p.dx != nullptr) != (p.dx_f32 != nullptr),
           fn << ": set exactly one of dx (bf16) and dx_f32 (f32)");
  if (cfg.lss == LssVariant::sampled) check_sampling(fn, n, cfg);
  // The exact int64 step sums (docs/formats.md): N·D·C elements·terms of |acc·w| ≤ 127·8·2·112
  // (the sampled dw's bound, the largest) must stay below 2^63.
  NB_CHECK(static_cast<double>(n) * static_cast<double>(d) * static_cast<double>(c) *
                   (2.0 * 127 * 8 * 112) < 0x1p63,
           fn << ": N=" << n << ", D=" << d << ", C=" << c
              << " is too large for the exact int64 LSQ step sums (N·D·C must stay below about "
                 "4·10^13); split the batch");
  check_tensor(fn, p.dy, n * c, "dy [N, C]");
  check_tensor(fn, p.x_q_packed, n * d / 2, "x_q_packed [N, D/2]");
  check_tensor(fn, p.x_e_packed, n * d / 2, "x_e_packed [N, D/2]");
  check_tensor(fn, p.w_q_packed, c * d / 2, "w_q_packed [C, D/2]");
  check_tensor(fn, p.w_e_packed, c * d / 2, "w_e_packed [C, D/2]");
  check_tensor(fn, p.w_q_t, c * d, "w_q_t [D, C]");
  check_tensor(fn, p.dw, c * d, "dw [C, D]");
  if (p.dx != nullptr) check_tensor(fn, p.dx, n * d, "dx [N, D]");
  else check_tensor(fn, p.dx_f32, n * d, "dx_f32 [N, D]");
  if (p.db != nullptr) detail::check_device_pointer(p.db, c, fn, "db [C]");
  detail::check_device_pointer(p.sx, 1, fn, "sx");
  detail::check_device_pointer(p.sw, 1, fn, "sw");
  detail::check_device_pointer(p.dsx, 1, fn, "dsx");
  detail::check_device_pointer(p.dsw, 1, fn, "dsw");
  size_t need = 0;
  carve(nullptr, n, d, c, cfg, &need);
  NB_CHECK(p.workspace != nullptr && p.workspace_bytes >= need,
           fn << ": workspace of " << p.workspace_bytes << " bytes is too small; this shape "
              << "needs " << need << " (hq_linear_backward_workspace_bytes)");
  check_tensor(fn, p.workspace, static_cast<int64_t>(need), "workspace");
  const Workspace ws = carve(p.workspace, n, d, c, cfg, &need);

  // LSQ partials of each product
  const int64_t parts_dx = cfg.lss == LssVariant::keep_all
                               ? mask_partials_count(n, d, c, cfg)
                               : ld::lsq_partials_count(n, d, cfg.block);
  const int64_t parts_dw = mask_partials_count(c, d, n, cfg);
  const float* s = ws.split_scale;  // the bit-split scale, written by bitsplit on the device
  // The GEMMs below have an int8 gradient operand (14·hi + lo in [−90, 90], or re-quantized
  // sampled codes): s8 on every path (gemm_dispatch.h). On Ampere the paper's two INT4 GEMMs
  // hi·w and lo·w would cost the same as this one INT8 GEMM (s4 mma.sync has twice the s8
  // rate, and there are two of them), so nothing is lost by fusing them.
  const GemmPath path = resolve_gemm_path(cfg.gemm);

  BitSplitParams<G> bs;
  bs.g = p.dy;
  bs.rows = n;
  bs.cols = c;
  bs.key = with_role(key, RngRole::grad_output_rounding);
  bs.scale = ws.split_scale;
  bs.status = p.status;
  // db = Σ_rows dy: column partials from the bit split's first pass, which reads dy anyway
  if (p.db != nullptr) bs.col_partials = ws.part_db;

  // The keep-all schedule forks a side stream for its critical path (below); the sampled one
  // runs in order, so crit is the caller's stream there.
  std::optional<StreamFork> fork;
  if (cfg.lss == LssVariant::keep_all && cfg.overlap_passes) fork.emplace(stream);
  const cudaStream_t crit = fork ? fork->side() : stream;
  if (cfg.lss == LssVariant::keep_all) {
    // Two chains meet only at the end: dx = the dx GEMM with the mask, the step sums and ·Hᵀ,
    // dw = the same of the dw GEMM; the x-code unpack needs nothing of this call. With
    // cfg.overlap_passes the critical path (bit split, GEMMs) goes to the fork's side stream
    // (crit, one priority step above the caller's) and the memory-bound kernels stay on the
    // caller's stream, where they fill the SMs the critical path leaves:
    //   crit:   bit split ─ dx GEMM ─┬──(x_q_t)─ dw GEMM [─ dw pass] ─┐
    //   stream: x unpack ────────────┴─[dx pass] ─────────────────────┴─ finalize
    // (the passes in brackets run only where the epilogues cannot take them, fused_mask).
    // A persistent GEMM takes every SM it is given, so the GEMMs are capped at the fewest SMs
    // that keep their tile rounds (16384×4096 dx: 4096 tiles, 32 rounds on 132 SMs and on
    // 128); the kernels beside them start on the SMs left over.
    const auto capped = [&](GemmS8S8Params g) {
      if (fork) g.max_sms = sm90::same_round_sms(g, device_sm_count());
      return g;
    };
    // 1. the dw GEMM's B operand: x codes, token-contiguous
    ld::unpack_s4_transpose(p.x_q_packed, n, d, ws.x_q_t, stream);
    // 2. dy -> combined = 14·hi + lo [N, C] and its transpose [C, N], one shared scale s
    bs.combined = ws.comb;
    bs.combined_t = ws.comb_t;
    bitsplit(bs, crit);
    // 3. dx = H(mask(float(combined·w_q)·(s·sw)))·norm and dsx's exact partials
    //    A = combined [N, C], B = w_q_t [D, C]
    const MaskedProduct mx{s,         p.sw,         p.x_q_packed,    p.x_e_packed,
                           ws.dx_acc, ws.part_dx_exact, fused_mask(cfg, n, c)};
    const GemmS8S8Params gx = capped({ws.comb, p.w_q_t, n, d, c});
    if (p.dx != nullptr) masked_gemm(gx, mx, cfg, p.dx, crit);
    else masked_gemm(gx, mx, cfg, p.dx_f32, crit);
    if (fork) {
      fork->main_waits_side();  // the dx GEMM (and the split scale s) is done
      fork->side_waits_main();  // x_q_t is written (the unpack is all the stream holds so far)
    }
    if (p.dx != nullptr) masked_pass(n, d, mx, cfg, p.dx, stream);
    else masked_pass(n, d, mx, cfg, p.dx_f32, stream);
    // 4. dw = H(mask(float(combinedᵀ·x_q)·(s·sx)))·norm and dsw's exact partials
    //    A = combined_t [C, N], B = x_q_t [D, N]
    const MaskedProduct mw{s,         p.sx,       p.w_q_packed,         p.w_e_packed,
                           ws.dw_acc, ws.part_dw, fused_mask(cfg, c, n)};
    masked_gemm(capped({ws.comb_t, ws.x_q_t, c, d, n}), mw, cfg, p.dw, crit);
    masked_pass(c, d, mw, cfg, p.dw, crit);
  } else {
    // Sampled (see LssVariant): split halves and their row Σq²
    bs.hi = ws.hi;
    bs.lo = ws.lo;
    bs.row_sumsq = ws.row_sumsq;
    bitsplit(bs, stream);
    const double budget = cfg.sample_fraction * static_cast<double>(2 * n);
    // dw scores ‖G↕_i‖·‖x_q row‖·sx, dx scores ‖G↕_i‖; fit p; Bernoulli rows
    ld::row_norms_packed(p.x_q_packed, n, d, p.sx, ws.x_norm, stream);
    LeverageParams lv;
    lv.row_sumsq = ws.row_sumsq;
    lv.rows = n;
    lv.cols = c;
    lv.scale = s;
    lv.status = p.status;
    lv.x_norm = ws.x_norm;
    lv.scores = ws.scores_w;
    leverage_scores(lv, stream);
    lv.x_norm = nullptr;
    lv.scores = ws.scores_x;
    leverage_scores(lv, stream);
    // the dw and dx fits and samplings are independent single-block loops: one launch each pair
    fit_probabilities_pair({ws.scores_w, 2 * n, budget, ws.p_w, p.status},
                           {ws.scores_x, 2 * n, budget, ws.p_x, p.status}, stream);
    SampleRowsParams sw;
    sw.n = 2 * n;
    sw.status = p.status;
    sw.p = ws.p_w;
    sw.key = with_role(key, RngRole::sample_dw);
    sw.kept_index = ws.kept_w;
    sw.kept_count = ws.counts;
    SampleRowsParams sx = sw;
    sx.p = ws.p_x;
    sx.key = with_role(key, RngRole::sample_dx);
    sx.kept_index = ws.kept_x;
    sx.kept_count = ws.counts + 2;
    sample_rows_pair(sw, sx, stream);
    // The GEMMs run over the first K_cap list entries, whatever the kept counts (they stay on
    // the device: no host wait); entries past a count are −1, i.e. zero rows. A count above
    // K_cap is reported (StatusKind::capacity), see LssVariant::sampled.
    const int64_t k_cap = hq_linear_sampled_capacity(n, cfg);
    ld::check_sample_capacity(ws.counts, k_cap, p.status, stream);
    // t = max_kept |β/p·code| / 127 and t·s, on the device (the list's −1 tail is skipped)
    ld::sampled_dw_scale(ws.hi, ws.lo, n, c, ws.kept_w, k_cap, ws.p_w, s, ws.dw_scale, p.status,
                         stream);
    // dw_t = float(Σ_kept q_iᵀ·x_q(i mod N))·((t·s)·sx), q = clamp(floor(β/p·code/t + u)):
    // 1/p varies along K, so it lives in the re-quantized codes, not in the epilogue (F.6).
    // K = K_cap: the kept rows, then zero rows (nothing kept makes dw_t = 0).
    ld::gather_weighted_split_t(ws.hi, ws.lo, n, c, ws.kept_w, k_cap, ws.p_w, ws.dw_scale,
                                with_role(key, RngRole::sample_dw_rounding), ws.a_dw, stream);
    ld::gather_x_t(p.x_q_packed, n, d, ws.kept_w, k_cap, ws.b_dw, stream);
    // The mask, dsw's exact partials and ·Hᵀ as in keep-all; t·s is one fp32 product on the
    // device (dw_scale[1]).
    // (fused or not decided with N, as the workspace: K_cap ≤ 2N)
    const MaskedProduct mw{ws.dw_scale + 1, p.sx,       p.w_q_packed,         p.w_e_packed,
                           ws.dw_acc,       ws.part_dw, fused_mask(cfg, c, n)};
    masked_gemm({ws.a_dw, ws.b_dw, c, d, k_cap}, mw, cfg, p.dw, stream);
    masked_pass(c, d, mw, cfg, p.dw, stream);
    // dx: kept split rows [k_cap, C] · w_q, row j scaled by coef_j·sw = (row_scale/p)·sw
    ld::gather_split_rows(ws.hi, ws.lo, n, c, ws.kept_x, k_cap, ws.a_dx, stream);
    ld::dx_coefs(ws.kept_x, k_cap, ws.p_x, s, n, ws.coef, ws.pos, stream);
    EpiDequantBias epi_x;
    epi_x.scale_a = ws.coef;
    epi_x.a_per_row = true;
    epi_x.scale_b = p.sw;
    epi_x.b_per_col = false;
    gemm_s8s8_s32_tn_dequant({ws.a_dx, p.w_q_t, k_cap, d, c}, epi_x, ws.out_dx, path, stream);
    // the token's hi and lo rows are added inside the fused pass
    if (p.dx != nullptr)
      mask_pass(nullptr, ws.out_dx, ws.pos, n, d, cfg, p.x_q_packed, p.x_e_packed, p.dx,
                ws.part_dx, stream);
    else
      mask_pass(nullptr, ws.out_dx, ws.pos, n, d, cfg, p.x_q_packed, p.x_e_packed, p.dx_f32,
                ws.part_dx, stream);
  }
  if (fork) fork->join();  // everything on crit, dw and its partials last, is written
  ld::LsqSumParts sum_dx, sum_dw;
  if (cfg.lss == LssVariant::keep_all) {
    sum_dx.exact = ws.part_dx_exact;
    sum_dx.scale_a = s;
    sum_dx.scale_b = p.sw;
  } else {
    sum_dx.fp = ws.part_dx;
  }
  sum_dx.count = parts_dx;
  sum_dx.numel = n * d;
  sum_dx.out = p.dsx;
  sum_dw.exact = ws.part_dw;
  sum_dw.scale_a = cfg.lss == LssVariant::keep_all ? s : ws.dw_scale + 1;
  sum_dw.scale_b = p.sx;
  sum_dw.count = parts_dw;
  sum_dw.numel = c * d;
  sum_dw.out = p.dsw;
  ld::lsq_finalize(sum_dx, sum_dw, cfg.range.qmax, stream);
  // db = Σ_rows dy from the partials of step 1
  if (p.db != nullptr)
    ld::column_sums_finalize(ws.part_db, bitsplit_column_chunks(n), c, p.db, stream);
  if (p.grad_scale != nullptr) {
    NB_CUDA_CHECK(cudaMemcpyAsync(p.grad_scale, s, sizeof(float), cudaMemcpyDeviceToDevice, stream));
  }
}

}  // namespace

void hq_linear_quantize_weight(const HqLinearWeightParams<float>& p, const HqLinearConfig& cfg,
                               const PhiloxKey& key, cudaStream_t stream) {
  quantize_weight_impl(p, cfg, key, stream);
}
void hq_linear_quantize_weight(const HqLinearWeightParams<bf16_t>& p, const HqLinearConfig& cfg,
                               const PhiloxKey& key, cudaStream_t stream) {
  quantize_weight_impl(p, cfg, key, stream);
}

void hq_linear_forward(const HqLinearForwardParams<float>& p, const HqLinearConfig& cfg,
                       const PhiloxKey& key, cudaStream_t stream) {
  forward_impl(p, cfg, key, stream);
}
void hq_linear_forward(const HqLinearForwardParams<bf16_t>& p, const HqLinearConfig& cfg,
                       const PhiloxKey& key, cudaStream_t stream) {
  forward_impl(p, cfg, key, stream);
}

int64_t hq_linear_sampled_capacity(int64_t n, const HqLinearConfig& cfg) {
  check_sampling("cuda::hq_linear_sampled_capacity", n, cfg);
  const int64_t list = round16(2 * n);
  const double expected = cfg.sample_fraction * static_cast<double>(2 * n);
  const double want = std::ceil(expected + cfg.sample_capacity_sigmas * std::sqrt(expected) + 16.0);
  if (!(want < static_cast<double>(list))) return list;  // also NaN
  return std::max<int64_t>(16, round16(static_cast<int64_t>(std::max(want, 0.0))));
}

HqLinearFusedProducts hq_linear_fused_products(int64_t n, int64_t d, int64_t c,
                                               const HqLinearConfig& cfg) {
  check_dims("cuda::hq_linear_fused_products", n, d, c, cfg);
  return {cfg.lss == LssVariant::keep_all && fused_mask(cfg, n, c), fused_mask(cfg, c, n)};
}

size_t hq_linear_backward_workspace_bytes(int64_t n, int64_t d, int64_t c,
                                          const HqLinearConfig& cfg) {
  const char* fn = "cuda::hq_linear_backward_workspace_bytes";
  check_dims(fn, n, d, c, cfg);
  if (cfg.lss == LssVariant::sampled) check_sampling(fn, n, cfg);
  size_t bytes = 0;
  carve(nullptr, n, d, c, cfg, &bytes);
  return bytes;
}

void hq_linear_backward(const HqLinearBackwardParams<float>& p, const HqLinearConfig& cfg,
                        const PhiloxKey& key, cudaStream_t stream) {
  backward_impl(p, cfg, key, stream);
}
void hq_linear_backward(const HqLinearBackwardParams<bf16_t>& p, const HqLinearConfig& cfg,
                        const PhiloxKey& key, cudaStream_t stream) {
  backward_impl(p, cfg, key, stream);
}

}  // namespace nibble::cuda
