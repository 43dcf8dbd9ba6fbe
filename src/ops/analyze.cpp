#include "nibble/analyze.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <numeric>
#include <ostream>
#include <set>
#include <sstream>

#include "nibble/error.h"
#include "nibble/format.h"
#include "nibble/parallel.h"
#include "nibble/rng.h"
#include "ref/hadamard.h"
#include "ref/quant.h"

namespace nibble {

namespace {

constexpr int64_t kMaxHadamardBlock = 1024;  // the largest block ref::hadamard_blocks takes

// The analysis works on an fp32 copy: F16/BF16 widen exactly, F32 is copied as is.
std::vector<float> to_float(const TensorView& t) {
  const int64_t n = t.numel();
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    switch (t.dtype) {
      case DType::f32: x[i] = t.ptr<const float>()[i]; break;
      case DType::f16: x[i] = f16_to_f32(t.ptr<const uint16_t>()[i]); break;
      case DType::bf16: x[i] = bf16_to_f32(t.ptr<const uint16_t>()[i]); break;
      default: NB_FAIL("to_float: dtype " << dtype_name(t.dtype) << " is not a float type");
    }
  }
  return x;
}

// Symmetric range of a b-bit quantizer: [−(2^(b−1) − 1), 2^(b−1) − 1] ([-7, 7] for INT4,
// the paper's choice, and [-127, 127] for INT8).
QRange symmetric_range(int bits) {
  const int32_t qmax = (1 << (bits - 1)) - 1;
  return {-qmax, qmax};
}

// Asymmetric range with 2^b levels. The codes live in int8 containers, so [0, 255] does
// not fit; [−2^(b−1), 2^(b−1) − 1] is the same quantizer shifted by 2^(b−1): the scale
// (max − min)/(2^b − 1) is unchanged, the zero point moves by the same 2^(b−1) as the
// codes, and x̂ = s·(q − zp) is identical. Reported as [0, 15] / [0, 255].
QRange asymmetric_range(int bits) {
  const int32_t half = 1 << (bits - 1);
  return {-half, half - 1};
}

// SQNR of x after one of the scale-based quantizers (per tensor / row / column,
// symmetric or asymmetric), rounding to nearest.
double sqnr_scaled(const std::vector<float>& x, int64_t rows, int64_t cols, Granularity g,
                   QRange range, bool asymmetric) {
  const int64_t n_scales = ref::scale_count(g, rows, cols, 1);
  std::vector<float> scale(static_cast<size_t>(n_scales));
  std::vector<int32_t> zero_point(asymmetric ? static_cast<size_t>(n_scales) : 0);
  int32_t* zp = asymmetric ? zero_point.data() : nullptr;
  ref::compute_scales(x.data(), rows, cols, g, 1, range, asymmetric, scale.data(), zp);
  std::vector<int8_t> q(x.size());
  ref::quantize(x.data(), rows, cols, g, 1, scale.data(), zp, range, Rounding::nearest,
                PhiloxKey{}, q.data());
  std::vector<float> x_hat(x.size());
  ref::dequantize(q.data(), rows, cols, g, 1, scale.data(), zp, x_hat.data());
  return ref::sqnr_db(x.data(), x_hat.data(), static_cast<int64_t>(x.size()));
}

// The per-tensor step with the smallest squared error for v, among LSQ's initial step and
// absmax/qmax·f for f in {1, 0.9, ..., 0.3}.
float best_step(const std::vector<float>& v, QRange range) {
  const auto n = static_cast<int64_t>(v.size());
  float absmax = 0;
  for (float e : v) absmax = std::max(absmax, std::abs(e));
  std::vector<float> candidates{ref::lsq_init_scale(v.data(), n, range)};
  for (int f = 10; f >= 3; --f)
    if (absmax > 0) candidates.push_back(absmax / static_cast<float>(range.qmax) * 0.1f * static_cast<float>(f));
  float best = candidates.front();
  double best_err = -1;
  std::vector<int8_t> q(v.size());
  for (float s : candidates) {
    ref::lsq_quantize(v.data(), n, s, range, q.data(), nullptr);
    double err = 0;
    for (size_t i = 0; i < v.size(); ++i) {
      const double d = static_cast<double>(v[i]) - static_cast<double>(s) * q[i];
      err += d * d;
    }
    if (best_err < 0 || err < best_err) best_err = err, best = s;
  }
  return best;
}

// HQ for every block that divides cols and every bit-width. The forward transform is done
// once per block and shared by the bit-widths. Fills hq_blocks / hq_blocks_sqnr_db /
// hq_block and the hq entry of sqnr_db in each result.
void hq_search(const std::vector<float>& x, int64_t rows, int64_t cols,
               std::vector<BitsResult>& results) {
  const auto n = static_cast<int64_t>(x.size());
  std::vector<float> xt(x.size()), x_hat(x.size());
  std::vector<int8_t> q(x.size());
  for (int64_t block = 1; block <= kMaxHadamardBlock && cols % block == 0; block *= 2) {
    xt = x;
    ref::hadamard_blocks(xt.data(), rows, cols, block);  // x·H
    for (BitsResult& r : results) {
      const QRange range = symmetric_range(r.bits);
      // One per-tensor step size, as HQ uses. LSQ's initial step 2·mean|x·H|/sqrt(qmax)
      // (algorithms.md A.3) is tuned for 4 bits and clips far too much at 8, and training moves
      // the step towards the MSE optimum anyway; so the step is the lowest-MSE one among the
      // LSQ init and fractions of absmax/qmax. H is orthonormal, so the MSE of x·H equals the
      // MSE of x and the choice needs no inverse transform.
      const float s = best_step(xt, range);
      ref::lsq_quantize(xt.data(), n, s, range, q.data(), nullptr);
      // x̂ = (s·q)·Hᵀ: H is symmetric and orthonormal, so the same call inverts it
      for (int64_t i = 0; i < n; ++i) x_hat[i] = s * static_cast<float>(q[i]);
      ref::hadamard_blocks(x_hat.data(), rows, cols, block);
      const double db = ref::sqnr_db(x.data(), x_hat.data(), n);
      r.hq_blocks.push_back(block);
      r.hq_blocks_sqnr_db.push_back(db);
      // Highest SQNR = smallest ‖X̄ − X‖_F: the paper's block criterion applied to this
      // tensor alone (ref::hq_search_block with x as both operands picks the same block).
      // Strict > keeps the smaller block on a tie, as that search does.
      if (r.hq_blocks.size() == 1 || db > r.sqnr(Quantizer::hq)) {
        r.sqnr_db[static_cast<size_t>(Quantizer::hq)] = db;
        r.hq_block = block;
      }
    }
  }
}

// The first NaN/Inf as "NaN at [r, c]"; empty when every value is finite.
std::string first_non_finite(const std::vector<float>& x, int64_t cols) {
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isfinite(x[i])) continue;
    const auto flat = static_cast<int64_t>(i);
    std::ostringstream os;
    os << "contains " << (std::isnan(x[i]) ? "NaN" : (x[i] > 0 ? "+Inf" : "-Inf")) << " at ["
       << flat / cols << ", " << flat % cols << "] (flat index " << flat
       << "); quantizers need finite values: clean or clip the tensor";
    return os.str();
  }
  return {};
}

std::string format_db(double db) {
  if (std::isinf(db)) return "inf";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", db);
  return buf;
}

std::string pad_left(const std::string& s, size_t width) {
  return s.size() >= width ? s : std::string(width - s.size(), ' ') + s;
}

const char* status_name(TensorStatus s) {
  switch (s) {
    case TensorStatus::ok: return "ok";
    case TensorStatus::skipped: return "skipped";
    case TensorStatus::error: return "error";
  }
  return "?";
}

// Written into the example file so that a reader knows where it came from.
std::map<std::string, std::string> builtin_metadata() {
  return {{"generator", "nibble analyze --builtin --save"},
          {"description",
           "blocks.0.mlp_in.input: N(0,1) activation [tokens, d_model] with 8 outlier channels "
           "scaled 20-60x; blocks.0.mlp_in.weight: N(0, 0.02^2) weight [d_ff, d_model]"}};
}

}  // namespace

const char* quantizer_name(Quantizer q) {
  switch (q) {
    case Quantizer::per_tensor: return "per_tensor";
    case Quantizer::per_token: return "per_token";
    case Quantizer::per_channel: return "per_channel";
    case Quantizer::hq: return "hq";
    case Quantizer::asym_per_token: return "asym_per_token";
  }
  return "?";
}

const char* quantizer_label(Quantizer q) {
  switch (q) {
    case Quantizer::per_tensor: return "per-tensor";
    case Quantizer::per_token: return "per-token";
    case Quantizer::per_channel: return "per-channel";
    case Quantizer::hq: return "HQ";
    case Quantizer::asym_per_token: return "asym-token";
  }
  return "?";
}

int64_t AnalyzeReport::count(TensorStatus s) const {
  return std::count_if(tensors.begin(), tensors.end(),
                       [s](const TensorReport& t) { return t.status == s; });
}

void check_bits(const std::vector<int>& bits) {
  NB_CHECK(!bits.empty(), "no bit-widths given; pass e.g. --bits 4,8");
  std::set<int> seen;
  for (int b : bits) {
    NB_CHECK(b >= 2 && b <= 8, "bit-width " << b << " is not supported; use widths in [2, 8] "
                                            << "(codes are stored in int8), e.g. --bits 4,8");
    NB_CHECK(seen.insert(b).second, "bit-width " << b << " is listed twice; list each once");
  }
}

TensorReport analyze_tensor(const std::string& name, const TensorView& t,
                            const std::vector<int>& bits) {
  check_bits(bits);
  TensorReport rep;
  rep.name = name;
  rep.dtype = t.dtype;
  rep.shape = t.shape;
  auto skip = [&](const std::string& why) {
    rep.status = TensorStatus::skipped;
    rep.reason = why;
    return rep;
  };
  if (t.dtype != DType::f32 && t.dtype != DType::f16 && t.dtype != DType::bf16)
    return skip(std::string("dtype ") + dtype_name(t.dtype) +
                " is not analyzed; analyze reads F32, F16 and BF16 tensors");
  if (t.dim() != 2)
    return skip(std::to_string(t.dim()) +
                "-D tensor; analyze needs a 2-D matrix [rows, cols] (a weight or an activation)");
  if (t.numel() == 0) return skip("empty tensor (no elements)");

  // From here on a failure is this tensor's problem: record it and let the caller go on.
  try {
    check_cpu_contiguous(t, "analyze: tensor");
    const int64_t rows = t.shape[0], cols = t.shape[1];
    const std::vector<float> x = to_float(t);
    if (std::string bad = first_non_finite(x, cols); !bad.empty()) {
      rep.status = TensorStatus::error;
      rep.reason = bad;
      return rep;
    }
    if (std::all_of(x.begin(), x.end(), [](float v) { return v == 0.0f; }))
      return skip("every value is zero, so SQNR is undefined");

    for (int b : bits) {
      BitsResult r;
      r.bits = b;
      const QRange sym = symmetric_range(b);
      auto set = [&](Quantizer q, double db) { r.sqnr_db[static_cast<size_t>(q)] = db; };
      set(Quantizer::per_tensor, sqnr_scaled(x, rows, cols, Granularity::tensor, sym, false));
      set(Quantizer::per_token, sqnr_scaled(x, rows, cols, Granularity::row, sym, false));
      set(Quantizer::per_channel, sqnr_scaled(x, rows, cols, Granularity::column, sym, false));
      set(Quantizer::asym_per_token,
          sqnr_scaled(x, rows, cols, Granularity::row, asymmetric_range(b), true));
      rep.results.push_back(std::move(r));
    }
    hq_search(x, rows, cols, rep.results);
    for (BitsResult& r : rep.results) {
      r.best = kQuantizers[0];
      for (Quantizer q : kQuantizers)
        if (r.sqnr(q) > r.sqnr(r.best)) r.best = q;
    }
  } catch (const std::exception& e) {
    rep.status = TensorStatus::error;
    rep.reason = e.what();
    rep.results.clear();
  }
  return rep;
}

AnalyzeReport analyze_tensors(const std::string& source, const std::vector<NamedTensor>& tensors,
                              const std::vector<int>& bits) {
  check_bits(bits);
  AnalyzeReport report;
  report.source = source;
  report.bits = bits;
  for (const NamedTensor& nt : tensors)
    report.tensors.push_back(analyze_tensor(nt.name, nt.tensor.view(), bits));
  return report;
}

AnalyzeReport analyze_file(const std::string& path, const std::vector<int>& bits) {
  check_bits(bits);
  const SafetensorsFile file = read_safetensors(path);
  return analyze_tensors(path, file.tensors, bits);
}

std::vector<NamedTensor> builtin_example() {
  // One seed; the layer field of the key separates the streams (values, outlier choice,
  // outlier scales, weights), so no two tensors share random numbers.
  constexpr uint64_t kSeed = 0x6e6962626c65;  // "nibble"
  constexpr int64_t kTokens = 1024, kDModel = 768, kDFF = 3072;
  constexpr int64_t kOutliers = 8;  // ~1% of 768 channels

  Tensor x = Tensor::empty({kTokens, kDModel}, DType::f32);
  const PhiloxKey values{kSeed, 0, 0, RngRole::data};
  float* xp = x.data<float>();
  parallel_for(kTokens * kDModel, [&](int64_t i) { xp[i] = philox_normal(values, i); });

  // Outlier channels: the kOutliers columns with the smallest random word (distinct by
  // construction, unlike independent draws), each scaled by a factor in [20, 60).
  const PhiloxKey pick{kSeed, 0, 1, RngRole::data};
  const PhiloxKey factor{kSeed, 0, 2, RngRole::data};
  std::vector<int64_t> cols(kDModel);
  std::iota(cols.begin(), cols.end(), 0);
  std::sort(cols.begin(), cols.end(), [&](int64_t a, int64_t b) {
    return philox_u32(pick, a) < philox_u32(pick, b);
  });
  for (int64_t k = 0; k < kOutliers; ++k) {
    const int64_t c = cols[k];
    const float scale = 20.0f + 40.0f * philox_uniform(factor, c);
    for (int64_t r = 0; r < kTokens; ++r) xp[r * kDModel + c] *= scale;
  }

  Tensor w = Tensor::empty({kDFF, kDModel}, DType::f32);
  const PhiloxKey init{kSeed, 0, 3, RngRole::init};
  float* wp = w.data<float>();
  parallel_for(kDFF * kDModel, [&](int64_t i) { wp[i] = 0.02f * philox_normal(init, i); });

  return {{"blocks.0.mlp_in.input", x}, {"blocks.0.mlp_in.weight", w}};
}

void write_builtin_example(const std::string& path) {
  write_safetensors(path, builtin_example(), builtin_metadata());
}

std::string format_report(const AnalyzeReport& report) {
  std::ostringstream os;
  os << "nibble analyze: " << report.source << " (" << report.tensors.size() << " tensors; bits";
  for (size_t i = 0; i < report.bits.size(); ++i) os << (i ? ", " : " ") << report.bits[i];
  os << ")\n"
     << "SQNR in dB, higher is better; * marks the best quantizer of each bit-width.\n"
     << "  per-tensor, per-token, per-channel: symmetric absmax scale for the whole tensor, "
        "each row, each column\n"
     << "    (rows: tokens of an activation or output channels of a weight; columns: input "
        "channels)\n"
     << "  HQ: block Hadamard along each row, then one per-tensor step: the lowest-error of "
        "LSQ's initial\n"
     << "    step 2*mean|v|/sqrt(qmax) and fractions of absmax/qmax; the best block is shown\n"
     << "  asym-token: min/max scale and zero point per row, codes [0, 2^bits - 1]\n";

  constexpr size_t kCol = 12;
  for (const TensorReport& t : report.tensors) {
    os << "\n" << t.name << "  " << dtype_name(t.dtype) << shape_str(t.shape) << "\n";
    if (t.status != TensorStatus::ok) {
      os << "  " << status_name(t.status) << ": " << t.reason << "\n";
      continue;
    }
    os << "      ";
    for (Quantizer q : kQuantizers) os << pad_left(quantizer_label(q), kCol - 1) << ' ';
    os << pad_left("HQ block", kCol) << "\n";
    for (const BitsResult& r : t.results) {
      os << pad_left("INT" + std::to_string(r.bits), 6);
      for (Quantizer q : kQuantizers)
        os << pad_left(format_db(r.sqnr(q)), kCol - 1) << (q == r.best ? '*' : ' ');
      os << pad_left(std::to_string(r.hq_block), kCol) << "\n";
    }
  }
  const int64_t errors = report.count(TensorStatus::error);
  os << "\n"
     << report.count(TensorStatus::ok) << " analyzed, " << report.count(TensorStatus::skipped)
     << " skipped, " << errors << (errors == 1 ? " error" : " errors") << "\n";
  return os.str();
}

std::string report_json(const AnalyzeReport& report) {
  using json = nlohmann::ordered_json;
  // JSON has no infinity: an exact reconstruction (SQNR +inf) is written as null.
  auto db = [](double v) { return std::isfinite(v) ? json(v) : json(nullptr); };
  json doc;
  doc["source"] = report.source;
  doc["bits"] = report.bits;
  json names = json::array();
  for (Quantizer q : kQuantizers) names.push_back(quantizer_name(q));
  doc["quantizers"] = names;
  json tensors = json::array();
  for (const TensorReport& t : report.tensors) {
    json jt;
    jt["name"] = t.name;
    jt["dtype"] = dtype_name(t.dtype);
    jt["shape"] = t.shape;
    jt["status"] = status_name(t.status);
    if (t.status != TensorStatus::ok) {
      jt["reason"] = t.reason;
    } else {
      json results = json::array();
      for (const BitsResult& r : t.results) {
        json jr;
        jr["bits"] = r.bits;
        json sq = json::object();
        for (Quantizer q : kQuantizers) sq[quantizer_name(q)] = db(r.sqnr(q));
        jr["sqnr_db"] = sq;
        jr["best"] = quantizer_name(r.best);
        jr["hq_block"] = r.hq_block;
        json search = json::array();
        for (size_t i = 0; i < r.hq_blocks.size(); ++i)
          search.push_back({{"block", r.hq_blocks[i]}, {"sqnr_db", db(r.hq_blocks_sqnr_db[i])}});
        jr["hq_search"] = search;
        results.push_back(jr);
      }
      jt["results"] = results;
    }
    tensors.push_back(jt);
  }
  doc["tensors"] = tensors;
  doc["summary"] = {{"analyzed", report.count(TensorStatus::ok)},
                    {"skipped", report.count(TensorStatus::skipped)},
                    {"errors", report.count(TensorStatus::error)}};
  // Tensor names come from the file: replace invalid UTF-8 rather than failing the report.
  return doc.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
}

int run_analyze(const AnalyzeOptions& options, std::ostream& out) {
  check_bits(options.bits);
  NB_CHECK(options.builtin != !options.path.empty(),
           (options.builtin ? "give either a FILE or --builtin, not both"
                            : "nothing to analyze; give a .safetensors FILE or --builtin"));
  NB_CHECK(options.save_path.empty() || options.builtin,
           "--save writes the built-in example; use it together with --builtin");

  AnalyzeReport report;
  if (options.builtin) {
    const std::vector<NamedTensor> example = builtin_example();
    if (!options.save_path.empty())
      write_safetensors(options.save_path, example, builtin_metadata());
    report = analyze_tensors("built-in example", example, options.bits);
  } else {
    report = analyze_file(options.path, options.bits);
  }

  if (options.json_path == "-") {
    out << report_json(report);
  } else {
    out << format_report(report);
    if (!options.save_path.empty()) out << "wrote the example to " << options.save_path << "\n";
    if (!options.json_path.empty()) {
      write_file_atomic(options.json_path, report_json(report));
      out << "wrote the JSON report to " << options.json_path << "\n";
    }
  }
  return report.count(TensorStatus::error) > 0 ? 1 : 0;
}

}  // namespace nibble
