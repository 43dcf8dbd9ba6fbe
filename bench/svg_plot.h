#pragma once
// A grouped bar chart as a self-contained SVG file (no plotting library): one group of bars
// per shape, one bar per series, a dashed reference line (1.0 = parity with the baseline).
#include <string>
#include <vector>

namespace nibble::bench {

struct BarChart {
  std::string title;
  std::string y_label;
  std::vector<std::string> groups;          // x-axis labels, one per group (e.g. "16384x4096x4096")
  std::vector<std::string> series;          // legend entries, one per bar within a group
  std::vector<std::vector<double>> values;  // [series][group]; NaN or <= 0 draws no bar
  double reference = 1.0;                   // the dashed line
};

// Throws nibble::Error when the file cannot be written or the sizes disagree.
void write_bar_chart_svg(const BarChart& chart, const std::string& path);

}  // namespace nibble::bench
