#pragma once
// A line chart as a self-contained SVG document: axes with "nice" ticks and labels, one
// <polyline> per series, a legend. Enough for training curves; no dependencies.
#include <string>
#include <vector>

namespace nibble::train {

struct PlotSeries {
  std::string label;
  std::vector<double> x, y;  // same length; non-finite points are left out
  std::string color = "#1f77b4";
  bool dashed = false;
  double width = 1.5;  // stroke width in pixels
};

struct PlotSpec {
  std::string title, x_label, y_label;
  std::vector<PlotSeries> series;
  int width = 900, height = 540;
};

// Throws nibble::Error if a series has x and y of different lengths or the spec has no
// finite point at all.
std::string render_svg(const PlotSpec& spec);

// Tick positions covering [lo, hi] at a 1, 2 or 5 · 10^k spacing, about `target` of them.
std::vector<double> nice_ticks(double lo, double hi, int target);

// Distinct colours for up to 8 series (then they repeat).
const char* series_color(size_t i);

}  // namespace nibble::train
