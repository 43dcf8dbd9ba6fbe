// `nibble analyze`: the quantizer SQNRs against an independent fp64 computation, the
// built-in example's claims, skipped/error entries, the JSON keys and the command itself.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>

#include "nibble/analyze.h"
#include "nibble/error.h"
#include "nibble/rng.h"
#include "ref/hadamard.h"

using namespace nibble;
namespace fs = std::filesystem;

namespace {

// N(0, 1) [rows, cols] with `outliers` columns scaled by 30, from Philox.
Tensor random_matrix(int64_t rows, int64_t cols, uint64_t seed, int64_t outliers = 0) {
  Tensor t = Tensor::empty({rows, cols}, DType::f32);
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t i = 0; i < rows * cols; ++i) t.data<float>()[i] = philox_normal(key, i);
  for (int64_t k = 0; k < outliers; ++k) {
    const int64_t c = (k * 37 + 5) % cols;
    for (int64_t r = 0; r < rows; ++r) t.data<float>()[r * cols + c] *= 30.0f;
  }
  return t;
}

double sqnr64(const std::vector<float>& x, const std::vector<double>& x_hat) {
  double sig = 0, err = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    sig += double(x[i]) * x[i];
    err += (x[i] - x_hat[i]) * (x[i] - x_hat[i]);
  }
  return 10.0 * std::log10(sig / err);
}

// Independent symmetric quantizer: scale absmax/qmax per slice (0 = tensor, 1 = row,
// 2 = column) in fp32 as the spec says, codes clamp(rint(x/s)), x̂ = s·q.
double expected_symmetric(const std::vector<float>& x, int64_t rows, int64_t cols, int slice,
                          int bits) {
  const int qmax = (1 << (bits - 1)) - 1;
  auto id = [&](int64_t r, int64_t c) { return slice == 0 ? 0 : slice == 1 ? r : c; };
  std::vector<float> absmax(static_cast<size_t>(std::max(rows, cols)), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      absmax[id(r, c)] = std::max(absmax[id(r, c)], std::fabs(x[r * cols + c]));
  std::vector<double> x_hat(x.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float s = absmax[id(r, c)] / float(qmax);
      const float q = std::clamp(std::nearbyint(x[r * cols + c] / s), float(-qmax), float(qmax));
      x_hat[r * cols + c] = double(s * q);
    }
  return sqnr64(x, x_hat);
}

// Independent asymmetric per-row quantizer on the unshifted codes [0, 2^b − 1].
double expected_asymmetric_rows(const std::vector<float>& x, int64_t rows, int64_t cols,
                                int bits) {
  const int levels = (1 << bits) - 1;
  std::vector<double> x_hat(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    float lo = 0, hi = 0;
    for (int64_t c = 0; c < cols; ++c) {
      lo = std::min(lo, x[r * cols + c]);
      hi = std::max(hi, x[r * cols + c]);
    }
    const float s = (hi - lo) / float(levels);
    const int zp = -int(std::nearbyint(lo / s));
    for (int64_t c = 0; c < cols; ++c) {
      const int q = std::clamp(int(std::nearbyint(x[r * cols + c] / s)) + zp, 0, levels);
      x_hat[r * cols + c] = double(s * float(q - zp));
    }
  }
  return sqnr64(x, x_hat);
}

// Independent HQ: dense Sylvester Hadamard in fp64; s = the lowest-error step among
// 2·mean|x·H|/sqrt(qmax) and absmax/qmax·{1.0, 0.9, ..., 0.3}; x̂ = (s·clamp(round(x·H/s)))·H.
double expected_hq(const std::vector<float>& x, int64_t rows, int64_t cols, int64_t block,
                   int bits) {
  const int qmax = (1 << (bits - 1)) - 1;
  auto h = [&](int64_t i, int64_t j) {
    return (std::popcount(uint64_t(i & j)) & 1 ? -1.0 : 1.0) / std::sqrt(double(block));
  };
  auto transform = [&](const std::vector<double>& in) {
    std::vector<double> out(in.size(), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t base = 0; base < cols; base += block)
        for (int64_t j = 0; j < block; ++j)
          for (int64_t i = 0; i < block; ++i)
            out[r * cols + base + j] += in[r * cols + base + i] * h(i, j);
    return out;
  };
  const std::vector<double> xt = transform(std::vector<double>(x.begin(), x.end()));
  double mean_abs = 0;
  for (double v : xt) mean_abs += std::fabs(v);
  mean_abs /= double(xt.size());
  double absmax = 0;
  for (double v : xt) absmax = std::max(absmax, std::fabs(v));
  std::vector<double> steps{2.0 * mean_abs / std::sqrt(double(qmax))};
  for (int f = 10; f >= 3; --f) steps.push_back(absmax / qmax * 0.1 * f);
  std::vector<double> q(xt.size());
  double best_err = -1;
  for (double s : steps) {
    double err = 0;
    std::vector<double> qs(xt.size());
    for (size_t i = 0; i < xt.size(); ++i) {
      qs[i] = s * std::clamp(std::nearbyint(xt[i] / s), double(-qmax), double(qmax));
      err += (xt[i] - qs[i]) * (xt[i] - qs[i]);
    }
    if (best_err < 0 || err < best_err) best_err = err, q = qs;
  }
  return sqnr64(x, transform(q));
}

std::vector<float> as_vector(const Tensor& t) {
  return {t.data<float>(), t.data<float>() + t.numel()};
}

// The built-in example is analyzed once (about a second) and shared by the tests.
const AnalyzeReport& builtin_report() {
  static const AnalyzeReport report = analyze_tensors("builtin", builtin_example(), {4, 8});
  return report;
}

class ScratchDir {
 public:
  ScratchDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("nibble_an_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST(AnalyzeBuiltin, HqBeatsPerTensorAtInt4ForTheActivation) {
  const auto& rep = builtin_report();
  ASSERT_EQ(rep.tensors.size(), 2u);
  const TensorReport& act = rep.tensors[0];
  ASSERT_EQ(act.name, "blocks.0.mlp_in.input");
  ASSERT_EQ(act.status, TensorStatus::ok) << act.reason;
  const BitsResult& int4 = act.results.at(0);
  ASSERT_EQ(int4.bits, 4);
  // The outlier channels set the per-tensor absmax, so most entries round to 0; HQ spreads
  // them over a block. "Well ahead": at least 3 dB (half the ~6 dB one extra bit buys);
  // the example gives about 5.7 dB.
  EXPECT_GT(int4.sqnr(Quantizer::hq), int4.sqnr(Quantizer::per_tensor) + 3.0);
  EXPECT_GT(int4.hq_block, 1);
}

TEST(AnalyzeBuiltin, Int8BeatsInt4ForEveryQuantizer) {
  for (const TensorReport& t : builtin_report().tensors) {
    ASSERT_EQ(t.status, TensorStatus::ok) << t.name << ": " << t.reason;
    ASSERT_EQ(t.results.size(), 2u);
    ASSERT_EQ(t.results[1].bits, 8);
    for (Quantizer q : kQuantizers)
      EXPECT_GT(t.results[1].sqnr(q), t.results[0].sqnr(q)) << t.name << " " << quantizer_name(q);
  }
}

TEST(AnalyzeBuiltin, ExampleIsDeterministicWithOutlierChannels) {
  const auto a = builtin_example();
  const auto b = builtin_example();
  ASSERT_EQ(a.size(), 2u);
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_EQ(std::memcmp(a[i].tensor.data<void>(), b[i].tensor.data<void>(), a[i].tensor.nbytes()),
              0);
  EXPECT_EQ(a[0].tensor.shape(), (Shape{1024, 768}));
  EXPECT_EQ(a[1].tensor.shape(), (Shape{3072, 768}));

  const float* x = a[0].tensor.data<float>();
  int outliers = 0;
  for (int64_t c = 0; c < 768; ++c) {
    double ss = 0;
    for (int64_t r = 0; r < 1024; ++r) ss += double(x[r * 768 + c]) * x[r * 768 + c];
    const double sd = std::sqrt(ss / 1024);
    // The std of 1024 N(0,1) samples has standard error 1/sqrt(2·1024) = 0.022: 0.15 is
    // ~7 sigma. Outlier columns have std 20..60 (bound 15 allows the same noise x60).
    if (sd > 10) {
      ++outliers;
      EXPECT_GT(sd, 15.0) << c;
      EXPECT_LT(sd, 65.0) << c;
    } else {
      EXPECT_NEAR(sd, 1.0, 0.15) << c;
    }
  }
  EXPECT_EQ(outliers, 8);  // ~1% of 768

  double ss = 0;
  const auto n = a[1].tensor.numel();
  for (int64_t i = 0; i < n; ++i) ss += double(a[1].tensor.data<float>()[i]) * a[1].tensor.data<float>()[i];
  // Relative standard error of a std estimate from n = 2.4M samples: 1/sqrt(2n) = 0.05%;
  // 0.5% is 10 sigma.
  EXPECT_NEAR(std::sqrt(ss / double(n)), 0.02, 0.02 * 0.005);
}

TEST(AnalyzeTensor, MatchesAnIndependentComputation) {
  const int64_t rows = 48, cols = 128;
  const Tensor t = random_matrix(rows, cols, 11, 2);
  const std::vector<float> x = as_vector(t);
  const TensorReport rep = analyze_tensor("x", t, {4, 8, 3});
  ASSERT_EQ(rep.status, TensorStatus::ok) << rep.reason;
  ASSERT_EQ(rep.results.size(), 3u);
  for (const BitsResult& r : rep.results) {
    SCOPED_TRACE("bits " + std::to_string(r.bits));
    // Same fp32 scales and divisions as the spec, so the codes are identical and only the
    // fp64 sums' order could differ: 1e-9 dB.
    EXPECT_NEAR(r.sqnr(Quantizer::per_tensor), expected_symmetric(x, rows, cols, 0, r.bits), 1e-9);
    EXPECT_NEAR(r.sqnr(Quantizer::per_token), expected_symmetric(x, rows, cols, 1, r.bits), 1e-9);
    EXPECT_NEAR(r.sqnr(Quantizer::per_channel), expected_symmetric(x, rows, cols, 2, r.bits), 1e-9);
    // Checks that the int8-container shift of [0, 2^b − 1] is the same quantizer.
    EXPECT_NEAR(r.sqnr(Quantizer::asym_per_token), expected_asymmetric_rows(x, rows, cols, r.bits),
                1e-9);
    // HQ: the fp32 butterfly vs this fp64 dense transform can flip a code only for a value
    // within ~1e-6 of a rounding boundary (expected flips over 6144 values: ~0.01); one
    // flip moves the SQNR by < 0.01 dB.
    ASSERT_EQ(r.hq_blocks, (std::vector<int64_t>{1, 2, 4, 8, 16, 32, 64, 128}));
    size_t best = 0;
    for (size_t i = 0; i < r.hq_blocks.size(); ++i) {
      EXPECT_NEAR(r.hq_blocks_sqnr_db[i], expected_hq(x, rows, cols, r.hq_blocks[i], r.bits), 0.01)
          << "block " << r.hq_blocks[i];
      if (r.hq_blocks_sqnr_db[i] > r.hq_blocks_sqnr_db[best]) best = i;
    }
    EXPECT_EQ(r.hq_block, r.hq_blocks[best]);
    EXPECT_EQ(r.sqnr(Quantizer::hq), r.hq_blocks_sqnr_db[best]);
    for (Quantizer q : kQuantizers) EXPECT_LE(r.sqnr(q), r.sqnr(r.best));
  }
}

TEST(AnalyzeTensor, HalfPrecisionInputsAreWidenedExactly) {
  const Tensor src = random_matrix(16, 64, 12, 1);
  for (DType dt : {DType::f16, DType::bf16}) {
    Tensor half = Tensor::empty({16, 64}, dt);
    Tensor widened = Tensor::empty({16, 64}, DType::f32);
    for (int64_t i = 0; i < src.numel(); ++i) {
      const float v = src.data<float>()[i];
      const uint16_t bits = dt == DType::f16 ? f32_to_f16(v) : f32_to_bf16(v);
      half.data<uint16_t>()[i] = bits;
      widened.data<float>()[i] = dt == DType::f16 ? f16_to_f32(bits) : bf16_to_f32(bits);
    }
    const TensorReport a = analyze_tensor("h", half, {4});
    const TensorReport b = analyze_tensor("w", widened, {4});
    ASSERT_EQ(a.status, TensorStatus::ok) << a.reason;
    EXPECT_EQ(a.dtype, dt);
    for (Quantizer q : kQuantizers)
      EXPECT_EQ(a.results[0].sqnr(q), b.results[0].sqnr(q)) << dtype_name(dt) << quantizer_name(q);
  }
}

TEST(AnalyzeTensor, NonFiniteValuesGiveAnErrorEntry) {
  Tensor bad = random_matrix(16, 32, 13);
  bad.data<float>()[3 * 32 + 7] = NAN;
  Tensor inf = random_matrix(4, 8, 14);
  inf.data<float>()[9] = -INFINITY;
  const std::vector<NamedTensor> tensors = {
      {"good1", random_matrix(8, 16, 15)}, {"bad", bad}, {"inf", inf}, {"good2", random_matrix(8, 16, 16)}};
  const AnalyzeReport rep = analyze_tensors("mem", tensors, {4, 8});
  ASSERT_EQ(rep.tensors.size(), 4u);
  EXPECT_EQ(rep.tensors[0].status, TensorStatus::ok);
  EXPECT_EQ(rep.tensors[1].status, TensorStatus::error);
  EXPECT_NE(rep.tensors[1].reason.find("NaN at [3, 7]"), std::string::npos) << rep.tensors[1].reason;
  EXPECT_TRUE(rep.tensors[1].results.empty());
  EXPECT_EQ(rep.tensors[2].status, TensorStatus::error);
  EXPECT_NE(rep.tensors[2].reason.find("-Inf at [1, 1]"), std::string::npos) << rep.tensors[2].reason;
  EXPECT_EQ(rep.tensors[3].status, TensorStatus::ok);  // analysis went on after the errors
  EXPECT_EQ(rep.count(TensorStatus::error), 2);
  EXPECT_NE(format_report(rep).find("error: contains NaN at [3, 7]"), std::string::npos);
}

TEST(AnalyzeTensor, SkipsWhatItCannotAnalyze) {
  struct Case { Tensor t; const char* why; };
  const Case cases[] = {
      {Tensor::zeros({5}, DType::f32), "1-D tensor"},
      {Tensor::zeros({2, 3, 4}, DType::f32), "3-D tensor"},
      {Tensor::zeros({4, 4}, DType::s32), "dtype s32 is not analyzed"},
      {Tensor::zeros({4, 4}, DType::s8), "dtype s8 is not analyzed"},
      {Tensor::zeros({4, 4}, DType::f64), "dtype f64 is not analyzed"},
      {Tensor::zeros({0, 4}, DType::f32), "empty tensor"},
      {Tensor::zeros({4, 4}, DType::f32), "every value is zero"},
  };
  for (const auto& c : cases) {
    const TensorReport r = analyze_tensor("t", c.t, {4, 8});
    EXPECT_EQ(r.status, TensorStatus::skipped) << c.why;
    EXPECT_NE(r.reason.find(c.why), std::string::npos) << r.reason;
    EXPECT_TRUE(r.results.empty());
  }
}

TEST(AnalyzeTensor, RejectsInvalidBitWidths) {
  const Tensor t = random_matrix(4, 8, 17);
  for (const std::vector<int>& bits : {std::vector<int>{}, {1}, {9}, {4, 4}})
    EXPECT_THROW(analyze_tensor("t", t, bits), Error);
  EXPECT_NO_THROW(check_bits({2, 8}));
}

TEST(AnalyzeJson, HasTheDocumentedKeys) {
  Tensor bad = random_matrix(4, 8, 18);
  bad.data<float>()[0] = NAN;
  const AnalyzeReport rep = analyze_tensors(
      "mem", {{"w", random_matrix(8, 16, 19)}, {"v", Tensor::zeros({3}, DType::f32)}, {"bad", bad}},
      {4, 8});
  const auto doc = nlohmann::json::parse(report_json(rep));
  EXPECT_EQ(doc.at("source"), "mem");
  EXPECT_EQ(doc.at("bits"), nlohmann::json({4, 8}));
  EXPECT_EQ(doc.at("quantizers"),
            nlohmann::json({"per_tensor", "per_token", "per_channel", "hq", "asym_per_token"}));
  const auto& ts = doc.at("tensors");
  ASSERT_EQ(ts.size(), 3u);
  EXPECT_EQ(ts[0].at("name"), "w");
  EXPECT_EQ(ts[0].at("dtype"), "f32");
  EXPECT_EQ(ts[0].at("shape"), nlohmann::json({8, 16}));
  EXPECT_EQ(ts[0].at("status"), "ok");
  const auto& r = ts[0].at("results");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[1].at("bits"), 8);
  for (Quantizer q : kQuantizers)
    EXPECT_DOUBLE_EQ(r[0].at("sqnr_db").at(quantizer_name(q)).get<double>(),
                     rep.tensors[0].results[0].sqnr(q))
        << quantizer_name(q);
  EXPECT_EQ(r[0].at("best"), quantizer_name(rep.tensors[0].results[0].best));
  EXPECT_EQ(r[0].at("hq_block"), rep.tensors[0].results[0].hq_block);
  ASSERT_EQ(r[0].at("hq_search").size(), 5u);  // blocks 1..16 divide 16
  EXPECT_EQ(r[0].at("hq_search")[4].at("block"), 16);
  EXPECT_TRUE(r[0].at("hq_search")[4].at("sqnr_db").is_number());
  EXPECT_EQ(ts[1].at("status"), "skipped");
  EXPECT_FALSE(ts[1].contains("results"));
  EXPECT_EQ(ts[2].at("status"), "error");
  EXPECT_NE(ts[2].at("reason").get<std::string>().find("NaN"), std::string::npos);
  EXPECT_EQ(doc.at("summary"), nlohmann::json({{"analyzed", 1}, {"skipped", 1}, {"errors", 1}}));
}

TEST(AnalyzeReportText, MarksOneBestQuantizerPerBitWidth) {
  const std::string text = format_report(builtin_report());
  EXPECT_NE(text.find("blocks.0.mlp_in.input  f32[1024, 768]"), std::string::npos);
  EXPECT_NE(text.find("HQ block"), std::string::npos);
  std::istringstream lines(text);
  int rows = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("  INT", 0) != 0) continue;
    ++rows;
    EXPECT_EQ(std::count(line.begin(), line.end(), '*'), 1) << line;
  }
  EXPECT_EQ(rows, 4);  // 2 tensors x 2 bit-widths
}

TEST(AnalyzeCommand, WritesJsonAndTheExampleFile) {
  ScratchDir dir;
  AnalyzeOptions opt;
  opt.builtin = true;
  opt.bits = {4};
  opt.save_path = dir.file("example.safetensors");
  opt.json_path = dir.file("report.json");
  std::ostringstream out;
  EXPECT_EQ(run_analyze(opt, out), 0);
  EXPECT_NE(out.str().find("INT4"), std::string::npos);
  const auto doc = nlohmann::json::parse(read_text(opt.json_path));
  EXPECT_EQ(doc.at("tensors").size(), 2u);
  const SafetensorsFile saved = read_safetensors(opt.save_path);
  const auto example = builtin_example();
  ASSERT_EQ(saved.tensors.size(), example.size());
  for (size_t i = 0; i < example.size(); ++i) {
    EXPECT_EQ(saved.tensors[i].name, example[i].name);
    EXPECT_EQ(std::memcmp(saved.tensors[i].tensor.data<void>(), example[i].tensor.data<void>(),
                          example[i].tensor.nbytes()),
              0);
  }
  EXPECT_TRUE(saved.metadata.count("generator"));

  // A file with a bad tensor: the others are analyzed, the exit code is 1, and "-"
  // sends the JSON (only) to the stream.
  Tensor bad = random_matrix(4, 8, 20);
  bad.data<float>()[5] = NAN;
  AnalyzeOptions file_opt;
  file_opt.path = dir.file("model.safetensors");
  file_opt.json_path = "-";
  write_safetensors(file_opt.path, {{"ok", random_matrix(8, 16, 21)}, {"bad", bad}});
  std::ostringstream json_out;
  EXPECT_EQ(run_analyze(file_opt, json_out), 1);
  const auto doc2 = nlohmann::json::parse(json_out.str());
  EXPECT_EQ(doc2.at("summary").at("errors"), 1);
  EXPECT_EQ(doc2.at("tensors")[0].at("status"), "ok");
}

TEST(AnalyzeCommand, ValidatesOptionsAndReportsUnreadableFiles) {
  ScratchDir dir;
  std::ostringstream out;
  AnalyzeOptions none;
  EXPECT_THROW(run_analyze(none, out), Error);
  AnalyzeOptions both;
  both.builtin = true;
  both.path = "x.safetensors";
  EXPECT_THROW(run_analyze(both, out), Error);
  AnalyzeOptions save_without_builtin;
  save_without_builtin.path = "x.safetensors";
  save_without_builtin.save_path = dir.file("y.safetensors");
  EXPECT_THROW(run_analyze(save_without_builtin, out), Error);
  AnalyzeOptions missing;
  missing.path = dir.file("absent.safetensors");
  try {
    run_analyze(missing, out);
    FAIL() << "a missing file must throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(missing.path), std::string::npos) << e.what();
  }
  EXPECT_TRUE(out.str().empty());
}
