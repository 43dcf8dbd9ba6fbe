#include "ref/layers.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <mutex>
#include <vector>

#include "nibble/error.h"
#include "nibble/parallel.h"

namespace nibble::ref {
namespace {

void check_positive(int64_t v, const char* what, const char* fn) {
  NB_CHECK(v > 0, fn << ": " << what << " = " << v << " must be positive");
}

void check_not_null(const void* p, const char* what, const char* fn) {
  NB_CHECK(p != nullptr, fn << ": " << what << " is null; pass a buffer of the documented shape");
}

void check_gemm_args(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, const float* a,
                     int64_t lda, const float* b, int64_t ldb, const float* c, int64_t ldc,
                     const char* fn) {
  check_positive(m, "M", fn);
  check_positive(n, "N", fn);
  check_positive(k, "K", fn);
  check_not_null(a, "A", fn);
  check_not_null(b, "B", fn);
  check_not_null(c, "C", fn);
  const int64_t a_cols = ta == Trans::no ? k : m;
  const int64_t b_cols = tb == Trans::no ? n : k;
  NB_CHECK(lda >= a_cols, fn << ": lda = " << lda << " is smaller than A's row length " << a_cols
                             << "; pass lda ≥ " << a_cols);
  NB_CHECK(ldb >= b_cols, fn << ": ldb = " << ldb << " is smaller than B's row length " << b_cols
                             << "; pass ldb ≥ " << b_cols);
  NB_CHECK(ldc >= n, fn << ": ldc = " << ldc << " is smaller than N = " << n << "; pass ldc ≥ " << n);
}

// GELU constants: √(2/π) and the cubic coefficient of the tanh approximation.
constexpr float kGeluScale = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

}  // namespace

// ---- float GEMM -------------------------------------------------------------------------

void gemm_f32(Trans trans_a, Trans trans_b, int64_t m, int64_t n, int64_t k, float alpha,
              const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
              int64_t ldc) {
  const char* fn = "gemm_f32";
  check_gemm_args(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, fn);
  // OpenBLAS takes 32-bit sizes (blasint); larger GEMMs would need the ILP64 build.
  const int64_t biggest = std::max({m, n, k, lda, ldb, ldc});
  NB_CHECK(biggest <= INT_MAX, fn << ": dimension " << biggest
                                  << " exceeds OpenBLAS's 32-bit sizes; split the GEMM");
  // OpenBLAS runs single-threaded and parallel_for splits C into fixed blocks of rows:
  // one thread pool (OpenMP) instead of two that spin against each other on a small
  // machine (measured: 2-3x slower steps on 2 cores under load), and results that do not
  // depend on the thread count (a block's rows come out the same whoever computes them).
  static std::once_flag single_threaded;
  std::call_once(single_threaded, [] { openblas_set_num_threads(1); });
  constexpr int64_t kRowsPerBlock = 64;
  const int64_t blocks = (m + kRowsPerBlock - 1) / kRowsPerBlock;
  parallel_rows(blocks, m * n * k, [&](int64_t blk) {
    const int64_t i0 = blk * kRowsPerBlock, rows = std::min(kRowsPerBlock, m - i0);
    // Rows i0.. of op(A): rows of A, or columns of A when it is transposed.
    const float* a_blk = trans_a == Trans::no ? a + i0 * lda : a + i0;
    cblas_sgemm(CblasRowMajor, trans_a == Trans::no ? CblasNoTrans : CblasTrans,
                trans_b == Trans::no ? CblasNoTrans : CblasTrans, static_cast<int>(rows),
                static_cast<int>(n), static_cast<int>(k), alpha, a_blk, static_cast<int>(lda), b,
                static_cast<int>(ldb), beta, c + i0 * ldc, static_cast<int>(ldc));
  });
}

void gemm_f32_loops(Trans trans_a, Trans trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                    const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                    float* c, int64_t ldc) {
  check_gemm_args(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, "gemm_f32_loops");
  parallel_rows(m, m * n * k, [&](int64_t i) {
    for (int64_t j = 0; j < n; ++j) {
      // acc = Σ_k op(A)[i, k]·op(B)[k, j] in fp64; c = alpha·acc + beta·c, rounded once
      double acc = 0.0;
      for (int64_t p = 0; p < k; ++p) {
        const float av = trans_a == Trans::no ? a[i * lda + p] : a[p * lda + i];
        const float bv = trans_b == Trans::no ? b[p * ldb + j] : b[j * ldb + p];
        acc += static_cast<double>(av) * static_cast<double>(bv);
      }
      double out = static_cast<double>(alpha) * acc;
      if (beta != 0.0f) out += static_cast<double>(beta) * static_cast<double>(c[i * ldc + j]);
      c[i * ldc + j] = static_cast<float>(out);
    }
  });
}

// ---- embedding --------------------------------------------------------------------------

namespace {
void check_ids(const int32_t* ids, int64_t n, int64_t rows, const char* fn) {
  for (int64_t i = 0; i < n; ++i) {
    NB_CHECK(ids[i] >= 0 && ids[i] < rows,
             fn << ": id " << ids[i] << " at index " << i << " is outside the table's " << rows
                << " rows; ids must lie in [0, " << rows << ") (check the tokenizer's vocabulary)");
  }
}
}  // namespace

void embedding_forward(const int32_t* ids, int64_t n, const float* table, int64_t rows,
                       int64_t dim, float* out) {
  const char* fn = "embedding_forward";
  check_positive(n, "n", fn);
  check_positive(rows, "rows", fn);
  check_positive(dim, "dim", fn);
  check_not_null(ids, "ids", fn);
  check_not_null(table, "table", fn);
  check_not_null(out, "out", fn);
  check_ids(ids, n, rows, fn);
  parallel_rows(n, n * dim, [&](int64_t i) {
    std::copy_n(table + static_cast<int64_t>(ids[i]) * dim, dim, out + i * dim);
  });
}

void embedding_backward(const int32_t* ids, int64_t n, const float* dout, int64_t rows,
                        int64_t dim, float* dtable) {
  const char* fn = "embedding_backward";
  check_positive(n, "n", fn);
  check_positive(rows, "rows", fn);
  check_positive(dim, "dim", fn);
  check_not_null(ids, "ids", fn);
  check_not_null(dout, "dout", fn);
  check_not_null(dtable, "dtable", fn);
  check_ids(ids, n, rows, fn);
  // Serial over tokens: two tokens may share a row, and the order of their sums must not
  // depend on threads. The work is n·dim additions, negligible beside the GEMMs.
  for (int64_t i = 0; i < n; ++i) {
    float* dst = dtable + static_cast<int64_t>(ids[i]) * dim;
    const float* src = dout + i * dim;
    for (int64_t d = 0; d < dim; ++d) dst[d] += src[d];
  }
}

// ---- LayerNorm --------------------------------------------------------------------------

void layernorm_forward(const float* x, int64_t rows, int64_t dim, const float* gamma,
                       const float* beta, float eps, float* y, float* mean, float* rstd) {
  const char* fn = "layernorm_forward";
  check_positive(rows, "rows", fn);
  check_positive(dim, "dim", fn);
  check_not_null(x, "x", fn);
  check_not_null(gamma, "gamma", fn);
  check_not_null(beta, "beta", fn);
  check_not_null(y, "y", fn);
  check_not_null(mean, "mean", fn);
  check_not_null(rstd, "rstd", fn);
  NB_CHECK(std::isfinite(eps) && eps > 0.0f, fn << ": eps = " << eps << " must be positive (e.g. 1e-5)");
  parallel_rows(rows, rows * dim * 4, [&](int64_t r) {
    const float* xr = x + r * dim;
    double sum = 0.0;
    for (int64_t d = 0; d < dim; ++d) sum += xr[d];
    const double mu = sum / static_cast<double>(dim);
    double sq = 0.0;
    for (int64_t d = 0; d < dim; ++d) {
      const double c = xr[d] - mu;
      sq += c * c;
    }
    const double var = sq / static_cast<double>(dim);
    const float m = static_cast<float>(mu);
    const float s = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
    mean[r] = m;
    rstd[r] = s;
    float* yr = y + r * dim;
    for (int64_t d = 0; d < dim; ++d) yr[d] = (xr[d] - m) * s * gamma[d] + beta[d];
  });
}

void layernorm_backward(const float* dy, const float* x, const float* mean, const float* rstd,
                        int64_t rows, int64_t dim, const float* gamma, float* dx,
                        float* dgamma, float* dbeta) {
  const char* fn = "layernorm_backward";
  check_positive(rows, "rows", fn);
  check_positive(dim, "dim", fn);
  for (const void* p : {static_cast<const void*>(dy), static_cast<const void*>(x),
                        static_cast<const void*>(mean), static_cast<const void*>(rstd),
                        static_cast<const void*>(gamma), static_cast<const void*>(dx),
                        static_cast<const void*>(dgamma), static_cast<const void*>(dbeta)}) {
    check_not_null(p, "a pointer argument", fn);
  }
  parallel_rows(rows, rows * dim * 6, [&](int64_t r) {
    const float* dyr = dy + r * dim;
    const float* xr = x + r * dim;
    const float m = mean[r], s = rstd[r];
    double sum_g = 0.0, sum_gx = 0.0;
    for (int64_t d = 0; d < dim; ++d) {
      const float xhat = (xr[d] - m) * s;
      const float g = dyr[d] * gamma[d];
      sum_g += g;
      sum_gx += static_cast<double>(g) * xhat;
    }
    const float mean_g = static_cast<float>(sum_g / static_cast<double>(dim));
    const float mean_gx = static_cast<float>(sum_gx / static_cast<double>(dim));
    float* dxr = dx + r * dim;
    for (int64_t d = 0; d < dim; ++d) {
      const float xhat = (xr[d] - m) * s;
      dxr[d] = s * (dyr[d] * gamma[d] - mean_g - xhat * mean_gx);
    }
  });
  // Column sums over rows: one column per index, rows in order.
  parallel_rows(dim, rows * dim * 3, [&](int64_t d) {
    double sg = 0.0, sb = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      const float g = dy[r * dim + d];
      const float xhat = (x[r * dim + d] - mean[r]) * rstd[r];
      sg += static_cast<double>(g) * xhat;
      sb += g;
    }
    dgamma[d] += static_cast<float>(sg);
    dbeta[d] += static_cast<float>(sb);
  });
}

// ---- GELU -------------------------------------------------------------------------------

void gelu_forward(const float* x, int64_t n, float* y) {
  const char* fn = "gelu_forward";
  check_positive(n, "n", fn);
  check_not_null(x, "x", fn);
  check_not_null(y, "y", fn);
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  parallel_rows(chunks, n * 20, [&](int64_t ch) {
    const int64_t end = std::min(n, (ch + 1) * kChunk);
    for (int64_t i = ch * kChunk; i < end; ++i) {
      // 0.5·(1 + tanh(u)) = σ(2u) exactly: one expf instead of tanhf (glibc's tanhf is
      // several times slower, and this is the hottest elementwise op of a step).
      const float v = x[i];
      const float u = kGeluScale * (v + kGeluCubic * v * v * v);
      y[i] = v / (1.0f + std::exp(-2.0f * u));
    }
  });
}

void gelu_backward(const float* dy, const float* x, int64_t n, float* dx) {
  const char* fn = "gelu_backward";
  check_positive(n, "n", fn);
  check_not_null(dy, "dy", fn);
  check_not_null(x, "x", fn);
  check_not_null(dx, "dx", fn);
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  parallel_rows(chunks, n * 24, [&](int64_t ch) {
    const int64_t end = std::min(n, (ch + 1) * kChunk);
    for (int64_t i = ch * kChunk; i < end; ++i) {
      // With σ = σ(2u) = 0.5·(1 + th):  0.5·(1 − th²) = 2·σ·(1 − σ), so
      // slope = σ + 2·x·σ·(1 − σ)·√(2/π)·(1 + 3·0.044715·x²)
      const float v = x[i];
      const float u = kGeluScale * (v + kGeluCubic * v * v * v);
      const float sg = 1.0f / (1.0f + std::exp(-2.0f * u));
      const float slope = sg + 2.0f * v * sg * (1.0f - sg) * kGeluScale * (1.0f + 3.0f * kGeluCubic * v * v);
      dx[i] = dy[i] * slope;
    }
  });
}

// ---- softmax cross-entropy --------------------------------------------------------------

namespace {
void check_targets(const int32_t* targets, int64_t rows, int64_t classes, const char* fn) {
  for (int64_t r = 0; r < rows; ++r) {
    NB_CHECK(targets[r] < classes, fn << ": target " << targets[r] << " at row " << r << " is not below the "
                                      << classes << " classes; targets must lie in [0, " << classes
                                      << ") or be negative (ignored)");
  }
}
}  // namespace

CrossEntropyStats cross_entropy_forward(const float* logits, int64_t rows, int64_t classes,
                                        const int32_t* targets) {
  const char* fn = "cross_entropy_forward";
  check_positive(rows, "rows", fn);
  check_positive(classes, "classes", fn);
  check_not_null(logits, "logits", fn);
  check_not_null(targets, "targets", fn);
  check_targets(targets, rows, classes, fn);
  std::vector<double> loss(static_cast<size_t>(rows), 0.0);
  std::vector<uint8_t> hit(static_cast<size_t>(rows), 0);
  parallel_rows(rows, rows * classes * 8, [&](int64_t r) {
    const int32_t t = targets[r];
    if (t < 0) return;
    const float* z = logits + r * classes;
    int64_t argmax = 0;
    for (int64_t c = 1; c < classes; ++c) {
      if (z[c] > z[argmax]) argmax = c;
    }
    // loss = log Σ exp(z − max) + max − z_t
    const double zmax = z[argmax];
    double sum = 0.0;
    for (int64_t c = 0; c < classes; ++c) sum += std::exp(static_cast<double>(z[c]) - zmax);
    loss[r] = std::log(sum) + zmax - static_cast<double>(z[t]);
    hit[r] = argmax == t ? 1 : 0;
  });
  CrossEntropyStats st;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < 0) continue;
    st.loss_sum += loss[r];
    st.count += 1;
    st.correct += hit[r];
  }
  return st;
}

void cross_entropy_backward(const float* logits, int64_t rows, int64_t classes,
                            const int32_t* targets, float dloss, float* dlogits) {
  const char* fn = "cross_entropy_backward";
  check_positive(rows, "rows", fn);
  check_positive(classes, "classes", fn);
  check_not_null(logits, "logits", fn);
  check_not_null(targets, "targets", fn);
  check_not_null(dlogits, "dlogits", fn);
  check_targets(targets, rows, classes, fn);
  parallel_rows(rows, rows * classes * 8, [&](int64_t r) {
    const int32_t t = targets[r];
    const float* z = logits + r * classes;
    float* g = dlogits + r * classes;
    if (t < 0) {
      std::fill_n(g, classes, 0.0f);
      return;
    }
    float zmax = z[0];
    for (int64_t c = 1; c < classes; ++c) zmax = std::max(zmax, z[c]);
    double sum = 0.0;
    for (int64_t c = 0; c < classes; ++c) sum += std::exp(static_cast<double>(z[c]) - zmax);
    // g = dloss·(exp(z − max)/Σ − 1[c = t]); z is read before g is written (aliasing allowed)
    const double inv = 1.0 / sum;
    for (int64_t c = 0; c < classes; ++c) {
      const double p = std::exp(static_cast<double>(z[c]) - zmax) * inv;
      g[c] = static_cast<float>(static_cast<double>(dloss) * (p - (c == t ? 1.0 : 0.0)));
    }
  });
}

// ---- attention --------------------------------------------------------------------------

namespace {
void check_attention_shape(int64_t batch, int64_t seq, int64_t channels, int64_t heads,
                           const char* fn) {
  check_positive(batch, "batch", fn);
  check_positive(seq, "seq", fn);
  check_positive(channels, "channels", fn);
  check_positive(heads, "heads", fn);
  NB_CHECK(channels % heads == 0, fn << ": channels " << channels << " are not divisible by "
                                     << heads << " heads; choose d_model as a multiple of n_heads");
}
}  // namespace

void attention_forward(const float* qkv, int64_t batch, int64_t seq, int64_t channels,
                       int64_t heads, bool causal, float* out, float* att) {
  const char* fn = "attention_forward";
  check_attention_shape(batch, seq, channels, heads, fn);
  check_not_null(qkv, "qkv", fn);
  check_not_null(out, "out", fn);
  check_not_null(att, "att", fn);
  const int64_t T = seq, C = channels, D = channels / heads, row = 3 * channels;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  parallel_rows(batch * heads, batch * heads * T * T * D * 2, [&](int64_t bh) {
    const int64_t b = bh / heads, h = bh % heads;
    const float* base = qkv + b * T * row;
    // k_hᵀ [D, T] copied once so that every score row is an axpy over s (vectorizes) rather
    // than a dot product per (t, s) (an fp32 reduction the compiler may not reorder).
    std::vector<float> kt(static_cast<size_t>(D * T));
    for (int64_t s = 0; s < T; ++s)
      for (int64_t d = 0; d < D; ++d) kt[d * T + s] = base[s * row + C + h * D + d];
    float* p_bh = att + bh * T * T;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t len = causal ? t + 1 : T;  // keys s < len are visible from query t
      float* p = p_bh + t * T;
      std::fill_n(p, T, 0.0f);
      const float* q = base + t * row + h * D;
      // S[t, s] = Σ_d q[t, d]·k[s, d], then ·1/√D
      for (int64_t d = 0; d < D; ++d) {
        const float qd = q[d];
        const float* kd = kt.data() + d * T;
        for (int64_t s = 0; s < len; ++s) p[s] += qd * kd[s];
      }
      float smax = p[0] * scale;
      for (int64_t s = 0; s < len; ++s) {
        p[s] *= scale;
        smax = std::max(smax, p[s]);
      }
      // P = exp(S − max)/Σ exp(S − max), denominator in fp64
      double sum = 0.0;
      for (int64_t s = 0; s < len; ++s) {
        p[s] = std::exp(p[s] - smax);
        sum += p[s];
      }
      const float inv = static_cast<float>(1.0 / sum);
      for (int64_t s = 0; s < len; ++s) p[s] *= inv;
      // out[t, :] = Σ_s P[t, s]·v[s, :]
      float* o = out + (b * T + t) * C + h * D;
      std::fill_n(o, D, 0.0f);
      for (int64_t s = 0; s < len; ++s) {
        const float ps = p[s];
        const float* v = base + s * row + 2 * C + h * D;
        for (int64_t d = 0; d < D; ++d) o[d] += ps * v[d];
      }
    }
  });
}

void attention_backward(const float* dout, const float* qkv, const float* att, int64_t batch,
                        int64_t seq, int64_t channels, int64_t heads, bool causal, float* dqkv) {
  const char* fn = "attention_backward";
  check_attention_shape(batch, seq, channels, heads, fn);
  check_not_null(dout, "dout", fn);
  check_not_null(qkv, "qkv", fn);
  check_not_null(att, "att", fn);
  check_not_null(dqkv, "dqkv", fn);
  const int64_t T = seq, C = channels, D = channels / heads, row = 3 * channels;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  parallel_rows(batch * heads, batch * heads * T * T * D * 4, [&](int64_t bh) {
    const int64_t b = bh / heads, h = bh % heads;
    const float* base = qkv + b * T * row;
    float* dbase = dqkv + b * T * row;
    const float* p_bh = att + bh * T * T;
    // v_hᵀ [D, T] for the dP rows (the same axpy layout as the forward's kᵀ)
    std::vector<float> vt(static_cast<size_t>(D * T));
    for (int64_t s = 0; s < T; ++s)
      for (int64_t d = 0; d < D; ++d) vt[d * T + s] = base[s * row + 2 * C + h * D + d];
    for (int64_t t = 0; t < T; ++t) {
      std::fill_n(dbase + t * row + h * D, D, 0.0f);
      std::fill_n(dbase + t * row + C + h * D, D, 0.0f);
      std::fill_n(dbase + t * row + 2 * C + h * D, D, 0.0f);
    }
    std::vector<float> ds(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
      const int64_t len = causal ? t + 1 : T;
      const float* p = p_bh + t * T;
      const float* go = dout + (b * T + t) * C + h * D;
      // dP[t, s] = Σ_d dout[t, d]·v[s, d]
      std::fill(ds.begin(), ds.end(), 0.0f);
      for (int64_t d = 0; d < D; ++d) {
        const float gd = go[d];
        const float* vd = vt.data() + d * T;
        for (int64_t s = 0; s < len; ++s) ds[s] += gd * vd[s];
      }
      // dS = P ⊙ (dP − Σ_s P·dP), then ·1/√D for the q and k gradients
      double dot = 0.0;
      for (int64_t s = 0; s < len; ++s) dot += static_cast<double>(p[s]) * ds[s];
      const float pd = static_cast<float>(dot);
      for (int64_t s = 0; s < len; ++s) ds[s] = p[s] * (ds[s] - pd) * scale;
      const float* q = base + t * row + h * D;
      float* dq = dbase + t * row + h * D;
      // One axpy per loop, so each vectorizes on its own (three output streams in one loop
      // would need alias checks the compiler gives up on).
      for (int64_t s = 0; s < len; ++s) {  // dq[t] = Σ_s dS[t, s]·k[s]
        const float dss = ds[s];
        const float* k = base + s * row + C + h * D;
        for (int64_t d = 0; d < D; ++d) dq[d] += dss * k[d];
      }
      for (int64_t s = 0; s < len; ++s) {  // dk[s] += dS[t, s]·q[t]
        const float dss = ds[s];
        float* dk = dbase + s * row + C + h * D;
        for (int64_t d = 0; d < D; ++d) dk[d] += dss * q[d];
      }
      for (int64_t s = 0; s < len; ++s) {  // dv[s] += P[t, s]·dout[t]
        const float ps = p[s];
        float* dv = dbase + s * row + 2 * C + h * D;
        for (int64_t d = 0; d < D; ++d) dv[d] += ps * go[d];
      }
    }
  });
}

// ---- small pieces -----------------------------------------------------------------------

void add(const float* a, const float* b, int64_t n, float* out) {
  const char* fn = "add";
  check_positive(n, "n", fn);
  check_not_null(a, "a", fn);
  check_not_null(b, "b", fn);
  check_not_null(out, "out", fn);
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void patchify(const float* images, int64_t batch, int64_t height, int64_t width, int64_t patch,
              float* patches) {
  const char* fn = "patchify";
  check_positive(batch, "batch", fn);
  check_positive(height, "height", fn);
  check_positive(width, "width", fn);
  check_positive(patch, "patch", fn);
  check_not_null(images, "images", fn);
  check_not_null(patches, "patches", fn);
  NB_CHECK(height % patch == 0 && width % patch == 0,
           fn << ": a " << height << "x" << width << " image does not tile into " << patch << "x"
              << patch << " patches; choose a patch size that divides both sides");
  const int64_t gh = height / patch, gw = width / patch, pp = patch * patch;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < gh; ++i)
      for (int64_t j = 0; j < gw; ++j) {
        float* dst = patches + ((b * gh + i) * gw + j) * pp;
        for (int64_t r = 0; r < patch; ++r)
          std::copy_n(images + (b * height + i * patch + r) * width + j * patch, patch,
                      dst + r * patch);
      }
}

// ---- optimizer --------------------------------------------------------------------------

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWConfig& cfg) {
  const char* fn = "adamw_update";
  check_positive(n, "n", fn);
  check_not_null(param, "param", fn);
  check_not_null(grad, "grad", fn);
  check_not_null(m, "m", fn);
  check_not_null(v, "v", fn);
  NB_CHECK(cfg.step >= 1, fn << ": step = " << cfg.step << " must count from 1 (bias correction)");
  NB_CHECK(cfg.beta1 >= 0.0f && cfg.beta1 < 1.0f && cfg.beta2 >= 0.0f && cfg.beta2 < 1.0f,
           fn << ": betas (" << cfg.beta1 << ", " << cfg.beta2 << ") must lie in [0, 1)");
  NB_CHECK(std::isfinite(cfg.lr) && cfg.lr >= 0.0f && std::isfinite(cfg.weight_decay) &&
               cfg.weight_decay >= 0.0f && cfg.eps > 0.0f && std::isfinite(cfg.grad_scale),
           fn << ": lr " << cfg.lr << ", weight_decay " << cfg.weight_decay << ", eps " << cfg.eps
              << " and grad_scale " << cfg.grad_scale << " must be finite, lr/decay ≥ 0, eps > 0");
  // Bias corrections 1 − β^step in fp64 once, then used as fp32 factors.
  const double step = static_cast<double>(cfg.step);
  const float inv_bc1 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(cfg.beta1), step)));
  const float inv_bc2 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(cfg.beta2), step)));
  const float b1 = cfg.beta1, b2 = cfg.beta2, lr = cfg.lr, wd = cfg.weight_decay;
  const float gs = cfg.grad_scale, eps = cfg.eps;
  for (int64_t i = 0; i < n; ++i) {
    const float g = gs * grad[i];
    m[i] = b1 * m[i] + (1.0f - b1) * g;
    v[i] = b2 * v[i] + (1.0f - b2) * g * g;
    const float update = (m[i] * inv_bc1) / (std::sqrt(v[i] * inv_bc2) + eps);
    param[i] -= lr * (wd * param[i] + update);
  }
}

double sum_squares(const float* x, int64_t n) {
  NB_CHECK(n >= 0, "sum_squares: negative length " << n);
  if (n == 0) return 0.0;
  check_not_null(x, "x", "sum_squares");
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(chunks), 0.0);
  parallel_rows(chunks, n, [&](int64_t ch) {
    const int64_t end = std::min(n, (ch + 1) * kChunk);
    double s = 0.0;
    for (int64_t i = ch * kChunk; i < end; ++i) s += static_cast<double>(x[i]) * x[i];
    part[ch] = s;
  });
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

}  // namespace nibble::ref
