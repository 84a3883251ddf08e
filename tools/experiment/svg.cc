#include "tools/experiment/svg.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

namespace memsnap::experiment {
namespace {

constexpr const char* kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e",
                                    "#9467bd", "#8c564b", "#e377c2", "#17becf"};

const char* colour(std::size_t i) { return kPalette[i % std::size(kPalette)]; }

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

std::string escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char ch : s) {
    switch (ch) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        // Control characters are not allowed in XML 1.0 text.
        if (static_cast<unsigned char>(ch) < 0x20 && ch != '\t' && ch != '\n') {
          out += ' ';
        } else {
          out += ch;
        }
    }
  }
  return out;
}

class Svg {
 public:
  void text(double x, double y, const std::string& s, const char* anchor = "start", int size = 11,
            const char* extra = "") {
    out_ += "<text x=\"" + num(x) + "\" y=\"" + num(y) + "\" font-size=\"" + std::to_string(size) +
            "\" text-anchor=\"" + anchor + "\"" + extra + ">" + escape(s) + "</text>\n";
  }
  void line(double x1, double y1, double x2, double y2, const char* stroke, double width = 1,
            const char* extra = "") {
    out_ += "<line x1=\"" + num(x1) + "\" y1=\"" + num(y1) + "\" x2=\"" + num(x2) + "\" y2=\"" +
            num(y2) + "\" stroke=\"" + stroke + "\" stroke-width=\"" + num(width) + "\"" + extra +
            "/>\n";
  }
  void rect(double x, double y, double w, double h, const char* fill, const char* extra = "") {
    out_ += "<rect x=\"" + num(x) + "\" y=\"" + num(y) + "\" width=\"" + num(std::max(0.0, w)) +
            "\" height=\"" + num(std::max(0.0, h)) + "\" fill=\"" + fill + "\"" + extra + "/>\n";
  }
  void circle(double cx, double cy, double r, const char* fill) {
    out_ += "<circle cx=\"" + num(cx) + "\" cy=\"" + num(cy) + "\" r=\"" + num(r) + "\" fill=\"" +
            fill + "\" stroke=\"white\" stroke-width=\"1\"/>\n";
  }
  void polyline(const std::vector<std::pair<double, double>>& points, const char* stroke) {
    out_ += "<polyline fill=\"none\" stroke=\"";
    out_ += stroke;
    out_ += "\" stroke-width=\"1.8\" points=\"";
    for (const auto& [x, y] : points) out_ += num(x) + "," + num(y) + " ";
    out_ += "\"/>\n";
  }
  void raw(const std::string& s) { out_ += s; }
  std::string& str() { return out_; }

 private:
  std::string out_;
};

// "Nice" ticks covering [lo, hi] with about `count` steps of 1, 2 or 5 x 10^k.
std::vector<double> nice_ticks(double lo, double hi, int count) {
  std::vector<double> ticks;
  if (!(hi > lo)) {
    ticks.push_back(lo);
    return ticks;
  }
  const double raw = (hi - lo) / count;
  const double mag = std::pow(10, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    step = m * mag;
    if (step >= raw) break;
  }
  for (double t = std::ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
    ticks.push_back(std::fabs(t) < step * 1e-9 ? 0 : t);
  }
  return ticks;
}

struct Axis {
  double lo = 0;
  double hi = 1;
  bool log = false;
  double px0 = 0;  // pixel of lo
  double px1 = 1;  // pixel of hi
  double map(double v) const {
    double f;
    if (log) {
      v = std::max(v, lo);
      f = (std::log10(v) - std::log10(lo)) / (std::log10(hi) - std::log10(lo));
    } else {
      f = (v - lo) / (hi - lo);
    }
    return px0 + std::clamp(f, 0.0, 1.0) * (px1 - px0);
  }
};

std::vector<double> log_ticks(double lo, double hi) {
  std::vector<double> ticks;
  const int first = static_cast<int>(std::floor(std::log10(lo)));
  const int last = static_cast<int>(std::ceil(std::log10(hi)));
  std::vector<double> multipliers = {1};
  if (last - first <= 2) multipliers = {1, 2, 5};
  for (int e = first; e <= last; ++e) {
    for (double m : multipliers) {
      const double t = m * std::pow(10, e);
      if (t >= lo * (1 - 1e-9) && t <= hi * (1 + 1e-9)) ticks.push_back(t);
    }
  }
  return ticks;
}

void panel_frame(Svg& svg, double x, double y, double w, double h, const std::string& title) {
  svg.rect(x, y, w, h, "#fafafa", " stroke=\"#dddddd\"");
  svg.text(x + w / 2, y + 18, title, "middle", 13, " font-weight=\"bold\"");
}

void ecdf_panel(Svg& svg, const Report& report, std::size_t m, double x, double y, double w,
                double h, const SvgOptions& options) {
  const MetricSpec& ms = report.metrics[m];
  const double left = x + 64;
  const double right = x + w - 16;
  const double top = y + 30;
  const double bottom = y + h - 44;

  double lo = INFINITY;
  double hi = -INFINITY;
  for (const ArmSummary& a : report.arms) {
    const ArmMetricStats& s = a.metrics[m];
    if (s.n == 0) continue;
    lo = std::min(lo, s.min);
    hi = std::max(hi, s.max);
  }
  Axis ax;
  ax.px0 = left;
  ax.px1 = right;
  ax.log = lo > 0 && hi / lo > 3;
  if (ax.log) {
    ax.lo = std::pow(10, std::log10(lo) - 0.03);
    ax.hi = std::pow(10, std::log10(hi) + 0.03);
  } else {
    const double pad = hi > lo ? (hi - lo) * 0.05 : (lo != 0 ? std::fabs(lo) * 0.1 : 1);
    ax.lo = lo - pad;
    ax.hi = hi + pad;
    if (lo >= 0 && ax.lo < 0) ax.lo = 0;
  }
  panel_frame(svg, x, y, w, h, ms.label + ": ECDF per " + report.arm_kind + (ax.log ? " (log scale)" : ""));

  // Gridlines and y ticks.
  for (double f : {0.0, 0.25, 0.5, 0.75, 1.0}) {
    const double py = bottom - f * (bottom - top);
    svg.line(left, py, right, py, f == 0.5 ? "#bbbbbb" : "#e4e4e4", 1,
             f == 0.5 ? " stroke-dasharray=\"4 3\"" : "");
    svg.text(left - 6, py + 4, std::to_string(static_cast<int>(f * 100)) + "%", "end", 10);
  }
  const std::vector<double> xt = ax.log ? log_ticks(ax.lo, ax.hi) : nice_ticks(ax.lo, ax.hi, 5);
  for (double t : xt) {
    const double px = ax.map(t);
    svg.line(px, top, px, bottom, "#e4e4e4");
    svg.line(px, bottom, px, bottom + 4, "#444444");
    svg.text(px, bottom + 16, format_value(ms.unit, t), "middle", 10);
  }
  svg.line(left, bottom, right, bottom, "#444444");
  svg.line(left, top, left, bottom, "#444444");
  svg.text((left + right) / 2, bottom + 34, ms.label + " (" + ms.name + ")", "middle", 11);
  svg.text(
      x + 14, (top + bottom) / 2, "share of operations <= x", "middle", 10,
      (" transform=\"rotate(-90 " + num(x + 14) + " " + num((top + bottom) / 2) + ")\"").c_str());

  for (std::size_t a = 0; a < report.arms.size(); ++a) {
    const ArmMetricStats& s = report.arms[a].metrics[m];
    if (s.n == 0) continue;
    std::vector<std::pair<double, double>> points;
    const auto n = s.sorted.size();
    const auto yf = [&](double f) { return bottom - f * (bottom - top); };
    const std::size_t limit = static_cast<std::size_t>(std::max(options.max_points, 2));
    if (n <= limit) {
      points.emplace_back(ax.map(s.sorted[0]), yf(0));
      for (std::size_t i = 0; i < n; ++i) {
        const double px = ax.map(s.sorted[i]);
        points.emplace_back(px, yf(static_cast<double>(i) / static_cast<double>(n)));
        points.emplace_back(px, yf(static_cast<double>(i + 1) / static_cast<double>(n)));
      }
    } else {
      for (std::size_t k = 0; k <= limit; ++k) {
        const std::size_t i = k * (n - 1) / limit;
        points.emplace_back(ax.map(s.sorted[i]),
                            yf(static_cast<double>(i + 1) / static_cast<double>(n)));
      }
    }
    svg.polyline(points, colour(a));
    svg.circle(ax.map(s.p50.estimate), yf(0.5), 3.5, colour(a));
  }
}

void bar_panel(Svg& svg, const Report& report, const std::string& metric, double x, double y,
               double w, double h) {
  std::size_t m = report.metrics.size();
  for (std::size_t i = 0; i < report.metrics.size(); ++i) {
    if (report.metrics[i].name == metric) m = i;
  }
  const std::string label = m < report.metrics.size() ? report.metrics[m].label : metric;
  panel_frame(svg, x, y, w, h, label + " per " + report.arm_kind + ": bar = p50, whisker = min-max");
  if (m == report.metrics.size()) {
    svg.text(x + w / 2, y + h / 2, "no " + metric + " measured", "middle", 12);
    return;
  }
  const Unit unit = report.metrics[m].unit;
  const double left = x + 72;
  const double right = x + w - 16;
  const double top = y + 44;
  const double bottom = y + h - 40;

  double hi = 0;
  for (const ArmSummary& a : report.arms) {
    if (a.metrics[m].n > 0) hi = std::max(hi, a.metrics[m].max);
  }
  if (!(hi > 0)) hi = 1;
  // Ticks in the binary unit the maximum is shown in, so labels read "200 MiB", not "191 MiB".
  double scale = 1;
  if (unit == Unit::kBytes) {
    while (hi / scale >= 1024 && scale < 1024.0 * 1024 * 1024 * 1024) scale *= 1024;
  }
  std::vector<double> ticks = nice_ticks(0, hi * 1.08 / scale, 5);
  for (double& t : ticks) t *= scale;
  const double top_value = std::max(ticks.back(), hi * 1.08);
  const auto yv = [&](double v) {
    return bottom - std::clamp(v / top_value, 0.0, 1.0) * (bottom - top);
  };

  for (double t : ticks) {
    svg.line(left, yv(t), right, yv(t), "#e4e4e4");
    svg.text(left - 6, yv(t) + 4, format_value(unit, t), "end", 10);
  }
  svg.line(left, bottom, right, bottom, "#444444");
  svg.line(left, top, left, bottom, "#444444");

  const double slot =
      (right - left) / static_cast<double>(std::max<std::size_t>(1, report.arms.size()));
  for (std::size_t a = 0; a < report.arms.size(); ++a) {
    const ArmMetricStats& s = report.arms[a].metrics[m];
    const double cx = left + slot * (static_cast<double>(a) + 0.5);
    svg.text(cx, bottom + 16, report.arms[a].name, "middle", 11);
    if (s.n == 0) {
      svg.text(cx, bottom - 8, "n=0", "middle", 10);
      continue;
    }
    const double bw = std::min(slot * 0.5, 90.0);
    svg.rect(cx - bw / 2, yv(s.p50.estimate), bw, bottom - yv(s.p50.estimate), colour(a),
             " fill-opacity=\"0.8\"");
    svg.line(cx, yv(s.min), cx, yv(s.max), "#222222", 1.5);
    svg.line(cx - 8, yv(s.min), cx + 8, yv(s.min), "#222222", 1.5);
    svg.line(cx - 8, yv(s.max), cx + 8, yv(s.max), "#222222", 1.5);
    svg.text(cx, yv(s.max) - 6, "p50 " + format_value(unit, s.p50.estimate), "middle", 10);
    svg.text(cx, bottom + 30, "n=" + std::to_string(s.n), "middle", 10, " fill=\"#666666\"");
  }
}

}  // namespace

std::string render_svg(const Report& report, const SvgOptions& options) {
  const int width = std::max(options.width, 400);
  const double margin = 16;
  const double cell_w = (width - 3 * margin) / 2;
  const double cell_h = std::max(options.panel_height, 200);

  std::vector<std::size_t> latency;
  for (std::size_t m = 0; m < report.metrics.size(); ++m) {
    if (report.metrics[m].unit != Unit::kSeconds) continue;
    const bool any = std::any_of(report.arms.begin(), report.arms.end(),
                                 [&](const ArmSummary& a) { return a.metrics[m].n > 0; });
    if (any) latency.push_back(m);
  }
  const std::size_t cells = latency.size() + 1;  // + the bar chart
  const std::size_t rows = (cells + 1) / 2;
  const double legend_y = 52;
  const double grid_top = legend_y + 24;
  const double height = grid_top + static_cast<double>(rows) * (cell_h + margin) + margin;

  Svg svg;
  svg.raw("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
  svg.raw("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + std::to_string(width) +
          "\" height=\"" + num(height) + "\" viewBox=\"0 0 " + std::to_string(width) + " " +
          num(height) + "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n");
  svg.raw("<title>" + escape(report.title) + "</title>\n");
  svg.rect(0, 0, width, height, "white");
  svg.text(margin, 26, report.title, "start", 16, " font-weight=\"bold\"");

  // Legend.
  double lx = margin;
  for (std::size_t a = 0; a < report.arms.size(); ++a) {
    std::string name = report.arms[a].name;
    if (name == report.baseline) name += " (baseline)";
    svg.rect(lx, legend_y - 10, 14, 10, colour(a));
    svg.text(lx + 19, legend_y, name, "start", 12);
    lx += 19 + 6.8 * static_cast<double>(name.size()) + 22;
  }

  std::size_t cell = 0;
  auto cell_pos = [&](std::size_t i) {
    const double cx = margin + static_cast<double>(i % 2) * (cell_w + margin);
    const double cy = grid_top + static_cast<double>(i / 2) * (cell_h + margin);
    return std::pair<double, double>(cx, cy);
  };
  for (std::size_t m : latency) {
    const auto [cx, cy] = cell_pos(cell++);
    svg.raw("<g id=\"ecdf-" + escape(report.metrics[m].name) + "\">\n");
    ecdf_panel(svg, report, m, cx, cy, cell_w, cell_h, options);
    svg.raw("</g>\n");
  }
  {
    const auto [cx, cy] = cell_pos(cell++);
    svg.raw("<g id=\"bars-" + escape(options.bar_metric) + "\">\n");
    bar_panel(svg, report, options.bar_metric, cx, cy, cell_w, cell_h);
    svg.raw("</g>\n");
  }
  svg.raw("</svg>\n");
  return std::move(svg.str());
}

}  // namespace memsnap::experiment
