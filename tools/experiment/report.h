// The A/B(/C) experiment report: per-operation records of sandboxes split across pause/resume
// strategies by a weighted feature flag go in; per arm and metric quantiles with confidence
// intervals, comparisons against a baseline arm, a sample-ratio-mismatch check of the split and
// plain-language verdicts come out, as a struct, JSON and Markdown (the picture: svg.h).
//
// Method (all in stats.h):
//   * p50/p90/p99: type-7 quantiles, 95% percentile-bootstrap intervals (B = 2000, seeded);
//   * arm vs baseline: ratio of p50 and of p99 (arms resampled independently); a difference
//     instead of a ratio for fractions (percentage points) and when either p50 is <= 0;
//   * Mann-Whitney U (two-sided), p-values Holm-corrected per metric over the comparisons with
//     the baseline (k arms: k - 1 tests per metric; metrics are separate families);
//   * a p50 change is significant when the corrected p < alpha AND its interval excludes "no
//     change" (ratio 1 / difference 0); a p99 change is reported when its interval excludes it
//     (the intervals are not multiplicity-corrected);
//   * the split: chi-square goodness of fit of units (sandboxes) per arm vs the flag weights.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/base/result.h"
#include "tools/experiment/stats.h"

namespace memsnap::experiment {

// One operation (a pause, a resume, a pause+resume cycle...) of one sandbox.
struct OperationRecord {
  std::string arm;   // the strategy / flag variant that served it
  std::string unit;  // the unit of assignment (sandbox id); empty: the record is its own unit
  std::map<std::string, double> metrics;  // e.g. pause_seconds; a missing metric: not measured
};

// A variant of the flag and its weight (flagd "fractional": relative weights, any scale).
struct ArmWeight {
  std::string arm;
  double weight = 1;
};

enum class Direction {
  kLowerIsBetter,   // latencies, CPU, memory
  kHigherIsBetter,  // released memory
  kNeutral,         // unknown metrics: changes are reported, never called better or worse
};

enum class Unit { kSeconds, kBytes, kFraction, kCount };

struct MetricSpec {
  std::string name;         // key in OperationRecord::metrics, e.g. "pause_seconds"
  std::string label;        // "pause latency"
  std::string short_label;  // "pause" (as in "+40% pause p99")
  Unit unit = Unit::kCount;
  Direction direction = Direction::kNeutral;
  // Verdict templates: {arm}, {base} (arm names) and {x}: the factor ("1.6x") or the absolute
  // difference ("2.0 ms", "40 pp"). lower_text when the arm's p50 is below the baseline's.
  std::string lower_text;   // "{arm} pauses are {x} faster than {base}"
  std::string higher_text;  // "{arm} pauses are {x} slower than {base}"
  // Optional, for the per-arm summary of an improvement: {value} (the arm's p50) and
  // {base_value}, e.g. "releases {value} of guest memory". Empty: "-38% pause p50 (...)".
  std::string level_text;
};

// The built-in metrics, in report order: pause_seconds, answer_seconds, answer_wall_seconds,
// durable_seconds (a pause's two moments), resume_seconds, cpu_seconds, export_cpu_seconds,
// peak_memory_bytes, held_memory_bytes, released_bytes, released_fraction.
const std::vector<MetricSpec>& default_metric_specs();
// The built-in spec of `name`, else a neutral one (unit guessed from the suffix: _seconds,
// _bytes, _fraction).
MetricSpec metric_spec_for(std::string_view name);

struct ExperimentSpec {
  std::string title = "memsnap strategy experiment";
  std::string arm_kind = "strategy";  // what an arm is, in the picture ("pause mode")
  std::string baseline;             // must be one of arms
  std::vector<ArmWeight> arms;      // every variant of the flag, in display order
  std::vector<MetricSpec> metrics;  // empty: every metric in the records (minus context ones)
  // Metrics that describe the sandbox rather than the strategy: not compared.
  std::vector<std::string> context_metrics = {"guest_memory_bytes"};
  // Add released_fraction = released_bytes / guest_memory_bytes where both are present.
  bool derive_released_fraction = true;
  double alpha = 0.05;
  double srm_threshold = kDefaultSrmThreshold;
  BootstrapOptions bootstrap;   // B, confidence (also used for every interval), seed
  std::size_t min_samples = 2;  // per arm and metric, to compare at all
};

struct ArmMetricStats {
  std::size_t n = 0;  // 0: not measured in this arm (the other fields are meaningless)
  double mean = 0;
  double min = 0;
  double max = 0;
  Interval p50, p90, p99;
  // False when fewer than 5 samples lie beyond the quantile (n (1-q) < 5): that interval is rough.
  bool p90_tail_ok = false;
  bool p99_tail_ok = false;
  std::vector<double> sorted;  // the samples, ascending (for the picture; not in the JSON)
};

struct ArmSummary {
  std::string name;
  double weight = 0;
  std::size_t records = 0;
  std::uint64_t units = 0;              // distinct units (what the SRM check counts)
  std::vector<ArmMetricStats> metrics;  // parallel to Report::metrics
};

enum class CompareMode { kRatio, kDifference };

enum class Outcome {
  kBetter,        // significant, in the metric's good direction
  kWorse,         // significant, in the bad direction
  kChanged,       // significant, neutral metric
  kNoDifference,  // neither test nor interval shows a change
  kInconclusive,  // only one of (corrected Mann-Whitney, p50 interval) shows a change
};

struct Comparison {
  std::string arm;
  std::string baseline;
  std::size_t metric = 0;  // index into Report::metrics
  CompareMode mode = CompareMode::kRatio;
  Interval p50;  // arm vs baseline: ratio or difference
  Interval p99;
  MannWhitneyResult mann_whitney;                // arm = sample a, baseline = sample b
  double p_adjusted = 1;                         // Holm, per metric
  Outcome outcome = Outcome::kNoDifference;      // of the p50 / distribution
  Outcome p99_outcome = Outcome::kNoDifference;  // of the p99, by its interval alone
  std::string verdict;                           // one sentence on the p50
  std::string p99_verdict;  // one sentence on the p99 if its interval excludes no change, else ""
};

struct Winner {
  std::size_t metric = 0;
  std::string arm;     // the best p50; empty if the metric is neutral or unmeasured
  bool clear = false;  // its p50 is significantly better than every other arm's
  std::string text;
};

struct Report {
  std::string title;
  std::string arm_kind = "strategy";
  std::string baseline;
  double alpha = 0.05;
  BootstrapOptions bootstrap;
  std::vector<MetricSpec> metrics;
  std::vector<ArmSummary> arms;  // in ExperimentSpec::arms order
  SrmResult srm;
  std::string srm_text;
  std::vector<Comparison> comparisons;  // for each metric, each non-baseline arm
  std::vector<Winner> winners;          // one per metric
  std::vector<std::string> summary;     // one per non-baseline arm: its gains and costs
  std::vector<std::string> notes;       // data problems: unit in two arms, too few samples...

  // All verdict sentences: p50 verdicts, then p99 ones, in comparison order.
  std::vector<std::string> verdicts() const;
};

// Errors: no records, baseline not among arms, a record of an arm not in arms, a zero-weight
// arm with records, bad alpha/threshold/bootstrap options.
Result<Report> build_report(std::span<const OperationRecord> records, const ExperimentSpec& spec);

nlohmann::json to_json(const Report& report);
std::string to_markdown(const Report& report);

// Records from JSON: an array of {"arm": s, "unit": s?, "metrics": {name: number}}, or of flat
// objects {"arm": s, "unit"|"sandbox": s?, name: number...} (non-numeric fields are ignored).
Result<std::vector<OperationRecord>> records_from_json(const nlohmann::json& json);

// Formatting shared with the picture: "850 us", "1.2 ms", "3.40 s"; "512 MiB"; "100%".
std::string format_value(Unit unit, double value);
// "p<0.001", "p=0.043", "p=0.43".
std::string format_p(double p);

}  // namespace memsnap::experiment
