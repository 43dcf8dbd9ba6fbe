#pragma once
// The training subcommands of the nibble CLI (train, compare, sample, eval): their options
// and the call into src/train/commands.h. main.cpp registers them beside `analyze`.
#include <CLI/CLI.hpp>
#include <functional>
#include <vector>

namespace nibble::cli {

struct Subcommand {
  CLI::App* app;             // parsed() tells whether the user chose it
  std::function<int()> run;  // the exit status; throws nibble::Error on bad input
};

std::vector<Subcommand> add_training_commands(CLI::App& app);

}  // namespace nibble::cli
