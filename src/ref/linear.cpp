#include "ref/linear.h"

#include <cmath>

#include "nibble/error.h"
#include "nibble/parallel.h"
#include "ref/bitsplit.h"
#include "ref/gemm.h"
#include "ref/hadamard.h"
#include "ref/quant.h"

namespace nibble::ref {
namespace {

void check_dims(int64_t n, int64_t d, int64_t c, const char* layer) {
  NB_CHECK(n > 0 && d > 0 && c > 0, layer << ": sizes must be positive, got N=" << n << " D=" << d
                                            << " C=" << c << " (x [N, D], w [C, D])");
}

void check_scale(float s, const char* what) {
  NB_CHECK(std::isfinite(s) && s > 0.0f,
           what << " = " << s << " must be a positive finite step size; initialise it with "
                   "lsq_init_scale on the first batch");
}

// out[cols, rows] = in[rows, cols]ᵀ: the K-contiguous copies the backward GEMMs need.
std::vector<int8_t> transpose_s8(const std::vector<int8_t>& in, int64_t rows, int64_t cols) {
  std::vector<int8_t> out(in.size());
  parallel_for(cols, [&](int64_t j) {
    for (int64_t i = 0; i < rows; ++i) out[j * rows + i] = in[i * cols + j];
  }, rows);
  return out;
}

PhiloxKey with_role(PhiloxKey key, RngRole role) {
  key.role = role;
  return key;
}

}  // namespace

void hq_linear_forward(const float* x, const float* w, const float* bias, int64_t n, int64_t d,
                       int64_t c, float sx, float sw, const HqLinearConfig& cfg, float* y,
                       HqLinearSaved* saved) {
  check_dims(n, d, c, "hq_linear_forward");
  check_scale(sx, "activation step size sx");
  check_scale(sw, "weight step size sw");
  HqLinearSaved local;
  HqLinearSaved& s = saved ? *saved : local;
  s.n = n, s.d = d, s.c = c, s.sx = sx, s.sw = sw;
  s.x_q.resize(static_cast<size_t>(n * d));
  s.x_r.resize(static_cast<size_t>(n * d));
  s.w_q.resize(static_cast<size_t>(c * d));
  s.w_r.resize(static_cast<size_t>(c * d));
  hq_quantize(x, n, d, cfg.block, sx, cfg.range, s.x_q.data(), s.x_r.data());
  hq_quantize(w, c, d, cfg.block, sw, cfg.range, s.w_q.data(), s.w_r.data());

  // y = float(x_q·w_qᵀ) · (sx·sw) + b
  std::vector<int32_t> acc(static_cast<size_t>(n * c));
  gemm_s8s8_s32_tn(s.x_q.data(), s.w_q.data(), n, c, d, acc.data());
  DequantEpilogue epi;
  epi.scale_a = &s.sx;
  epi.scale_b = &s.sw;
  epi.bias = bias;
  epilogue_dequant(acc.data(), n, c, epi, y);
}

HqLinearGrads hq_linear_backward(const float* dy, const HqLinearSaved& saved,
                                 const HqLinearConfig& cfg, const PhiloxKey& key) {
  const int64_t n = saved.n, d = saved.d, c = saved.c;
  check_dims(n, d, c, "hq_linear_backward");
  NB_CHECK(saved.x_q.size() == static_cast<size_t>(n * d) &&
               saved.w_q.size() == static_cast<size_t>(c * d),
           "hq_linear_backward: the saved state does not match N=" << n << " D=" << d << " C=" << c
                                                                   << "; pass the state that "
                                                                      "hq_linear_forward filled");
  NB_CHECK(cfg.sample_fraction > 0.0 && cfg.sample_fraction <= 1.0,
           "sample_fraction " << cfg.sample_fraction << " must be in (0, 1]");
  HqLinearGrads g;

  // 1. Bit split dy once; both products share it (the released code's choice, B.7).
  std::vector<int8_t> hi(static_cast<size_t>(n * c)), lo(hi.size()), comb(hi.size());
  const float s = bitsplit(dy, n, c, with_role(key, RngRole::grad_output_rounding), hi.data(),
                           lo.data(), comb.data());
  g.grad_scale = s;

  std::vector<float> dw_t(static_cast<size_t>(c * d)), dx_t(static_cast<size_t>(n * d));
  if (cfg.lss == LssMode::keep_nonzero) {
    // Every split row kept with p = 1, so the two INT4 products collapse exactly into one
    // INT8 GEMM on 14·hi + lo (design.md). Zero rows add nothing; they are only counted.
    std::vector<float> scores(static_cast<size_t>(2 * n)), p(scores.size());
    std::vector<uint8_t> keep(scores.size());
    leverage_scores(hi.data(), lo.data(), n, c, s, nullptr, scores.data());
    g.kept_rows_dx = g.kept_rows_dw = keep_nonzero_rows(scores.data(), 2 * n, p.data(), keep.data());

    // dw_t = float(combᵀ·x_q) · (s·sx): A = combᵀ [C, N], B = x_qᵀ [D, N]
    const std::vector<int8_t> comb_t = transpose_s8(comb, n, c);
    const std::vector<int8_t> x_q_t = transpose_s8(saved.x_q, n, d);
    std::vector<int32_t> acc_w(static_cast<size_t>(c * d));
    gemm_s8s8_s32_tn(comb_t.data(), x_q_t.data(), c, d, n, acc_w.data());
    DequantEpilogue epi_w;
    epi_w.scale_a = &s;
    epi_w.scale_b = &saved.sx;
    epilogue_dequant(acc_w.data(), c, d, epi_w, dw_t.data());

    // dx_t = float(comb·w_q) · (s·sw): A = comb [N, C], B = w_qᵀ [D, C]
    const std::vector<int8_t> w_q_t = transpose_s8(saved.w_q, c, d);
    std::vector<int32_t> acc_x(static_cast<size_t>(n * d));
    gemm_s8s8_s32_tn(comb.data(), w_q_t.data(), n, d, c, acc_x.data());
    DequantEpilogue epi_x;
    epi_x.scale_a = &s;
    epi_x.scale_b = &saved.sw;
    epilogue_dequant(acc_x.data(), n, d, epi_x, dx_t.data());
  } else {
    const double budget = cfg.sample_fraction * static_cast<double>(2 * n);
    // Split row i < N is hi row i (value scale 14s); row N + i is lo row i (scale s).
    auto row_code = [&](int64_t i, int64_t col) -> int32_t {
      return i < n ? hi[static_cast<size_t>(i * c + col)] : lo[static_cast<size_t>((i - n) * c + col)];
    };
    auto row_scale = [&](int64_t i) -> double {
      return i < n ? static_cast<double>(kBitSplitBase) * s : static_cast<double>(s);
    };

    // dw = Σ_kept (1/p_i)·G↕_iᵀ·X̂↕_i. 1/p varies along dw's K (tokens), so it cannot be an
    // epilogue scale (algorithms.md F.6); the reference accumulates the weighted rows in fp64.
    std::vector<float> x_norm(static_cast<size_t>(n));
    row_norms_s8(saved.x_q.data(), n, d, x_norm.data());
    for (float& v : x_norm) v *= saved.sx;
    std::vector<float> sc_w(static_cast<size_t>(2 * n)), p_w(sc_w.size());
    std::vector<uint8_t> keep_w(sc_w.size());
    leverage_scores(hi.data(), lo.data(), n, c, s, x_norm.data(), sc_w.data());
    fit_probabilities(sc_w.data(), 2 * n, budget, p_w.data());
    g.kept_rows_dw = sample_rows(p_w.data(), 2 * n, with_role(key, RngRole::sample_dw), keep_w.data());
    parallel_for(c, [&](int64_t col) {
      std::vector<double> acc(static_cast<size_t>(d), 0.0);
      for (int64_t i = 0; i < 2 * n; ++i) {
        if (!keep_w[static_cast<size_t>(i)]) continue;
        const int32_t code = row_code(i, col);
        if (code == 0) continue;
        const double coef = row_scale(i) / p_w[static_cast<size_t>(i)] * code;
        const int8_t* xr = saved.x_q.data() + (i % n) * d;
        for (int64_t k = 0; k < d; ++k) acc[static_cast<size_t>(k)] += coef * xr[k];
      }
      for (int64_t k = 0; k < d; ++k)
        dw_t[static_cast<size_t>(col * d + k)] = static_cast<float>(acc[static_cast<size_t>(k)] * saved.sx);
    }, 2 * n * d);

    // dx: split rows i and N+i both feed output row i, so 1/p is a per-row scale of the
    // integer products hi·w_q and lo·w_q (an epilogue scale on the GPU).
    std::vector<float> sc_x(static_cast<size_t>(2 * n)), p_x(sc_x.size());
    std::vector<uint8_t> keep_x(sc_x.size());
    leverage_scores(hi.data(), lo.data(), n, c, s, nullptr, sc_x.data());
    fit_probabilities(sc_x.data(), 2 * n, budget, p_x.data());
    g.kept_rows_dx = sample_rows(p_x.data(), 2 * n, with_role(key, RngRole::sample_dx), keep_x.data());
    const std::vector<int8_t> w_q_t = transpose_s8(saved.w_q, c, d);
    std::vector<int32_t> acc_hi(static_cast<size_t>(n * d)), acc_lo(acc_hi.size());
    gemm_s8s8_s32_tn(hi.data(), w_q_t.data(), n, d, c, acc_hi.data());
    gemm_s8s8_s32_tn(lo.data(), w_q_t.data(), n, d, c, acc_lo.data());
    parallel_for(n, [&](int64_t r) {
      const auto ih = static_cast<size_t>(r), il = static_cast<size_t>(n + r);
      const double wh = keep_x[ih] ? row_scale(r) / p_x[ih] : 0.0;
      const double wl = keep_x[il] ? row_scale(n + r) / p_x[il] : 0.0;
      for (int64_t k = 0; k < d; ++k) {
        const auto e = static_cast<size_t>(r * d + k);
        dx_t[e] = static_cast<float>((wh * acc_hi[e] + wl * acc_lo[e]) * saved.sw);
      }
    }, d);
  }

  // 2. LSQ step-size gradients and STE masks, in the transformed domain.
  g.dsx = lsq_backward(dx_t.data(), saved.x_r.data(), n * d, cfg.range, dx_t.data());
  g.dsw = lsq_backward(dw_t.data(), saved.w_r.data(), c * d, cfg.range, dw_t.data());

  // 3. Back to the original domain: ·Hᵀ, and H is symmetric, so the same transform.
  hadamard_blocks(dx_t.data(), n, d, cfg.block);
  hadamard_blocks(dw_t.data(), c, d, cfg.block);
  g.dx = std::move(dx_t);
  g.dw = std::move(dw_t);

  // 4. db = Σ_rows dy (fp64 sums).
  g.db.assign(static_cast<size_t>(c), 0.0f);
  parallel_for(c, [&](int64_t col) {
    double acc = 0;
    for (int64_t r = 0; r < n; ++r) acc += dy[r * c + col];
    g.db[static_cast<size_t>(col)] = static_cast<float>(acc);
  }, n);
  return g;
}

void w4a4_linear_forward(const float* x, const float* w, const float* bias, int64_t n,
                         int64_t d, int64_t c, const W4A4Config& cfg, float* y,
                         W4A4Saved* saved) {
  check_dims(n, d, c, "w4a4_linear_forward");
  W4A4Saved local;
  W4A4Saved& s = saved ? *saved : local;
  s.n = n, s.d = d, s.c = c;
  const QRange act_range = cfg.asymmetric ? kUint4 : cfg.act_range;
  s.x_q.resize(static_cast<size_t>(n * d));
  s.x_scale.resize(static_cast<size_t>(n));
  s.x_zero.assign(cfg.asymmetric ? static_cast<size_t>(n) : 0, 0);
  int32_t* zx = cfg.asymmetric ? s.x_zero.data() : nullptr;
  const PhiloxKey unused{};  // nearest rounding draws no random numbers
  compute_scales(x, n, d, Granularity::row, 0, act_range, cfg.asymmetric, s.x_scale.data(), zx);
  quantize(x, n, d, Granularity::row, 0, s.x_scale.data(), zx, act_range, Rounding::nearest,
           unused, s.x_q.data());

  s.w_q.resize(static_cast<size_t>(c * d));
  s.w_scale.resize(static_cast<size_t>(c));
  compute_scales(w, c, d, Granularity::row, 0, cfg.weight_range, false, s.w_scale.data(), nullptr);
  quantize(w, c, d, Granularity::row, 0, s.w_scale.data(), nullptr, cfg.weight_range,
           Rounding::nearest, unused, s.w_q.data());

  // y = float(acc − zx[n]·Σ_k w_q[c,k]) · (sx[n]·sw[c]) + b[c]
  std::vector<int32_t> acc(static_cast<size_t>(n * c)), w_sum(static_cast<size_t>(c));
  gemm_s8s8_s32_tn(s.x_q.data(), s.w_q.data(), n, c, d, acc.data());
  row_sums_s8(s.w_q.data(), c, d, w_sum.data());
  DequantEpilogue epi;
  epi.scale_a = s.x_scale.data();
  epi.a_per_row = true;
  epi.scale_b = s.w_scale.data();
  epi.b_per_col = true;
  epi.bias = bias;
  epi.zp_a = zx;
  epi.b_sum = zx ? w_sum.data() : nullptr;
  epilogue_dequant(acc.data(), n, c, epi, y);
}

void w4a4_linear_backward(const float* dy, const W4A4Saved& saved, float* dx, float* dw,
                          float* db) {
  const int64_t n = saved.n, d = saved.d, c = saved.c;
  check_dims(n, d, c, "w4a4_linear_backward");
  const int32_t* zx = saved.x_zero.empty() ? nullptr : saved.x_zero.data();
  std::vector<float> x_hat(static_cast<size_t>(n * d)), w_hat(static_cast<size_t>(c * d));
  dequantize(saved.x_q.data(), n, d, Granularity::row, 0, saved.x_scale.data(), zx, x_hat.data());
  dequantize(saved.w_q.data(), c, d, Granularity::row, 0, saved.w_scale.data(), nullptr,
             w_hat.data());
  // Straight-through estimator: the rounding is treated as identity, so the gradients are
  // those of y = x̂·ŵᵀ + b with respect to x̂ and ŵ.
  parallel_for(n, [&](int64_t r) {
    std::vector<double> acc(static_cast<size_t>(d), 0.0);
    for (int64_t j = 0; j < c; ++j) {
      const double g = dy[r * c + j];
      if (g == 0.0) continue;
      for (int64_t k = 0; k < d; ++k) acc[static_cast<size_t>(k)] += g * w_hat[static_cast<size_t>(j * d + k)];
    }
    for (int64_t k = 0; k < d; ++k) dx[r * d + k] = static_cast<float>(acc[static_cast<size_t>(k)]);
  }, c * d);
  parallel_for(c, [&](int64_t j) {
    std::vector<double> acc(static_cast<size_t>(d), 0.0);
    double bsum = 0;
    for (int64_t r = 0; r < n; ++r) {
      const double g = dy[r * c + j];
      bsum += g;
      if (g == 0.0) continue;
      for (int64_t k = 0; k < d; ++k) acc[static_cast<size_t>(k)] += g * x_hat[static_cast<size_t>(r * d + k)];
    }
    for (int64_t k = 0; k < d; ++k) dw[j * d + k] = static_cast<float>(acc[static_cast<size_t>(k)]);
    if (db) db[j] = static_cast<float>(bsum);
  }, n * d);
}

}  // namespace nibble::ref
