#pragma once
// Float64 forwards of the float layers, written independently of src/ref, for gradient
// checks by central finite differences (tests/unit/test_layers.cpp, test_models.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace nibble::testing {

using Vec = std::vector<double>;

inline Vec to_f64(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// Central differences of f at x for the listed indices (all when `indices` is empty).
// h = 1e-5: truncation h²·|f'''|/6 and cancellation 1e-16·|f|/h both ≈ 1e-11.
inline Vec fd_grad(Vec x, const std::function<double(const Vec&)>& f, const std::vector<size_t>& indices = {}) {
  constexpr double h = 1e-5;
  Vec g(x.size(), 0.0);
  auto one = [&](size_t i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double up = f(x);
    x[i] = x0 - h;
    const double down = f(x);
    x[i] = x0;
    g[i] = (up - down) / (2 * h);
  };
  if (indices.empty()) {
    for (size_t i = 0; i < x.size(); ++i) one(i);
  } else {
    for (size_t i : indices) one(i);
  }
  return g;
}

inline double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// y [rows, out] = x [rows, in] · wᵀ (w [out, in]) + b (b may be empty)
inline Vec linear_f64(const Vec& x, const Vec& w, const Vec& b, int64_t rows, int64_t in, int64_t out) {
  Vec y(static_cast<size_t>(rows * out), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc = b.empty() ? 0.0 : b[o];
      for (int64_t i = 0; i < in; ++i) acc += x[r * in + i] * w[o * in + i];
      y[r * out + o] = acc;
    }
  return y;
}

inline Vec layernorm_f64(const Vec& x, const Vec& g, const Vec& b, int64_t rows, int64_t dim, double eps = 1e-5) {
  Vec y(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double mu = 0, var = 0;
    for (int64_t d = 0; d < dim; ++d) mu += x[r * dim + d];
    mu /= static_cast<double>(dim);
    for (int64_t d = 0; d < dim; ++d) var += (x[r * dim + d] - mu) * (x[r * dim + d] - mu);
    var /= static_cast<double>(dim);
    for (int64_t d = 0; d < dim; ++d) y[r * dim + d] = (x[r * dim + d] - mu) / std::sqrt(var + eps) * g[d] + b[d];
  }
  return y;
}

inline double gelu_f64(double x) {
  return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
}

inline Vec gelu_f64(const Vec& x) {
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = gelu_f64(x[i]);
  return y;
}

// qkv [B, T, 3C] -> [B, T, C], softmax(q·kᵀ/√D) per head, optional causal mask.
inline Vec attention_f64(const Vec& qkv, int64_t B, int64_t T, int64_t C, int64_t H, bool causal) {
  const int64_t D = C / H;
  Vec out(static_cast<size_t>(B * T * C), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        Vec p(static_cast<size_t>(T), 0.0);
        const int64_t len = causal ? t + 1 : T;
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t s = 0; s < len; ++s) {
          double acc = 0;
          for (int64_t d = 0; d < D; ++d)
            acc += qkv[(b * T + t) * 3 * C + h * D + d] * qkv[(b * T + s) * 3 * C + C + h * D + d];
          p[s] = acc / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, p[s]);
        }
        double sum = 0;
        for (int64_t s = 0; s < len; ++s) sum += (p[s] = std::exp(p[s] - mx));
        for (int64_t s = 0; s < len; ++s)
          for (int64_t d = 0; d < D; ++d)
            out[(b * T + t) * C + h * D + d] += p[s] / sum * qkv[(b * T + s) * 3 * C + 2 * C + h * D + d];
      }
  return out;
}

// Mean softmax cross-entropy over rows with a target ≥ 0.
inline double cross_entropy_f64(const Vec& z, const std::vector<int32_t>& t, int64_t rows, int64_t classes) {
  double total = 0;
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (t[r] < 0) continue;
    double mx = z[r * classes];
    for (int64_t c = 0; c < classes; ++c) mx = std::max(mx, z[r * classes + c]);
    double s = 0;
    for (int64_t c = 0; c < classes; ++c) s += std::exp(z[r * classes + c] - mx);
    total += std::log(s) + mx - z[r * classes + t[r]];
    ++count;
  }
  return total / static_cast<double>(count);
}

}  // namespace nibble::testing
