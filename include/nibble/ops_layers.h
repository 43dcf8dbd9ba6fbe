#pragma once
// The floating-point ops of the training engine (nn calls these, never a backend).
// Each validates shapes, dtypes and contiguity, then the finiteness of its float inputs,
// and runs the backend that holds the data (the CPU reference with OpenBLAS today).
//
// Outputs are caller-allocated f32 views of the documented shapes. Backward ops WRITE the
// input gradient and ADD into parameter gradients (dgamma, dbeta, dtable), so a model can
// accumulate. Integer ids/targets are s32 views.
//
// Non-finite inputs throw NonFiniteError (a nibble::Error), so a model can tell a diverged
// step (report it, skip the update) from a programming error.
#include <cstdint>
#include <vector>

#include "nibble/error.h"
#include "nibble/format.h"
#include "nibble/tensor.h"

namespace nibble::ops {

class NonFiniteError : public Error {
 public:
  using Error::Error;
};

// Throws NonFiniteError naming `what` and the first NaN/Inf (flat index) of an f32 view.
void check_all_finite(const TensorView& t, const char* what);

// ---- float GEMM -------------------------------------------------------------------------
// c = alpha·op(a)·op(b) + beta·c; op(x) = xᵀ when the flag is set. a, b, c contiguous 2-D
// f32; op(a) [M, K], op(b) [K, N], c [M, N]. OpenBLAS sgemm.
void matmul(const TensorView& a, bool transpose_a, const TensorView& b, bool transpose_b,
            const TensorView& c, float alpha = 1.0f, float beta = 0.0f);

// ---- embedding --------------------------------------------------------------------------
// out[i] = table[ids[i]]:  ids s32 [n] (any shape with n elements), table [rows, dim], out [n, dim]
void embedding_forward(const TensorView& ids, const TensorView& table, const TensorView& out);
// dtable[ids[i]] += dout[i]
void embedding_backward(const TensorView& ids, const TensorView& dout, const TensorView& dtable);

// ---- LayerNorm --------------------------------------------------------------------------
// x, y [rows, dim]; gamma, beta [dim]; mean, rstd [rows] (saved for the backward)
void layernorm_forward(const TensorView& x, const TensorView& gamma, const TensorView& beta,
                       float eps, const TensorView& y, const TensorView& mean,
                       const TensorView& rstd);
// dx [rows, dim] written; dgamma, dbeta [dim] accumulated
void layernorm_backward(const TensorView& dy, const TensorView& x, const TensorView& mean,
                        const TensorView& rstd, const TensorView& gamma, const TensorView& dx,
                        const TensorView& dgamma, const TensorView& dbeta);

// ---- GELU (tanh approximation) ----------------------------------------------------------
void gelu_forward(const TensorView& x, const TensorView& y);                          // same shapes
void gelu_backward(const TensorView& dy, const TensorView& x, const TensorView& dx);  // dx may be dy

// ---- softmax cross-entropy --------------------------------------------------------------
// logits [rows, classes]; targets s32 [rows], negative = ignored.
struct CrossEntropyResult {
  double loss_sum = 0;  // Σ over counted rows (fp64)
  int64_t count = 0;
  int64_t correct = 0;  // first argmax == target
  double mean_loss() const { return count > 0 ? loss_sum / static_cast<double>(count) : 0.0; }
};
CrossEntropyResult cross_entropy_forward(const TensorView& logits, const TensorView& targets);
// dlogits = dloss·(softmax(logits) − onehot) on counted rows, 0 elsewhere (dloss = 1/count
// for the mean loss). dlogits may be the logits view itself.
void cross_entropy_backward(const TensorView& logits, const TensorView& targets, float dloss,
                            const TensorView& dlogits);

// ---- multi-head attention ---------------------------------------------------------------
// qkv [B, T, 3C] -> out [B, T, C]; att [B, H, T, T] saves the probabilities. fp32 matmuls.
void attention_forward(const TensorView& qkv, int64_t heads, bool causal, const TensorView& out,
                       const TensorView& att);
// dout [B, T, C] -> dqkv [B, T, 3C] (written)
void attention_backward(const TensorView& dout, const TensorView& qkv, const TensorView& att,
                        int64_t heads, bool causal, const TensorView& dqkv);

// ---- small pieces -----------------------------------------------------------------------
// out = a + b, all the same shape; out may be a or b.
void add(const TensorView& a, const TensorView& b, const TensorView& out);
// images [B, H, W] -> patches [B, (H/p)·(W/p), p·p]
void patchify(const TensorView& images, int64_t patch, const TensorView& patches);

// ---- LSQ fake quantization (for an embedding output; algorithms.md A.3, B.2) ---------------
// y = s·clamp(round(r), qmin, qmax), r = x·fl(1/s) (one multiply per element, docs/formats.md)
// saved for the backward; x, y, r same shape.
// s > 0 and finite (throws otherwise).
void lsq_fake_quantize(const TensorView& x, float s, QRange range, const TensorView& y,
                       const TensorView& r);
// dx = dy·1[qmin ≤ r ≤ qmax] (written; dx may be dy); returns ∂L/∂s with LSQ's gradient
// scale 1/sqrt(qmax·numel) already applied.
float lsq_fake_quantize_backward(const TensorView& dy, const TensorView& r, QRange range,
                                 const TensorView& dx);
// LSQ's initial step 2·mean|x|/sqrt(qmax) (1 for all-zero x).
float lsq_init_step(const TensorView& x, QRange range);

// ---- optimizer --------------------------------------------------------------------------
struct AdamWConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;  // decoupled: p -= lr·weight_decay·p
  int64_t step = 1;           // 1 for the first update (bias correction)
  float grad_scale = 1.0f;    // multiplies the gradient first (clipping: max_norm / norm)
};
// param, grad, m, v: f32, one shape. m and v are updated in place (start at zero).
// A non-finite gradient throws NonFiniteError before anything is written.
void adamw_update(const TensorView& param, const TensorView& grad, const TensorView& m,
                  const TensorView& v, const AdamWConfig& cfg);

// sqrt(Σ_tensors Σ x²) in fp64 (tensor order, fixed chunks: thread-count independent).
// Returns +inf or NaN when a tensor holds a non-finite value (no throw: the trainer tests it).
double global_norm(const std::vector<TensorView>& tensors);

}  // namespace nibble::ops
