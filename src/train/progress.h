#pragma once
// Training progress on a terminal (one line redrawn with '\r': step/total, a bar, loss,
// throughput, ETA) or, when the output is a file or pipe, plain lines every few steps.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ostream>
#include <string>

namespace nibble::train {

// True if the stream's file descriptor is a terminal.
bool is_terminal(std::FILE* f);
// "45s", "3m07s", "1h02m".
std::string format_duration(double seconds);
// "812", "12.3k", "4.56M".
std::string format_rate(double per_second);

class Progress {
 public:
  // os may be null (silent). label prefixes every line ("[int4] "); unit is "tok" or "img".
  Progress(std::ostream* os, bool tty, int64_t total_steps, int64_t log_every, std::string unit,
           std::string label);
  ~Progress();
  // After step `step` (1-based) with the step's loss, the recent throughput and the ETA.
  void update(int64_t step, double loss, double items_per_s, double eta_s);
  // A full line (validation results, warnings); on a terminal it replaces the bar, which the
  // next update redraws.
  void message(const std::string& line);
  // Ends the bar's line on a terminal.
  void finish();

 private:
  void clear_bar();
  std::ostream* os_;
  bool tty_;
  int64_t total_;
  int64_t log_every_;
  std::string unit_, label_;
  bool bar_shown_ = false;
  std::chrono::steady_clock::time_point last_draw_{};
};

}  // namespace nibble::train
