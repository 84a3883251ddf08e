// memsnap's Prometheus metrics: one catalogue, one owner (HostMetrics), typed recording methods.
//
// The daemon (memsnapd) owns one HostMetrics and exposes its registry with MetricsEndpoint
// (metrics_endpoint.h). Callers never build label strings: every method takes the values it
// records, and HostMetrics turns them into labels, bounding what a label can hold so that no
// caller can blow up cardinality by accident (free text becomes "other", over-long or odd names
// become "invalid"). The rules (docs/metrics.md): names start with memsnap_, values are in base
// units (seconds, bytes), counters end in _total, the strategy is a label, and no label ever
// holds a sandbox id.
//
// This library is a leaf: it depends on prometheus-cpp only, never on memsnap::core, so the
// daemon maps PauseReport / ResumeReport / StrategyChoice onto the small structs below.
//
// Thread-safety: every method may be called from any thread. Nothing throws: a recording that
// cannot be made (out of memory) is dropped, because metrics must never fail a pause.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/fallback/fallback.h"
#include "core/pause_mode/pause_mode.h"

namespace prometheus {
class Gauge;
class Registry;
}  // namespace prometheus

namespace memsnap::metrics {

// ---- The catalogue -------------------------------------------------------------------------

enum class MetricType { kCounter, kGauge, kHistogram };
// "counter", "gauge", "histogram" (the exposition format's words).
std::string_view metric_type_name(MetricType type) noexcept;

struct MetricInfo {
  std::string name;  // full name, e.g. "memsnap_pause_duration_seconds"
  MetricType type = MetricType::kCounter;
  std::string help;
  std::string unit;                 // "seconds", "bytes", or "" for a plain count / an info gauge
  std::vector<std::string> labels;  // label names, in the order documented
  std::vector<double> buckets;      // histograms only: upper bounds, +Inf implied
};

// Bucket boundaries (seconds), shared by the catalogue and by callers that pre-bucket.
// Whole pauses and resumes: 1 ms .. 60 s in 1-2-5 steps.
const std::vector<double>& operation_duration_buckets();
// Phases of a pause or resume: 100 us .. 60 s (resolve, listen etc. take well under 1 ms).
const std::vector<double>& phase_duration_buckets();
// The two moments of a pause (handover, durable: memsnap_pause_handover_seconds and
// memsnap_pause_durable_seconds) use the phase buckets: a handover takes about a millisecond, a
// durable copy of a large guest tens of seconds.
// Serving one page fault: 1 us .. 10 ms in 1-2-5 steps.
const std::vector<double>& fault_latency_buckets();

// Every metric HostMetrics registers, sorted by name. docs/metrics.md is generated from it
// (memsnap-metrics-catalogue) and the tests check both against the registry.
const std::vector<MetricInfo>& catalogue();

// The catalogue as the Markdown table of docs/metrics.md.
std::string catalogue_markdown();

// ---- What callers record --------------------------------------------------------------------

enum class Outcome { kOk, kError, kAborted };
std::string_view outcome_name(Outcome outcome) noexcept;  // ok, error, aborted

enum class OperationKind { kPause, kResume };

// A userfaultfd mode the fault server had to turn off (core/fault_decision.h, ModeDowngrade).
enum class FaultModeDowngrade { kCopyWp, kContinueWp, kZeroPage };
std::string_view operation_kind_name(OperationKind kind) noexcept;  // pause, resume

// Why a sandbox did not get the strategy it asked for: memsnap::FallbackCause
// (core/fallback/fallback.h), a closed set so that the label stays a short stable token
// (fallback_metric_label); the free-text reason belongs in the log, not in a label.

struct Phase {
  std::string name;  // as the report names it: resolve, freeze, dirty_set, export, commit, thaw;
                     // open, listen, wait_vmm, fill, hand_over, serve
  double seconds = 0;
};

// One pause, as the daemon saw it. On error only strategy, outcome, seconds (and whatever
// phases finished) are usually known; the byte counters then stay 0.
struct PauseObservation {
  std::string strategy;  // the strategy that ran (after any fallback), else the one asked for
  Outcome outcome = Outcome::kOk;
  double seconds = 0;  // PauseReport::wall_seconds, or the time until the failure
  std::vector<Phase> phases;
  std::uint64_t exported_bytes = 0;  // PauseReport::dirty_bytes
  std::uint64_t written_bytes = 0;   // PauseReport::data_bytes
  std::uint64_t zero_blocks = 0;     // PauseReport::zero_blocks ...
  std::uint32_t block_size = 0;      // ... times PauseReport::block_size = zero bytes
  std::uint64_t released_bytes = 0;  // PauseReport::export_stats.bytes_released
  double cpu_seconds = 0;            // PauseReport::cpu_seconds
};

struct ResumeObservation {
  std::string strategy;
  Outcome outcome = Outcome::kOk;
  // ResumeReport::ready_seconds: from the VMM's handshake to the VMM being able to run, i.e.
  // what resuming costs a sandbox beyond its VMM's own start-up (phases hold the rest).
  double seconds = 0;
  std::vector<Phase> phases;
  std::string mode;  // resume_mode_name(): lazy, background, eager, warm ("" if it never got one)
};

struct PluginStatus {
  std::string name;  // the descriptor's name, or the file's stem when it was never read
  std::string version;
  std::uint32_t abi = 0;
  bool experimental = false;
  bool loaded = false;
  std::string failure_reason;  // when !loaded: the error code's name, e.g. plugin_abi_mismatch
};

struct HostMetricsOptions {
  // Goes into memsnap_build_info{version}; empty means the version this library was built as.
  std::string version;
  // Strategies whose series are created at 0 up front, so that rate() and the dashboards see
  // every strategy before its first pause. record_plugin_load() adds loaded plugins too.
  std::vector<std::string> strategies;
  // The states memsnap_sandboxes reports (each always present, 0 when empty). memsnapd gives its
  // lifecycle's (tools/memsnapd/sandbox_lifecycle.h); with none, no state is reported.
  std::vector<std::string> sandbox_states;
};

class HostMetrics;

// Counts one pause or resume in memsnap_operations_in_flight for as long as it lives. Must not
// outlive the HostMetrics that made it.
class InFlight {
 public:
  InFlight() = default;
  InFlight(InFlight&& other) noexcept;
  InFlight& operator=(InFlight&& other) noexcept;
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;
  ~InFlight();

 private:
  friend class HostMetrics;
  explicit InFlight(prometheus::Gauge* gauge) : gauge_(gauge) {}
  prometheus::Gauge* gauge_ = nullptr;
};

class HostMetrics {
 public:
  // Registers every family of the catalogue. Throws only what allocation throws.
  explicit HostMetrics(HostMetricsOptions options = {});
  ~HostMetrics();
  HostMetrics(const HostMetrics&) = delete;
  HostMetrics& operator=(const HostMetrics&) = delete;

  // For MetricsEndpoint, and for a daemon that wants to register collectables of its own.
  [[nodiscard]] std::shared_ptr<prometheus::Registry> registry() const noexcept;

  // The registry in the text exposition format (tests, and a /metrics fallback).
  // Empty if even that fails (out of memory).
  [[nodiscard]] std::string serialize() const noexcept;

  // Creates every per-strategy series at 0 (idempotent).
  void declare_strategy(std::string_view strategy) noexcept;

  // Pause and resume: duration by outcome, every phase, and (pause) the byte and CPU counters.
  void record_pause(const PauseObservation& pause) noexcept;
  void record_resume(const ResumeObservation& resume) noexcept;

  // Page-fault service latency. Three ways in, pick what the fault server can give:
  //  - one sample per fault;
  //  - pre-bucketed samples: counts[i] faults fell at or below fault_latency_buckets()[i] and
  //    above the bound before it; the last element counts the rest (+Inf). counts must have
  //    fault_latency_buckets().size() + 1 elements, else nothing is recorded (returns false).
  //    Lets a fault thread bucket locally and flush now and then, without a lock per fault;
  //  - a batch of `count` faults that took `sum_seconds` together, when only totals are known
  //    (FaultStats today). A batch cannot say where its faults fall, so it goes only into the
  //    count and sum counters (mean latency), never into the histogram (it would invent a
  //    distribution and fake the p99). Batches are increments since the last call, not totals.
  // Every form feeds memsnap_page_faults_total and memsnap_page_fault_service_seconds_total.
  void observe_fault_latency(std::string_view strategy, double seconds) noexcept;
  bool observe_fault_latency_buckets(std::string_view strategy,
                                     const std::vector<std::uint64_t>& counts,
                                     double sum_seconds) noexcept;
  void observe_fault_latency_batch(std::string_view strategy, std::uint64_t count,
                                   double sum_seconds) noexcept;
  // count more resumes of strategy that had to turn mode off
  // (memsnap_page_fault_mode_downgrades_total).
  void record_fault_mode_downgrades(std::string_view strategy, FaultModeDowngrade mode,
                                    std::uint64_t count) noexcept;

  // Strategy selection and the pipeline's own fallback.
  void record_fallback(std::string_view from, std::string_view to, FallbackCause reason) noexcept;
  // reason: flagd's reason (STATIC, TARGETING_MATCH, DEFAULT, DISABLED, ERROR), recorded in
  // lower case; variant "" (no variant selected) is recorded as "none".
  void record_flag_evaluation(std::string_view flag, std::string_view variant,
                              std::string_view reason) noexcept;
  void record_flag_reload(bool success) noexcept;

  // One plugin the plugin host looked at: sets memsnap_plugin_info for its name (replacing an
  // earlier series of the same name) and, when refused, counts the failure by reason.
  void record_plugin_load(const PluginStatus& plugin) noexcept;
  // Drops every memsnap_plugin_info series (before loading plugins again).
  void clear_plugins() noexcept;

  // Sets memsnap_warm_memory_bytes: every declared strategy to the bytes held for it (0 when
  // absent); strategies not yet declared are declared first.
  void set_warm_memory_bytes(const std::map<std::string, std::uint64_t>& by_strategy) noexcept;

  // What the start made of the registry (memsnap_registry_recovered_sandboxes{outcome}).
  void set_registry_recovery(std::uint64_t recovered, std::uint64_t not_recovered) noexcept;

  // Sets memsnap_sandboxes: every declared state to its count (0 when absent); states that
  // were not declared are added up under state="other".
  void set_sandboxes_by_state(const std::map<std::string, std::int64_t>& counts) noexcept;

  // ---- Pause modes (core/pause_mode/pause_mode.h): the two moments of a pause, and the
  // exports that run after a handover.
  //
  // A pause answered (ok): seconds from its request to its answer, by the strategy that ran and
  // the mode it ran in (copy: the whole pause; handover: the VMM stopped and its memory held;
  // live: how long the VMM was stopped, the moment it runs again).
  // memsnap_pause_handover_seconds. A pause that fails before its answer is not observed here
  // (memsnap_pause_duration_seconds{outcome} counts it).
  void record_handover(std::string_view strategy, PauseMode mode, double seconds) noexcept;
  // A pause's snapshot committed (ok), or one attempt of its export failed (!ok): seconds from the
  // pause's request until the commit. ok ones go into memsnap_pause_durable_seconds; in handover
  // mode, every attempt also counts in memsnap_background_exports_total{outcome="durable" or
  // "failed"} (a failed attempt retried and then durable counts once in each).
  void record_durable(std::string_view strategy, PauseMode mode, double seconds, bool ok) noexcept;
  // Blocks a live pause copied out before the guest wrote them (memsnap_live_copies_total).
  void record_live_copies(std::string_view strategy, std::uint64_t blocks) noexcept;
  // A failed background export tried again (memsnap_background_export_retries_total).
  void record_export_retry(std::string_view strategy) noexcept;
  // The background exports right now (set, not added; call on every change): running and failed
  // ones (memsnap_background_exports_pending{state}), the dirty bytes not yet durable
  // (memsnap_export_backlog_bytes) and the host memory held for them
  // (memsnap_export_held_bytes).
  void set_background_exports(std::uint64_t running, std::uint64_t failed,
                              std::uint64_t backlog_bytes, std::uint64_t held_bytes) noexcept;
  // A pause that asked for `requested` runs in `used` because of `cause`
  // (memsnap_pause_mode_fallbacks_total{requested, mode, reason}). kNone records nothing.
  void record_pause_mode_fallback(PauseMode requested, PauseMode used,
                                  PauseModeFallback cause) noexcept;
  // The mode a pause asked for and where it came from: source "body" (the pause body's mode),
  // "flag" (the pause-mode flag) or "default" (no flag, or it named no mode); anything else is
  // recorded as "other" (memsnap_pause_modes_total{mode, source}).
  void record_pause_mode_evaluation(PauseMode mode, std::string_view source) noexcept;

  [[nodiscard]] InFlight track_in_flight(OperationKind kind) noexcept;
  void record_concurrency_rejection(OperationKind kind) noexcept;
  // endpoint: a fixed route name such as "sandbox_pause" (a token, never a path: paths hold
  // sandbox ids); code: the HTTP status.
  void record_api_request(std::string_view endpoint, int code) noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace memsnap::metrics
