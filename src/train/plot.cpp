#include "train/plot.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "nibble/error.h"

namespace nibble::train {

namespace {

std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

std::string tick_label(double v, double step) {
  // As many decimals as the tick spacing needs.
  const int decimals = step >= 1 ? 0 : static_cast<int>(std::ceil(-std::log10(step) - 1e-9));
  char buf[32];
  if (std::abs(v) >= 1e5) std::snprintf(buf, sizeof buf, "%.3g", v);
  else std::snprintf(buf, sizeof buf, "%.*f", std::clamp(decimals, 0, 6), v);
  return buf;
}

}  // namespace

const char* series_color(size_t i) {
  static const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd",
                                  "#ff7f0e", "#17becf", "#8c564b", "#e377c2"};
  return kColors[i % 8];
}

std::vector<double> nice_ticks(double lo, double hi, int target) {
  std::vector<double> ticks;
  if (!(hi > lo) || target < 1) {
    ticks.push_back(lo);
    return ticks;
  }
  const double raw = (hi - lo) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  const double first = std::ceil(lo / step - 1e-9) * step;
  for (double t = first; t <= hi + step * 1e-9; t += step) ticks.push_back(std::abs(t) < step * 1e-9 ? 0.0 : t);
  return ticks;
}

std::string render_svg(const PlotSpec& spec) {
  NB_CHECK(spec.width >= 200 && spec.height >= 150,
           "plot size " << spec.width << "x" << spec.height << " is too small; use at least 200x150");
  double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
  for (const PlotSeries& s : spec.series) {
    NB_CHECK(s.x.size() == s.y.size(), "plot series '" << s.label << "' has " << s.x.size() << " x values but "
                                                        << s.y.size() << " y values");
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      x0 = std::min(x0, s.x[i]);
      x1 = std::max(x1, s.x[i]);
      y0 = std::min(y0, s.y[i]);
      y1 = std::max(y1, s.y[i]);
    }
  }
  NB_CHECK(std::isfinite(x0), "nothing to plot: no series has a finite point");
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) {
    y0 -= 0.5;
    y1 += 0.5;
  }
  const double pad = 0.04 * (y1 - y0);
  y0 -= pad;
  y1 += pad;

  // Plot area inside margins: left for y tick labels, bottom for x labels, right for the legend.
  const double W = spec.width, H = spec.height;
  const double ml = 70, mr = 190, mt = 40, mb = 55;
  const double pw = W - ml - mr, ph = H - mt - mb;
  auto px = [&](double x) { return ml + (x - x0) / (x1 - x0) * pw; };
  auto py = [&](double y) { return mt + (1 - (y - y0) / (y1 - y0)) * ph; };

  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << spec.width << "\" height=\"" << spec.height
    << "\" viewBox=\"0 0 " << spec.width << " " << spec.height << "\" font-family=\"sans-serif\" font-size=\"12\">\n";
  o << "<rect x=\"0\" y=\"0\" width=\"" << spec.width << "\" height=\"" << spec.height << "\" fill=\"white\"/>\n";
  o << "<text x=\"" << num(ml + pw / 2) << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">"
    << xml_escape(spec.title) << "</text>\n";

  // Grid and ticks.
  const std::vector<double> xt = nice_ticks(x0, x1, 8), yt = nice_ticks(y0, y1, 6);
  const double xstep = xt.size() > 1 ? xt[1] - xt[0] : 1, ystep = yt.size() > 1 ? yt[1] - yt[0] : 1;
  o << "<g stroke=\"#e0e0e0\" stroke-width=\"1\">\n";
  for (double t : xt)
    o << "<line x1=\"" << num(px(t)) << "\" y1=\"" << num(mt) << "\" x2=\"" << num(px(t)) << "\" y2=\""
      << num(mt + ph) << "\"/>\n";
  for (double t : yt)
    o << "<line x1=\"" << num(ml) << "\" y1=\"" << num(py(t)) << "\" x2=\"" << num(ml + pw) << "\" y2=\""
      << num(py(t)) << "\"/>\n";
  o << "</g>\n";
  o << "<g stroke=\"black\" stroke-width=\"1\">\n";
  o << "<line x1=\"" << num(ml) << "\" y1=\"" << num(mt + ph) << "\" x2=\"" << num(ml + pw) << "\" y2=\""
    << num(mt + ph) << "\"/>\n";
  o << "<line x1=\"" << num(ml) << "\" y1=\"" << num(mt) << "\" x2=\"" << num(ml) << "\" y2=\"" << num(mt + ph)
    << "\"/>\n";
  for (double t : xt)
    o << "<line x1=\"" << num(px(t)) << "\" y1=\"" << num(mt + ph) << "\" x2=\"" << num(px(t)) << "\" y2=\""
      << num(mt + ph + 5) << "\"/>\n";
  for (double t : yt)
    o << "<line x1=\"" << num(ml - 5) << "\" y1=\"" << num(py(t)) << "\" x2=\"" << num(ml) << "\" y2=\""
      << num(py(t)) << "\"/>\n";
  o << "</g>\n";
  for (double t : xt)
    o << "<text x=\"" << num(px(t)) << "\" y=\"" << num(mt + ph + 19) << "\" text-anchor=\"middle\">"
      << tick_label(t, xstep) << "</text>\n";
  for (double t : yt)
    o << "<text x=\"" << num(ml - 8) << "\" y=\"" << num(py(t) + 4) << "\" text-anchor=\"end\">"
      << tick_label(t, ystep) << "</text>\n";
  o << "<text x=\"" << num(ml + pw / 2) << "\" y=\"" << num(H - 12) << "\" text-anchor=\"middle\">"
    << xml_escape(spec.x_label) << "</text>\n";
  o << "<text x=\"18\" y=\"" << num(mt + ph / 2) << "\" text-anchor=\"middle\" transform=\"rotate(-90 18 "
    << num(mt + ph / 2) << ")\">" << xml_escape(spec.y_label) << "</text>\n";

  // Series.
  for (const PlotSeries& s : spec.series) {
    o << "<polyline fill=\"none\" stroke=\"" << xml_escape(s.color) << "\" stroke-width=\"" << s.width << "\""
      << (s.dashed ? " stroke-dasharray=\"6 4\"" : "") << " points=\"";
    bool first = true;
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      o << (first ? "" : " ") << num(px(s.x[i])) << "," << num(py(s.y[i]));
      first = false;
    }
    o << "\"><title>" << xml_escape(s.label) << "</title></polyline>\n";
  }

  // Legend, right of the plot area.
  const double lx = ml + pw + 15;
  for (size_t i = 0; i < spec.series.size(); ++i) {
    const PlotSeries& s = spec.series[i];
    const double ly = mt + 10 + 20.0 * static_cast<double>(i);
    o << "<line x1=\"" << num(lx) << "\" y1=\"" << num(ly) << "\" x2=\"" << num(lx + 28) << "\" y2=\"" << num(ly)
      << "\" stroke=\"" << xml_escape(s.color) << "\" stroke-width=\"" << s.width << "\""
      << (s.dashed ? " stroke-dasharray=\"6 4\"" : "") << "/>\n";
    o << "<text x=\"" << num(lx + 34) << "\" y=\"" << num(ly + 4) << "\">" << xml_escape(s.label) << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

}  // namespace nibble::train
