// The nibble command line: argument parsing only; the work is in the library.
//   nibble analyze FILE.safetensors [--json OUT.json|-] [--bits 4,8]
//   nibble analyze --builtin [--save FILE.safetensors] [--json OUT.json|-] [--bits 4,8]
//   nibble train --model gpt|vit [--data PATH] --precision fp32|int8|int4|w4a4 ... --out DIR
//   nibble compare --precisions fp32,int4 <train's model/data options> --out DIR
//   nibble sample --ckpt DIR --prompt TEXT --tokens N --temperature T --seed S
//   nibble eval --ckpt DIR [--data PATH]
// (train, compare, sample and eval: training_cli.cpp.)
// Exit codes: 0 success, 1 an error from nibble (message on stderr, "error: ..."), 2 a
// command-line error (CLI11's message), 130 a training run stopped by Ctrl-C (checkpoint saved).
#include <CLI/CLI.hpp>
#include <exception>
#include <iostream>

#include "nibble/analyze.h"
#include "nibble/error.h"
#include "training_cli.h"
#include "bench_cli.h"

namespace {

constexpr const char* kVersion = "0.1.0";  // keep equal to project(VERSION) in CMakeLists.txt
constexpr int kExitUsage = 2;

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nibble: train and run transformers on 4-bit integers", "nibble"};
  app.set_version_flag("--version", kVersion);
  // At most one subcommand: an unknown word is then reported as unexpected by CLI11 (a
  // required subcommand would hide it behind "a subcommand is required").
  app.require_subcommand(0, 1);

  nibble::AnalyzeOptions analyze;
  CLI::App* cmd = app.add_subcommand(
      "analyze", "SQNR of INT4/INT8 quantizers (per-tensor, per-token, per-channel, Hadamard HQ, "
                 "asymmetric per-token) on every 2-D tensor of a safetensors file");
  CLI::Option* file = cmd->add_option("file", analyze.path, "the .safetensors file to analyze");
  CLI::Option* builtin = cmd->add_flag(
      "--builtin", analyze.builtin,
      "analyze a built-in example (an activation with outlier channels and a weight)");
  file->excludes(builtin);
  cmd->add_option("--save", analyze.save_path,
                  "with --builtin: also write the example as a .safetensors file")
      ->needs(builtin);
  cmd->add_option("--json", analyze.json_path,
                  "also write the report as JSON to this file; '-' writes JSON to stdout "
                  "instead of the table");
  cmd->add_option("--bits", analyze.bits, "bit-widths to test, comma separated (2..8)")
      ->delimiter(',')
      ->check(CLI::Range(2, 8))
      ->capture_default_str();
  cmd->parse_complete_callback([&] {
    if (analyze.path.empty() && !analyze.builtin)
      throw CLI::ValidationError("analyze", "give a .safetensors FILE or --builtin");
  });

  const std::vector<nibble::cli::Subcommand> training = nibble::cli::add_training_commands(app);
  const std::vector<nibble::cli::Subcommand> bench = nibble::cli::add_bench_commands(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version arrive here too, with exit code 0.
    const int rc = app.exit(e);
    return rc == 0 ? 0 : kExitUsage;
  }

  if (app.get_subcommands().empty()) {
    std::cerr << "a subcommand is required, e.g. 'nibble compare --steps 200' or 'nibble analyze --builtin'\n"
              << "Run with --help for more information.\n";
    return kExitUsage;
  }

  try {
    if (cmd->parsed()) return nibble::run_analyze(analyze, std::cout);
    for (const auto& sub : training)
      if (sub.app->parsed()) return sub.run();
    for (const auto& sub : bench) if (sub.app->parsed()) return sub.run();
    return 0;
  } catch (const std::exception& e) {
    // nibble::Error and anything else (e.g. out of memory): one line, exit code 1.
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
