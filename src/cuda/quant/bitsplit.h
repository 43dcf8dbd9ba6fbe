#pragma once
// CUDA twins of ref/bitsplit.h: bit splitting of the output gradient and leverage-score
// sampling (algorithms.md B.4-B.8, F.3, F.6, F.7).
//
// All pointers are device pointers; work is queued on `stream` and nothing waits for the GPU:
// the bit-split scale and the kept-row count stay in device memory for the next kernel.
//
// Bit-exactness against the reference:
//   bitsplit            s, hi, lo, combined (and its transpose): exact — max|g| is an exact
//                       reduction and every per-element step is the reference's fp32 operation.
//   row_norms_s8,       exact — integer sums of squares, one fp64 sqrt (correctly rounded on
//   leverage_scores     both sides) rounded once to fp32, then the reference's fp32 products.
//   fit_probabilities   within 1 fp32 ulp — see its comment.
//   sample_rows,        exact for the same p — u is the same Philox uniform on a 2^-24 grid.
//   keep_nonzero_rows
#include <cuda_runtime.h>

#include <cstdint>

#include "nibble/dtype.h"
#include "nibble/format.h"
#include "nibble/rng.h"

namespace nibble::cuda {

// g[rows, cols] -> hi, lo in [-6, 6] with one per-tensor scale (ref::bitsplit):
//   m  = max|g| + 1e-8                 (= the reference's max(|min − 1e-8|, |max + 1e-8|):
//                                       fp32 addition is monotonic, so they are equal)
//   s  = 2m / 196,  T = g / s
//   hi = clamp(rint(T / 14), −6, 6),  lo = clamp(floor((T − 14·hi) + u), −6, 6),
//   u  = philox_uniform(key, r·cols + c),  combined = 14·hi + lo in [−90, 90]
// Two kernels: an exact max|g| reduction (atomicMax on the bit pattern, which orders
// non-negative floats like integers), then one pass that writes every requested output.
template <class T>
struct BitSplitParams {
  const T* g = nullptr;            // [rows, cols] row-major output gradient dy, float or bf16_t
  int64_t rows = 0;                // tokens N
  int64_t cols = 0;                // out_features C
  PhiloxKey key{};                 // low-half rounding stream (role grad_output_rounding)
  float* scale = nullptr;          // [2] device: [0] = s (output), [1] = max|g| (first pass)
  int8_t* hi = nullptr;            // optional [rows, cols]
  int8_t* lo = nullptr;            // optional [rows, cols]
  int8_t* combined = nullptr;      // optional [rows, cols] 14·hi + lo: dx = dy·w's A operand
  int8_t* combined_t = nullptr;    // optional [cols, rows] its transpose: dw = dyᵀ·x's A operand
  int64_t* row_sumsq = nullptr;    // optional [2·rows]: Σ_c hi[r,c]² at r, Σ_c lo[r,c]² at rows + r
                                   // (the leverage scores' row norms without re-reading codes)
  // optional [bitsplit_column_chunks(rows), cols]: fp64 column sums of g over chunks of
  // kBitSplitColumnChunkRows rows, partials[k, c] = Σ_{r in chunk k} g[r, c] in a fixed order
  // (deterministic), computed by the first pass, which reads g anyway (the layer's db).
  // Needs cols % 4 == 0 and g aligned to 4 elements.
  double* col_partials = nullptr;
  uint64_t* status = nullptr;      // optional (status.h): first NaN/Inf of g
};
constexpr int64_t kBitSplitColumnChunkRows = 256;
int64_t bitsplit_column_chunks(int64_t rows);
void bitsplit(const BitSplitParams<float>& p, cudaStream_t stream);
void bitsplit(const BitSplitParams<bf16_t>& p, cudaStream_t stream);

// norms[r] = float(sqrt(Σ_c q[r,c]²)) · scale[0]  (ref::row_norms_s8; the multiply only when
// scale is set, e.g. x_norm = ‖x_q row‖·sx for the dw leverage scores).
struct RowNormsParams {
  const int8_t* q = nullptr;       // [rows, cols]
  int64_t rows = 0;
  int64_t cols = 0;
  const float* scale = nullptr;    // optional [1] device
  float* norms = nullptr;          // [rows]
};
void row_norms_s8(const RowNormsParams& p, cudaStream_t stream);

// Leverage scores of the 2N split rows (ref::leverage_scores):
//   a_r = float(‖hi_r‖)·(14·s), e_r = float(‖lo_r‖)·s, times x_norm[r] when given (dw);
//   scores[r] = a_r, scores[rows + r] = e_r.
// The row norms come from the codes hi, lo or, when row_sumsq is set, from bitsplit's sums.
struct LeverageParams {
  const int8_t* hi = nullptr;        // [rows, cols] (unused when row_sumsq is set)
  const int8_t* lo = nullptr;        // [rows, cols] (unused when row_sumsq is set)
  const int64_t* row_sumsq = nullptr;  // optional [2·rows] from bitsplit
  int64_t rows = 0;
  int64_t cols = 0;
  const float* scale = nullptr;      // [1] device: the bit-split s (bitsplit's scale[0])
  const float* x_norm = nullptr;     // optional [rows] device: ‖x_q row‖·sx (dw); null for dx
  float* scores = nullptr;           // [2·rows]
  uint64_t* status = nullptr;        // optional: s not positive finite = bad_scale 0;
                                     // x_norm[r] NaN/Inf = nonfinite r, negative = out_of_range r
};
void leverage_scores(const LeverageParams& p, cudaStream_t stream);

// p_i ∈ [0, 1] with Σp = budget, p ∝ scores where possible (ref::fit_probabilities):
// one thread block runs the reference's saturation loop on the device (no host round trip):
//   if #nonzero ≤ budget: p = 1[score > 0]; else repeat { λ = (budget − |F|) / Σ_{i∉F} c_i;
//   p_i = c_i·λ; F ∪= {p_i ≥ 1} } until F stops growing; fp64 inside, fp32 output.
// Tolerance: Σ_{i∉F} c_i is an fp64 sum in another (fixed) order than the reference's index
// order; each is within (n−1)·2^-53 relative of the exact sum, so λ and every p agree to
// about 2n·2^-53 relative — far below half an fp32 ulp for any n < 2^28 — and the fp32 p are
// equal or 1 ulp apart. The exception is a c_i·λ within that distance of 1, where the
// saturated sets may differ; random scores essentially never land there (the tests check
// their inputs stay clear of it).
struct FitProbabilitiesParams {
  const float* scores = nullptr;   // [n], finite and ≥ 0
  int64_t n = 0;                   // < 2^31
  double budget = 0;               // expected kept count, finite and ≥ 0 (host value)
  float* p = nullptr;              // [n] output
  uint64_t* status = nullptr;      // optional: NaN/Inf score = nonfinite i, negative = out_of_range i
};
void fit_probabilities(const FitProbabilitiesParams& p, cudaStream_t stream);
// Two independent fits (e.g. the sampled backward's dw and dx scores) in one launch, one thread
// block each: the same results as two fit_probabilities calls, in the time of the slower one.
// Their p arrays must not overlap.
void fit_probabilities_pair(const FitProbabilitiesParams& a, const FitProbabilitiesParams& b,
                            cudaStream_t stream);

// The kept-row list shared by sample_rows and keep_nonzero_rows, compacted on the device
// (a block-wide prefix sum, one thread block):
//   kept_index[0 .. k)            the kept row indices, ascending (k = kept rows)
//   kept_index[k .. round16(n))   −1: zero-row padding, so the list (and a gathered operand)
//                                 always has a multiple of 16 entries — the K % 16 == 0 of the
//                                 sm_90a INT8 GEMM (cuda/gemm/gemm_s8s8_s32_tn_sm90.h), since
//                                 the kept rows are dw's K dimension
//   kept_count[0] = k, kept_count[1] = round16(k) (the padded K to run the GEMM with)
constexpr int64_t kKeptRowsMultiple = 16;

// keep[i] = philox_uniform(key, i) < p[i]  (ref::sample_rows); p must lie in [0, 1].
struct SampleRowsParams {
  const float* p = nullptr;        // [n] probabilities
  int64_t n = 0;                   // < 2^31
  PhiloxKey key{};                 // role sample_dw or sample_dx
  uint8_t* keep = nullptr;         // optional [n] 0/1 masks
  int32_t* kept_index = nullptr;   // optional [round16(n)] (see above)
  int32_t* kept_count = nullptr;   // optional [2] (see above)
  uint64_t* status = nullptr;      // optional: p outside [0, 1] (or NaN) = out_of_range i
};
void sample_rows(const SampleRowsParams& p, cudaStream_t stream);
// Two independent samplings in one launch, one thread block each (as fit_probabilities_pair);
// their outputs must not overlap.
void sample_rows_pair(const SampleRowsParams& a, const SampleRowsParams& b, cudaStream_t stream);

// The released code's deterministic variant (ref::keep_nonzero_rows): keep every row with a
// non-zero score, p = 1; others p = 0.
struct KeepNonzeroParams {
  const float* scores = nullptr;   // [n], finite and ≥ 0
  int64_t n = 0;                   // < 2^31
  float* p = nullptr;              // optional [n] 0/1 probabilities
  uint8_t* keep = nullptr;         // optional [n]
  int32_t* kept_index = nullptr;   // optional [round16(n)]
  int32_t* kept_count = nullptr;   // optional [2]
  uint64_t* status = nullptr;      // optional: NaN/Inf score = nonfinite i, negative = out_of_range i
};
void keep_nonzero_rows(const KeepNonzeroParams& p, cudaStream_t stream);

// Gathers kept rows of int8 codes into a transposed, K-contiguous GEMM operand:
//   out[c, j] = index[j] ≥ 0 ? q[index[j], c] : 0      (out is [cols, k])
// e.g. dw = dyᵀ·x over the kept tokens: A = gather(combined), B = gather(x_q), k = the padded
// length of kept_index (a multiple of 16; −1 entries become zero columns).
struct GatherRowsParams {
  const int8_t* q = nullptr;       // [rows, cols]
  int64_t rows = 0;
  int64_t cols = 0;
  const int32_t* index = nullptr;  // [k] row indices in [0, rows) or −1
  int64_t k = 0;
  int8_t* out = nullptr;           // [cols, k]
};
void gather_rows_t_s8(const GatherRowsParams& p, cudaStream_t stream);

}  // namespace nibble::cuda
