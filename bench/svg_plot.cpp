#include "bench/svg_plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "nibble/error.h"
#include "nibble/safetensors.h"  // write_file_atomic

namespace nibble::bench {
namespace {

std::string escape(const std::string& s) {
  std::string out;
  for (const char ch : s) {
    switch (ch) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += ch;
    }
  }
  return out;
}

std::string fmt(double v, int decimals) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.*f", decimals, v);
  return buf;
}

}  // namespace

void write_bar_chart_svg(const BarChart& chart, const std::string& path) {
  const size_t ng = chart.groups.size(), ns = chart.series.size();
  NB_CHECK(ng > 0 && ns > 0 && chart.values.size() == ns,
           "bar chart: " << ns << " series with " << chart.values.size() << " value rows and "
                         << ng << " groups; pass one value row per series");
  for (const auto& row : chart.values)
    NB_CHECK(row.size() == ng, "bar chart: a series has " << row.size() << " values for " << ng
                                                          << " groups");
  // Layout (pixels): left axis margin, bottom margin for rotated group labels, legend on top.
  const double bar_w = 14, group_gap = 18, left = 70, right = 20, top = 70, plot_h = 320,
               bottom = 150;
  const double group_w = bar_w * static_cast<double>(ns) + group_gap;
  const double plot_w = group_w * static_cast<double>(ng);
  // Wide enough for the legend (4 entries per line) and the last rotated group label.
  const double legend_w = left + 190.0 * static_cast<double>(std::min<size_t>(ns, 4)) + 20;
  const double width = std::max(left + plot_w + right + 110, legend_w);
  const double height = top + plot_h + bottom;
  double vmax = chart.reference;
  for (const auto& row : chart.values)
    for (const double v : row)
      if (std::isfinite(v)) vmax = std::max(vmax, v);
  // Axis top: the next multiple of 0.5 above the largest value.
  const double ymax = std::ceil(vmax * 1.05 / 0.5) * 0.5;
  const auto y_of = [&](double v) { return top + plot_h - v / ymax * plot_h; };
  static const char* kColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"};

  std::ostringstream os;
  os << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << fmt(width, 0) << "\" height=\""
     << fmt(height, 0) << "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  os << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  os << "<text x=\"" << fmt(width / 2, 1) << "\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">"
     << escape(chart.title) << "</text>\n";
  // legend
  for (size_t s = 0; s < ns; ++s) {
    const double x = left + 190.0 * static_cast<double>(s % 4), y = 36 + 16.0 * static_cast<double>(s / 4);
    os << "<rect x=\"" << fmt(x, 1) << "\" y=\"" << fmt(y, 1) << "\" width=\"10\" height=\"10\" fill=\""
       << kColors[s % 6] << "\"/><text x=\"" << fmt(x + 14, 1) << "\" y=\"" << fmt(y + 9, 1)
       << "\">" << escape(chart.series[s]) << "</text>\n";
  }
  // y grid and labels
  for (double t = 0; t <= ymax + 1e-9; t += 0.5) {
    const double y = y_of(t);
    os << "<line x1=\"" << fmt(left, 1) << "\" y1=\"" << fmt(y, 1) << "\" x2=\"" << fmt(left + plot_w, 1)
       << "\" y2=\"" << fmt(y, 1) << "\" stroke=\"#ddd\"/>\n";
    os << "<text x=\"" << fmt(left - 6, 1) << "\" y=\"" << fmt(y + 4, 1) << "\" text-anchor=\"end\">"
       << fmt(t, 1) << "</text>\n";
  }
  os << "<text transform=\"translate(18," << fmt(top + plot_h / 2, 1)
     << ") rotate(-90)\" text-anchor=\"middle\">" << escape(chart.y_label) << "</text>\n";
  // bars
  for (size_t g = 0; g < ng; ++g) {
    const double gx = left + group_w * static_cast<double>(g) + group_gap / 2;
    for (size_t s = 0; s < ns; ++s) {
      const double v = chart.values[s][g];
      if (!(std::isfinite(v) && v > 0)) continue;
      const double x = gx + bar_w * static_cast<double>(s), y = y_of(v);
      os << "<rect x=\"" << fmt(x, 1) << "\" y=\"" << fmt(y, 1) << "\" width=\"" << fmt(bar_w - 1, 1)
         << "\" height=\"" << fmt(top + plot_h - y, 1) << "\" fill=\"" << kColors[s % 6]
         << "\"><title>" << escape(chart.series[s]) << " " << escape(chart.groups[g]) << ": "
         << fmt(v, 2) << "</title></rect>\n";
    }
    const double lx = gx + bar_w * static_cast<double>(ns) / 2, ly = top + plot_h + 8;
    os << "<text transform=\"translate(" << fmt(lx, 1) << "," << fmt(ly, 1)
       << ") rotate(45)\" text-anchor=\"start\">" << escape(chart.groups[g]) << "</text>\n";
  }
  // axes and the reference line
  os << "<line x1=\"" << fmt(left, 1) << "\" y1=\"" << fmt(top + plot_h, 1) << "\" x2=\""
     << fmt(left + plot_w, 1) << "\" y2=\"" << fmt(top + plot_h, 1) << "\" stroke=\"black\"/>\n";
  os << "<line x1=\"" << fmt(left, 1) << "\" y1=\"" << fmt(top, 1) << "\" x2=\"" << fmt(left, 1)
     << "\" y2=\"" << fmt(top + plot_h, 1) << "\" stroke=\"black\"/>\n";
  const double ry = y_of(chart.reference);
  os << "<line x1=\"" << fmt(left, 1) << "\" y1=\"" << fmt(ry, 1) << "\" x2=\"" << fmt(left + plot_w, 1)
     << "\" y2=\"" << fmt(ry, 1) << "\" stroke=\"black\" stroke-dasharray=\"6,4\"/>\n";
  os << "</svg>\n";

  write_file_atomic(path, os.str());  // temporary file, then rename
}

}  // namespace nibble::bench
