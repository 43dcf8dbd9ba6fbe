#pragma once
// Launchers of the linear layer's own kernels (internal to src/cuda/linear; the public API is
// hq_linear.h). Arguments are validated by the callers in hq_linear.cpp, once per layer call:
// shapes are multiples of 16 and every base is 16-byte aligned, which these kernels assume.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/linear/hq_linear.h"
#include "nibble/dtype.h"
#include "nibble/format.h"
#include "nibble/rng.h"

namespace nibble::cuda::linear_detail {

// ---- backward: side channel -> mask, δ̃ sum, inverse Hadamard -------------------------------
// out = (mask ∘ g_t) · BlockDiag(H_k), mask = 1[e ≠ −8], and per thread block a partial step
// sum written to its slot (lsq_partials_count of them). Sources of g_t [rows, cols]:
//   dense     g_t f32;
//   gathered  the sampled dx: g_t[r] = src[pos[r]] + src[pos[rows + r]] (a position −1 reads 0);
//   acc       an integer product with one per-tensor scale: g_t = float(acc)·(scale_a·scale_b),
//             the dequant epilogue's value (the unfused keep-all dx and dw, the sampled dw).
// Partials: f32 sources Σ g_t·δ̃ in fp64 (δ̃ = q where e = −8, else float(e)/14; fp64 products
// of the fp32 values, as ref::lsq_backward_coded) into `partials`; the acc source the exact
// Σ acc·w, w = 14·δ̃ (ref::lsq_backward_exact) into `exact_partials`.
template <class OutT>
struct LsqMaskHadamardParams {
  const float* g_t = nullptr;         // dense source, or null
  const float* gathered = nullptr;    // gathered source rows [*, cols], or null
  const int32_t* pos = nullptr;       // [2·rows] with `gathered`
  const int32_t* acc = nullptr;       // integer source [rows, cols], or null
  const float* scale_a = nullptr;     // [1] with acc
  const float* scale_b = nullptr;     // [1] with acc
  int64_t rows = 0, cols = 0, block = 32;
  const uint8_t* q_packed = nullptr;  // [rows, cols/2]
  const uint8_t* e_packed = nullptr;  // [rows, cols/2]
  OutT* out = nullptr;                // [rows, cols]
  double* partials = nullptr;         // f32 sources: [lsq_partials_count(rows, cols, block)]
  int64_t* exact_partials = nullptr;  // acc source: the same count
};
int64_t lsq_partials_count(int64_t rows, int64_t cols, int64_t block);
void lsq_mask_hadamard(const LsqMaskHadamardParams<float>& p, cudaStream_t stream);
void lsq_mask_hadamard(const LsqMaskHadamardParams<bf16_t>& p, cudaStream_t stream);

// One step-size gradient's partial sums: fp64 partials of Σ g·δ̃ (f32 sources), or int64
// partials of the exact Σ acc·w with the product's scale S = float(scale_a·scale_b).
struct LsqSumParts {
  const double* fp = nullptr;
  const int64_t* exact = nullptr;
  const float* scale_a = nullptr;  // [1] with exact
  const float* scale_b = nullptr;  // [1] with exact
  int64_t count = 0;               // partials
  int64_t numel = 0;               // elements of the tensor (g = 1/sqrt(qmax · numel))
  float* out = nullptr;            // [1]
};
// fp:    out = float(g · Σ partials), the partials summed in one fixed order (deterministic);
// exact: out = float(g · ((double(S) · double(T)) / 14)), T = Σ partials (int64, exact).
// g = 1/sqrt(qmax · numel) in fp64. One launch for both.
void lsq_finalize(const LsqSumParts& a, const LsqSumParts& b, int32_t qmax, cudaStream_t stream);

// out_t[c, r] = code (r, c) of packed s4 [rows, cols/2]: the dw GEMM's B operand x_q_t.
void unpack_s4_transpose(const uint8_t* packed, int64_t rows, int64_t cols, int8_t* out_t,
                         cudaStream_t stream);

// db: out[c] = float(Σ_k partials[k, c]) over fp64 column partials [chunks, cols] in a fixed
// order (deterministic); the partials come from the bit split's first pass
// (BitSplitParams::col_partials, chunks = bitsplit_column_chunks(rows)).
void column_sums_finalize(const double* partials, int64_t chunks, int64_t cols, float* out,
                          cudaStream_t stream);

// ---- sampled-LSS helpers ---------------------------------------------------------------------
// norms[r] = float(sqrt(Σ_k q[r, k]²)) · scale[0] from packed s4 codes (ref::row_norms_s8 ·sx).
void row_norms_packed(const uint8_t* packed, int64_t rows, int64_t cols, const float* scale,
                      float* norms, cudaStream_t stream);
// Kept split row j (index[j] = i in [0, 2n) or −1): hi row i (i < n) or lo row i − n.
// The sampled dw's A operand is that row's codes weighted by f_i = float(β_i)/p_i (β = 14 for
// hi rows, 1 for lo rows) and re-quantized with one scale t (ref::requantize_sampled_rows):
//   sampled_dw_scale:  dw_scale[0] = t = max_{kept i} fl(f_i·max_c |code_i[c]|) / 127, or 1
//                      when nothing is kept; dw_scale[1] = t·s (s = split_scale[0]); k is the
//                      list length to scan (−1 entries skipped), so no host count is needed;
//                      a non-finite t is reported as bad_scale 1 in status
//   weighted split_t:  out[c, j] = clamp(floor(f_i·code_i[c] / t + u), −127, 127) | 0,
//                      u = philox_uniform(key, i·cols + c)          out [cols, k]  (dw's A)
//   x_t:               out[d, j] = x code (i mod n, d) | 0          out [d, k]     (dw's B)
//   split:             out[j, c] = hi[i, c] | lo[i − n, c] | 0      out [k, cols]  (dx's A)
// The transposed gathers need k % 16 == 0 and cols % 16 == 0 (4-byte column segments).
void sampled_dw_scale(const int8_t* hi, const int8_t* lo, int64_t n, int64_t cols,
                      const int32_t* index, int64_t k, const float* p, const float* split_scale,
                      float* dw_scale, uint64_t* status, cudaStream_t stream);
void gather_weighted_split_t(const int8_t* hi, const int8_t* lo, int64_t n, int64_t cols,
                             const int32_t* index, int64_t k, const float* p,
                             const float* dw_scale, const PhiloxKey& key, int8_t* out,
                             cudaStream_t stream);
void gather_x_t(const uint8_t* x_packed, int64_t n, int64_t d, const int32_t* index, int64_t k,
                int8_t* out, cudaStream_t stream);
void gather_split_rows(const int8_t* hi, const int8_t* lo, int64_t n, int64_t cols,
                       const int32_t* index, int64_t k, int8_t* out, cudaStream_t stream);
// For the kept dx rows j < k: coef[j] = float(row_scale(i) / p[i]) (row_scale = 14·s for hi
// rows, s for lo, in fp64 as the reference), pos[i] = j; padding rows get coef 0. pos must be
// filled with −1 before (the launcher does it).
void dx_coefs(const int32_t* index, int64_t k, const float* p, const float* split_scale,
              int64_t n, float* coef, int32_t* pos, cudaStream_t stream);
// counts = sample_rows' [kept_w k, round16, kept_x k, round16]: a k above capacity (the rows the
// sampled GEMMs were sized for) is reported as StatusKind::capacity, index = that k (the
// larger one when both are). One thread; nothing when status is null.
void check_sample_capacity(const int32_t* counts, int64_t capacity, uint64_t* status,
                           cudaStream_t stream);

}  // namespace nibble::cuda::linear_detail
