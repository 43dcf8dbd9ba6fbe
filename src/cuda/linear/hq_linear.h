#pragma once
// The HQ-MM / LSS-MM linear layer of paper 1 on the GPU (twin of ref::hq_linear_forward /
// ref::hq_linear_backward, src/ref/linear.h, whose comments are the spec).
//
//   y [N, C] = x [N, D] · w [C, D]ᵀ + b     (N tokens, D in_features, C out_features)
//
// Forward, per step:
//   hq_linear_quantize_weight  w -> w_q [C, D], w_q_t [D, C] (the dx GEMM's B operand) and the
//                              saved packed codes + side channel of w, once per step
//   hq_linear_forward          x -> x_q [N, D] (scratch) + saved packed codes + side channel
//                              (one fused Hadamard + quantize + side-channel pass), then the
//                              INT8 GEMM y = float(x_q·w_qᵀ)·(sx·sw) + b with the fused dequant
//                              epilogue (scales read from device memory)
// Backward (every split row kept, the default):
//   bitsplit(dy) -> combined [N, C] (dx's A), combined_t [C, N] (dw's A), s
//   x_q_t [D, N] unpacked from the saved codes (dw's B)
//   dx_t = float(combined·w_q)·(s·sw), dw_t = float(combinedᵀ·x_q)·(s·sx)  (INT8 GEMMs), and per
//   product: side channel -> STE mask, the exact int64 step sum Σ acc·14δ̃ for dsx / dsw
//   (docs/formats.md, "LSQ step sums"), inverse block Hadamard, store dx (bf16 or f32), dw
//   (f32) — in the GEMM's epilogue where that wins (hq_linear_fused_products), else an int32
//   GEMM and one fused pass
//   db = Σ_rows dy (deterministic fp64 sums; the column partials come from the bit split's
//   first pass, which reads dy anyway)
// Backward (sampled, LssVariant::sampled): leverage scores, p, Bernoulli rows on the device;
//   dw over the kept rows' 1/p-weighted, re-quantized codes, dx with 1/p row scales (see there)
//
// Saved state: exactly the reference's HqLinearSaved encoding (docs/formats.md): packed s4
// codes and the packed s4 LSQ side channel, [rows, D/2] each, for x and for w — so the bytes
// can be compared with ref::HqLinearSaved. The side channel draws philox_uniform16 with role
// RngRole::rounding of the forward's key, index i for element i of x_r and N·D + i for w_r.
//
// Numerics against the reference (tests/gpu/test_linear_gpu.cpp checks each):
//   codes, side channel, x_q_t, combined: bit-exact (same fp32 operations, IEEE intrinsics);
//   y: the GEMM epilogue's fma(float(acc), sx·sw, b) vs the reference's two roundings, then
//      bf16 rounding (the bound of tests/gpu/test_gemm_gpu.cpp);
//   dx_t, dw_t: float(acc)·(s·sw) is one rounding on both sides (no bias), so equal; the mask
//      is exact and the Hadamard butterfly is the reference's order, so dx, dw equal the
//      reference's (bf16 dx: its round-to-nearest-even);
//   dsx, dsw: exact integer sums scaled once, bit-exact (the sampled dsx: the same fp64 terms
//      summed in another fixed order, bound in the test);
//   db: fp64 column sums in another fixed order;
//   sampled: kept rows, t, the re-quantized codes and dw bit-exact for equal p; dx within
//      fp32 rounding of the reference's fp64-weighted rows (see LssVariant).
//
// Shape rules (checked, nibble::Error): N, D, C multiples of 16 (the INT8 GEMM's K % 16 for
// all three products, and 16-byte rows) — pad the tensors otherwise; the Hadamard block a
// power of two in [1, 1024] dividing D; every pointer 16-byte aligned (cudaMalloc bases).
//
// All pointers are device pointers; work is queued on `stream` (the keep-all backward forks a
// side stream from it and joins it back before returning, HqLinearConfig::overlap_passes);
// nothing waits for the GPU, so every variant can be captured in a CUDA graph. Errors in the
// data (NaN/Inf input, a step size that is not positive finite) go to the optional status word
// (cuda/quant/status.h).
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/gemm/gemm_dispatch.h"
#include "nibble/dtype.h"
#include "nibble/format.h"
#include "nibble/rng.h"

namespace nibble::cuda {

// The side channel's constants; equal to ref::kLsqResidualSteps / ref::kLsqClipped (the GPU
// tests static_assert it, the CUDA backend does not include the reference).
constexpr int32_t kLsqResidualSteps = 14;  // δ̃ = e / 14 for e in [−7, 7]
constexpr int32_t kLsqClipped = -8;        // r was clipped: mask 0, δ = q

enum class LssVariant : uint8_t {
  // Every split row kept with p = 1 (the released code, ref::LssMode::keep_nonzero): one INT8
  // GEMM per product on 14·hi + lo, bit-for-bit the reference.
  keep_all,
  // Bernoulli leverage-score sampling of the 2N split rows (Σp = sample_fraction·2N), the
  // reference's estimator (ref::LssMode::bernoulli), unbiased:
  //   dx: kept hi / lo rows gathered into one INT8 GEMM, 1/p and 14 applied as per-row
  //       epilogue scales (coef = float(β·s/p) from fp64), the two rows of a token added in
  //       the fused pass: the reference's fp64-weighted estimator up to fp32 rounding (a few
  //       roundings per term; the bound is in tests/gpu/test_linear_gpu.cpp);
  //   dw: 1/p varies along dw's K (tokens), so it cannot be an epilogue scale (algorithms.md
  //       F.6); it is folded into the gradient codes, re-quantized to int8 with one scale t
  //       computed on the device (ref::requantize_sampled_rows, the spec):
  //         f_i = float(β_i)/p_i,  t = max_kept |f_i·code_i| / 127,
  //         q_i = clamp(floor(f_i·code_i / t + u), −127, 127), u role sample_dw_rounding,
  //       then dw_t = float(Σ_kept q_iᵀ·x_q(i mod N))·((t·s)·sx) as one INT8 GEMM over the
  //       kept rows (K padded to 16 with zero rows). Bit-exact with the reference for the same
  //       p (fit_probabilities agrees to 1 ulp, cuda/quant/bitsplit.h; equal in practice).
  // The kept counts live on the device and the host never reads them: the GEMMs are sized
  // for a capacity K_cap = hq_linear_sampled_capacity(N, cfg) rows (the expected count E =
  // sample_fraction·2N plus sample_capacity_sigmas·√E + 16, rounded up to 16, at most 2N);
  // list entries past the kept count are −1 and give zero rows, which add nothing to the
  // integer sums, so the results are those of the exact-size GEMMs. The count is a sum of
  // independent Bernoulli draws with mean ≤ E (variance ≤ E), so by Bernstein's inequality it
  // exceeds K_cap with probability ≤ exp(−t²/(2E + 2t/3)), t = K_cap − E: below e^-32 for
  // σ = 8 at every E. If it happens anyway, the rows past K_cap are dropped and the status
  // word says so (StatusKind::capacity, index = the kept count). t and t·s stay on the
  // device. N ≤ 1056899 (int32 dw sums of |q| ≤ 127 times |x| ≤ 8).
  sampled,
};

struct HqLinearConfig {
  int64_t block = 32;               // Hadamard block along D: 2^k in [1, 1024] dividing D
  QRange range = kInt4Sym;          // forward codes inside [-8, 7], qmin < 0 < qmax
  LssVariant lss = LssVariant::keep_all;
  double sample_fraction = 0.5;     // sampled: Σp = fraction·2N (in (0, 1])
  double sample_capacity_sigmas = 8.0;  // sampled: rows reserved above E, in units of √E
  // Which GEMM kernels run the layer (cuda/gemm/gemm_dispatch.h): automatic = the sm_90a INT8
  // wgmma GEMM on Hopper, the mma.sync GEMMs on Ampere/Ada (compute capability ≥ 8.0).
  // mma_sm80 (forced, e.g. for tests on Hopper): the forward is the native INT4 GEMM on the
  // packed codes, y = float(x_q_packed·w_q_packedᵀ)·(sx·sw) + b (when D % 32 == 0, i.e. packed
  // rows of 16-byte multiples; otherwise the s8 mma.sync GEMM on x_q / w_q), and the backward's
  // GEMMs, whose gradient operand is int8, are the s8 mma.sync GEMM (K = N, C or the kept rows
  // must then stay below 2^17, its int32 bound for full-range s8). Every path computes the
  // same integer sums and the same epilogue, so results are bit-identical across paths.
  GemmPath gemm = GemmPath::automatic;
  // Keep-all backward: true runs the kernels that do not depend on each other at the same
  // time, through a second stream (one priority step above the caller's) forked from and
  // joined back into the caller's (cuda/common/stream_fork.h): the bit split, the two GEMMs
  // and the dw pass (where not fused) go there; the x-code unpack and the dx mask pass (where
  // not fused) stay on the caller's stream beside them.
  // The GEMMs are capped at the fewest SMs that keep their number of tile rounds
  // (GemmS8S8Params::max_sms), which leaves SMs free for the passes at no cost to the GEMMs.
  // false queues everything on the caller's stream in order (for A/B timing). The results are
  // the same bits either way (the kernels and their fixed reduction orders do not change; the
  // GPU tests check it). The sampled variant always runs in order.
  bool overlap_passes = true;
  // Keep-all on the wgmma_sm90 path with block ≤ 32: the dx and dw GEMMs' epilogues apply
  // the STE mask, add the LSQ step sums and run the block Hadamard on the accumulators
  // (EpiMaskHadamard, gemm_params.h) instead of writing an fp32 [N, D] / [C, D] product for
  // a separate pass. false forces the separate passes (benchmarks, tests). The same bits
  // either way: the step sums are exact integer sums (docs/formats.md, "LSQ step sums").
  bool fuse_mask_epilogues = true;
};

// ---- the fused quantizer -------------------------------------------------------------------
// One kernel, one read of x:
//   v = x·BlockDiag(H_k)   (the reference's butterfly order, then × hadamard_norm(block))
//   r = v·inv_s            (inv_s = 1/s: one IEEE division per thread from the device s =
//                           *step; per element one fp32 multiply)
//   q = clamp(rint(r), qmin, qmax)
//   e = −8 if !(qmin ≤ r ≤ qmax), else floor(14·(rint(r) − r) + u) (exact sum, in [−7, 7]),
//       u = philox_uniform16(key with role rounding, index_base + row·cols + col)
// and writes any of: q [rows, cols], q_t [cols, rows], q packed s4 and e packed s4
// ([rows, cols/2] each, formats.md). rows, cols multiples of 16; index_base % 8 == 0.
template <class T>
struct HqLsqQuantizeParams {
  const T* x = nullptr;          // [rows, cols], float or bf16_t (widened exactly)
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t block = 32;
  QRange range = kInt4Sym;
  const float* step = nullptr;   // [1] device: the LSQ step size
  PhiloxKey key{};               // role is set to RngRole::rounding inside
  uint64_t index_base = 0;       // 0 for x, N·D for w
  int8_t* q = nullptr;           // optional [rows, cols]
  int8_t* q_t = nullptr;         // optional [cols, rows]
  uint8_t* q_packed = nullptr;   // optional [rows, cols/2]
  uint8_t* e_packed = nullptr;   // optional [rows, cols/2]
  uint64_t* status = nullptr;    // optional: NaN/Inf input, overflow, bad step (bad_scale 0)
};
void hq_lsq_quantize(const HqLsqQuantizeParams<float>& p, cudaStream_t stream);
void hq_lsq_quantize(const HqLsqQuantizeParams<bf16_t>& p, cudaStream_t stream);

// ---- the layer ---------------------------------------------------------------------------------

// The weight's codes of one step (all four written by hq_linear_quantize_weight).
struct HqLinearWeightCodes {
  int8_t* w_q = nullptr;          // [C, D] the forward GEMM's B operand
  int8_t* w_q_t = nullptr;        // [D, C] the dx GEMM's B operand
  uint8_t* w_q_packed = nullptr;  // [C, D/2] saved codes
  uint8_t* w_e_packed = nullptr;  // [C, D/2] saved side channel
};

// w [C, D] -> the four outputs above. n (the forward's token count) places w's side channel
// at indices N·D + i of the stream, as in the reference.
template <class T>
struct HqLinearWeightParams {
  const T* w = nullptr;          // [C, D] float or bf16_t
  int64_t n = 0, d = 0, c = 0;
  const float* sw = nullptr;     // [1] device
  HqLinearWeightCodes out;
  uint64_t* status = nullptr;
};
void hq_linear_quantize_weight(const HqLinearWeightParams<float>& p, const HqLinearConfig& cfg,
                               const PhiloxKey& key, cudaStream_t stream);
void hq_linear_quantize_weight(const HqLinearWeightParams<bf16_t>& p, const HqLinearConfig& cfg,
                               const PhiloxKey& key, cudaStream_t stream);

template <class T>
struct HqLinearForwardParams {
  const T* x = nullptr;            // [N, D] float or bf16_t
  int64_t n = 0, d = 0, c = 0;
  const float* sx = nullptr;       // [1] device step sizes
  const float* sw = nullptr;
  const float* bias = nullptr;     // [C] or null
  const int8_t* w_q = nullptr;     // [C, D] from hq_linear_quantize_weight (same sw, cfg)
  // [C, D/2] from hq_linear_quantize_weight: the B operand of the INT4 GEMM, needed (and only
  // read) on the mma_sm80 path with D % 32 == 0; w_q is not read there.
  const uint8_t* w_q_packed = nullptr;
  // [N, D] scratch: the int8 GEMM's A operand. On the mma_sm80 path with D % 32 == 0 the INT4
  // GEMM reads packed codes instead: x_q is then not written in training (it reads
  // x_q_packed), and in inference (no saved buffers) x_q's memory holds the packed codes
  // [N, D/2] (its first N·D/2 bytes), so the scratch size is the same on every path.
  int8_t* x_q = nullptr;
  uint8_t* x_q_packed = nullptr;   // [N, D/2] saved codes; both null: inference, nothing saved
  uint8_t* x_e_packed = nullptr;   // [N, D/2] saved side channel
  bf16_t* y = nullptr;             // [N, C]: exactly one of y (bf16) and y_f32
  float* y_f32 = nullptr;
  uint64_t* status = nullptr;
};
void hq_linear_forward(const HqLinearForwardParams<float>& p, const HqLinearConfig& cfg,
                       const PhiloxKey& key, cudaStream_t stream);
void hq_linear_forward(const HqLinearForwardParams<bf16_t>& p, const HqLinearConfig& cfg,
                       const PhiloxKey& key, cudaStream_t stream);

// The sampled backward's GEMM row capacity (see LssVariant::sampled):
//   min(round16(2N), round16(ceil(E + sample_capacity_sigmas·√E + 16))), at least 16,
//   E = sample_fraction·2N. Throws for N ≤ 0, N > 1056899, a sample_fraction outside (0, 1]
//   or a non-finite sample_capacity_sigmas (the backward's own rules).
int64_t hq_linear_sampled_capacity(int64_t n, const HqLinearConfig& cfg);

// Which of the backward's products run the fused mask epilogue (fuse_mask_epilogues): the dx
// GEMM (keep-all; M = N tokens, K = C) and the dw GEMM (M = C, K = N tokens; also sampled).
// The rule (hq_linear.cpp, fused_mask): wgmma_sm90, block ≤ 32, M > 256 and K > 1024.
struct HqLinearFusedProducts {
  bool dx = false, dw = false;
};
HqLinearFusedProducts hq_linear_fused_products(int64_t n, int64_t d, int64_t c,
                                               const HqLinearConfig& cfg);

// Scratch the backward needs (one buffer, carved inside), for this shape and variant.
size_t hq_linear_backward_workspace_bytes(int64_t n, int64_t d, int64_t c,
                                          const HqLinearConfig& cfg);

template <class G>
struct HqLinearBackwardParams {
  const G* dy = nullptr;               // [N, C] float or bf16_t
  int64_t n = 0, d = 0, c = 0;
  const float* sx = nullptr;           // [1] device: the forward's step sizes
  const float* sw = nullptr;
  const uint8_t* x_q_packed = nullptr; // [N, D/2] saved by hq_linear_forward
  const uint8_t* x_e_packed = nullptr;
  const uint8_t* w_q_packed = nullptr; // [C, D/2] from hq_linear_quantize_weight
  const uint8_t* w_e_packed = nullptr;
  const int8_t* w_q_t = nullptr;       // [D, C] from hq_linear_quantize_weight
  void* workspace = nullptr;           // hq_linear_backward_workspace_bytes(n, d, c, cfg)
  size_t workspace_bytes = 0;
  bf16_t* dx = nullptr;                // [N, D]: exactly one of dx (bf16) and dx_f32
  float* dx_f32 = nullptr;
  float* dw = nullptr;                 // [C, D]
  float* db = nullptr;                 // [C] or null
  float* dsx = nullptr;                // [1] device: ∂L/∂sx (LSQ, scaled by g)
  float* dsw = nullptr;                // [1] device
  float* grad_scale = nullptr;         // optional [1]: the bit-split scale s
  uint64_t* status = nullptr;
};
// key: the layer's (seed, step, layer); roles grad_output_rounding / sample_dw / sample_dx /
// sample_dw_rounding are set inside, as in the reference.
void hq_linear_backward(const HqLinearBackwardParams<float>& p, const HqLinearConfig& cfg,
                        const PhiloxKey& key, cudaStream_t stream);
void hq_linear_backward(const HqLinearBackwardParams<bf16_t>& p, const HqLinearConfig& cfg,
                        const PhiloxKey& key, cudaStream_t stream);

}  // namespace nibble::cuda
