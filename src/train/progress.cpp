#include "train/progress.h"

#include <unistd.h>

#include <cmath>
#include <sstream>

namespace nibble::train {

bool is_terminal(std::FILE* f) { return f != nullptr && ::isatty(::fileno(f)) == 1; }

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const auto total = static_cast<int64_t>(std::llround(s));
  char buf[32];
  if (total < 60) std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(total));
  else if (total < 3600)
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(total / 60),
                  static_cast<long long>(total % 60));
  else
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", static_cast<long long>(total / 3600),
                  static_cast<long long>(total / 60 % 60));
  return buf;
}

std::string format_rate(double r) {
  if (!std::isfinite(r) || r < 0) return "?";
  char buf[32];
  if (r < 1e3) std::snprintf(buf, sizeof buf, "%.0f", r);
  else if (r < 1e6) std::snprintf(buf, sizeof buf, "%.1fk", r / 1e3);
  else std::snprintf(buf, sizeof buf, "%.2fM", r / 1e6);
  return buf;
}

Progress::Progress(std::ostream* os, bool tty, int64_t total_steps, int64_t log_every, std::string unit,
                   std::string label)
    : os_(os), tty_(tty), total_(total_steps), log_every_(log_every < 1 ? 1 : log_every),
      unit_(std::move(unit)), label_(std::move(label)) {}

Progress::~Progress() { finish(); }

void Progress::clear_bar() {
  // "\r" + erase to end of line (ANSI EL), so a shorter line leaves no debris.
  if (tty_ && bar_shown_) *os_ << "\r\033[K";
  bar_shown_ = false;
}

void Progress::update(int64_t step, double loss, double items_per_s, double eta_s) {
  if (os_ == nullptr) return;
  char loss_buf[32];
  std::snprintf(loss_buf, sizeof loss_buf, "%.4f", loss);
  if (!tty_) {
    if (step % log_every_ != 0 && step != total_) return;
    *os_ << label_ << "step " << step << "/" << total_ << "  loss " << loss_buf << "  "
         << format_rate(items_per_s) << " " << unit_ << "/s  ETA " << format_duration(eta_s) << "\n";
    os_->flush();
    return;
  }
  // Redraw at most ten times a second: a terminal is slow at thousands of lines a second.
  const auto now = std::chrono::steady_clock::now();
  if (bar_shown_ && step != total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  constexpr int kWidth = 24;
  const double frac = total_ > 0 ? static_cast<double>(step) / static_cast<double>(total_) : 1.0;
  const int filled = static_cast<int>(frac * kWidth);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(kWidth - filled), '.');
  *os_ << "\r\033[K" << label_ << "step " << step << "/" << total_ << " [" << bar << "] loss " << loss_buf
       << "  " << format_rate(items_per_s) << " " << unit_ << "/s  ETA " << format_duration(eta_s);
  os_->flush();
  bar_shown_ = true;
}

void Progress::message(const std::string& line) {
  if (os_ == nullptr) return;
  clear_bar();
  *os_ << label_ << line << "\n";
  os_->flush();
}

void Progress::finish() {
  if (os_ == nullptr) return;
  if (tty_ && bar_shown_) {
    *os_ << "\n";
    os_->flush();
  }
  bar_shown_ = false;
}

}  // namespace nibble::train
