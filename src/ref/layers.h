#pragma once
// CPU reference of the floating-point ops of the training engine: float GEMM, embedding,
// LayerNorm, GELU, softmax cross-entropy, multi-head attention, residual add, AdamW and
// the global gradient norm. fp32 data; sums that decide accuracy (means, variances,
// softmax denominators, loss and norm totals) are taken in fp64 in index order.
//
// Conventions shared by every backward here:
//   - the input gradient (dx) is WRITTEN (overwritten); parameter gradients (dgamma,
//     dbeta, dtable) are ADDED to, so a model can accumulate over calls;
//   - every output row is written by one index of parallel_for, so results do not depend
//     on the thread count.
// Model code names dimensions B (batch), T (sequence), C (= d_model), H (heads),
// V (vocabulary or classes); the GEMMs use M, N, K.
#include <cstdint>

namespace nibble::ref {

// ---- float GEMM -------------------------------------------------------------------------
// C[M, N] = alpha·op(A)·op(B) + beta·C, row-major with leading dimensions (elements).
//   op(A) = A [M, K] (lda ≥ K) or, transposed, Aᵀ with A stored [K, M] (lda ≥ M);
//   op(B) = B [K, N] (ldb ≥ N) or, transposed, Bᵀ with B stored [N, K] (ldb ≥ K).
// beta = 0 ignores C's old contents (NaN included), as BLAS does.
enum class Trans : uint8_t { no, yes };

// OpenBLAS cblas_sgemm (single-threaded, on fixed 64-row blocks of C spread over
// parallel_for): the path every model uses; results do not depend on the thread count.
void gemm_f32(Trans trans_a, Trans trans_b, int64_t m, int64_t n, int64_t k, float alpha,
              const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
              int64_t ldc);
// The same contract as plain loops with an fp64 accumulator per output element, rounded
// once: the oracle that gemm_f32 is tested against.
void gemm_f32_loops(Trans trans_a, Trans trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                    const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                    float* c, int64_t ldc);

// ---- embedding --------------------------------------------------------------------------
// out[i, :] = table[ids[i], :]           ids [n] in [0, rows), table [rows, dim], out [n, dim]
void embedding_forward(const int32_t* ids, int64_t n, const float* table, int64_t rows,
                       int64_t dim, float* out);
// dtable[ids[i], :] += dout[i, :]        (i in increasing order: fixed summation order)
void embedding_backward(const int32_t* ids, int64_t n, const float* dout, int64_t rows,
                        int64_t dim, float* dtable);

// ---- LayerNorm over the last dimension --------------------------------------------------
// mean = Σx/D, var = Σ(x − mean)²/D (both fp64), rstd = 1/sqrt(var + eps)
// y = (x − mean)·rstd·gamma + beta       x, y [rows, D]; mean, rstd [rows] (saved, fp32)
void layernorm_forward(const float* x, int64_t rows, int64_t dim, const float* gamma,
                       const float* beta, float eps, float* y, float* mean, float* rstd);
// x̂ = (x − mean)·rstd, g = dy·gamma:
//   dx = rstd·(g − mean(g) − x̂·mean(g·x̂))      (row means in fp64)
//   dgamma += Σ_rows dy·x̂,  dbeta += Σ_rows dy  (column sums in fp64, row order)
void layernorm_backward(const float* dy, const float* x, const float* mean, const float* rstd,
                        int64_t rows, int64_t dim, const float* gamma, float* dx,
                        float* dgamma, float* dbeta);

// ---- GELU, tanh approximation -----------------------------------------------------------
// y = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
void gelu_forward(const float* x, int64_t n, float* y);
// dx = dy·(0.5·(1 + th) + 0.5·x·(1 − th²)·√(2/π)·(1 + 3·0.044715·x²)); dx may alias dy.
void gelu_backward(const float* dy, const float* x, int64_t n, float* dx);

// ---- softmax cross-entropy --------------------------------------------------------------
// Rows whose target is negative are ignored (padding). For the others, with p = softmax(z):
//   loss_r = log Σ_c exp(z_c) − z_t   (log-sum-exp in fp64 after subtracting the row max)
// loss_sum adds the rows in order (fp64); correct counts rows whose first argmax is t.
struct CrossEntropyStats {
  double loss_sum = 0;
  int64_t count = 0;    // rows with a target ≥ 0
  int64_t correct = 0;
};
CrossEntropyStats cross_entropy_forward(const float* logits, int64_t rows, int64_t classes,
                                        const int32_t* targets);
// dlogits[r, c] = dloss·(p_c − 1[c = t_r]) for rows with t_r ≥ 0, 0 for ignored rows.
// For the mean loss pass dloss = 1/count. dlogits may alias logits (softmax recomputed).
void cross_entropy_backward(const float* logits, int64_t rows, int64_t classes,
                            const int32_t* targets, float dloss, float* dlogits);

// ---- multi-head attention (fp32 matmuls) ------------------------------------------------
// qkv [B, T, 3C]: q = columns [0, C), k = [C, 2C), v = [2C, 3C); head h owns the columns
// [h·D, (h+1)·D) of each, D = C/H.
//   S = q_h·k_hᵀ/√D  (causal: S[t, s] = −∞ for s > t);  P = softmax over s (fp64 sum)
//   out_h = P·v_h                        out [B, T, C]; att = P saved [B, H, T, T]
void attention_forward(const float* qkv, int64_t batch, int64_t seq, int64_t channels,
                       int64_t heads, bool causal, float* out, float* att);
// dP = dout_h·v_hᵀ;  dS = P ⊙ (dP − Σ_s P·dP);  dq = dS·k/√D;  dk = dSᵀ·q/√D;  dv = Pᵀ·dout_h
// dqkv [B, T, 3C] written.
void attention_backward(const float* dout, const float* qkv, const float* att, int64_t batch,
                        int64_t seq, int64_t channels, int64_t heads, bool causal, float* dqkv);

// ---- small pieces -----------------------------------------------------------------------
// out = a + b (residual add; its backward hands dout to both inputs). out may alias a or b.
void add(const float* a, const float* b, int64_t n, float* out);

// Non-overlapping patches of single-channel images [B, H, W] -> [B, (H/p)·(W/p), p·p]:
// patch index = row-major over the patch grid, element index = row-major inside the patch.
void patchify(const float* images, int64_t batch, int64_t height, int64_t width, int64_t patch,
              float* patches);

// ---- optimizer --------------------------------------------------------------------------
// AdamW with decoupled weight decay and bias correction (Loshchilov & Hutter), step ≥ 1:
//   g = grad_scale·grad
//   m = β1·m + (1 − β1)·g,   v = β2·v + (1 − β2)·g²
//   p = p − lr·(weight_decay·p + (m / (1 − β1^step)) / (sqrt(v / (1 − β2^step)) + eps))
// grad_scale carries gradient clipping (max_norm / norm) without a pass over the gradients.
struct AdamWConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  int64_t step = 1;
  float grad_scale = 1.0f;
};
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWConfig& cfg);

// Σ x² in fp64. Fixed chunks of 4096 elements summed in order, so the result does not
// depend on the thread count. The global gradient norm is sqrt of the sum over tensors.
double sum_squares(const float* x, int64_t n);

}  // namespace nibble::ref
