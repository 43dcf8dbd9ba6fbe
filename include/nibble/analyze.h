#pragma once
// `nibble analyze`: how much of a tensor survives INT4 / INT8 quantization under each
// quantizer, as SQNR in dB (10·log10(Σx² / Σ(x − x̂)²), higher is better).
//
// Quantizers (b bits, qmax = 2^(b−1) − 1; rounding to nearest, halves to even):
//   per_tensor      symmetric [−qmax, qmax], one scale absmax/qmax for the whole tensor
//   per_token       symmetric, one scale per row (a token of an activation X[tokens, K],
//                   an output channel of a weight W[out, K])
//   per_channel     symmetric, one scale per column (an input channel)
//   hq              the Hadamard quantizer of paper 1 (algorithms.md A.3): each row times
//                   BlockDiag(H, ..., H), one LSQ-init scale s = 2·mean|v|/sqrt(qmax) over
//                   the transformed tensor, codes in [−qmax, qmax]; SQNR is measured after
//                   the inverse transform, in the original domain. The block (1, 2, 4, ...,
//                   1024, dividing cols) is searched per bit-width on the tensor itself;
//                   block 1 means no transform.
//   asym_per_token  asymmetric, one scale and zero point per row from min/max, the
//                   2^b levels of [0, 2^b − 1] ([0, 15] for INT4, [0, 255] for INT8)
//
// JSON report (report_json), keys:
//   {"source": str, "bits": [int],
//    "quantizers": ["per_tensor", "per_token", "per_channel", "hq", "asym_per_token"],
//    "tensors": [{"name": str, "dtype": "f32"|"f16"|"bf16"|..., "shape": [int],
//                 "status": "ok"|"skipped"|"error",
//                 "reason": str                              (skipped and error only)
//                 "results": [{"bits": int,                  (ok only; one per bit-width)
//                              "sqnr_db": {quantizer: number|null},   null = exact (+inf)
//                              "best": quantizer,
//                              "hq_block": int,
//                              "hq_search": [{"block": int, "sqnr_db": number|null}]}]}],
//    "summary": {"analyzed": int, "skipped": int, "errors": int}}
#include <array>
#include <cstdint>
#include <iosfwd>
#include <map>
#include <string>
#include <vector>

#include "nibble/safetensors.h"
#include "nibble/tensor.h"

namespace nibble {

// In report order.
enum class Quantizer : uint8_t { per_tensor, per_token, per_channel, hq, asym_per_token };
constexpr int kNumQuantizers = 5;
constexpr std::array<Quantizer, kNumQuantizers> kQuantizers = {
    Quantizer::per_tensor, Quantizer::per_token, Quantizer::per_channel, Quantizer::hq,
    Quantizer::asym_per_token};
const char* quantizer_name(Quantizer q);   // JSON key: "per_tensor", ...
const char* quantizer_label(Quantizer q);  // table column: "per-tensor", ...

// One bit-width's results for one tensor.
struct BitsResult {
  int bits = 4;
  std::array<double, kNumQuantizers> sqnr_db{};  // indexed by Quantizer; +inf when exact
  Quantizer best = Quantizer::per_tensor;        // highest SQNR (the earlier one on a tie)
  int64_t hq_block = 1;                          // the block the search chose
  std::vector<int64_t> hq_blocks;                // every block tried, ascending
  std::vector<double> hq_blocks_sqnr_db;         // SQNR of HQ with each of them
  double sqnr(Quantizer q) const { return sqnr_db[static_cast<size_t>(q)]; }
};

enum class TensorStatus : uint8_t { ok, skipped, error };

struct TensorReport {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
  TensorStatus status = TensorStatus::ok;
  std::string reason;               // why it was skipped, or the error (status != ok)
  std::vector<BitsResult> results;  // one per requested bit-width, in order (status ok)
};

struct AnalyzeReport {
  std::string source;  // the file, or "builtin example"
  std::vector<int> bits;
  std::vector<TensorReport> tensors;
  int64_t count(TensorStatus s) const;
};

// Throws nibble::Error unless bits is a non-empty list of distinct widths in [2, 8]
// (codes live in int8 containers).
void check_bits(const std::vector<int>& bits);

// Analyzes one tensor. Never throws for the tensor's content: a dtype other than F32, F16,
// BF16, a shape that is not 2-D, an empty or all-zero tensor give status skipped; NaN/Inf
// values (or any other failure) give status error with the reason. Throws nibble::Error
// only for invalid `bits`.
TensorReport analyze_tensor(const std::string& name, const TensorView& t,
                            const std::vector<int>& bits);
AnalyzeReport analyze_tensors(const std::string& source, const std::vector<NamedTensor>& tensors,
                              const std::vector<int>& bits);
// Reads a safetensors file (throws nibble::Error if it cannot) and analyzes every tensor.
AnalyzeReport analyze_file(const std::string& path, const std::vector<int>& bits);

// The built-in example, a pure function of a fixed Philox seed:
//   "blocks.0.mlp_in.input"  f32[1024, 768]: N(0, 1), with 8 of the 768 columns (~1%)
//                            scaled by 20..60, like the outlier features of LLM
//                            activations (LLM.int8());
//   "blocks.0.mlp_in.weight" f32[3072, 768]: N(0, 0.02²).
std::vector<NamedTensor> builtin_example();
// The example as a safetensors file, with metadata saying where it came from.
void write_builtin_example(const std::string& path);

// Human-readable table: per tensor one line per bit-width, '*' on the best quantizer.
std::string format_report(const AnalyzeReport& report);
// The JSON document described at the top of this file (2-space indented).
std::string report_json(const AnalyzeReport& report);

// The whole command, for the CLI (which only parses arguments into this struct).
struct AnalyzeOptions {
  std::string path;            // the .safetensors file to analyze (empty with builtin)
  bool builtin = false;        // analyze builtin_example() instead of a file
  std::string save_path;       // with builtin: also write the example here ("" = no)
  std::string json_path;       // also write the JSON report here; "-" = stdout instead of
                               // the table ("" = no JSON)
  std::vector<int> bits = {4, 8};
};
// Prints the table (or the JSON, for json_path "-") to `out`, writes the JSON file
// atomically. Returns 0, or 1 when any tensor had an error. Throws nibble::Error for
// invalid options or an unreadable file.
int run_analyze(const AnalyzeOptions& options, std::ostream& out);

}  // namespace nibble
