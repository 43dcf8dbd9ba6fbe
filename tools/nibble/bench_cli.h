#pragma once
// `nibble bench gemm` and `nibble bench linear`: options and the call into the benchmark
// library (bench/bench_api.h, built when CUDA is on). main.cpp registers them beside the
// other subcommands. Without CUDA both exist but fail with "built without CUDA" (exit 1).
#include <CLI/CLI.hpp>
#include <vector>

#include "training_cli.h"  // nibble::cli::Subcommand

namespace nibble::cli {

std::vector<Subcommand> add_bench_commands(CLI::App& app);

}  // namespace nibble::cli
