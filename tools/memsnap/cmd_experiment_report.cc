// memsnap experiment report: the analysis of an A/B(/C) experiment, from the JSON results of
// `memsnap experiment run` or from Prometheus (the histograms memsnapd exports, over a window).
// Per arm (strategy, or pause mode) p50/p90/p99 with bootstrap intervals, each arm against the
// baseline (ratio with its interval, Mann-Whitney U), a sample-ratio-mismatch check of the split,
// verdicts in plain language; written as Markdown, JSON and an SVG picture (tools/experiment).
//
// From Prometheus only what the histograms hold is known: pause and resume latency per strategy
// (or a pause's answered and durable latency per pause mode, --split pause-mode), bucketed. The
// samples are rebuilt from the buckets (spread evenly inside each bucket, which is what
// histogram_quantile assumes), so quantiles agree with Prometheus' own to within a bucket; the
// split is checked on operations, not sandboxes (the metrics carry no sandbox ids).
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>


#include "tools/experiment/report.h"
#include "tools/fleet/fleet.h"
#include "tools/experiment/svg.h"
#include "tools/memsnap/cli.h"

namespace memsnap::cli {
namespace {

using nlohmann::json;
namespace ex = memsnap::experiment;

// GET http://host:port/target, the body of a 200.
std::string http_get(const std::string& url, const std::string& target) {
  if (url.rfind("http://", 0) != 0) throw std::invalid_argument("--prometheus must be http://HOST:PORT");
  std::string hostport = url.substr(7);
  if (const auto slash = hostport.find('/'); slash != std::string::npos) hostport.resize(slash);
  const auto colon = hostport.rfind(':');
  const std::string host = colon == std::string::npos ? hostport : hostport.substr(0, colon);
  const int port = colon == std::string::npos ? 80 : std::stoi(hostport.substr(colon + 1));
  auto body = fleet::http_get(host, static_cast<std::uint16_t>(port), target,
                              std::chrono::seconds(60));
  if (!body.ok()) throw std::runtime_error(body.error().message);
  return *body;
}

std::string url_encode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      char buf[4];
      std::snprintf(buf, sizeof(buf), "%%%02X", c);
      out += buf;
    }
  }
  return out;
}

json prom_query(const std::string& url, const std::string& expr) {
  const json answer = json::parse(http_get(url, "/api/v1/query?query=" + url_encode(expr)));
  if (answer.value("status", "") != "success") {
    throw std::runtime_error("query failed: " + expr + ": " + answer.dump());
  }
  return answer["data"]["result"];
}

// Samples rebuilt from cumulative bucket counts (le -> count), spread evenly inside each bucket.
std::vector<double> samples_from_buckets(std::map<double, double> cumulative) {
  std::vector<double> out;
  double below = 0, lower = 0;
  for (const auto& [le, count] : cumulative) {
    const auto n = static_cast<long>(std::llround(count - below));
    if (std::isinf(le)) {
      // Beyond the last bound: Prometheus reports the last finite bound; do the same.
      for (long i = 0; i < n; ++i) out.push_back(lower);
    } else {
      for (long i = 0; i < n; ++i) {
        out.push_back(lower + (le - lower) * (static_cast<double>(i) + 0.5) / static_cast<double>(n));
      }
      lower = le;
    }
    below = count;
  }
  return out;
}

// What a Prometheus report compares: the arms are the values of one label of memsnapd's
// histograms, each metric rebuilt from one histogram family.
struct PrometheusSplit {
  std::string arm_label;  // "strategy" or "mode"
  struct Source {
    const char* metric;    // the report's metric
    const char* family;    // the histogram
    const char* matchers;  // inside {}: which of its series count
  };
  std::vector<Source> sources;
};

// --split strategy: pause and resume latency by the strategy that ran (successful operations).
// --split pause-mode: the two moments of a pause by the mode that ran -- answered (every
// answered pause, a handover whose export later failed included) and durable (committed
// snapshots only); a copy pause's two are the same moment.
PrometheusSplit prometheus_split(bool by_mode) {
  if (by_mode) {
    return {"mode",
            {{"answer_seconds", "memsnap_pause_handover_seconds", ""},
             {"durable_seconds", "memsnap_pause_durable_seconds", ""}}};
  }
  return {"strategy",
          {{"pause_seconds", "memsnap_pause_duration_seconds", "outcome=\"ok\""},
           {"resume_seconds", "memsnap_resume_duration_seconds", "outcome=\"ok\""}}};
}

// Records rebuilt from memsnapd's histograms in Prometheus over `window`: one record per
// observation, unit = arm + index (there are no sandbox ids in the metrics, by design).
std::vector<ex::OperationRecord> records_from_prometheus(const std::string& url,
                                                         const std::string& window,
                                                         const PrometheusSplit& split) {
  std::vector<ex::OperationRecord> records;
  for (const auto& source : split.sources) {
    const json result =
        prom_query(url, "sum by (" + split.arm_label + ", le) (increase(" + source.family +
                            "_bucket{" + source.matchers + "}[" + window + "]))");
    std::map<std::string, std::map<double, double>> by_arm;
    for (const auto& series : result) {
      const std::string arm = series["metric"].value(split.arm_label, "");
      const std::string le = series["metric"].value("le", "");
      const double v = std::stod(series["value"][1].get<std::string>());
      by_arm[arm][le == "+Inf" ? INFINITY : std::stod(le)] = v;
    }
    for (const auto& [arm, buckets] : by_arm) {
      std::size_t i = 0;
      for (double s : samples_from_buckets(buckets)) {
        ex::OperationRecord r;
        r.arm = arm;
        r.unit = arm + "#" + std::to_string(i++);
        r.metrics[source.metric] = s;
        records.push_back(std::move(r));
      }
    }
  }
  return records;
}

// "a=1,b=2"
// ": 1.0 GiB memfd guests, 10% of pages dirtied (random), THP asked (enabled madvise,
// shmem_enabled advise)" from the run's settings; "" for results that do not carry them.
std::string describe(const json& e) {
  if (!e.is_object() || !e.contains("guest_bytes") || !e["guest_bytes"].is_number()) return "";
  std::string out = ": " + format_bytes(e["guest_bytes"].get<double>()) + " " +
                    e.value("backing", "?") + " guests";
  if (e.contains("dirty_fraction") && e["dirty_fraction"].is_number()) {
    char dirty[64];
    std::snprintf(dirty, sizeof dirty, ", %g%% of pages dirtied (%s)",
                  e["dirty_fraction"].get<double>() * 100, e.value("pattern", "random").c_str());
    out += dirty;
  }
  if (e.value("thp", false)) {
    out += ", THP asked (enabled " + e.value("thp_enabled", std::string("?")) +
           ", shmem_enabled " + e.value("thp_shmem_enabled", std::string("?")) + ")";
  }
  return out;
}

std::vector<ex::ArmWeight> parse_arms(const std::string& text) {
  std::vector<ex::ArmWeight> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    const auto eq = item.find('=');
    out.push_back({item.substr(0, eq), eq == std::string::npos ? 1.0 : std::stod(item.substr(eq + 1))});
  }
  return out;
}

}  // namespace

int cmd_experiment_report(Args& args) {
  const std::string prometheus = args.value("--prometheus");
  const std::string window = args.value("--window", "1h");
  const std::string split = args.value("--split");
  std::string baseline = args.value("--baseline");
  const std::string arms_text = args.value("--arms");
  const std::string out_prefix = args.value("--out");
  const double alpha = std::stod(args.value("--alpha", "0.05"));
  // The first cycle's pause exports the whole guest (a base snapshot), the later ones a diff:
  // different operations, so by default only the diffs are compared.
  const int warmup = std::stoi(args.value("--warmup", "1"));
  const bool json_out = args.flag("--json");
  const auto files = args.positional();
  args.expect_done();
  if (prometheus.empty() == (files.size() != 1)) {
    throw std::invalid_argument("give RESULTS.json, or --prometheus URL --window DURATION");
  }
  if (!split.empty() && prometheus.empty()) {
    throw std::invalid_argument(
        "--split goes with --prometheus: a results file says itself what its arms are");
  }

  ex::ExperimentSpec spec;
  spec.baseline = baseline.empty() ? "process_vm_readv" : baseline;
  spec.alpha = alpha;
  std::vector<ex::OperationRecord> records;
  std::vector<std::string> fallback_notes;  // pauses that ran in another mode than their arm's
  std::string source;
  const bool by_mode = split == "pause-mode";
  if (!prometheus.empty()) {
    try {
      records = records_from_prometheus(prometheus, window, prometheus_split(by_mode));
    } catch (const std::exception& e) {
      // An unreachable server or an answer that is not Prometheus': say so, exit 1.
      std::fprintf(stderr, "memsnap experiment report: %s: %s\n", prometheus.c_str(), e.what());
      return 1;
    }
    spec.title =
        std::string(by_mode ? "memsnap pause-mode experiment" : "memsnap strategy experiment") +
        " (Prometheus " + prometheus + ", last " + window + ")";
    for (const auto& from : prometheus_split(by_mode).sources) {
      spec.metrics.push_back(ex::metric_spec_for(from.metric));
    }
    if (by_mode) {
      spec.arm_kind = "pause mode";
      if (baseline.empty()) spec.baseline = "copy";
      // The histograms carry the mode that ran, not the one the flag chose.
      fallback_notes.push_back(
          "from Prometheus, an arm is the pause mode that ran: a pause that fell back counts in "
          "the mode it fell back to (memsnap_pause_mode_fallbacks_total says how many did)");
    }
    source = prometheus;
    std::map<std::string, double> weights;
    for (const auto& a : parse_arms(arms_text)) weights[a.arm] = a.weight;
    for (const auto& r : records) weights.emplace(r.arm, 1.0);
    for (const auto& [name, w] : weights) spec.arms.push_back({name, w});
  } else {
    std::ifstream in(files[0]);
    if (!in) throw std::invalid_argument("cannot read " + files[0]);
    const json results = json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (!results.is_object() || !results.contains("operations") ||
        !results["operations"].is_array() || !results.contains("experiment")) {
      throw std::invalid_argument(files[0] + " is not the results of `memsnap experiment run`");
    }
    source = files[0];
    const json& experiment = results["experiment"];
    const bool mode_split = experiment.value("flag", "") == "pause-mode";
    std::string what = describe(experiment);
    if (mode_split) {
      spec.arm_kind = "pause mode";
      if (baseline.empty()) spec.baseline = "copy";
      what += (what.empty() ? ": " : ", ") + std::string("strategy ") +
              experiment.value("strategy", json("?")).get<std::string>();
    }
    spec.title = std::string(mode_split ? "memsnap pause-mode experiment (" : "memsnap strategy "
                                                                             "experiment (") +
                 files[0] + what +
                 (warmup > 0 ? ", cycles after the first " + std::to_string(warmup) : "") + ")";
    // A strategy split compares the pause as one moment; a pause-mode split its two moments
    // (answered, durable) and the export's CPU time, whichever process spent it.
    const std::vector<const char*> metrics =
        mode_split ? std::vector<const char*>{"answer_seconds", "answer_wall_seconds",
                                              "durable_seconds", "resume_seconds",
                                              "export_cpu_seconds", "peak_memory_bytes",
                                              "released_bytes", "held_memory_bytes",
                                              "guest_memory_bytes"}
                   : std::vector<const char*>{"pause_seconds", "resume_seconds", "cpu_seconds",
                                              "peak_memory_bytes", "released_bytes",
                                              "held_memory_bytes", "guest_memory_bytes"};
    std::map<std::string, std::map<std::string, int>> ran_otherwise;  // arm -> "mode (why)" -> n
    for (const auto& op : results["operations"]) {
      if (op.contains("error") || !op.contains("pause_seconds")) continue;
      if (op.value("cycle", 0) <= warmup) continue;
      ex::OperationRecord r;
      // Intention to treat: the arm is the flag's variant; its latency is that of what ran.
      const char* variant = mode_split ? "mode_variant" : "variant";
      r.arm = op.contains(variant) && op[variant].is_string()
                  ? op[variant].get<std::string>()
                  : op.value(mode_split ? "requested_mode" : "strategy", "");
      r.unit = op.value("sandbox", "");
      for (const char* m : metrics) {
        if (op.contains(m) && op[m].is_number()) r.metrics[m] = op[m].get<double>();
      }
      if (mode_split && op.value("mode", r.arm) != r.arm) {
        const json& fb = op.contains("mode_fallback") ? op["mode_fallback"] : json();
        ++ran_otherwise[r.arm][op.value("mode", "?") + " (" +
                               (fb.is_object() ? fb.value("reason", "?") : "?") + ")"];
      }
      records.push_back(std::move(r));
    }
    for (const auto& [arm, ran] : ran_otherwise) {
      for (const auto& [how, n] : ran) {
        fallback_notes.push_back(std::to_string(n) + " pause(s) of arm " + arm + " ran as " + how +
                                 ": they count in " + arm + " (intention to treat)");
      }
    }
    const json& weights = results["experiment"]["weights"];
    for (const auto& [name, w] : weights.items()) spec.arms.push_back({name, w.get<double>()});
    if (!arms_text.empty()) spec.arms = parse_arms(arms_text);
  }
  const std::string prefix =
      !out_prefix.empty() ? out_prefix
      : prometheus.empty()
          ? (std::filesystem::path(files[0]).parent_path() /
             std::filesystem::path(files[0]).stem())
                    .string() + "-report"
          : std::string("experiment-prometheus-report");
  for (const char* ext : {".json", ".md", ".svg"}) {
    if (const std::string why = output_path_problem(prefix + ext); !why.empty()) {
      throw std::invalid_argument("--out: " + why);
    }
  }
  auto report = ex::build_report(records, spec);
  if (!report.ok()) {
    std::fprintf(stderr, "memsnap experiment report: %s\n", report.error().to_string().c_str());
    return 1;
  }
  report->notes.insert(report->notes.end(), fallback_notes.begin(), fallback_notes.end());
  const json j = ex::to_json(*report);
  if (!write_output_file(prefix + ".json", j.dump(2) + "\n") ||
      !write_output_file(prefix + ".md", ex::to_markdown(*report)) ||
      !write_output_file(prefix + ".svg", ex::render_svg(*report))) {
    return 1;
  }
  if (json_out) {
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("%s\n", ex::to_markdown(*report).c_str());
  }
  std::fprintf(stderr, "report of %s: %s.md, %s.json, %s.svg\n", source.c_str(), prefix.c_str(),
               prefix.c_str(), prefix.c_str());
  return 0;
}

}  // namespace memsnap::cli
