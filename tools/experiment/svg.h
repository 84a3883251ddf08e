// The experiment's picture: one standalone SVG document (hand-written SVG elements).
//
//   * a legend: one colour per arm (a strategy, or a pause mode), the baseline marked;
//   * per latency metric (every metric in seconds: pause, resume, CPU; a pause's answer and
//     durable latencies...) one panel with the ECDF of each arm, log-scaled x axis when the values span more than a factor 3,
//     gridlines at 25/50/75%, a dot at each strategy's p50;
//   * a bar chart of peak memory (peak_memory_bytes) per strategy: the bar is the p50, the
//     whisker the min-max range, labelled with the p50.
// Two panels per row. Text is XML-escaped, so any arm name is safe.
#pragma once

#include <string>

#include "tools/experiment/report.h"

namespace memsnap::experiment {

struct SvgOptions {
  int width = 960;         // px; the height follows from the number of panels
  int panel_height = 320;  // px
  int max_points = 400;    // per ECDF curve (larger samples are thinned to this many points)
  std::string bar_metric = "peak_memory_bytes";
};

std::string render_svg(const Report& report, const SvgOptions& options = {});

}  // namespace memsnap::experiment
