#include "core/metrics/host_metrics.h"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <sstream>
#include <tuple>
#include <utility>

#ifndef MEMSNAP_METRICS_VERSION
#define MEMSNAP_METRICS_VERSION "unknown"
#endif

namespace memsnap::metrics {

namespace {

// The strings that stand in for label values we refuse to record as given.
constexpr std::string_view kOther = "other";      // a token outside [a-z0-9_]: free text
constexpr std::string_view kInvalid = "invalid";  // a name with odd characters or too long

constexpr std::size_t kMaxTokenLength = 48;
constexpr std::size_t kMaxNameLength = 64;

// Label values that come from code (reasons, phases, states, modes): lower-case snake_case
// tokens. Upper case is folded (flagd's TARGETING_MATCH -> targeting_match); anything else,
// notably a sentence that someone passed as a "reason", becomes "other" so that free text can
// never mint new series.
std::string token_value(std::string_view v, std::string_view empty_as) {
  if (v.empty()) return std::string(empty_as);
  if (v.size() > kMaxTokenLength) return std::string(kOther);
  std::string out(v);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    const bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
    if (!ok) return std::string(kOther);
  }
  return out;
}

// Label values that come from configuration (strategy = plugin names, flag keys, variants,
// versions): kept as written when they look like names, else "invalid".
std::string name_value(std::string_view v, std::string_view empty_as) {
  if (v.empty()) return std::string(empty_as);
  if (v.size() > kMaxNameLength) return std::string(kInvalid);
  for (const char c : v) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '-' || c == '.' || c == ':' || c == '+';
    if (!ok) return std::string(kInvalid);
  }
  return std::string(v);
}

std::string strategy_value(std::string_view strategy) { return name_value(strategy, "unknown"); }

// A duration or amount worth recording: NaN, infinities and negative values would poison a
// histogram's sum (or be silently ignored by a counter) for the life of the process.
bool usable(double v) { return std::isfinite(v) && v >= 0; }

constexpr const char* kPausePhases[] = {"resolve",  "prepare_live", "freeze", "dirty_set",
                                        "arm_live", "export",       "commit", "thaw"};
constexpr const char* kResumePhases[] = {"open", "listen",    "wait_vmm",
                                         "fill", "hand_over", "serve"};
constexpr Outcome kOutcomes[] = {Outcome::kOk, Outcome::kError, Outcome::kAborted};
// The mode label of memsnap_page_fault_mode_downgrades_total, by FaultModeDowngrade.
constexpr const char* kFaultModeDowngrades[] = {"copy_wp", "continue_wp", "zeropage"};
constexpr OperationKind kKinds[] = {OperationKind::kPause, OperationKind::kResume};
// Where a pause's mode came from (memsnap_pause_modes_total{source}); anything else is "other".
constexpr std::string_view kPauseModeSources[] = {"body", "flag", "default"};

std::string pause_mode_label(PauseMode mode) { return std::string(pause_mode_name(mode)); }

struct PauseModeFallbackSeries {
  PauseMode requested;
  PauseMode used;
  PauseModeFallback cause;
  bool operator<(const PauseModeFallbackSeries& o) const {
    return std::tie(requested, used, cause) < std::tie(o.requested, o.used, o.cause);
  }
};

// The pause-mode fallbacks that can happen, declared at 0: every (requested, used, reason) that
// decide_pause_mode() gives for some inputs, and a pause-mode flag that cannot be evaluated
// (the pause then asks for the default, copy, and says why).
std::set<PauseModeFallbackSeries> possible_pause_mode_fallbacks() {
  std::set<PauseModeFallbackSeries> out = {
      {PauseMode::kCopy, PauseMode::kCopy, PauseModeFallback::kFlagError}};
  for (const PauseMode requested : kPauseModes) {
    for (unsigned bits = 0; bits < 32; ++bits) {
      PauseModeInputs in;
      in.strategy_needs_memfd = (bits & 1U) != 0;
      in.memfd_held = (bits & 2U) != 0;
      in.memory_resident = (bits & 4U) != 0;
      in.stop = (bits & 8U) != 0;
      in.live_capable = (bits & 16U) != 0;
      const PauseModeDecision d = decide_pause_mode(requested, in);
      if (d.fallback != PauseModeFallback::kNone) out.insert({requested, d.mode, d.fallback});
    }
  }
  return out;
}

prometheus::Labels pause_mode_fallback_labels(PauseMode requested, PauseMode used,
                                              PauseModeFallback cause) {
  return {{"requested", pause_mode_label(requested)},
          {"mode", pause_mode_label(used)},
          {"reason", std::string(pause_mode_fallback_name(cause))}};
}

std::vector<MetricInfo> build_catalogue() {
  using T = MetricType;
  const auto& op = operation_duration_buckets();
  const auto& phase = phase_duration_buckets();
  const auto& fault = fault_latency_buckets();
  // Sorted by name; the tests check it.
  return {
      {"memsnap_api_requests_total",
       T::kCounter,
       "Control API requests answered, by endpoint (a fixed route name, never a path: paths hold "
       "sandbox ids) and HTTP status code.",
       "",
       {"endpoint", "code"},
       {}},
      {"memsnap_background_export_retries_total",
       T::kCounter,
       "Failed background exports tried again (each retry exports from the start into a fresh "
       "temporary file), by strategy.",
       "",
       {"strategy"},
       {}},
      {"memsnap_background_exports_pending",
       T::kGauge,
       "Background exports (of pauses answered at handover) right now, by state: running (not "
       "durable yet) or failed (the memory stays held, in RAM only, until a retry succeeds or "
       "the sandbox is removed).",
       "",
       {"state"},
       {}},
      {"memsnap_background_exports_total",
       T::kCounter,
       "Attempts of background exports (pauses answered at handover) that ended, by strategy and "
       "outcome: durable (the snapshot is committed) or failed (the memory stays held; a retry "
       "is a new attempt).",
       "",
       {"strategy", "outcome"},
       {}},
      {"memsnap_build_info",
       T::kGauge,
       "Always 1; the version of memsnap this daemon runs is in the version label.",
       "",
       {"version"},
       {}},
      {"memsnap_concurrency_limit_rejections_total",
       T::kCounter,
       "Pause or resume requests refused because that kind's concurrency limit was reached.",
       "",
       {"kind"},
       {}},
      {"memsnap_export_backlog_bytes",
       T::kGauge,
       "Guest bytes of pauses answered at handover that are not durable yet: the dirty sets of "
       "the running and failed background exports.",
       "bytes",
       {},
       {}},
      {"memsnap_export_held_bytes",
       T::kGauge,
       "Host memory memsnapd holds for background exports that are not durable yet: memory of "
       "acknowledged pauses that exists only in RAM until its snapshot is committed.",
       "bytes",
       {},
       {}},
      {"memsnap_flag_evaluations_total",
       T::kCounter,
       "Feature-flag evaluations, by flag key, variant chosen (none when no variant) and "
       "lower-case OpenFeature reason (static, targeting_match, default, disabled, error).",
       "",
       {"flag", "variant", "reason"},
       {}},
      {"memsnap_flag_reloads_total",
       T::kCounter,
       "Flag file reloads, by result: success (the new flags are in force) or failure (the file "
       "was rejected and the previous flags stay in force).",
       "",
       {"result"},
       {}},
      {"memsnap_live_copies_total",
       T::kCounter,
       "Blocks a live pause copied out of guest memory before the running guest wrote them "
       "(copy-before-write), by strategy: the price the guest paid for running during the "
       "export.",
       "",
       {"strategy"},
       {}},
      {"memsnap_operations_in_flight",
       T::kGauge,
       "Pauses or resumes running right now, by kind.",
       "",
       {"kind"},
       {}},
      {"memsnap_page_fault_mode_downgrades_total",
       T::kCounter,
       "Userfaultfd modes the kernel refused while serving page faults, each turned off for the "
       "rest of that resume: copy_wp (copies without write protection: the pages count as "
       "written), continue_wp (the same for memfd pages) or zeropage (zeros are copied instead).",
       "",
       {"strategy", "mode"},
       {}},
      {"memsnap_page_fault_service_duration_seconds",
       T::kHistogram,
       "Time to serve one guest page fault while resuming, from reading the fault to the page "
       "being installed. Fed only by individual or pre-bucketed samples.",
       "seconds",
       {"strategy"},
       fault},
      {"memsnap_page_fault_service_seconds_total",
       T::kCounter,
       "Total time spent serving guest page faults, from every sample and batch; divided by "
       "memsnap_page_faults_total it gives the mean service time.",
       "seconds",
       {"strategy"},
       {}},
      {"memsnap_page_faults_total",
       T::kCounter,
       "Guest page faults served while resuming, from every sample and batch.",
       "",
       {"strategy"},
       {}},
      {"memsnap_pause_cpu_seconds_total",
       T::kCounter,
       "CPU time spent by pauses: the pausing thread plus the snapshot writer's hashing thread.",
       "seconds",
       {"strategy"},
       {}},
      {"memsnap_pause_durable_seconds",
       T::kHistogram,
       "Time from a pause's request until its snapshot is committed (durable), by the strategy "
       "that ran and the pause mode (copy, handover, live); committed snapshots only. A copy "
       "pause answers at this moment, a handover pause long before.",
       "seconds",
       {"strategy", "mode"},
       phase},
      {"memsnap_pause_duration_seconds",
       T::kHistogram,
       "Wall time of a pause, from the request to the committed snapshot or the failure, by the "
       "strategy that ran and outcome (ok, error, aborted).",
       "seconds",
       {"strategy", "outcome"},
       op},
      {"memsnap_pause_exported_bytes_total",
       T::kCounter,
       "Guest bytes covered by pauses' dirty sets (data and zero blocks alike): the memory the "
       "pauses took out of their VMMs.",
       "bytes",
       {"strategy"},
       {}},
      {"memsnap_pause_handover_seconds",
       T::kHistogram,
       "Time from a pause's request to its answer, by the strategy that ran and the pause mode "
       "(copy, handover, live): in copy mode the whole pause, in handover mode until the VMM is "
       "stopped and memsnapd holds its memory. Answered pauses only.",
       "seconds",
       {"strategy", "mode"},
       phase},
      {"memsnap_pause_mode_fallbacks_total",
       T::kCounter,
       "Pauses that did not run in the pause mode they asked for, by the mode asked for "
       "(requested), the mode used instead (mode) and a short reason token.",
       "",
       {"requested", "mode", "reason"},
       {}},
      {"memsnap_pause_modes_total",
       T::kCounter,
       "Pause modes that pauses asked for, by mode and where the choice came from: body (the "
       "pause request's mode field), flag (the pause-mode flag) or default (neither).",
       "",
       {"mode", "source"},
       {}},
      {"memsnap_pause_phase_duration_seconds",
       T::kHistogram,
       "Wall time of each phase of a pause: resolve, freeze, dirty_set, export, commit, thaw (a "
       "live pause: prepare_live first, arm_live and thaw before export).",
       "seconds",
       {"strategy", "phase"},
       phase},
      {"memsnap_pause_released_bytes_total",
       T::kCounter,
       "Host memory given back while exporting, by strategies that release guest memory as they "
       "go (hole_punch).",
       "bytes",
       {"strategy"},
       {}},
      {"memsnap_pause_written_bytes_total",
       T::kCounter,
       "Data bytes written into snapshot files by pauses (zero blocks are not written).",
       "bytes",
       {"strategy"},
       {}},
      {"memsnap_pause_zero_bytes_total",
       T::kCounter,
       "Guest bytes that pauses found zero and recorded as zero runs, writing no data.",
       "bytes",
       {"strategy"},
       {}},
      {"memsnap_plugin_info",
       T::kGauge,
       "Always 1, one series per strategy plugin the plugin host looked at; status is loaded or "
       "refused.",
       "",
       {"name", "version", "abi", "experimental", "status"},
       {}},
      {"memsnap_plugin_load_failures_total",
       T::kCounter,
       "Plugins the plugin host refused, by reason (the error code's name, e.g. "
       "plugin_abi_mismatch).",
       "",
       {"reason"},
       {}},
      {"memsnap_registry_recovered_sandboxes",
       T::kGauge,
       "What memsnapd's start made of the sandboxes its registry recorded (state.directory): "
       "recovered (taken back, paused or running) or not_recovered (the log and GET /v1/health "
       "say why). Set once at start.",
       "",
       {"outcome"},
       {}},
      {"memsnap_resume_duration_seconds",
       T::kHistogram,
       "What a resume costs a sandbox beyond its VMM's start-up: from the VMM's handshake to the "
       "VMM being able to run, by strategy and outcome (ok, error, aborted). Buckets from 100 us: "
       "a warm or lazy resume is ready in well under a millisecond.",
       "seconds",
       {"strategy", "outcome"},
       phase},
      {"memsnap_resume_phase_duration_seconds",
       T::kHistogram,
       "Wall time of each phase of a resume: open, listen, wait_vmm, fill, hand_over, serve.",
       "seconds",
       {"strategy", "phase"},
       phase},
      {"memsnap_resumes_by_mode_total",
       T::kCounter,
       "Resumes by strategy and the resume mode they got (lazy, background, eager, warm).",
       "",
       {"strategy", "mode"},
       {}},
      {"memsnap_sandboxes", T::kGauge, "Sandboxes the daemon knows, by state.", "", {"state"}, {}},
      {"memsnap_strategy_fallbacks_total",
       T::kCounter,
       "Sandboxes that did not get the strategy they asked for, by the strategy asked for (from), "
       "the one used instead (to) and a short reason token.",
       "",
       {"from", "to", "reason"},
       {}},
      {"memsnap_warm_memory_bytes",
       T::kGauge,
       "Host memory memsnapd holds for warm resumes: the allocated bytes of the memfds kept from "
       "pauses, by the strategy that paused them. A warm resume hands a memfd back; removing the "
       "sandbox frees it.",
       "bytes",
       {"strategy"},
       {}},
  };
}

const MetricInfo& info_of(std::string_view name) {
  for (const MetricInfo& m : catalogue()) {
    if (m.name == name) return m;
  }
  // A name used below but missing from the catalogue is a programming error that every test
  // run would hit at once.
  std::fprintf(stderr, "memsnap metrics: %.*s is not in the catalogue\n",
               static_cast<int>(name.size()), name.data());
  std::abort();
}

template <typename Metric, typename Builder>
prometheus::Family<Metric>& family(prometheus::Registry& registry, std::string_view name,
                                   MetricType type, Builder builder) {
  const MetricInfo& info = info_of(name);
  if (info.type != type) {
    std::fprintf(stderr, "memsnap metrics: %s has the wrong type\n", info.name.c_str());
    std::abort();
  }
  return builder.Name(info.name).Help(info.help).Register(registry);
}

// "1ms", "100µs", "2.5s": bucket bounds as a person reads them.
std::string human_seconds(double s) {
  char buf[32];
  if (s < 1e-3) {
    std::snprintf(buf, sizeof buf, "%gµs", s * 1e6);
  } else if (s < 1) {
    std::snprintf(buf, sizeof buf, "%gms", s * 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%gs", s);
  }
  return buf;
}

}  // namespace

std::string_view metric_type_name(MetricType type) noexcept {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
  }
  return "untyped";
}

std::string_view outcome_name(Outcome outcome) noexcept {
  switch (outcome) {
    case Outcome::kOk:
      return "ok";
    case Outcome::kError:
      return "error";
    case Outcome::kAborted:
      return "aborted";
  }
  return "error";
}

std::string_view operation_kind_name(OperationKind kind) noexcept {
  return kind == OperationKind::kPause ? "pause" : "resume";
}

const std::vector<double>& operation_duration_buckets() {
  // 1-2-5 steps from 1 ms; 30 s and 60 s close it because a pause of a large guest on a slow
  // disk can take tens of seconds, and anything past a minute is an incident, not a latency.
  static const std::vector<double> b = {0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
                                        0.5,   1,     2,     5,    10,   20,   30,  60};
  return b;
}

const std::vector<double>& phase_duration_buckets() {
  static const std::vector<double> b = {0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01,
                                        0.02,   0.05,   0.1,    0.2,   0.5,   1,     2,
                                        5,      10,     20,     30,    60};
  return b;
}

const std::vector<double>& fault_latency_buckets() {
  // A fault served from the page cache takes a few µs; one that reads a cold snapshot from
  // disk takes up to milliseconds; past 10 ms the guest is visibly stalling.
  static const std::vector<double> b = {1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4,
                                        2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2};
  return b;
}

const std::vector<MetricInfo>& catalogue() {
  static const std::vector<MetricInfo> c = build_catalogue();
  return c;
}

std::string catalogue_markdown() {
  std::ostringstream out;
  out << "| name | type | labels | unit | help |\n|---|---|---|---|---|\n";
  for (const MetricInfo& m : catalogue()) {
    out << "| `" << m.name << "` | " << metric_type_name(m.type) << " | ";
    for (std::size_t i = 0; i < m.labels.size(); ++i) {
      out << (i ? ", " : "") << '`' << m.labels[i] << '`';
    }
    out << " | " << (m.unit.empty() ? "-" : m.unit) << " | " << m.help << " |\n";
  }
  out << "\n| histogram | bucket upper bounds (+Inf implied) |\n|---|---|\n";
  for (const MetricInfo& m : catalogue()) {
    if (m.type != MetricType::kHistogram) continue;
    out << "| `" << m.name << "` | ";
    for (std::size_t i = 0; i < m.buckets.size(); ++i) {
      out << (i ? ", " : "") << human_seconds(m.buckets[i]);
    }
    out << " |\n";
  }
  return out.str();
}

// ---- InFlight ---------------------------------------------------------------------------------

InFlight::InFlight(InFlight&& other) noexcept : gauge_(std::exchange(other.gauge_, nullptr)) {}

InFlight& InFlight::operator=(InFlight&& other) noexcept {
  if (this != &other) {
    if (gauge_ != nullptr) gauge_->Decrement();
    gauge_ = std::exchange(other.gauge_, nullptr);
  }
  return *this;
}

InFlight::~InFlight() {
  if (gauge_ != nullptr) gauge_->Decrement();
}

// ---- HostMetrics ------------------------------------------------------------------------------

struct HostMetrics::Impl {
  using Counters = prometheus::Family<prometheus::Counter>;
  using Gauges = prometheus::Family<prometheus::Gauge>;
  using Histograms = prometheus::Family<prometheus::Histogram>;

  explicit Impl(const std::shared_ptr<prometheus::Registry>& r)
      : registry(r),
        api_requests(counter("memsnap_api_requests_total")),
        export_retries(counter("memsnap_background_export_retries_total")),
        background_exports(gauge("memsnap_background_exports_pending")),
        background_outcomes(counter("memsnap_background_exports_total")),
        build_info(gauge("memsnap_build_info")),
        concurrency_rejections(counter("memsnap_concurrency_limit_rejections_total")),
        export_backlog(gauge("memsnap_export_backlog_bytes")),
        export_held(gauge("memsnap_export_held_bytes")),
        flag_evaluations(counter("memsnap_flag_evaluations_total")),
        flag_reloads(counter("memsnap_flag_reloads_total")),
        in_flight(gauge("memsnap_operations_in_flight")),
        fault_downgrades(counter("memsnap_page_fault_mode_downgrades_total")),
        fault_latency(histogram("memsnap_page_fault_service_duration_seconds")),
        fault_seconds(counter("memsnap_page_fault_service_seconds_total")),
        faults(counter("memsnap_page_faults_total")),
        live_copies(counter("memsnap_live_copies_total")),
        pause_cpu(counter("memsnap_pause_cpu_seconds_total")),
        pause_durable(histogram("memsnap_pause_durable_seconds")),
        pause_duration(histogram("memsnap_pause_duration_seconds")),
        pause_exported(counter("memsnap_pause_exported_bytes_total")),
        pause_handover(histogram("memsnap_pause_handover_seconds")),
        pause_mode_fallbacks(counter("memsnap_pause_mode_fallbacks_total")),
        pause_modes(counter("memsnap_pause_modes_total")),
        pause_phase(histogram("memsnap_pause_phase_duration_seconds")),
        pause_released(counter("memsnap_pause_released_bytes_total")),
        pause_written(counter("memsnap_pause_written_bytes_total")),
        pause_zero(counter("memsnap_pause_zero_bytes_total")),
        plugin_info(gauge("memsnap_plugin_info")),
        plugin_failures(counter("memsnap_plugin_load_failures_total")),
        resume_duration(histogram("memsnap_resume_duration_seconds")),
        resume_phase(histogram("memsnap_resume_phase_duration_seconds")),
        resume_modes(counter("memsnap_resumes_by_mode_total")),
        sandboxes(gauge("memsnap_sandboxes")),
        registry_recovered(gauge("memsnap_registry_recovered_sandboxes")),
        fallbacks(counter("memsnap_strategy_fallbacks_total")),
        warm_memory(gauge("memsnap_warm_memory_bytes")) {}

  Counters& counter(std::string_view name) {
    return family<prometheus::Counter>(*registry, name, MetricType::kCounter,
                                       prometheus::BuildCounter());
  }
  Gauges& gauge(std::string_view name) {
    return family<prometheus::Gauge>(*registry, name, MetricType::kGauge, prometheus::BuildGauge());
  }
  Histograms& histogram(std::string_view name) {
    return family<prometheus::Histogram>(*registry, name, MetricType::kHistogram,
                                         prometheus::BuildHistogram());
  }

  // The page-fault series of one strategy, looked up once: a fault thread records thousands of
  // samples a second, and Family::Add allocates a new histogram on every call before finding
  // the existing one.
  struct FaultSeries {
    prometheus::Histogram* latency = nullptr;
    prometheus::Counter* seconds = nullptr;
    prometheus::Counter* count = nullptr;
  };
  FaultSeries fault_series(const std::string& strategy) {
    {
      std::shared_lock lock(fault_mutex);
      if (auto it = fault_cache.find(strategy); it != fault_cache.end()) return it->second;
    }
    const prometheus::Labels labels{{"strategy", strategy}};
    FaultSeries s{&fault_latency.Add(labels, fault_latency_buckets()), &fault_seconds.Add(labels),
                  &faults.Add(labels)};
    std::unique_lock lock(fault_mutex);
    return fault_cache.emplace(strategy, s).first->second;
  }

  void declare(const std::string& strategy) {
    {
      std::lock_guard lock(mutex);
      if (!strategies.insert(strategy).second) return;
    }
    const prometheus::Labels s{{"strategy", strategy}};
    for (const Outcome o : kOutcomes) {
      prometheus::Labels l = s;
      l.emplace("outcome", outcome_name(o));
      pause_duration.Add(l, operation_duration_buckets());
      resume_duration.Add(l, phase_duration_buckets());
    }
    for (const char* phase : kPausePhases) {
      prometheus::Labels l = s;
      l.emplace("phase", phase);
      pause_phase.Add(l, phase_duration_buckets());
    }
    for (const char* phase : kResumePhases) {
      prometheus::Labels l = s;
      l.emplace("phase", phase);
      resume_phase.Add(l, phase_duration_buckets());
    }
    pause_cpu.Add(s);
    pause_exported.Add(s);
    pause_written.Add(s);
    pause_zero.Add(s);
    pause_released.Add(s);
    warm_memory.Add(s);
    for (const char* mode : kFaultModeDowngrades) {
      prometheus::Labels l = s;
      l.emplace("mode", mode);
      fault_downgrades.Add(l);
    }
    for (const PauseMode mode : kPauseModes) {
      prometheus::Labels l = s;
      l.emplace("mode", pause_mode_label(mode));
      pause_handover.Add(l, phase_duration_buckets());
      pause_durable.Add(l, phase_duration_buckets());
    }
    for (const char* outcome : {"durable", "failed"}) {
      prometheus::Labels l = s;
      l.emplace("outcome", outcome);
      background_outcomes.Add(l);
    }
    export_retries.Add(s);
    live_copies.Add(s);
    fault_series(strategy);
  }

  std::shared_ptr<prometheus::Registry> registry;
  Counters& api_requests;
  Counters& export_retries;
  Gauges& background_exports;
  Counters& background_outcomes;
  Gauges& build_info;
  Counters& concurrency_rejections;
  Gauges& export_backlog;
  Gauges& export_held;
  Counters& flag_evaluations;
  Counters& flag_reloads;
  Gauges& in_flight;
  Counters& fault_downgrades;
  Histograms& fault_latency;
  Counters& fault_seconds;
  Counters& faults;
  Counters& live_copies;
  Counters& pause_cpu;
  Histograms& pause_durable;
  Histograms& pause_duration;
  Counters& pause_exported;
  Histograms& pause_handover;
  Counters& pause_mode_fallbacks;
  Counters& pause_modes;
  Histograms& pause_phase;
  Counters& pause_released;
  Counters& pause_written;
  Counters& pause_zero;
  Gauges& plugin_info;
  Counters& plugin_failures;
  Histograms& resume_duration;
  Histograms& resume_phase;
  Counters& resume_modes;
  Gauges& sandboxes;
  Gauges& registry_recovered;
  Counters& fallbacks;
  Gauges& warm_memory;

  std::mutex mutex;  // guards the members below
  std::set<std::string> strategies;
  std::map<std::string, prometheus::Gauge*> plugin_info_by_name;
  std::vector<std::string> states;
  prometheus::Gauge* other_state = nullptr;
  // memsnap_background_exports_pending{state="running"|"failed"} and the two byte gauges, made
  // by the constructor (so read without the lock), set together under it.
  prometheus::Gauge* exports_running = nullptr;
  prometheus::Gauge* exports_failed = nullptr;
  prometheus::Gauge* backlog_bytes = nullptr;
  prometheus::Gauge* held_bytes = nullptr;

  std::shared_mutex fault_mutex;
  std::map<std::string, FaultSeries> fault_cache;
};

HostMetrics::HostMetrics(HostMetricsOptions options)
    : impl_(std::make_unique<Impl>(std::make_shared<prometheus::Registry>())) {
  Impl& m = *impl_;
  const std::string version =
      options.version.empty() ? std::string(MEMSNAP_METRICS_VERSION) : options.version;
  m.build_info.Add({{"version", name_value(version, "unknown")}}).Set(1);
  // Series whose label values are known up front start at 0: increase() and rate() only see a
  // counter's first event if the series existed before it, and alerts need the series to exist.
  for (const OperationKind k : kKinds) {
    const prometheus::Labels l{{"kind", std::string(operation_kind_name(k))}};
    m.in_flight.Add(l);
    m.concurrency_rejections.Add(l);
  }
  m.flag_reloads.Add({{"result", "success"}});
  m.flag_reloads.Add({{"result", "failure"}});
  m.exports_running = &m.background_exports.Add({{"state", "running"}});
  m.exports_failed = &m.background_exports.Add({{"state", "failed"}});
  m.backlog_bytes = &m.export_backlog.Add({});
  m.held_bytes = &m.export_held.Add({});
  for (const PauseModeFallbackSeries& f : possible_pause_mode_fallbacks()) {
    m.pause_mode_fallbacks.Add(pause_mode_fallback_labels(f.requested, f.used, f.cause));
  }
  for (const PauseMode mode : kPauseModes) {
    for (const std::string_view source : kPauseModeSources) {
      m.pause_modes.Add({{"mode", pause_mode_label(mode)}, {"source", std::string(source)}});
    }
  }
  for (const char* outcome : {"recovered", "not_recovered"}) {
    m.registry_recovered.Add({{"outcome", outcome}});
  }
  for (const std::string& state : options.sandbox_states) {
    std::string s = token_value(state, "unknown");
    if (std::find(m.states.begin(), m.states.end(), s) != m.states.end()) continue;
    m.sandboxes.Add({{"state", s}});
    m.states.push_back(std::move(s));
  }
  for (const std::string& s : options.strategies) declare_strategy(s);
}

HostMetrics::~HostMetrics() = default;

std::shared_ptr<prometheus::Registry> HostMetrics::registry() const noexcept {
  return impl_->registry;
}

std::string HostMetrics::serialize() const noexcept {
  try {
    return prometheus::TextSerializer().Serialize(impl_->registry->Collect());
  } catch (...) {
    return {};
  }
}

void HostMetrics::declare_strategy(std::string_view strategy) noexcept {
  try {
    impl_->declare(strategy_value(strategy));
  } catch (...) {
  }
}

void HostMetrics::record_pause(const PauseObservation& p) noexcept {
  try {
    Impl& m = *impl_;
    const std::string strategy = strategy_value(p.strategy);
    m.declare(strategy);
    const prometheus::Labels s{{"strategy", strategy}};
    if (usable(p.seconds)) {
      m.pause_duration
          .Add({{"strategy", strategy}, {"outcome", std::string(outcome_name(p.outcome))}},
               operation_duration_buckets())
          .Observe(p.seconds);
    }
    for (const Phase& phase : p.phases) {
      if (!usable(phase.seconds)) continue;
      m.pause_phase
          .Add({{"strategy", strategy}, {"phase", token_value(phase.name, "unknown")}},
               phase_duration_buckets())
          .Observe(phase.seconds);
    }
    if (usable(p.cpu_seconds)) m.pause_cpu.Add(s).Increment(p.cpu_seconds);
    m.pause_exported.Add(s).Increment(static_cast<double>(p.exported_bytes));
    m.pause_written.Add(s).Increment(static_cast<double>(p.written_bytes));
    m.pause_zero.Add(s).Increment(static_cast<double>(p.zero_blocks) *
                                  static_cast<double>(p.block_size));
    m.pause_released.Add(s).Increment(static_cast<double>(p.released_bytes));
  } catch (...) {
  }
}

void HostMetrics::record_resume(const ResumeObservation& r) noexcept {
  try {
    Impl& m = *impl_;
    const std::string strategy = strategy_value(r.strategy);
    m.declare(strategy);
    if (usable(r.seconds)) {
      m.resume_duration
          .Add({{"strategy", strategy}, {"outcome", std::string(outcome_name(r.outcome))}},
               phase_duration_buckets())
          .Observe(r.seconds);
    }
    for (const Phase& phase : r.phases) {
      if (!usable(phase.seconds)) continue;
      m.resume_phase
          .Add({{"strategy", strategy}, {"phase", token_value(phase.name, "unknown")}},
               phase_duration_buckets())
          .Observe(phase.seconds);
    }
    if (!r.mode.empty()) {
      m.resume_modes.Add({{"strategy", strategy}, {"mode", token_value(r.mode, "none")}})
          .Increment();
    }
  } catch (...) {
  }
}

void HostMetrics::observe_fault_latency(std::string_view strategy, double seconds) noexcept {
  try {
    if (!usable(seconds)) return;
    const Impl::FaultSeries s = impl_->fault_series(strategy_value(strategy));
    s.latency->Observe(seconds);
    s.seconds->Increment(seconds);
    s.count->Increment();
  } catch (...) {
  }
}

bool HostMetrics::observe_fault_latency_buckets(std::string_view strategy,
                                                const std::vector<std::uint64_t>& counts,
                                                double sum_seconds) noexcept {
  try {
    if (counts.size() != fault_latency_buckets().size() + 1 || !usable(sum_seconds)) return false;
    std::vector<double> increments(counts.size());
    double total = 0;
    for (std::size_t i = 0; i < counts.size(); ++i) {
      increments[i] = static_cast<double>(counts[i]);
      total += increments[i];
    }
    const Impl::FaultSeries s = impl_->fault_series(strategy_value(strategy));
    s.latency->ObserveMultiple(increments, sum_seconds);
    s.seconds->Increment(sum_seconds);
    s.count->Increment(total);
    return true;
  } catch (...) {
    return false;
  }
}

void HostMetrics::observe_fault_latency_batch(std::string_view strategy, std::uint64_t count,
                                              double sum_seconds) noexcept {
  try {
    if (!usable(sum_seconds)) return;
    const Impl::FaultSeries s = impl_->fault_series(strategy_value(strategy));
    s.seconds->Increment(sum_seconds);
    s.count->Increment(static_cast<double>(count));
  } catch (...) {
  }
}

void HostMetrics::record_fault_mode_downgrades(std::string_view strategy, FaultModeDowngrade mode,
                                              std::uint64_t count) noexcept {
  if (count == 0) return;
  try {
    const char* name = kFaultModeDowngrades[static_cast<std::size_t>(mode)];
    impl_->fault_downgrades.Add({{"strategy", strategy_value(strategy)}, {"mode", name}})
        .Increment(static_cast<double>(count));
  } catch (...) {
  }
}

void HostMetrics::record_fallback(std::string_view from, std::string_view to,
                                  FallbackCause reason) noexcept {
  try {
    impl_->fallbacks
        .Add({{"from", strategy_value(from)},
              {"to", strategy_value(to)},
              {"reason", std::string(fallback_metric_label(reason))}})
        .Increment();
  } catch (...) {
  }
}

void HostMetrics::record_flag_evaluation(std::string_view flag, std::string_view variant,
                                         std::string_view reason) noexcept {
  try {
    impl_->flag_evaluations
        .Add({{"flag", name_value(flag, "unknown")},
              {"variant", name_value(variant, "none")},
              {"reason", token_value(reason, "unknown")}})
        .Increment();
  } catch (...) {
  }
}

void HostMetrics::record_flag_reload(bool success) noexcept {
  try {
    impl_->flag_reloads.Add({{"result", success ? "success" : "failure"}}).Increment();
  } catch (...) {
  }
}

void HostMetrics::record_plugin_load(const PluginStatus& plugin) noexcept {
  try {
    Impl& m = *impl_;
    const std::string name = name_value(plugin.name, "unknown");
    {
      std::lock_guard lock(m.mutex);
      if (auto it = m.plugin_info_by_name.find(name); it != m.plugin_info_by_name.end()) {
        m.plugin_info.Remove(it->second);
        m.plugin_info_by_name.erase(it);
      }
      prometheus::Gauge& g =
          m.plugin_info.Add({{"name", name},
                             {"version", name_value(plugin.version, "unknown")},
                             {"abi", std::to_string(plugin.abi)},
                             {"experimental", plugin.experimental ? "true" : "false"},
                             {"status", plugin.loaded ? "loaded" : "refused"}});
      g.Set(1);
      m.plugin_info_by_name.emplace(name, &g);
    }
    if (plugin.loaded) {
      m.declare(name);  // a loaded plugin is a strategy sandboxes may use
    } else {
      m.plugin_failures.Add({{"reason", token_value(plugin.failure_reason, "unknown")}})
          .Increment();
    }
  } catch (...) {
  }
}

void HostMetrics::clear_plugins() noexcept {
  try {
    Impl& m = *impl_;
    std::lock_guard lock(m.mutex);
    for (auto& [name, gauge] : m.plugin_info_by_name) m.plugin_info.Remove(gauge);
    m.plugin_info_by_name.clear();
  } catch (...) {
  }
}

void HostMetrics::set_warm_memory_bytes(
    const std::map<std::string, std::uint64_t>& by_strategy) noexcept {
  try {
    Impl& m = *impl_;
    std::map<std::string, double> held;
    for (const auto& [strategy, bytes] : by_strategy) {
      const std::string s = strategy_value(strategy);
      m.declare(s);
      held[s] += static_cast<double>(bytes);
    }
    std::lock_guard lock(m.mutex);
    for (const std::string& s : m.strategies) {
      const auto it = held.find(s);
      m.warm_memory.Add({{"strategy", s}}).Set(it == held.end() ? 0 : it->second);
    }
  } catch (...) {
  }
}

void HostMetrics::set_registry_recovery(std::uint64_t recovered,
                                        std::uint64_t not_recovered) noexcept {
  try {
    Impl& m = *impl_;
    std::lock_guard lock(m.mutex);
    m.registry_recovered.Add({{"outcome", "recovered"}}).Set(static_cast<double>(recovered));
    m.registry_recovered.Add({{"outcome", "not_recovered"}})
        .Set(static_cast<double>(not_recovered));
  } catch (...) {
  }
}

void HostMetrics::set_sandboxes_by_state(
    const std::map<std::string, std::int64_t>& counts) noexcept {
  try {
    Impl& m = *impl_;
    // m.states is fixed by the constructor, so it is read here without the lock.
    std::map<std::string, double> by_state;
    double other = 0;
    for (const auto& [state, n] : counts) {
      const std::string s = token_value(state, "unknown");
      if (std::find(m.states.begin(), m.states.end(), s) != m.states.end()) {
        by_state[s] += static_cast<double>(n);
      } else {
        other += static_cast<double>(n);
      }
    }
    std::lock_guard lock(m.mutex);
    for (const std::string& s : m.states) {
      const auto it = by_state.find(s);
      m.sandboxes.Add({{"state", s}}).Set(it == by_state.end() ? 0 : it->second);
    }
    // "other" exists only once an undeclared state was seen; then it stays, at 0 if need be.
    if (other != 0 && m.other_state == nullptr) {
      m.other_state = &m.sandboxes.Add({{"state", std::string(kOther)}});
    }
    if (m.other_state != nullptr) m.other_state->Set(other);
  } catch (...) {
  }
}

void HostMetrics::record_handover(std::string_view strategy, PauseMode mode,
                                  double seconds) noexcept {
  try {
    if (!usable(seconds)) return;
    Impl& m = *impl_;
    const std::string s = strategy_value(strategy);
    m.declare(s);
    m.pause_handover
        .Add({{"strategy", s}, {"mode", pause_mode_label(mode)}}, phase_duration_buckets())
        .Observe(seconds);
  } catch (...) {
  }
}

void HostMetrics::record_durable(std::string_view strategy, PauseMode mode, double seconds,
                                 bool ok) noexcept {
  try {
    Impl& m = *impl_;
    const std::string s = strategy_value(strategy);
    m.declare(s);
    if (ok && usable(seconds)) {
      m.pause_durable
          .Add({{"strategy", s}, {"mode", pause_mode_label(mode)}}, phase_duration_buckets())
          .Observe(seconds);
    }
    if (mode == PauseMode::kHandover) {
      m.background_outcomes.Add({{"strategy", s}, {"outcome", ok ? "durable" : "failed"}})
          .Increment();
    }
  } catch (...) {
  }
}

void HostMetrics::record_live_copies(std::string_view strategy, std::uint64_t blocks) noexcept {
  try {
    Impl& m = *impl_;
    const std::string s = strategy_value(strategy);
    m.declare(s);
    m.live_copies.Add({{"strategy", s}}).Increment(static_cast<double>(blocks));
  } catch (...) {
  }
}

void HostMetrics::record_export_retry(std::string_view strategy) noexcept {
  try {
    Impl& m = *impl_;
    const std::string s = strategy_value(strategy);
    m.declare(s);
    m.export_retries.Add({{"strategy", s}}).Increment();
  } catch (...) {
  }
}

void HostMetrics::set_background_exports(std::uint64_t running, std::uint64_t failed,
                                         std::uint64_t backlog_bytes,
                                         std::uint64_t held_bytes) noexcept {
  try {
    Impl& m = *impl_;
    std::lock_guard lock(m.mutex);  // one call's four values, not a mix of two calls'
    m.exports_running->Set(static_cast<double>(running));
    m.exports_failed->Set(static_cast<double>(failed));
    m.backlog_bytes->Set(static_cast<double>(backlog_bytes));
    m.held_bytes->Set(static_cast<double>(held_bytes));
  } catch (...) {
  }
}

void HostMetrics::record_pause_mode_fallback(PauseMode requested, PauseMode used,
                                             PauseModeFallback cause) noexcept {
  // kNone, or a value outside the enum (named "none" too), is not a fallback.
  const std::string_view none = pause_mode_fallback_name(PauseModeFallback::kNone);
  if (pause_mode_fallback_name(cause) == none) return;
  try {
    impl_->pause_mode_fallbacks.Add(pause_mode_fallback_labels(requested, used, cause)).Increment();
  } catch (...) {
  }
}

void HostMetrics::record_pause_mode_evaluation(PauseMode mode, std::string_view source) noexcept {
  try {
    const bool known = std::find(std::begin(kPauseModeSources), std::end(kPauseModeSources),
                                 source) != std::end(kPauseModeSources);
    impl_->pause_modes
        .Add({{"mode", pause_mode_label(mode)},
              {"source", known ? std::string(source) : std::string(kOther)}})
        .Increment();
  } catch (...) {
  }
}

InFlight HostMetrics::track_in_flight(OperationKind kind) noexcept {
  try {
    prometheus::Gauge& g = impl_->in_flight.Add({{"kind", std::string(operation_kind_name(kind))}});
    g.Increment();
    return InFlight(&g);
  } catch (...) {
    return InFlight();
  }
}

void HostMetrics::record_concurrency_rejection(OperationKind kind) noexcept {
  try {
    impl_->concurrency_rejections.Add({{"kind", std::string(operation_kind_name(kind))}})
        .Increment();
  } catch (...) {
  }
}

void HostMetrics::record_api_request(std::string_view endpoint, int code) noexcept {
  try {
    const std::string c = (code >= 100 && code <= 599) ? std::to_string(code) : "invalid";
    impl_->api_requests.Add({{"endpoint", token_value(endpoint, "unknown")}, {"code", c}})
        .Increment();
  } catch (...) {
  }
}

}  // namespace memsnap::metrics
