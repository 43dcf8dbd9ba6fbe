#include "nibble/ops_layers.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <sstream>
#include <utility>
#include <vector>

#include "nibble/parallel.h"
#include "ref/hadamard.h"
#include "ref/layers.h"

namespace nibble::ops {
namespace {

// f32, CPU, contiguous, of exactly this shape.
void require_f32(const TensorView& t, const Shape& shape, const char* what) {
  check_dtype(t, DType::f32, what);
  check_cpu_contiguous(t, what);
  check_shape(t, shape, what);
}

void require_s32(const TensorView& t, int64_t n, const char* what) {
  check_dtype(t, DType::s32, what);
  check_cpu_contiguous(t, what);
  NB_CHECK(t.numel() == n, what << " has " << t.numel() << " elements (" << t.describe()
                                << "); pass exactly " << n);
}

// A 2-D f32 contiguous view; returns {rows, cols}.
std::pair<int64_t, int64_t> require_matrix(const TensorView& t, const char* what) {
  NB_CHECK(t.dim() == 2, what << " must be 2-D [rows, cols], got " << t.describe());
  check_dtype(t, DType::f32, what);
  check_cpu_contiguous(t, what);
  return {t.size(0), t.size(1)};
}

const float* f32(const TensorView& t) { return t.ptr<const float>(); }
float* f32_mut(const TensorView& t) { return t.ptr<float>(); }

}  // namespace

void check_all_finite(const TensorView& t, const char* what) {
  check_dtype(t, DType::f32, what);
  check_cpu_contiguous(t, what);
  const int64_t n = t.numel();
  const float* x = f32(t);
  // Branch-free scan in fixed chunks: an all-ones exponent field marks NaN or Inf. OR-ing
  // the comparisons vectorizes with baseline SSE2 (an unsigned max would not: pmaxud is
  // SSE4.1), so the scan runs at memory speed. The index search runs only on failure.
  constexpr int64_t kChunk = int64_t{1} << 16;
  constexpr uint32_t kExp = 0x7f800000u;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<uint8_t> bad(static_cast<size_t>(chunks), 0);
  parallel_rows(chunks, n, [&](int64_t ch) {
    const int64_t end = std::min(n, (ch + 1) * kChunk);
    uint32_t any = 0;
    for (int64_t i = ch * kChunk; i < end; ++i)
      any |= static_cast<uint32_t>((std::bit_cast<uint32_t>(x[i]) & kExp) == kExp);
    bad[static_cast<size_t>(ch)] = any != 0 ? 1 : 0;
  });
  if (std::find(bad.begin(), bad.end(), uint8_t{1}) == bad.end()) return;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) {
      std::ostringstream os;
      os << what << " contains " << (std::isnan(x[i]) ? "NaN" : "Inf") << " at flat index " << i
         << " of " << t.describe()
         << "; the computation diverged (lower the learning rate or clip gradients)";
      throw NonFiniteError(os.str());
    }
  }
}

// ---- GEMM -------------------------------------------------------------------------------

void matmul(const TensorView& a, bool transpose_a, const TensorView& b, bool transpose_b,
            const TensorView& c, float alpha, float beta) {
  const auto [ar, ac] = require_matrix(a, "matmul: a");
  const auto [br, bc] = require_matrix(b, "matmul: b");
  const auto [cr, cc] = require_matrix(c, "matmul: c");
  const int64_t m = transpose_a ? ac : ar, k = transpose_a ? ar : ac;
  const int64_t kb = transpose_b ? bc : br, n = transpose_b ? br : bc;
  NB_CHECK(k == kb, "matmul: op(a) is [" << m << ", " << k << "] but op(b) is [" << kb << ", " << n
                                         << "]; the inner dimensions must agree (check the transpose flags)");
  NB_CHECK(cr == m && cc == n, "matmul: c is " << c.describe() << " but op(a)·op(b) is [" << m
                                               << ", " << n << "]");
  NB_CHECK(std::isfinite(alpha) && std::isfinite(beta),
           "matmul: alpha " << alpha << " and beta " << beta << " must be finite");
  check_all_finite(a, "matmul: a");
  check_all_finite(b, "matmul: b");
  // c is not scanned: with beta ≠ 0 it is an accumulator (a gradient) whose NaN/Inf would
  // reach the output anyway, and scanning it costs as much as scanning a.
  if (m == 0 || n == 0) return;
  if (k == 0) {  // empty sum: c = beta·c
    for (int64_t i = 0; i < m * n; ++i) f32_mut(c)[i] = beta == 0.0f ? 0.0f : beta * f32(c)[i];
    return;
  }
  ref::gemm_f32(transpose_a ? ref::Trans::yes : ref::Trans::no,
                transpose_b ? ref::Trans::yes : ref::Trans::no, m, n, k, alpha, f32(a), ac, f32(b),
                bc, beta, f32_mut(c), cc);
}

// ---- embedding --------------------------------------------------------------------------

void embedding_forward(const TensorView& ids, const TensorView& table, const TensorView& out) {
  const auto [rows, dim] = require_matrix(table, "embedding_forward: table");
  const int64_t n = ids.numel();
  require_s32(ids, n, "embedding_forward: ids");
  require_f32(out, {n, dim}, "embedding_forward: out");
  check_all_finite(table, "embedding_forward: table");
  if (n == 0) return;
  ref::embedding_forward(ids.ptr<const int32_t>(), n, f32(table), rows, dim, f32_mut(out));
}

void embedding_backward(const TensorView& ids, const TensorView& dout, const TensorView& dtable) {
  const auto [rows, dim] = require_matrix(dtable, "embedding_backward: dtable");
  const int64_t n = ids.numel();
  require_s32(ids, n, "embedding_backward: ids");
  require_f32(dout, {n, dim}, "embedding_backward: dout");
  check_all_finite(dout, "embedding_backward: dout");
  if (n == 0) return;
  ref::embedding_backward(ids.ptr<const int32_t>(), n, f32(dout), rows, dim, f32_mut(dtable));
}

// ---- LayerNorm --------------------------------------------------------------------------

void layernorm_forward(const TensorView& x, const TensorView& gamma, const TensorView& beta,
                       float eps, const TensorView& y, const TensorView& mean,
                       const TensorView& rstd) {
  const auto [rows, dim] = require_matrix(x, "layernorm_forward: x");
  require_f32(gamma, {dim}, "layernorm_forward: gamma");
  require_f32(beta, {dim}, "layernorm_forward: beta");
  require_f32(y, {rows, dim}, "layernorm_forward: y");
  require_f32(mean, {rows}, "layernorm_forward: mean");
  require_f32(rstd, {rows}, "layernorm_forward: rstd");
  check_all_finite(x, "layernorm_forward: x");
  check_all_finite(gamma, "layernorm_forward: gamma");
  check_all_finite(beta, "layernorm_forward: beta");
  if (rows == 0) return;
  ref::layernorm_forward(f32(x), rows, dim, f32(gamma), f32(beta), eps, f32_mut(y),
                         f32_mut(mean), f32_mut(rstd));
}

void layernorm_backward(const TensorView& dy, const TensorView& x, const TensorView& mean,
                        const TensorView& rstd, const TensorView& gamma, const TensorView& dx,
                        const TensorView& dgamma, const TensorView& dbeta) {
  const auto [rows, dim] = require_matrix(x, "layernorm_backward: x");
  require_f32(dy, {rows, dim}, "layernorm_backward: dy");
  require_f32(mean, {rows}, "layernorm_backward: mean");
  require_f32(rstd, {rows}, "layernorm_backward: rstd");
  require_f32(gamma, {dim}, "layernorm_backward: gamma");
  require_f32(dx, {rows, dim}, "layernorm_backward: dx");
  require_f32(dgamma, {dim}, "layernorm_backward: dgamma");
  require_f32(dbeta, {dim}, "layernorm_backward: dbeta");
  check_all_finite(dy, "layernorm_backward: dy");
  if (rows == 0) return;
  ref::layernorm_backward(f32(dy), f32(x), f32(mean), f32(rstd), rows, dim, f32(gamma),
                          f32_mut(dx), f32_mut(dgamma), f32_mut(dbeta));
}

// ---- GELU -------------------------------------------------------------------------------

void gelu_forward(const TensorView& x, const TensorView& y) {
  check_dtype(x, DType::f32, "gelu_forward: x");
  check_cpu_contiguous(x, "gelu_forward: x");
  require_f32(y, x.shape, "gelu_forward: y");
  check_all_finite(x, "gelu_forward: x");
  if (x.numel() == 0) return;
  ref::gelu_forward(f32(x), x.numel(), f32_mut(y));
}

void gelu_backward(const TensorView& dy, const TensorView& x, const TensorView& dx) {
  check_dtype(x, DType::f32, "gelu_backward: x");
  check_cpu_contiguous(x, "gelu_backward: x");
  require_f32(dy, x.shape, "gelu_backward: dy");
  require_f32(dx, x.shape, "gelu_backward: dx");
  check_all_finite(dy, "gelu_backward: dy");
  if (x.numel() == 0) return;
  ref::gelu_backward(f32(dy), f32(x), x.numel(), f32_mut(dx));
}

// ---- cross-entropy ----------------------------------------------------------------------

CrossEntropyResult cross_entropy_forward(const TensorView& logits, const TensorView& targets) {
  const auto [rows, classes] = require_matrix(logits, "cross_entropy_forward: logits");
  require_s32(targets, rows, "cross_entropy_forward: targets");
  NB_CHECK(classes > 0, "cross_entropy_forward: logits have no classes (" << logits.describe() << ")");
  check_all_finite(logits, "cross_entropy_forward: logits");
  if (rows == 0) return {};
  const ref::CrossEntropyStats st =
      ref::cross_entropy_forward(f32(logits), rows, classes, targets.ptr<const int32_t>());
  return {st.loss_sum, st.count, st.correct};
}

void cross_entropy_backward(const TensorView& logits, const TensorView& targets, float dloss,
                            const TensorView& dlogits) {
  const auto [rows, classes] = require_matrix(logits, "cross_entropy_backward: logits");
  require_s32(targets, rows, "cross_entropy_backward: targets");
  require_f32(dlogits, {rows, classes}, "cross_entropy_backward: dlogits");
  NB_CHECK(std::isfinite(dloss), "cross_entropy_backward: dloss = " << dloss << " must be finite");
  check_all_finite(logits, "cross_entropy_backward: logits");
  if (rows == 0 || classes == 0) return;
  ref::cross_entropy_backward(f32(logits), rows, classes, targets.ptr<const int32_t>(), dloss,
                              f32_mut(dlogits));
}

// ---- attention --------------------------------------------------------------------------

namespace {
// qkv [B, T, 3C] -> {B, T, C}
std::array<int64_t, 3> attention_dims(const TensorView& qkv, int64_t heads, const char* what) {
  NB_CHECK(qkv.dim() == 3 && qkv.size(2) % 3 == 0,
           what << " must be [B, T, 3C], got " << qkv.describe());
  check_dtype(qkv, DType::f32, what);
  check_cpu_contiguous(qkv, what);
  const int64_t c = qkv.size(2) / 3;
  NB_CHECK(heads > 0 && c % heads == 0, what << ": width C = " << c << " is not divisible by "
                                             << heads << " heads; choose d_model as a multiple of n_heads");
  return {qkv.size(0), qkv.size(1), c};
}
}  // namespace

void attention_forward(const TensorView& qkv, int64_t heads, bool causal, const TensorView& out,
                       const TensorView& att) {
  const auto [b, t, c] = attention_dims(qkv, heads, "attention_forward: qkv");
  require_f32(out, {b, t, c}, "attention_forward: out");
  require_f32(att, {b, heads, t, t}, "attention_forward: att");
  check_all_finite(qkv, "attention_forward: qkv");
  if (b == 0 || t == 0 || c == 0) return;
  ref::attention_forward(f32(qkv), b, t, c, heads, causal, f32_mut(out), f32_mut(att));
}

void attention_backward(const TensorView& dout, const TensorView& qkv, const TensorView& att,
                        int64_t heads, bool causal, const TensorView& dqkv) {
  const auto [b, t, c] = attention_dims(qkv, heads, "attention_backward: qkv");
  require_f32(dout, {b, t, c}, "attention_backward: dout");
  require_f32(att, {b, heads, t, t}, "attention_backward: att");
  require_f32(dqkv, {b, t, 3 * c}, "attention_backward: dqkv");
  check_all_finite(dout, "attention_backward: dout");
  if (b == 0 || t == 0 || c == 0) return;
  ref::attention_backward(f32(dout), f32(qkv), f32(att), b, t, c, heads, causal, f32_mut(dqkv));
}

// ---- small pieces -----------------------------------------------------------------------

void add(const TensorView& a, const TensorView& b, const TensorView& out) {
  check_dtype(a, DType::f32, "add: a");
  check_cpu_contiguous(a, "add: a");
  require_f32(b, a.shape, "add: b");
  require_f32(out, a.shape, "add: out");
  check_all_finite(a, "add: a");
  check_all_finite(b, "add: b");
  if (a.numel() == 0) return;
  ref::add(f32(a), f32(b), a.numel(), f32_mut(out));
}

void patchify(const TensorView& images, int64_t patch, const TensorView& patches) {
  NB_CHECK(images.dim() == 3, "patchify: images must be [B, H, W], got " << images.describe());
  check_dtype(images, DType::f32, "patchify: images");
  check_cpu_contiguous(images, "patchify: images");
  const int64_t b = images.size(0), h = images.size(1), w = images.size(2);
  NB_CHECK(patch > 0 && h % patch == 0 && w % patch == 0,
           "patchify: a " << h << "x" << w << " image does not tile into " << patch << "x" << patch
                          << " patches; choose a patch size that divides both sides");
  require_f32(patches, {b, (h / patch) * (w / patch), patch * patch}, "patchify: patches");
  check_all_finite(images, "patchify: images");
  if (b == 0) return;
  ref::patchify(f32(images), b, h, w, patch, f32_mut(patches));
}

// ---- LSQ --------------------------------------------------------------------------------

void lsq_fake_quantize(const TensorView& x, float s, QRange range, const TensorView& y,
                       const TensorView& r) {
  check_dtype(x, DType::f32, "lsq_fake_quantize: x");
  check_cpu_contiguous(x, "lsq_fake_quantize: x");
  require_f32(y, x.shape, "lsq_fake_quantize: y");
  require_f32(r, x.shape, "lsq_fake_quantize: r");
  check_all_finite(x, "lsq_fake_quantize: x");
  if (!std::isfinite(s)) throw NonFiniteError("lsq_fake_quantize: step size is not finite");
  const int64_t n = x.numel();
  if (n == 0) return;
  std::vector<int8_t> q(static_cast<size_t>(n));
  ref::lsq_quantize(f32(x), n, s, range, q.data(), f32_mut(r));
  // y = s·q (one fp32 product per element)
  float* yp = f32_mut(y);
  for (int64_t i = 0; i < n; ++i) yp[i] = s * static_cast<float>(q[static_cast<size_t>(i)]);
}

float lsq_fake_quantize_backward(const TensorView& dy, const TensorView& r, QRange range,
                                 const TensorView& dx) {
  check_dtype(dy, DType::f32, "lsq_fake_quantize_backward: dy");
  check_cpu_contiguous(dy, "lsq_fake_quantize_backward: dy");
  require_f32(r, dy.shape, "lsq_fake_quantize_backward: r");
  require_f32(dx, dy.shape, "lsq_fake_quantize_backward: dx");
  check_all_finite(dy, "lsq_fake_quantize_backward: dy");
  if (dy.numel() == 0) return 0.0f;
  return ref::lsq_backward(f32(dy), f32(r), dy.numel(), range, f32_mut(dx));
}

float lsq_init_step(const TensorView& x, QRange range) {
  check_dtype(x, DType::f32, "lsq_init_step: x");
  check_cpu_contiguous(x, "lsq_init_step: x");
  check_all_finite(x, "lsq_init_step: x");
  return ref::lsq_init_scale(f32(x), x.numel(), range);
}

// ---- optimizer --------------------------------------------------------------------------

void adamw_update(const TensorView& param, const TensorView& grad, const TensorView& m,
                  const TensorView& v, const AdamWConfig& cfg) {
  check_dtype(param, DType::f32, "adamw_update: param");
  check_cpu_contiguous(param, "adamw_update: param");
  require_f32(grad, param.shape, "adamw_update: grad");
  require_f32(m, param.shape, "adamw_update: m");
  require_f32(v, param.shape, "adamw_update: v");
  check_all_finite(grad, "adamw_update: grad");
  if (param.numel() == 0) return;
  ref::AdamWConfig c;
  c.lr = cfg.lr;
  c.beta1 = cfg.beta1;
  c.beta2 = cfg.beta2;
  c.eps = cfg.eps;
  c.weight_decay = cfg.weight_decay;
  c.step = cfg.step;
  c.grad_scale = cfg.grad_scale;
  ref::adamw_update(f32_mut(param), f32(grad), f32_mut(m), f32_mut(v), param.numel(), c);
}

double global_norm(const std::vector<TensorView>& tensors) {
  double total = 0.0;
  for (const TensorView& t : tensors) {
    check_dtype(t, DType::f32, "global_norm: tensor");
    check_cpu_contiguous(t, "global_norm: tensor");
    total += ref::sum_squares(f32(t), t.numel());
  }
  return std::sqrt(total);
}

}  // namespace nibble::ops
