#include "tools/experiment/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <set>
#include <utility>

namespace memsnap::experiment {
namespace {

constexpr double kQuantiles[] = {0.5, 0.9, 0.99};
constexpr double kComparedQuantiles[] = {0.5, 0.99};

std::string printf_string(const char* format, double value) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, value);
  return buf;
}

std::string fixed(double value, int decimals) {
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  if (std::isnan(value)) return "nan";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, value);
  return buf;
}

// Three significant digits for |value| in [0, 1000).
std::string sig3(double value) {
  const double a = std::fabs(value);
  const int decimals = a >= 99.95 ? 0 : (a >= 9.995 ? 1 : 2);
  return fixed(value, decimals);
}

std::string signed_fixed(double value, int decimals) {
  std::string s = fixed(value, decimals);
  if (value >= 0 || s == fixed(0.0, decimals)) {
    if (s.front() == '-') s.erase(0, 1);
    return "+" + s;
  }
  return s;
}

// A per-stream seed from the report seed and two indices (splitmix64 finalizer).
std::uint64_t derive_seed(std::uint64_t base, std::uint64_t a, std::uint64_t b) {
  std::uint64_t z = base + 0x9E3779B97F4A7C15ULL * (a * 1000003ULL + b + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

std::string fill(std::string text, const std::map<std::string, std::string>& values) {
  for (const auto& [key, value] : values) {
    const std::string token = "{" + key + "}";
    for (std::size_t pos = text.find(token); pos != std::string::npos;
         pos = text.find(token, pos + value.size())) {
      text.replace(pos, token.size(), value);
    }
  }
  return text;
}

// Percent with one decimal below 10%, none above.
int percent_decimals(std::initializer_list<double> values) {
  double smallest = INFINITY;
  for (double v : values) {
    if (std::isfinite(v)) smallest = std::min(smallest, std::fabs(v));
  }
  return smallest < 10 ? 1 : 0;
}

std::string format_difference(Unit unit, double value) {
  if (unit == Unit::kFraction)
    return signed_fixed(value * 100, std::fabs(value) < 0.1 ? 1 : 0) + " pp";
  const std::string magnitude = format_value(unit, std::fabs(value));
  return (value < 0 ? "-" : "+") + magnitude;
}

std::string format_magnitude(Unit unit, double value) {
  if (unit == Unit::kFraction)
    return fixed(std::fabs(value) * 100, std::fabs(value) < 0.1 ? 1 : 0) + " pp";
  return format_value(unit, std::fabs(value));
}

bool excludes_null(const Interval& ci, CompareMode mode) {
  const double null_value = mode == CompareMode::kRatio ? 1.0 : 0.0;
  return ci.low > null_value || ci.high < null_value;
}

std::string ci_words(double confidence) { return fixed(confidence * 100, 0) + "% CI"; }

// "+40% pause p99 (95% CI +30% to +52%)" or "+2.0 ms pause p99 (95% CI ...)".
std::string change_phrase(const MetricSpec& spec, CompareMode mode, const Interval& ci,
                          const char* quantile_name) {
  std::string change;
  std::string low;
  std::string high;
  if (mode == CompareMode::kRatio) {
    const double pct = (ci.estimate - 1) * 100;
    const double lo = (ci.low - 1) * 100;
    const double hi = (ci.high - 1) * 100;
    const int d = percent_decimals({pct, lo, hi});
    change = signed_fixed(pct, d) + "%";
    low = signed_fixed(lo, d) + "%";
    high = signed_fixed(hi, d) + "%";
  } else {
    change = format_difference(spec.unit, ci.estimate);
    low = format_difference(spec.unit, ci.low);
    high = format_difference(spec.unit, ci.high);
  }
  return change + " " + spec.short_label + " " + quantile_name + " (" + ci_words(ci.confidence) +
         " " + low + " to " + high + ")";
}

struct Factor {
  bool lower = false;  // the arm's value is below the baseline's
  std::string x;       // "1.6x" / "2.0 ms"
  std::string range;   // "1.5-1.7x" / "-2.4 ms to -1.6 ms"
};

Factor factor_of(const MetricSpec& spec, CompareMode mode, const Interval& ci) {
  Factor f;
  if (mode == CompareMode::kRatio) {
    f.lower = ci.estimate < 1;
    double value = ci.estimate;
    double lo = ci.low;
    double hi = ci.high;
    if (f.lower) {
      value = 1 / ci.estimate;
      lo = ci.high > 0 ? 1 / ci.high : INFINITY;
      hi = ci.low > 0 ? 1 / ci.low : INFINITY;
    }
    const int d = std::min(value, lo) < 1.1 ? 2 : (value < 10 ? 1 : 0);
    f.x = fixed(value, d) + "x";
    f.range = fixed(lo, d) + "-" + fixed(hi, d) + "x";
  } else {
    f.lower = ci.estimate < 0;
    f.x = format_magnitude(spec.unit, ci.estimate);
    f.range = format_difference(spec.unit, ci.low) + " to " + format_difference(spec.unit, ci.high);
  }
  return f;
}

Outcome outcome_for(const MetricSpec& spec, bool lower) {
  switch (spec.direction) {
    case Direction::kLowerIsBetter:
      return lower ? Outcome::kBetter : Outcome::kWorse;
    case Direction::kHigherIsBetter:
      return lower ? Outcome::kWorse : Outcome::kBetter;
    case Direction::kNeutral:
      break;
  }
  return Outcome::kChanged;
}

const char* outcome_name(Outcome o) {
  switch (o) {
    case Outcome::kBetter:
      return "better";
    case Outcome::kWorse:
      return "worse";
    case Outcome::kChanged:
      return "changed";
    case Outcome::kNoDifference:
      return "no_difference";
    case Outcome::kInconclusive:
      return "inconclusive";
  }
  return "?";
}

const char* unit_name(Unit u) {
  switch (u) {
    case Unit::kSeconds:
      return "seconds";
    case Unit::kBytes:
      return "bytes";
    case Unit::kFraction:
      return "fraction";
    case Unit::kCount:
      return "count";
  }
  return "?";
}

const char* direction_name(Direction d) {
  switch (d) {
    case Direction::kLowerIsBetter:
      return "lower_is_better";
    case Direction::kHigherIsBetter:
      return "higher_is_better";
    case Direction::kNeutral:
      return "neutral";
  }
  return "?";
}

std::string mw_words(const Comparison& c, std::size_t family) {
  std::string s = "Mann-Whitney " + format_p(c.p_adjusted);
  if (family > 1) s += " Holm-adjusted";
  return s;
}

void write_verdicts(const MetricSpec& spec, double alpha, std::size_t family, Comparison& c) {
  const bool mw_significant = c.p_adjusted < alpha;
  const bool ci_significant = excludes_null(c.p50, c.mode);
  const Factor f = factor_of(spec, c.mode, c.p50);
  const std::string ci = ci_words(c.p50.confidence);
  const std::string mw = mw_words(c, family);
  const std::map<std::string, std::string> names = {
      {"arm", c.arm}, {"base", c.baseline}, {"x", f.x}};

  std::string raw;  // "p50 ratio 1.02 (95% CI 0.97-1.08)"
  if (c.mode == CompareMode::kRatio) {
    raw = "p50 ratio " + fixed(c.p50.estimate, 2) + ", " + ci + " " + fixed(c.p50.low, 2) + "-" +
          fixed(c.p50.high, 2);
  } else {
    raw = "p50 difference " + format_difference(spec.unit, c.p50.estimate) + ", " + ci + " " +
          f.range;
  }

  if (mw_significant && ci_significant) {
    c.outcome = outcome_for(spec, f.lower);
    c.verdict = fill(f.lower ? spec.lower_text : spec.higher_text, names) + " (p50, " + ci + " " +
                f.range + ", " + mw + ")";
  } else if (!mw_significant && !ci_significant) {
    c.outcome = Outcome::kNoDifference;
    c.verdict = "no significant difference in " + spec.label + " between " + c.arm + " and " +
                c.baseline + " (" + raw + ", " + mw + ")";
  } else {
    c.outcome = Outcome::kInconclusive;
    c.verdict = "inconclusive " + spec.label + " difference between " + c.arm + " and " +
                c.baseline + ": " +
                (mw_significant ? mw + " but the " + raw + " includes no change"
                                : raw + " excludes no change but " + mw + " is not significant");
  }

  c.p99_verdict.clear();
  c.p99_outcome = Outcome::kNoDifference;
  if (excludes_null(c.p99, c.mode)) {
    const bool lower = c.mode == CompareMode::kRatio ? c.p99.estimate < 1 : c.p99.estimate < 0;
    c.p99_outcome = outcome_for(spec, lower);
    // "hole_punch has +40% pause p99 (95% CI +30% to +52%) vs process_vm_readv"
    c.p99_verdict =
        c.arm + " has " + change_phrase(spec, c.mode, c.p99, "p99") + " vs " + c.baseline;
  }
}

std::string md_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    if (ch == '|')
      out += "\\|";
    else if (ch == '\n')
      out += ' ';
    else
      out += ch;
  }
  return out;
}

nlohmann::json interval_json(const Interval& ci) {
  return {
      {"estimate", ci.estimate}, {"low", ci.low}, {"high", ci.high}, {"confidence", ci.confidence}};
}

// "<0.001" / "0.43" for a table cell.
std::string p_cell(double p) {
  const std::string s = format_p(p);
  return s.compare(0, 2, "p=") == 0 ? s.substr(2) : s.substr(1);
}

std::string interval_md(Unit unit, const Interval& ci) {
  return format_value(unit, ci.estimate) + " [" + format_value(unit, ci.low) + ", " +
         format_value(unit, ci.high) + "]";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Metric specs and formatting
// ---------------------------------------------------------------------------------------------

const std::vector<MetricSpec>& default_metric_specs() {
  static const std::vector<MetricSpec> specs = {
      {"pause_seconds", "pause latency", "pause", Unit::kSeconds, Direction::kLowerIsBetter,
       "{arm} pauses are {x} faster than {base}", "{arm} pauses are {x} slower than {base}", ""},
      // The two moments of a pause (docs/api.md "Handover pauses"): when it was answered, and
      // when its snapshot was durable (the same moment for a copy pause).
      {"answer_seconds", "pause answer latency", "answer", Unit::kSeconds,
       Direction::kLowerIsBetter, "{arm} pauses answer {x} sooner than {base}",
       "{arm} pauses answer {x} later than {base}", ""},
      {"answer_wall_seconds", "pause answer latency at the client", "client answer",
       Unit::kSeconds, Direction::kLowerIsBetter,
       "{arm} pauses answer the client {x} sooner than {base}",
       "{arm} pauses answer the client {x} later than {base}", ""},
      {"durable_seconds", "pause durable latency", "durable", Unit::kSeconds,
       Direction::kLowerIsBetter, "{arm} snapshots are durable {x} sooner than {base}",
       "{arm} snapshots are durable {x} later than {base}", ""},
      {"resume_seconds", "resume latency", "resume", Unit::kSeconds, Direction::kLowerIsBetter,
       "{arm} resumes are {x} faster than {base}", "{arm} resumes are {x} slower than {base}", ""},
      {"cpu_seconds", "CPU time", "CPU", Unit::kSeconds, Direction::kLowerIsBetter,
       "{arm} uses {x} less CPU time than {base}", "{arm} uses {x} more CPU time than {base}", ""},
      {"export_cpu_seconds", "export CPU time", "export CPU", Unit::kSeconds,
       Direction::kLowerIsBetter, "{arm} exports use {x} less CPU time than {base}",
       "{arm} exports use {x} more CPU time than {base}", ""},
      {"peak_memory_bytes", "peak memory", "peak memory", Unit::kBytes, Direction::kLowerIsBetter,
       "{arm} needs {x} less peak memory than {base}",
       "{arm} needs {x} more peak memory than {base}", ""},
      {"held_memory_bytes", "memory held while paused", "held memory", Unit::kBytes,
       Direction::kLowerIsBetter, "{arm} holds {x} less memory while paused than {base}",
       "{arm} holds {x} more memory while paused than {base}", ""},
      {"released_bytes", "released guest memory", "released memory", Unit::kBytes,
       Direction::kHigherIsBetter, "{arm} releases {x} less guest memory than {base}",
       "{arm} releases {x} more guest memory than {base}", ""},
      {"released_fraction", "share of guest memory released", "released share", Unit::kFraction,
       Direction::kHigherIsBetter, "{arm} releases {x} less of guest memory than {base}",
       "{arm} releases {x} more of guest memory than {base}",
       "releases {value} of guest memory (p50; {base}: {base_value})"},
  };
  return specs;
}

MetricSpec metric_spec_for(std::string_view name) {
  for (const MetricSpec& s : default_metric_specs()) {
    if (s.name == name) return s;
  }
  MetricSpec s;
  s.name = std::string(name);
  s.label = s.name;
  s.short_label = s.name;
  auto ends_with = [&](std::string_view suffix) {
    return name.size() >= suffix.size() && name.substr(name.size() - suffix.size()) == suffix;
  };
  if (ends_with("_seconds"))
    s.unit = Unit::kSeconds;
  else if (ends_with("_bytes"))
    s.unit = Unit::kBytes;
  else if (ends_with("_fraction"))
    s.unit = Unit::kFraction;
  s.direction = Direction::kNeutral;
  s.lower_text = "{arm} " + s.name + " is {x} lower than {base}";
  s.higher_text = "{arm} " + s.name + " is {x} higher than {base}";
  return s;
}

std::string format_value(Unit unit, double value) {
  if (std::isnan(value)) return "n/a";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  const double a = std::fabs(value);
  const std::string sign = value < 0 ? "-" : "";
  switch (unit) {
    case Unit::kSeconds:
      if (a == 0) return "0 s";
      if (a < 1e-6) return sign + sig3(a * 1e9) + " ns";
      if (a < 1e-3) return sign + sig3(a * 1e6) + " us";
      if (a < 1) return sign + sig3(a * 1e3) + " ms";
      if (a < 1000) return sign + sig3(a) + " s";
      return sign + fixed(a, 0) + " s";
    case Unit::kBytes: {
      static const char* const kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
      double v = a;
      std::size_t u = 0;
      while (v >= 1024 && u + 1 < std::size(kUnits)) {
        v /= 1024;
        ++u;
      }
      return sign + (u == 0 ? fixed(v, 0) : sig3(v)) + " " + kUnits[u];
    }
    case Unit::kFraction:
      return fixed(value * 100, a * 100 >= 10 || a == 0 ? 0 : 1) + "%";
    case Unit::kCount:
      return printf_string("%.4g", value);
  }
  return printf_string("%g", value);
}

std::string format_p(double p) {
  if (std::isnan(p)) return "p=n/a";
  if (p < 0.001) return "p<0.001";
  if (p < 0.01) return "p=" + fixed(p, 3);
  return "p=" + fixed(p, 2);
}

std::vector<std::string> Report::verdicts() const {
  std::vector<std::string> out;
  for (const Comparison& c : comparisons) out.push_back(c.verdict);
  for (const Comparison& c : comparisons) {
    if (!c.p99_verdict.empty()) out.push_back(c.p99_verdict);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// build_report
// ---------------------------------------------------------------------------------------------

Result<Report> build_report(std::span<const OperationRecord> records, const ExperimentSpec& spec) {
  if (records.empty()) return make_error(Errc::kInvalidArgument, "experiment: no records");
  if (spec.arms.size() < 2) {
    return make_error(Errc::kInvalidArgument, "experiment: at least two arms are needed");
  }
  if (!(spec.alpha > 0 && spec.alpha < 1)) {
    return make_error(Errc::kInvalidArgument, "experiment: alpha must be in (0,1)");
  }
  if (spec.bootstrap.resamples < 1 ||
      !(spec.bootstrap.confidence > 0 && spec.bootstrap.confidence < 1)) {
    return make_error(Errc::kInvalidArgument, "experiment: bad bootstrap options");
  }

  Report report;
  report.title = spec.title;
  report.arm_kind = spec.arm_kind;
  report.baseline = spec.baseline;
  report.alpha = spec.alpha;
  report.bootstrap = spec.bootstrap;

  std::map<std::string, std::size_t> arm_index;
  for (const ArmWeight& a : spec.arms) {
    if (a.arm.empty()) return make_error(Errc::kInvalidArgument, "experiment: an arm has no name");
    if (!arm_index.emplace(a.arm, report.arms.size()).second) {
      return make_error(Errc::kInvalidArgument, "experiment: arm " + a.arm + " is listed twice");
    }
    ArmSummary s;
    s.name = a.arm;
    s.weight = a.weight;
    report.arms.push_back(std::move(s));
  }
  const auto base_it = arm_index.find(spec.baseline);
  if (base_it == arm_index.end()) {
    return make_error(Errc::kInvalidArgument,
                      "experiment: the baseline '" + spec.baseline + "' is not one of the arms");
  }
  const std::size_t base = base_it->second;

  // Records per arm, derived metrics, metric discovery, units.
  std::vector<std::vector<const OperationRecord*>> per_arm(report.arms.size());
  std::vector<std::map<std::string, double>> derived(records.size());
  std::set<std::string> seen_metrics;
  std::vector<std::set<std::string>> unit_ids(report.arms.size());
  std::map<std::string, std::size_t> unit_arm;
  std::set<std::string> leaked_units;
  for (std::size_t i = 0; i < records.size(); ++i) {
    const OperationRecord& r = records[i];
    const auto it = arm_index.find(r.arm);
    if (it == arm_index.end()) {
      return make_error(Errc::kInvalidArgument,
                        "experiment: a record is from arm '" + r.arm + "', which is not a " +
                            "variant of the flag (add it to the arms with its weight)");
    }
    const std::size_t arm = it->second;
    per_arm[arm].push_back(&r);
    ++report.arms[arm].records;
    if (r.unit.empty()) {
      ++report.arms[arm].units;
    } else {
      unit_ids[arm].insert(r.unit);
      const auto [ua, inserted] = unit_arm.emplace(r.unit, arm);
      if (!inserted && ua->second != arm) leaked_units.insert(r.unit);
    }
    derived[i] = r.metrics;
    if (spec.derive_released_fraction && !r.metrics.contains("released_fraction")) {
      const auto rel = r.metrics.find("released_bytes");
      const auto guest = r.metrics.find("guest_memory_bytes");
      if (rel != r.metrics.end() && guest != r.metrics.end() && guest->second > 0) {
        derived[i]["released_fraction"] = rel->second / guest->second;
      }
    }
    for (const auto& [name, value] : derived[i]) seen_metrics.insert(name);
  }
  for (std::size_t a = 0; a < report.arms.size(); ++a) report.arms[a].units += unit_ids[a].size();
  if (!leaked_units.empty()) {
    std::string list;
    std::size_t shown = 0;
    for (const std::string& u : leaked_units) {
      if (shown++ == 5) {
        list += ", ...";
        break;
      }
      list += (list.empty() ? "" : ", ") + u;
    }
    report.notes.push_back(std::to_string(leaked_units.size()) +
                           " unit(s) appear in more than one arm (" + list +
                           "): assignment is not sticky, the arms are not independent");
  }

  if (!spec.metrics.empty()) {
    report.metrics = spec.metrics;
  } else {
    const std::set<std::string> context(spec.context_metrics.begin(), spec.context_metrics.end());
    for (const MetricSpec& s : default_metric_specs()) {
      if (seen_metrics.contains(s.name) && !context.contains(s.name)) report.metrics.push_back(s);
    }
    for (const std::string& name : seen_metrics) {
      if (context.contains(name)) continue;
      const bool known = std::any_of(report.metrics.begin(), report.metrics.end(),
                                     [&](const MetricSpec& s) { return s.name == name; });
      if (!known) report.metrics.push_back(metric_spec_for(name));
    }
  }

  // Per arm and metric statistics.
  std::map<const OperationRecord*, std::size_t> record_pos;
  for (std::size_t i = 0; i < records.size(); ++i) record_pos[&records[i]] = i;
  for (std::size_t a = 0; a < report.arms.size(); ++a) {
    ArmSummary& arm = report.arms[a];
    arm.metrics.resize(report.metrics.size());
    for (std::size_t m = 0; m < report.metrics.size(); ++m) {
      ArmMetricStats& st = arm.metrics[m];
      std::size_t non_finite = 0;
      for (const OperationRecord* r : per_arm[a]) {
        const auto& values = derived[record_pos[r]];
        const auto it = values.find(report.metrics[m].name);
        if (it == values.end()) continue;
        if (!std::isfinite(it->second)) {
          ++non_finite;
          continue;
        }
        st.sorted.push_back(it->second);
      }
      if (non_finite > 0) {
        report.notes.push_back(std::to_string(non_finite) + " non-finite " +
                               report.metrics[m].name + " value(s) of " + arm.name + " ignored");
      }
      std::sort(st.sorted.begin(), st.sorted.end());
      st.n = st.sorted.size();
      if (st.n == 0) continue;
      st.min = st.sorted.front();
      st.max = st.sorted.back();
      st.mean =
          std::accumulate(st.sorted.begin(), st.sorted.end(), 0.0) / static_cast<double>(st.n);
      BootstrapOptions b = spec.bootstrap;
      b.seed = derive_seed(spec.bootstrap.seed, a, m);
      MEMSNAP_ASSIGN_OR_RETURN(std::vector<Interval> cis,
                               bootstrap_quantiles_ci(st.sorted, kQuantiles, b));
      st.p50 = cis[0];
      st.p90 = cis[1];
      st.p99 = cis[2];
      st.p90_tail_ok = static_cast<double>(st.n) * 0.1 >= 5;
      st.p99_tail_ok = static_cast<double>(st.n) * 0.01 >= 5;
    }
  }

  // Sample ratio: units per arm vs the weights.
  {
    std::vector<std::uint64_t> observed;
    std::vector<double> weights;
    for (const ArmSummary& a : report.arms) {
      observed.push_back(a.units);
      weights.push_back(a.weight);
    }
    MEMSNAP_ASSIGN_OR_RETURN(SrmResult srm,
                             sample_ratio_mismatch(observed, weights, spec.srm_threshold));
    report.srm = std::move(srm);
    std::string counts;
    std::string expected;
    for (std::size_t a = 0; a < report.arms.size(); ++a) {
      counts += (a ? "/" : "") + std::to_string(report.arms[a].units);
      expected += (a ? "/" : "") + fixed(report.srm.expected[a], 0);
    }
    const std::string detail =
        "units " + counts + " vs expected " + expected + " (chi2=" + fixed(report.srm.chi2, 2) +
        ", dof=" + std::to_string(report.srm.dof) + ", " + format_p(report.srm.p_value) + ")";
    if (report.srm.mismatch) {
      report.srm_text = "SAMPLE RATIO MISMATCH: " + detail + ", below the threshold " +
                        printf_string("%g", report.srm.threshold) +
                        ": the split does not follow the flag's weights, so the arms may differ "
                        "in more than the strategy; treat the comparisons with suspicion";
    } else {
      report.srm_text = "sample ratio OK: " + detail;
    }
  }

  // Comparisons with the baseline, Holm per metric.
  for (std::size_t m = 0; m < report.metrics.size(); ++m) {
    const MetricSpec& ms = report.metrics[m];
    const ArmMetricStats& bst = report.arms[base].metrics[m];
    const std::size_t first = report.comparisons.size();
    for (std::size_t a = 0; a < report.arms.size(); ++a) {
      if (a == base) continue;
      const ArmMetricStats& ast = report.arms[a].metrics[m];
      if (ast.n < spec.min_samples || bst.n < spec.min_samples) {
        if (ast.n > 0 || bst.n > 0) {
          report.notes.push_back(ms.name + ": " + report.arms[a].name + " vs " + report.baseline +
                                 " not compared (n=" + std::to_string(ast.n) +
                                 " vs n=" + std::to_string(bst.n) + ", need " +
                                 std::to_string(spec.min_samples) + " each)");
        }
        continue;
      }
      Comparison c;
      c.arm = report.arms[a].name;
      c.baseline = report.baseline;
      c.metric = m;
      c.mode = ms.unit != Unit::kFraction && ast.p50.estimate > 0 && bst.p50.estimate > 0
                   ? CompareMode::kRatio
                   : CompareMode::kDifference;
      BootstrapOptions b = spec.bootstrap;
      b.seed = derive_seed(spec.bootstrap.seed, 1000 + a, m);
      Result<std::vector<Interval>> cis =
          c.mode == CompareMode::kRatio
              ? bootstrap_quantile_ratio_ci(ast.sorted, bst.sorted, kComparedQuantiles, b)
              : bootstrap_quantile_difference_ci(ast.sorted, bst.sorted, kComparedQuantiles, b);
      if (!cis && c.mode == CompareMode::kRatio) {  // the baseline p99 was <= 0
        c.mode = CompareMode::kDifference;
        cis = bootstrap_quantile_difference_ci(ast.sorted, bst.sorted, kComparedQuantiles, b);
      }
      if (!cis) return std::move(cis).error();
      c.p50 = cis.value()[0];
      c.p99 = cis.value()[1];
      MEMSNAP_ASSIGN_OR_RETURN(MannWhitneyResult mw, mann_whitney_u(ast.sorted, bst.sorted));
      c.mann_whitney = mw;
      report.comparisons.push_back(std::move(c));
    }
    const std::size_t family = report.comparisons.size() - first;
    std::vector<double> ps;
    for (std::size_t i = first; i < report.comparisons.size(); ++i) {
      ps.push_back(report.comparisons[i].mann_whitney.p_value);
    }
    const std::vector<double> adjusted = holm_adjust(ps);
    for (std::size_t i = first; i < report.comparisons.size(); ++i) {
      report.comparisons[i].p_adjusted = adjusted[i - first];
      write_verdicts(ms, spec.alpha, family, report.comparisons[i]);
    }
  }

  auto find_comparison = [&](std::size_t arm, std::size_t m) -> const Comparison* {
    for (const Comparison& c : report.comparisons) {
      if (c.metric == m && c.arm == report.arms[arm].name) return &c;
    }
    return nullptr;
  };

  // Winners: the best p50, clear when significantly better than every other measured arm.
  for (std::size_t m = 0; m < report.metrics.size(); ++m) {
    const MetricSpec& ms = report.metrics[m];
    Winner w;
    w.metric = m;
    if (ms.direction == Direction::kNeutral) {
      w.text = ms.label + ": no direction (neither lower nor higher is better), no winner";
      report.winners.push_back(std::move(w));
      continue;
    }
    std::vector<std::size_t> measured;
    for (std::size_t a = 0; a < report.arms.size(); ++a) {
      if (report.arms[a].metrics[m].n >= spec.min_samples) measured.push_back(a);
    }
    if (measured.size() < 2) {
      w.text = ms.label + ": not enough data for a winner";
      report.winners.push_back(std::move(w));
      continue;
    }
    const bool lower_better = ms.direction == Direction::kLowerIsBetter;
    const std::size_t best =
        *std::min_element(measured.begin(), measured.end(), [&](std::size_t l, std::size_t r) {
          const double lv = report.arms[l].metrics[m].p50.estimate;
          const double rv = report.arms[r].metrics[m].p50.estimate;
          return lower_better ? lv < rv : lv > rv;
        });
    w.arm = report.arms[best].name;
    std::string blocker;
    for (std::size_t other : measured) {
      if (other == best) continue;
      bool significant = false;
      if (best == base || other == base) {
        const Comparison* c = find_comparison(best == base ? other : best, m);
        const Outcome want = best == base ? Outcome::kWorse : Outcome::kBetter;
        significant = c != nullptr && c->outcome == want;
      } else {
        // Two non-baseline arms: the same test and interval, uncorrected.
        const ArmMetricStats& bs = report.arms[best].metrics[m];
        const ArmMetricStats& os = report.arms[other].metrics[m];
        const bool ratio = ms.unit != Unit::kFraction && bs.p50.estimate > 0 && os.p50.estimate > 0;
        BootstrapOptions b = spec.bootstrap;
        b.seed = derive_seed(spec.bootstrap.seed, 2000 + best * 100 + other, m);
        const double q50[] = {0.5};
        Result<std::vector<Interval>> ci =
            ratio ? bootstrap_quantile_ratio_ci(bs.sorted, os.sorted, q50, b)
                  : bootstrap_quantile_difference_ci(bs.sorted, os.sorted, q50, b);
        Result<MannWhitneyResult> mw = mann_whitney_u(bs.sorted, os.sorted);
        if (ci && mw) {
          const CompareMode mode = ratio ? CompareMode::kRatio : CompareMode::kDifference;
          significant = mw->p_value < spec.alpha && excludes_null(ci.value()[0], mode);
        }
      }
      if (!significant) {
        blocker = report.arms[other].name;
        break;
      }
    }
    const std::string value = format_value(ms.unit, report.arms[best].metrics[m].p50.estimate);
    if (blocker.empty()) {
      w.clear = true;
      w.text = ms.label + ": " + w.arm + " (p50 " + value +
               ", significantly better than every other arm)";
    } else {
      w.text = ms.label + ": no clear winner (best p50: " + w.arm + " " + value +
               ", not significantly better than " + blocker + ")";
    }
    report.winners.push_back(std::move(w));
  }

  // Per-arm summary: significant gains and costs against the baseline. A p99 change is listed
  // only when the p50 does not already show the same (it adds a tail effect, e.g. "+40% pause
  // p99" of an arm whose p50 did not move); released_bytes is left out when released_fraction
  // is reported (the same fact twice); "level" phrases ("releases 100% of guest memory") first.
  const bool has_fraction =
      std::any_of(report.metrics.begin(), report.metrics.end(),
                  [](const MetricSpec& ms) { return ms.name == "released_fraction"; });
  for (std::size_t a = 0; a < report.arms.size(); ++a) {
    if (a == base) continue;
    std::vector<std::string> level_gains;
    std::vector<std::string> gains;
    std::vector<std::string> costs;
    for (const Comparison& c : report.comparisons) {
      if (c.arm != report.arms[a].name) continue;
      const MetricSpec& ms = report.metrics[c.metric];
      if (has_fraction && ms.name == "released_bytes") continue;
      const bool p50_moved = c.outcome == Outcome::kBetter || c.outcome == Outcome::kWorse;
      if (p50_moved) {
        if (c.outcome == Outcome::kBetter && !ms.level_text.empty()) {
          level_gains.push_back(
              fill(ms.level_text,
                   {{"value", format_value(ms.unit, report.arms[a].metrics[c.metric].p50.estimate)},
                    {"base_value",
                     format_value(ms.unit, report.arms[base].metrics[c.metric].p50.estimate)},
                    {"arm", c.arm},
                    {"base", c.baseline}}));
        } else {
          (c.outcome == Outcome::kBetter ? gains : costs)
              .push_back(change_phrase(ms, c.mode, c.p50, "p50"));
        }
      }
      if ((c.p99_outcome == Outcome::kBetter || c.p99_outcome == Outcome::kWorse) &&
          c.p99_outcome != c.outcome) {
        (c.p99_outcome == Outcome::kBetter ? gains : costs)
            .push_back(change_phrase(ms, c.mode, c.p99, "p99"));
      }
    }
    gains.insert(gains.begin(), level_gains.begin(), level_gains.end());
    auto join = [](const std::vector<std::string>& parts) {
      std::string s;
      for (std::size_t i = 0; i < parts.size(); ++i) {
        if (i > 0) s += i + 1 == parts.size() ? " and " : ", ";
        s += parts[i];
      }
      return s;
    };
    const std::string head = report.arms[a].name + " vs " + report.baseline + ": ";
    if (!gains.empty() && !costs.empty()) {
      report.summary.push_back(head + join(gains) + " at the cost of " + join(costs));
    } else if (!gains.empty()) {
      report.summary.push_back(head + join(gains) + ", with no significant regression");
    } else if (!costs.empty()) {
      report.summary.push_back(head + "no significant improvement; " + join(costs));
    } else {
      report.summary.push_back(head + "no significant difference in any metric");
    }
  }
  return report;
}

// ---------------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------------

nlohmann::json to_json(const Report& report) {
  using nlohmann::json;
  json j;
  j["title"] = report.title;
  j["baseline"] = report.baseline;
  j["method"] = {
      {"quantile", "Hyndman-Fan type 7 (linear interpolation)"},
      {"interval", "percentile bootstrap"},
      {"resamples", report.bootstrap.resamples},
      {"confidence", report.bootstrap.confidence},
      {"seed", report.bootstrap.seed},
      {"test",
       "Mann-Whitney U, two-sided (exact without ties for n_a*n_b <= 2500, else normal "
       "approximation with tie and continuity correction)"},
      {"correction", "Holm, per metric over the comparisons with the baseline"},
      {"alpha", report.alpha},
      {"srm", "chi-square goodness of fit of units per arm vs flag weights"},
  };

  json metrics = json::array();
  for (const MetricSpec& m : report.metrics) {
    metrics.push_back({{"name", m.name},
                       {"label", m.label},
                       {"unit", unit_name(m.unit)},
                       {"direction", direction_name(m.direction)}});
  }
  j["metrics"] = metrics;

  json arms = json::array();
  for (const ArmSummary& a : report.arms) {
    json ja = {{"name", a.name},
               {"weight", a.weight},
               {"baseline", a.name == report.baseline},
               {"records", a.records},
               {"units", a.units}};
    json jm = json::object();
    for (std::size_t m = 0; m < report.metrics.size(); ++m) {
      const ArmMetricStats& s = a.metrics[m];
      if (s.n == 0) continue;
      jm[report.metrics[m].name] = {{"n", s.n},
                                    {"mean", s.mean},
                                    {"min", s.min},
                                    {"max", s.max},
                                    {"p50", interval_json(s.p50)},
                                    {"p90", interval_json(s.p90)},
                                    {"p99", interval_json(s.p99)},
                                    {"p90_tail_ok", s.p90_tail_ok},
                                    {"p99_tail_ok", s.p99_tail_ok}};
    }
    ja["metrics"] = jm;
    arms.push_back(ja);
  }
  j["arms"] = arms;

  const SrmResult& s = report.srm;
  json srm_arms = json::array();
  for (std::size_t i = 0; i < report.arms.size() && i < s.expected.size(); ++i) {
    srm_arms.push_back({{"arm", report.arms[i].name},
                        {"observed", report.arms[i].units},
                        {"expected", s.expected[i]},
                        {"observed_share", s.observed_share[i]},
                        {"expected_share", s.expected_share[i]}});
  }
  j["srm"] = {{"chi2", s.chi2},           {"dof", s.dof},           {"p_value", s.p_value},
              {"threshold", s.threshold}, {"mismatch", s.mismatch}, {"total", s.total},
              {"arms", srm_arms},         {"text", report.srm_text}};

  json comps = json::array();
  for (const Comparison& c : report.comparisons) {
    const MannWhitneyResult& mw = c.mann_whitney;
    comps.push_back({{"arm", c.arm},
                     {"baseline", c.baseline},
                     {"metric", report.metrics[c.metric].name},
                     {"mode", c.mode == CompareMode::kRatio ? "ratio" : "difference"},
                     {"p50", interval_json(c.p50)},
                     {"p99", interval_json(c.p99)},
                     {"mann_whitney",
                      {{"u", mw.u_a},
                       {"u_baseline", mw.u_b},
                       {"z", mw.z},
                       {"p_value", mw.p_value},
                       {"p_adjusted", c.p_adjusted},
                       {"exact", mw.exact},
                       {"common_language_effect", mw.common_language},
                       {"rank_biserial", mw.rank_biserial}}},
                     {"outcome", outcome_name(c.outcome)},
                     {"p99_outcome", outcome_name(c.p99_outcome)},
                     {"verdict", c.verdict},
                     {"p99_verdict", c.p99_verdict}});
  }
  j["comparisons"] = comps;

  json winners = json::array();
  for (const Winner& w : report.winners) {
    winners.push_back({{"metric", report.metrics[w.metric].name},
                       {"arm", w.arm.empty() ? json(nullptr) : json(w.arm)},
                       {"clear", w.clear},
                       {"text", w.text}});
  }
  j["winners"] = winners;
  j["verdicts"] = report.verdicts();
  j["summary"] = report.summary;
  j["notes"] = report.notes;
  return j;
}

// ---------------------------------------------------------------------------------------------
// Markdown
// ---------------------------------------------------------------------------------------------

std::string to_markdown(const Report& report) {
  std::string md;
  const std::string ci = ci_words(report.bootstrap.confidence);
  md += "# " + md_escape(report.title) + "\n\n";
  md += "Baseline: **" + md_escape(report.baseline) + "**. Arms (flag weight): ";
  for (std::size_t a = 0; a < report.arms.size(); ++a) {
    md += (a ? ", " : "") + md_escape(report.arms[a].name) + " (" +
          printf_string("%g", report.arms[a].weight) + ")";
  }
  md += ".\n\nQuantiles: type 7 (linear interpolation). Intervals: " + ci +
        ", percentile bootstrap, " + std::to_string(report.bootstrap.resamples) +
        " resamples, seed " + std::to_string(report.bootstrap.seed) +
        ". Test: Mann-Whitney U, two-sided, Holm-corrected per metric, alpha " +
        printf_string("%g", report.alpha) + ".\n\n";

  md += "## Verdicts\n\n";
  for (const std::string& v : report.verdicts()) md += "- " + md_escape(v) + "\n";
  if (report.comparisons.empty()) md += "- no comparisons (not enough data)\n";
  md += "\n## Summary\n\n";
  for (const std::string& s : report.summary) md += "- " + md_escape(s) + "\n";
  md += "\n## Winners\n\n";
  for (const Winner& w : report.winners) md += "- " + md_escape(w.text) + "\n";

  md += "\n## Sample ratio\n\n" + md_escape(report.srm_text) + "\n\n";
  md += "| arm | weight | expected share | expected units | observed units | observed share |\n";
  md += "|---|---:|---:|---:|---:|---:|\n";
  for (std::size_t a = 0; a < report.arms.size() && a < report.srm.expected.size(); ++a) {
    md += "| " + md_escape(report.arms[a].name) + " | " +
          printf_string("%g", report.arms[a].weight) + " | " +
          format_value(Unit::kFraction, report.srm.expected_share[a]) + " | " +
          fixed(report.srm.expected[a], 1) + " | " + std::to_string(report.arms[a].units) + " | " +
          format_value(Unit::kFraction, report.srm.observed_share[a]) + " |\n";
  }

  md += "\n## Per-arm statistics\n";
  bool rough_tail = false;
  for (std::size_t m = 0; m < report.metrics.size(); ++m) {
    const MetricSpec& ms = report.metrics[m];
    md += "\n### " + md_escape(ms.label) + " (`" + ms.name + "`)\n\n";
    md += "| arm | n | mean | p50 [" + ci + "] | p90 [" + ci + "] | p99 [" + ci + "] |\n";
    md += "|---|---:|---:|---:|---:|---:|\n";
    for (const ArmSummary& a : report.arms) {
      const ArmMetricStats& s = a.metrics[m];
      std::string name = md_escape(a.name);
      if (a.name == report.baseline) name += " (baseline)";
      if (s.n == 0) {
        md += "| " + name + " | 0 | | | | |\n";
        continue;
      }
      const std::string p99_mark = s.p99_tail_ok ? "" : " *";
      rough_tail = rough_tail || !s.p99_tail_ok;
      md += "| " + name + " | " + std::to_string(s.n) + " | " + format_value(ms.unit, s.mean) +
            " | " + interval_md(ms.unit, s.p50) + " | " + interval_md(ms.unit, s.p90) + " | " +
            interval_md(ms.unit, s.p99) + p99_mark + " |\n";
    }
  }
  if (rough_tail) {
    md += "\n\\* fewer than 5 samples beyond the p99 (n < 500): that interval is rough.\n";
  }

  md += "\n## Comparisons with " + md_escape(report.baseline) + "\n\n";
  md += "| arm | metric | p50 vs baseline [" + ci + "] | p99 vs baseline [" + ci +
        "] | U | z | p | p (Holm) | P(arm > baseline) | outcome |\n";
  md += "|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n";
  for (const Comparison& c : report.comparisons) {
    const MetricSpec& ms = report.metrics[c.metric];
    auto cell = [&](const Interval& iv) {
      if (c.mode == CompareMode::kRatio) {
        return fixed(iv.estimate, 3) + "x [" + fixed(iv.low, 3) + ", " + fixed(iv.high, 3) + "]";
      }
      return format_difference(ms.unit, iv.estimate) + " [" + format_difference(ms.unit, iv.low) +
             ", " + format_difference(ms.unit, iv.high) + "]";
    };
    const MannWhitneyResult& mw = c.mann_whitney;
    md += "| " + md_escape(c.arm) + " | " + ms.name + " | " + cell(c.p50) + " | " + cell(c.p99) +
          " | " + printf_string("%.1f", mw.u_a) + " | " + fixed(mw.z, 2) + " | " +
          p_cell(mw.p_value) + (mw.exact ? " (exact)" : "") + " | " + p_cell(c.p_adjusted) + " | " +
          fixed(mw.common_language, 3) + " | " + outcome_name(c.outcome) + " |\n";
  }
  if (!report.notes.empty()) {
    md += "\n## Notes\n\n";
    for (const std::string& n : report.notes) md += "- " + md_escape(n) + "\n";
  }
  return md;
}

// ---------------------------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------------------------

Result<std::vector<OperationRecord>> records_from_json(const nlohmann::json& json) {
  if (!json.is_array()) {
    return make_error(Errc::kInvalidArgument, "experiment records: expected a JSON array");
  }
  std::vector<OperationRecord> out;
  out.reserve(json.size());
  for (std::size_t i = 0; i < json.size(); ++i) {
    const nlohmann::json& item = json[i];
    const std::string where = "experiment records[" + std::to_string(i) + "]";
    if (!item.is_object() || !item.contains("arm") || !item["arm"].is_string()) {
      return make_error(Errc::kInvalidArgument, where + ": an object with a string \"arm\"");
    }
    OperationRecord r;
    r.arm = item["arm"].get<std::string>();
    for (const char* key : {"unit", "sandbox"}) {
      if (item.contains(key)) {
        const nlohmann::json& u = item[key];
        if (u.is_string())
          r.unit = u.get<std::string>();
        else if (u.is_number_integer())
          r.unit = std::to_string(u.get<long long>());
        break;
      }
    }
    const nlohmann::json& values = item.contains("metrics") ? item["metrics"] : item;
    if (!values.is_object()) {
      return make_error(Errc::kInvalidArgument, where + ": \"metrics\" must be an object");
    }
    for (const auto& [key, value] : values.items()) {
      if (key == "unit" || key == "sandbox") continue;
      if (value.is_number()) r.metrics[key] = value.get<double>();
    }
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace memsnap::experiment
