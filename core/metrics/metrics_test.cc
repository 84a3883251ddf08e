// HostMetrics: what the recording methods put into the registry, checked on the text exposition
// a scrape would see; the catalogue against the registry; naming rules; promtool's linter.
#include "core/metrics/host_metrics.h"

#include <gtest/gtest.h>
#include <prometheus/check_names.h>
#include <prometheus/registry.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/metrics/metrics_test_util.h"

namespace memsnap::metrics {
namespace {

using testing::Exposition;
using testing::parse_exposition;
using Labels = std::map<std::string, std::string>;

PauseObservation pause_of(std::string strategy, Outcome outcome, double seconds) {
  PauseObservation p;
  p.strategy = std::move(strategy);
  p.outcome = outcome;
  p.seconds = seconds;
  return p;
}

// Calls every recording method once, so that every family has at least one series.
void exercise_everything(HostMetrics& m) {
  PauseObservation p = pause_of("memfd", Outcome::kOk, 0.25);
  p.phases = {{"freeze", 0.001}, {"export", 0.2}};
  p.exported_bytes = 1 << 20;
  p.written_bytes = 1 << 19;
  p.zero_blocks = 3;
  p.block_size = 4096;
  p.released_bytes = 0;
  p.cpu_seconds = 0.1;
  m.record_pause(p);
  m.record_resume({"memfd", Outcome::kOk, 0.01, {{"open", 0.002}}, "warm"});
  m.observe_fault_latency("process_vm_readv", 3e-6);
  m.record_fallback("hole_punch", "process_vm_readv", FallbackCause::kMissingMemfd);
  m.record_flag_evaluation("memory-export-strategy", "memfd", "TARGETING_MATCH");
  m.record_flag_reload(true);
  m.record_plugin_load({"memfd", "1.0.0", 1, false, true, ""});
  m.record_plugin_load({"broken", "", 0, false, false, "plugin_abi_mismatch"});
  m.set_sandboxes_by_state({{"running", 2}});
  const InFlight op = m.track_in_flight(OperationKind::kPause);
  m.record_concurrency_rejection(OperationKind::kResume);
  m.record_api_request("sandbox_pause", 200);
  m.record_handover("memfd", PauseMode::kHandover, 0.002);
  m.record_durable("memfd", PauseMode::kHandover, 0.4, true);
  m.record_export_retry("memfd");
  m.set_background_exports(1, 0, 1 << 20, 1 << 20);
  m.record_pause_mode_fallback(PauseMode::kHandover, PauseMode::kCopy,
                               PauseModeFallback::kStrategyReadsVmm);
  m.record_pause_mode_evaluation(PauseMode::kHandover, "flag");
}

TEST(HostMetricsTest, RecordsPausesPerStrategyAndOutcome) {
  HostMetrics m;
  PauseObservation a = pause_of("memfd", Outcome::kOk, 0.003);
  a.phases = {{"resolve", 0.00005}, {"freeze", 0.0004}, {"export", 0.002}, {"commit", 0.0005}};
  a.exported_bytes = 8 << 20;
  a.written_bytes = 6 << 20;
  a.zero_blocks = 512;
  a.block_size = 4096;
  a.cpu_seconds = 0.0025;
  m.record_pause(a);
  PauseObservation b = pause_of("memfd", Outcome::kOk, 0.2);  // exactly on a bucket bound
  b.phases = {{"export", 0.15}};
  b.exported_bytes = 2 << 20;
  b.written_bytes = 2 << 20;
  b.cpu_seconds = 0.1;
  m.record_pause(b);
  m.record_pause(pause_of("process_vm_readv", Outcome::kError, 0.05));
  PauseObservation c = pause_of("hole_punch", Outcome::kOk, 1.5);
  c.released_bytes = 64 << 20;
  m.record_pause(c);

  const Exposition e = parse_exposition(m.serialize());
  const Labels memfd_ok{{"strategy", "memfd"}, {"outcome", "ok"}};
  EXPECT_EQ(e.value("memsnap_pause_duration_seconds_count", memfd_ok), 2);
  EXPECT_NEAR(*e.value("memsnap_pause_duration_seconds_sum", memfd_ok), 0.203, 1e-12);
  auto bucket = [&](const Labels& l, const std::string& le) {
    Labels with_le = l;
    with_le["le"] = le;
    return e.value("memsnap_pause_duration_seconds_bucket", with_le);
  };
  EXPECT_EQ(bucket(memfd_ok, "0.002"), 0);
  EXPECT_EQ(bucket(memfd_ok, "0.005"), 1);
  EXPECT_EQ(bucket(memfd_ok, "0.1"), 1);
  EXPECT_EQ(bucket(memfd_ok, "0.2"), 2) << "le is inclusive: 0.2 s belongs to le=\"0.2\"";
  EXPECT_EQ(bucket(memfd_ok, "+Inf"), 2);
  // The other outcomes of a strategy exist from its first pause, at 0, so ratios are defined.
  EXPECT_EQ(e.value("memsnap_pause_duration_seconds_count",
                    {{"strategy", "memfd"}, {"outcome", "error"}}),
            0);
  EXPECT_EQ(e.value("memsnap_pause_duration_seconds_count",
                    {{"strategy", "process_vm_readv"}, {"outcome", "error"}}),
            1);
  EXPECT_EQ(e.value("memsnap_pause_duration_seconds_count",
                    {{"strategy", "process_vm_readv"}, {"outcome", "ok"}}),
            0);

  const Labels memfd{{"strategy", "memfd"}};
  EXPECT_EQ(e.value("memsnap_pause_exported_bytes_total", memfd), 10 << 20);
  EXPECT_EQ(e.value("memsnap_pause_written_bytes_total", memfd), 8 << 20);
  EXPECT_EQ(e.value("memsnap_pause_zero_bytes_total", memfd), 512 * 4096);
  EXPECT_NEAR(*e.value("memsnap_pause_cpu_seconds_total", memfd), 0.1025, 1e-12);
  EXPECT_EQ(e.value("memsnap_pause_released_bytes_total", memfd), 0);
  EXPECT_EQ(e.value("memsnap_pause_released_bytes_total", {{"strategy", "hole_punch"}}), 64 << 20);

  const Labels export_phase{{"strategy", "memfd"}, {"phase", "export"}};
  EXPECT_EQ(e.value("memsnap_pause_phase_duration_seconds_count", export_phase), 2);
  EXPECT_NEAR(*e.value("memsnap_pause_phase_duration_seconds_sum", export_phase), 0.152, 1e-12);
  EXPECT_EQ(e.value("memsnap_pause_phase_duration_seconds_bucket",
                    {{"strategy", "memfd"}, {"phase", "resolve"}, {"le", "0.0001"}}),
            1);
  // Every pause phase exists for every strategy seen, even those it never ran.
  EXPECT_EQ(e.value("memsnap_pause_phase_duration_seconds_count",
                    {{"strategy", "process_vm_readv"}, {"phase", "thaw"}}),
            0);
}

TEST(HostMetricsTest, RecordsResumesWithPhasesAndModes) {
  HostMetrics m;
  m.record_resume({"memfd", Outcome::kOk, 0.0008, {{"open", 0.01}, {"hand_over", 0.0007}}, "warm"});
  m.record_resume({"memfd", Outcome::kOk, 0.04, {{"fill", 0.035}}, "background"});
  m.record_resume({"process_vm_readv", Outcome::kAborted, 3, {}, "lazy"});
  const Exposition e = parse_exposition(m.serialize());
  const Labels memfd_ok{{"strategy", "memfd"}, {"outcome", "ok"}};
  EXPECT_EQ(e.value("memsnap_resume_duration_seconds_count", memfd_ok), 2);
  EXPECT_NEAR(*e.value("memsnap_resume_duration_seconds_sum", memfd_ok), 0.0408, 1e-12);
  EXPECT_EQ(e.value("memsnap_resume_duration_seconds_bucket",
                    {{"strategy", "memfd"}, {"outcome", "ok"}, {"le", "0.001"}}),
            1);
  EXPECT_EQ(e.value("memsnap_resume_duration_seconds_count",
                    {{"strategy", "process_vm_readv"}, {"outcome", "aborted"}}),
            1);
  EXPECT_EQ(e.value("memsnap_resume_phase_duration_seconds_count",
                    {{"strategy", "memfd"}, {"phase", "fill"}}),
            1);
  EXPECT_EQ(e.value("memsnap_resume_phase_duration_seconds_count",
                    {{"strategy", "memfd"}, {"phase", "wait_vmm"}}),
            0);
  EXPECT_EQ(e.value("memsnap_resumes_by_mode_total", {{"strategy", "memfd"}, {"mode", "warm"}}), 1);
  EXPECT_EQ(
      e.value("memsnap_resumes_by_mode_total", {{"strategy", "memfd"}, {"mode", "background"}}), 1);
  EXPECT_EQ(e.value("memsnap_resumes_by_mode_total",
                    {{"strategy", "process_vm_readv"}, {"mode", "lazy"}}),
            1);
}

TEST(HostMetricsTest, DeclaredStrategiesAndKnownLabelsStartAtZero) {
  HostMetricsOptions o;
  o.strategies = {"memfd", "process_vm_readv"};
  o.version = "1.2.3";
  o.sandbox_states = {"running", "paused"};
  HostMetrics m(o);
  const Exposition e = parse_exposition(m.serialize());
  for (const char* s : {"memfd", "process_vm_readv"}) {
    for (const char* outcome : {"ok", "error", "aborted"}) {
      EXPECT_EQ(
          e.value("memsnap_pause_duration_seconds_count", {{"strategy", s}, {"outcome", outcome}}),
          0)
          << s << " " << outcome;
      EXPECT_EQ(
          e.value("memsnap_resume_duration_seconds_count", {{"strategy", s}, {"outcome", outcome}}),
          0);
    }
    EXPECT_EQ(e.value("memsnap_page_fault_service_duration_seconds_count", {{"strategy", s}}), 0);
    EXPECT_EQ(e.value("memsnap_page_faults_total", {{"strategy", s}}), 0);
    EXPECT_EQ(e.value("memsnap_pause_exported_bytes_total", {{"strategy", s}}), 0);
  }
  EXPECT_EQ(e.value("memsnap_flag_reloads_total", {{"result", "success"}}), 0);
  EXPECT_EQ(e.value("memsnap_flag_reloads_total", {{"result", "failure"}}), 0);
  EXPECT_EQ(e.value("memsnap_operations_in_flight", {{"kind", "pause"}}), 0);
  EXPECT_EQ(e.value("memsnap_concurrency_limit_rejections_total", {{"kind", "resume"}}), 0);
  EXPECT_EQ(e.value("memsnap_sandboxes", {{"state", "paused"}}), 0);
  EXPECT_EQ(e.value("memsnap_build_info", {{"version", "1.2.3"}}), 1);
}

// The pause-mode series exist before the first pause of any mode: per strategy (each mode, each
// outcome), and host-wide (exports by state, backlog, modes by source, every fallback reason).
TEST(HostMetricsTest, PauseModeSeriesStartAtZero) {
  HostMetricsOptions o;
  o.strategies = {"memfd", "process_vm_readv"};
  HostMetrics m(o);
  const Exposition e = parse_exposition(m.serialize());
  for (const char* s : {"memfd", "process_vm_readv"}) {
    for (const PauseMode mode : kPauseModes) {
      const Labels l{{"strategy", s}, {"mode", std::string(pause_mode_name(mode))}};
      EXPECT_EQ(e.value("memsnap_pause_handover_seconds_count", l), 0) << s << " " << l.at("mode");
      EXPECT_EQ(e.value("memsnap_pause_durable_seconds_count", l), 0) << s << " " << l.at("mode");
    }
    for (const char* outcome : {"durable", "failed"}) {
      EXPECT_EQ(
          e.value("memsnap_background_exports_total", {{"strategy", s}, {"outcome", outcome}}), 0)
          << s << " " << outcome;
    }
    EXPECT_EQ(e.value("memsnap_background_export_retries_total", {{"strategy", s}}), 0) << s;
  }
  EXPECT_EQ(e.value("memsnap_background_exports_pending", {{"state", "running"}}), 0);
  EXPECT_EQ(e.value("memsnap_background_exports_pending", {{"state", "failed"}}), 0);
  EXPECT_EQ(e.value("memsnap_export_backlog_bytes", {}), 0);
  EXPECT_EQ(e.value("memsnap_export_held_bytes", {}), 0);
  for (const PauseMode mode : kPauseModes) {
    for (const char* source : {"body", "flag", "default"}) {
      EXPECT_EQ(e.value("memsnap_pause_modes_total",
                        {{"mode", std::string(pause_mode_name(mode))}, {"source", source}}),
                0)
          << pause_mode_name(mode) << " " << source;
    }
  }
  // Every reason has a series (so a panel by reason and increase() see its first event), and
  // the ones decide_pause_mode can give are there under the modes it gives them for.
  std::set<std::string> reasons;
  for (const auto& s : e.samples) {
    if (s.name != "memsnap_pause_mode_fallbacks_total") continue;
    EXPECT_EQ(s.value, 0) << s.labels.at("reason");
    EXPECT_EQ(s.labels.at("mode"), "copy") << "every fallback is to copy";
    reasons.insert(s.labels.at("reason"));
  }
  for (const PauseModeFallback cause : kPauseModeFallbacks) {
    EXPECT_TRUE(reasons.count(std::string(pause_mode_fallback_name(cause))))
        << pause_mode_fallback_name(cause);
  }
  EXPECT_FALSE(reasons.count("none"));
  for (const auto& [requested, reason] :
       std::vector<std::pair<std::string, std::string>>{{"handover", "strategy_reads_vmm"},
                                                        {"live", "no_write_faults"},
                                                        {"copy", "flag_error"}}) {
    EXPECT_EQ(e.value("memsnap_pause_mode_fallbacks_total",
                      {{"requested", requested}, {"mode", "copy"}, {"reason", reason}}),
              0)
        << requested << " " << reason;
  }
}

// Handover and durable latency by strategy and mode; background outcomes for handover only.
TEST(HostMetricsTest, RecordsHandoverAndDurableByStrategyAndMode) {
  HostMetrics m;
  m.record_handover("memfd", PauseMode::kHandover, 0.003);
  m.record_handover("memfd", PauseMode::kHandover, 0.0001);  // exactly on the first bound
  m.record_handover("memfd", PauseMode::kCopy, 0.9);
  m.record_handover("memfd", PauseMode::kHandover, std::nan(""));
  m.record_handover("memfd", PauseMode::kHandover, -1);
  // A handover export: one attempt failed, the retry became durable.
  m.record_durable("memfd", PauseMode::kHandover, 0.5, false);
  m.record_export_retry("memfd");
  m.record_durable("memfd", PauseMode::kHandover, 1.25, true);
  // A copy pause: durable when it answers; a failed one is not a background export.
  m.record_durable("memfd", PauseMode::kCopy, 0.9, true);
  m.record_durable("process_vm_readv", PauseMode::kCopy, 2, false);
  m.record_durable("hole_punch", PauseMode::kHandover, INFINITY, true);

  const Exposition e = parse_exposition(m.serialize());
  const Labels handover{{"strategy", "memfd"}, {"mode", "handover"}};
  const Labels copy{{"strategy", "memfd"}, {"mode", "copy"}};
  auto bucket = [&](const char* name, const Labels& l, const std::string& le) {
    Labels with_le = l;
    with_le["le"] = le;
    return e.value(std::string(name) + "_bucket", with_le);
  };
  EXPECT_EQ(e.value("memsnap_pause_handover_seconds_count", handover), 2);
  EXPECT_NEAR(*e.value("memsnap_pause_handover_seconds_sum", handover), 0.0031, 1e-12);
  EXPECT_EQ(bucket("memsnap_pause_handover_seconds", handover, "0.0001"), 1);
  EXPECT_EQ(bucket("memsnap_pause_handover_seconds", handover, "0.002"), 1);
  EXPECT_EQ(bucket("memsnap_pause_handover_seconds", handover, "0.005"), 2);
  EXPECT_EQ(bucket("memsnap_pause_handover_seconds", handover, "30"), 2);
  EXPECT_EQ(e.value("memsnap_pause_handover_seconds_count", copy), 1);
  EXPECT_EQ(bucket("memsnap_pause_handover_seconds", copy, "0.5"), 0);
  EXPECT_EQ(bucket("memsnap_pause_handover_seconds", copy, "1"), 1);
  EXPECT_EQ(
      e.value("memsnap_pause_handover_seconds_count", {{"strategy", "memfd"}, {"mode", "live"}}),
      0);

  // Durable: only committed snapshots.
  EXPECT_EQ(e.value("memsnap_pause_durable_seconds_count", handover), 1);
  EXPECT_NEAR(*e.value("memsnap_pause_durable_seconds_sum", handover), 1.25, 1e-12);
  EXPECT_EQ(bucket("memsnap_pause_durable_seconds", handover, "1"), 0);
  EXPECT_EQ(bucket("memsnap_pause_durable_seconds", handover, "2"), 1);
  EXPECT_EQ(e.value("memsnap_pause_durable_seconds_count", copy), 1);
  EXPECT_EQ(e.value("memsnap_pause_durable_seconds_count",
                    {{"strategy", "process_vm_readv"}, {"mode", "copy"}}),
            0);
  // A non-finite duration is not observed, but the attempt's outcome still counts.
  EXPECT_EQ(e.value("memsnap_pause_durable_seconds_count",
                    {{"strategy", "hole_punch"}, {"mode", "handover"}}),
            0);

  // Background outcomes: handover attempts only, each attempt once.
  auto outcomes = [&](const char* strategy, const char* outcome) {
    return e.value("memsnap_background_exports_total",
                   {{"strategy", strategy}, {"outcome", outcome}});
  };
  EXPECT_EQ(outcomes("memfd", "durable"), 1);
  EXPECT_EQ(outcomes("memfd", "failed"), 1);
  EXPECT_EQ(outcomes("process_vm_readv", "failed"), 0);
  EXPECT_EQ(outcomes("hole_punch", "durable"), 1);
  EXPECT_EQ(e.value("memsnap_background_export_retries_total", {{"strategy", "memfd"}}), 1);
  EXPECT_EQ(e.value("memsnap_background_export_retries_total", {{"strategy", "hole_punch"}}), 0);
  // Recording a strategy declares it: its pause series exist too.
  EXPECT_EQ(e.value("memsnap_pause_duration_seconds_count",
                    {{"strategy", "process_vm_readv"}, {"outcome", "ok"}}),
            0);
}

// Set, not added: each call replaces all four values.
TEST(HostMetricsTest, BackgroundExportGaugesAreSet) {
  HostMetrics m;
  m.set_background_exports(3, 1, 5ULL << 30, 6ULL << 30);
  Exposition e = parse_exposition(m.serialize());
  EXPECT_EQ(e.value("memsnap_background_exports_pending", {{"state", "running"}}), 3);
  EXPECT_EQ(e.value("memsnap_background_exports_pending", {{"state", "failed"}}), 1);
  EXPECT_EQ(e.value("memsnap_export_backlog_bytes", {}), 5.0 * (1ULL << 30));
  EXPECT_EQ(e.value("memsnap_export_held_bytes", {}), 6.0 * (1ULL << 30));
  m.set_background_exports(0, 1, 4096, 8192);
  e = parse_exposition(m.serialize());
  EXPECT_EQ(e.value("memsnap_background_exports_pending", {{"state", "running"}}), 0);
  EXPECT_EQ(e.value("memsnap_background_exports_pending", {{"state", "failed"}}), 1);
  EXPECT_EQ(e.value("memsnap_export_backlog_bytes", {}), 4096);
  EXPECT_EQ(e.value("memsnap_export_held_bytes", {}), 8192);
  int series = 0;
  for (const auto& s : e.samples) series += s.name == "memsnap_background_exports_pending";
  EXPECT_EQ(series, 2) << "running and failed, nothing else";
}

TEST(HostMetricsTest, PauseModeFallbacksAndEvaluations) {
  HostMetrics m;
  m.record_pause_mode_fallback(PauseMode::kHandover, PauseMode::kCopy, PauseModeFallback::kNoMemfd);
  m.record_pause_mode_fallback(PauseMode::kHandover, PauseMode::kCopy, PauseModeFallback::kNoMemfd);
  m.record_pause_mode_fallback(PauseMode::kLive, PauseMode::kCopy,
                               PauseModeFallback::kNoWriteFaults);
  m.record_pause_mode_fallback(PauseMode::kCopy, PauseMode::kCopy, PauseModeFallback::kFlagError);
  m.record_pause_mode_fallback(PauseMode::kHandover, PauseMode::kHandover,
                               PauseModeFallback::kNone);  // not a fallback: nothing
  m.record_pause_mode_fallback(PauseMode::kHandover, PauseMode::kCopy,
                               static_cast<PauseModeFallback>(99));  // not a cause: nothing
  m.record_pause_mode_evaluation(PauseMode::kHandover, "body");
  m.record_pause_mode_evaluation(PauseMode::kHandover, "flag");
  m.record_pause_mode_evaluation(PauseMode::kHandover, "flag");
  m.record_pause_mode_evaluation(PauseMode::kCopy, "default");
  m.record_pause_mode_evaluation(PauseMode::kLive, "sandbox sb-42's orchestrator");

  const Exposition e = parse_exposition(m.serialize());
  auto fallbacks = [&](const char* requested, const char* mode, const char* reason) {
    return e.value("memsnap_pause_mode_fallbacks_total",
                   {{"requested", requested}, {"mode", mode}, {"reason", reason}});
  };
  EXPECT_EQ(fallbacks("handover", "copy", "no_memfd"), 2);
  EXPECT_EQ(fallbacks("live", "copy", "no_write_faults"), 1);
  EXPECT_EQ(fallbacks("copy", "copy", "flag_error"), 1);
  EXPECT_EQ(fallbacks("handover", "copy", "continues"), 0);
  double total = 0;
  for (const auto& s : e.samples) {
    if (s.name != "memsnap_pause_mode_fallbacks_total") continue;
    total += s.value;
    EXPECT_NE(s.labels.at("reason"), "none");
  }
  EXPECT_EQ(total, 4);

  auto modes = [&](const char* mode, const char* source) {
    return e.value("memsnap_pause_modes_total", {{"mode", mode}, {"source", source}});
  };
  EXPECT_EQ(modes("handover", "body"), 1);
  EXPECT_EQ(modes("handover", "flag"), 2);
  EXPECT_EQ(modes("copy", "default"), 1);
  EXPECT_EQ(modes("copy", "flag"), 0);
  EXPECT_EQ(modes("live", "other"), 1) << "free text is not a source";
}

TEST(HostMetricsTest, BuildInfoDefaultsToTheProjectVersion) {
  HostMetrics m;
  const Exposition e = parse_exposition(m.serialize());
  std::string version;
  for (const auto& s : e.samples) {
    if (s.name == "memsnap_build_info") version = s.labels.at("version");
  }
  EXPECT_FALSE(version.empty());
  EXPECT_NE(version, "unknown");
}

TEST(HostMetricsTest, PageFaultLatencySamplesBucketsAndBatches) {
  HostMetrics m;
  m.observe_fault_latency("process_vm_readv", 3e-6);
  m.observe_fault_latency("process_vm_readv", 4e-4);
  std::vector<std::uint64_t> counts(fault_latency_buckets().size() + 1, 0);
  counts[0] = 10;     // <= 1 µs
  counts.back() = 1;  // > 10 ms
  EXPECT_TRUE(m.observe_fault_latency_buckets("memfd", counts, 0.05));
  EXPECT_FALSE(m.observe_fault_latency_buckets("memfd", {1, 2, 3}, 1.0));
  m.observe_fault_latency_batch("memfd", 1000, 0.02);  // totals only: not in the histogram
  m.observe_fault_latency("memfd", std::nan(""));      // ignored
  m.observe_fault_latency("memfd", -1);                // ignored

  const Exposition e = parse_exposition(m.serialize());
  const Labels pvr{{"strategy", "process_vm_readv"}};
  EXPECT_EQ(e.value("memsnap_page_fault_service_duration_seconds_count", pvr), 2);
  EXPECT_EQ(e.value("memsnap_page_fault_service_duration_seconds_bucket",
                    {{"strategy", "process_vm_readv"}, {"le", "5e-06"}}),
            1);
  EXPECT_EQ(e.value("memsnap_page_fault_service_duration_seconds_bucket",
                    {{"strategy", "process_vm_readv"}, {"le", "0.0005"}}),
            2);
  EXPECT_EQ(e.value("memsnap_page_faults_total", pvr), 2);
  EXPECT_NEAR(*e.value("memsnap_page_fault_service_seconds_total", pvr), 4.03e-4, 1e-15);

  const Labels memfd{{"strategy", "memfd"}};
  EXPECT_EQ(e.value("memsnap_page_fault_service_duration_seconds_count", memfd), 11);
  EXPECT_EQ(e.value("memsnap_page_fault_service_duration_seconds_bucket",
                    {{"strategy", "memfd"}, {"le", "1e-06"}}),
            10);
  EXPECT_EQ(e.value("memsnap_page_fault_service_duration_seconds_bucket",
                    {{"strategy", "memfd"}, {"le", "0.01"}}),
            10);
  EXPECT_EQ(e.value("memsnap_page_fault_service_duration_seconds_bucket",
                    {{"strategy", "memfd"}, {"le", "+Inf"}}),
            11);
  EXPECT_NEAR(*e.value("memsnap_page_fault_service_duration_seconds_sum", memfd), 0.05, 1e-12);
  EXPECT_EQ(e.value("memsnap_page_faults_total", memfd), 1011);
  EXPECT_NEAR(*e.value("memsnap_page_fault_service_seconds_total", memfd), 0.07, 1e-12);
}

TEST(HostMetricsTest, FaultModeDowngradesByStrategyAndMode) {
  HostMetricsOptions options;
  options.strategies = {"memfd"};
  HostMetrics m(options);
  Exposition e = parse_exposition(m.serialize());
  for (const char* mode : {"copy_wp", "continue_wp", "zeropage"}) {
    EXPECT_EQ(e.value("memsnap_page_fault_mode_downgrades_total",
                      {{"strategy", "memfd"}, {"mode", mode}}),
              0)
        << mode;
  }
  m.record_fault_mode_downgrades("memfd", FaultModeDowngrade::kContinueWp, 1);
  m.record_fault_mode_downgrades("memfd", FaultModeDowngrade::kContinueWp, 2);
  m.record_fault_mode_downgrades("memfd", FaultModeDowngrade::kZeroPage, 0);  // nothing new
  m.record_fault_mode_downgrades("process_vm_readv", FaultModeDowngrade::kCopyWp, 1);
  e = parse_exposition(m.serialize());
  EXPECT_EQ(e.value("memsnap_page_fault_mode_downgrades_total",
                    {{"strategy", "memfd"}, {"mode", "continue_wp"}}),
            3);
  EXPECT_EQ(e.value("memsnap_page_fault_mode_downgrades_total",
                    {{"strategy", "memfd"}, {"mode", "zeropage"}}),
            0);
  EXPECT_EQ(e.value("memsnap_page_fault_mode_downgrades_total",
                    {{"strategy", "process_vm_readv"}, {"mode", "copy_wp"}}),
            1);
}

TEST(HostMetricsTest, FlagsFallbacksApiAndConcurrency) {
  HostMetrics m;
  m.record_flag_evaluation("memory-export-strategy", "memfd", "TARGETING_MATCH");
  m.record_flag_evaluation("memory-export-strategy", "memfd", "targeting_match");
  m.record_flag_evaluation("memory-export-strategy", "", "ERROR");
  m.record_flag_reload(true);
  m.record_flag_reload(false);
  m.record_flag_reload(false);
  m.record_fallback("hole_punch", "process_vm_readv", FallbackCause::kMissingMemfd);
  m.record_fallback("memfd", "process_vm_readv", FallbackCause::kFlagError);
  m.record_fallback("hole_punch", "memfd", FallbackCause::kStrategyFailed);
  m.record_api_request("sandbox_pause", 200);
  m.record_api_request("sandbox_pause", 200);
  m.record_api_request("sandbox_resume", 429);
  m.record_concurrency_rejection(OperationKind::kResume);

  const Exposition e = parse_exposition(m.serialize());
  EXPECT_EQ(e.value("memsnap_flag_evaluations_total", {{"flag", "memory-export-strategy"},
                                                       {"variant", "memfd"},
                                                       {"reason", "targeting_match"}}),
            2);
  EXPECT_EQ(e.value("memsnap_flag_evaluations_total",
                    {{"flag", "memory-export-strategy"}, {"variant", "none"}, {"reason", "error"}}),
            1);
  EXPECT_EQ(e.value("memsnap_flag_reloads_total", {{"result", "success"}}), 1);
  EXPECT_EQ(e.value("memsnap_flag_reloads_total", {{"result", "failure"}}), 2);
  EXPECT_EQ(
      e.value("memsnap_strategy_fallbacks_total",
              {{"from", "hole_punch"}, {"to", "process_vm_readv"}, {"reason", "missing_memfd"}}),
      1);
  EXPECT_EQ(e.value("memsnap_strategy_fallbacks_total",
                    {{"from", "memfd"}, {"to", "process_vm_readv"}, {"reason", "flag_error"}}),
            1);
  EXPECT_EQ(e.value("memsnap_strategy_fallbacks_total",
                    {{"from", "hole_punch"}, {"to", "memfd"}, {"reason", "strategy_failed"}}),
            1);
  EXPECT_EQ(e.value("memsnap_api_requests_total", {{"endpoint", "sandbox_pause"}, {"code", "200"}}),
            2);
  EXPECT_EQ(
      e.value("memsnap_api_requests_total", {{"endpoint", "sandbox_resume"}, {"code", "429"}}), 1);
  EXPECT_EQ(e.value("memsnap_concurrency_limit_rejections_total", {{"kind", "resume"}}), 1);
  EXPECT_EQ(e.value("memsnap_concurrency_limit_rejections_total", {{"kind", "pause"}}), 0);
}

// Free text, paths and odd strings never become label values: they collapse to one series.
TEST(HostMetricsTest, LabelValuesAreBounded) {
  HostMetrics m;
  m.record_api_request("/v1/sandboxes/sb-42/pause", 200);
  m.record_api_request("/v1/sandboxes/sb-43/pause", 200);
  m.record_api_request("sandbox_pause", 1000);
  m.record_flag_evaluation("memory-export-strategy", "memfd",
                           "the flag could not be read: file not found");
  m.record_pause(pause_of("sandbox sb-42 asked for memfd", Outcome::kOk, 0.01));
  m.record_pause(pause_of(std::string(200, 'x'), Outcome::kOk, 0.01));
  m.record_pause(pause_of("", Outcome::kOk, 0.01));
  m.record_plugin_load({"weird", "1.0", 1, false, false, "plugin refused: ABI 7 != 1"});

  const Exposition e = parse_exposition(m.serialize());
  EXPECT_EQ(e.value("memsnap_api_requests_total", {{"endpoint", "other"}, {"code", "200"}}), 2);
  EXPECT_EQ(
      e.value("memsnap_api_requests_total", {{"endpoint", "sandbox_pause"}, {"code", "invalid"}}),
      1);
  EXPECT_EQ(
      e.value("memsnap_flag_evaluations_total",
              {{"flag", "memory-export-strategy"}, {"variant", "memfd"}, {"reason", "other"}}),
      1);
  EXPECT_EQ(
      e.value("memsnap_pause_duration_seconds_count", {{"strategy", "invalid"}, {"outcome", "ok"}}),
      2);
  EXPECT_EQ(
      e.value("memsnap_pause_duration_seconds_count", {{"strategy", "unknown"}, {"outcome", "ok"}}),
      1);
  EXPECT_EQ(e.value("memsnap_plugin_load_failures_total", {{"reason", "other"}}), 1);
  for (const auto& s : e.samples) {
    for (const auto& [k, v] : s.labels) {
      EXPECT_EQ(v.find("sb-4"), std::string::npos) << s.name << " " << k << "=" << v;
    }
  }
}

TEST(HostMetricsTest, NonFiniteAndNegativeValuesAreDropped) {
  HostMetrics m;
  PauseObservation p = pause_of("memfd", Outcome::kOk, std::nan(""));
  p.phases = {{"export", -1}, {"commit", INFINITY}};
  p.cpu_seconds = -2;
  m.record_pause(p);
  m.record_pause(pause_of("memfd", Outcome::kOk, -0.5));
  const Exposition e = parse_exposition(m.serialize());
  EXPECT_EQ(
      e.value("memsnap_pause_duration_seconds_count", {{"strategy", "memfd"}, {"outcome", "ok"}}),
      0);
  EXPECT_EQ(
      e.value("memsnap_pause_duration_seconds_sum", {{"strategy", "memfd"}, {"outcome", "ok"}}), 0);
  EXPECT_EQ(e.value("memsnap_pause_phase_duration_seconds_count",
                    {{"strategy", "memfd"}, {"phase", "export"}}),
            0);
  EXPECT_EQ(e.value("memsnap_pause_cpu_seconds_total", {{"strategy", "memfd"}}), 0);
}

TEST(HostMetricsTest, PluginInfoAndLoadFailures) {
  HostMetrics m;
  m.record_plugin_load({"memfd", "1.0.0", 1, false, true, ""});
  m.record_plugin_load({"hole_punch", "0.9.0", 1, true, true, ""});
  m.record_plugin_load({"old", "0.1.0", 0, false, false, "plugin_abi_mismatch"});
  m.record_plugin_load({"old", "0.1.1", 0, false, false, "plugin_abi_mismatch"});  // replaces
  Exposition e = parse_exposition(m.serialize());
  EXPECT_EQ(e.value("memsnap_plugin_info", {{"name", "memfd"},
                                            {"version", "1.0.0"},
                                            {"abi", "1"},
                                            {"experimental", "false"},
                                            {"status", "loaded"}}),
            1);
  EXPECT_EQ(e.value("memsnap_plugin_info", {{"name", "hole_punch"},
                                            {"version", "0.9.0"},
                                            {"abi", "1"},
                                            {"experimental", "true"},
                                            {"status", "loaded"}}),
            1);
  EXPECT_EQ(e.value("memsnap_plugin_info", {{"name", "old"},
                                            {"version", "0.1.1"},
                                            {"abi", "0"},
                                            {"experimental", "false"},
                                            {"status", "refused"}}),
            1);
  int old_series = 0;
  for (const auto& s : e.samples) {
    if (s.name == "memsnap_plugin_info" && s.labels.at("name") == "old") ++old_series;
  }
  EXPECT_EQ(old_series, 1);
  EXPECT_EQ(e.value("memsnap_plugin_load_failures_total", {{"reason", "plugin_abi_mismatch"}}), 2);
  // A loaded plugin is a strategy: its series exist before its first pause.
  EXPECT_EQ(e.value("memsnap_pause_duration_seconds_count",
                    {{"strategy", "hole_punch"}, {"outcome", "ok"}}),
            0);
  EXPECT_FALSE(
      e.value("memsnap_pause_duration_seconds_count", {{"strategy", "old"}, {"outcome", "ok"}}));

  m.clear_plugins();
  e = parse_exposition(m.serialize());
  for (const auto& s : e.samples) EXPECT_NE(s.name, "memsnap_plugin_info");
}

TEST(HostMetricsTest, SandboxesByState) {
  HostMetricsOptions o;
  o.sandbox_states = {"registered", "running", "paused"};
  HostMetrics m(o);
  m.set_sandboxes_by_state({{"running", 5}, {"paused", 2}, {"zombie", 1}, {"Lost Souls", 2}});
  Exposition e = parse_exposition(m.serialize());
  EXPECT_EQ(e.value("memsnap_sandboxes", {{"state", "registered"}}), 0);
  EXPECT_EQ(e.value("memsnap_sandboxes", {{"state", "running"}}), 5);
  EXPECT_EQ(e.value("memsnap_sandboxes", {{"state", "paused"}}), 2);
  EXPECT_EQ(e.value("memsnap_sandboxes", {{"state", "other"}}), 3);
  m.set_sandboxes_by_state({{"paused", 1}});
  e = parse_exposition(m.serialize());
  EXPECT_EQ(e.value("memsnap_sandboxes", {{"state", "running"}}), 0);
  EXPECT_EQ(e.value("memsnap_sandboxes", {{"state", "paused"}}), 1);
  EXPECT_EQ(e.value("memsnap_sandboxes", {{"state", "other"}}), 0);
}

TEST(HostMetricsTest, WarmMemoryIsSetPerStrategyAndZeroWhereNoneIsHeld) {
  HostMetricsOptions o;
  o.strategies = {"process_vm_readv", "memfd", "hole_punch"};
  HostMetrics m(o);
  Exposition e = parse_exposition(m.serialize());
  EXPECT_EQ(e.value("memsnap_warm_memory_bytes", {{"strategy", "memfd"}}), 0);
  m.set_warm_memory_bytes({{"memfd", 3ULL << 30}, {"new_strategy", 4096}});
  e = parse_exposition(m.serialize());
  EXPECT_EQ(e.value("memsnap_warm_memory_bytes", {{"strategy", "memfd"}}), 3.0 * (1ULL << 30));
  EXPECT_EQ(e.value("memsnap_warm_memory_bytes", {{"strategy", "new_strategy"}}), 4096);
  EXPECT_EQ(e.value("memsnap_warm_memory_bytes", {{"strategy", "hole_punch"}}), 0);
  // Set, not added: the next call replaces every value, and a strategy no longer named is 0.
  m.set_warm_memory_bytes({{"memfd", 1024}});
  e = parse_exposition(m.serialize());
  EXPECT_EQ(e.value("memsnap_warm_memory_bytes", {{"strategy", "memfd"}}), 1024);
  EXPECT_EQ(e.value("memsnap_warm_memory_bytes", {{"strategy", "new_strategy"}}), 0);
}

TEST(HostMetricsTest, InFlightFollowsTheGuardsLifetime) {
  HostMetrics m;
  auto in_flight = [&](const char* kind) {
    return *parse_exposition(m.serialize()).value("memsnap_operations_in_flight", {{"kind", kind}});
  };
  {
    InFlight a = m.track_in_flight(OperationKind::kPause);
    InFlight b = m.track_in_flight(OperationKind::kPause);
    const InFlight c = m.track_in_flight(OperationKind::kResume);
    EXPECT_EQ(in_flight("pause"), 2);
    EXPECT_EQ(in_flight("resume"), 1);
    InFlight moved = std::move(a);
    EXPECT_EQ(in_flight("pause"), 2);
    b = std::move(moved);  // b's own count ends here
    EXPECT_EQ(in_flight("pause"), 1);
  }
  EXPECT_EQ(in_flight("pause"), 0);
  EXPECT_EQ(in_flight("resume"), 0);
}

TEST(HostMetricsTest, ConcurrentRecordingLosesNothing) {
  HostMetrics m;
  constexpr int kThreads = 4;
  constexpr int kEach = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&m, t] {
      const std::string strategy = t % 2 ? "memfd" : "process_vm_readv";
      for (int i = 0; i < kEach; ++i) {
        m.observe_fault_latency(strategy, 1e-5);
        if (i % 100 == 0) m.record_pause(pause_of(strategy, Outcome::kOk, 0.01));
        if (i % 10 == 0) m.record_handover(strategy, PauseMode::kHandover, 0.001);
      }
    });
  }
  for (auto& th : threads) th.join();
  const Exposition e = parse_exposition(m.serialize());
  for (const char* s : {"memfd", "process_vm_readv"}) {
    EXPECT_EQ(e.value("memsnap_page_faults_total", {{"strategy", s}}), 2 * kEach);
    EXPECT_EQ(e.value("memsnap_page_fault_service_duration_seconds_count", {{"strategy", s}}),
              2 * kEach);
    EXPECT_EQ(e.value("memsnap_pause_duration_seconds_count", {{"strategy", s}, {"outcome", "ok"}}),
              2 * kEach / 100);
    EXPECT_EQ(
        e.value("memsnap_pause_handover_seconds_count", {{"strategy", s}, {"mode", "handover"}}),
        2 * kEach / 10);
  }
}

// ---- The catalogue against the registry and the naming rules --------------------------------

TEST(CatalogueTest, SortedUniqueAndEqualToTheRegistrysFamilies) {
  const auto& c = catalogue();
  ASSERT_FALSE(c.empty());
  for (std::size_t i = 1; i < c.size(); ++i) {
    EXPECT_LT(c[i - 1].name, c[i].name) << "the catalogue must be sorted by name, no duplicates";
  }
  HostMetrics m;
  exercise_everything(m);
  std::set<std::string> registered;
  for (const auto& f : m.registry()->Collect()) registered.insert(f.name);
  std::set<std::string> catalogued;
  for (const auto& info : c) catalogued.insert(info.name);
  EXPECT_EQ(registered, catalogued);
}

TEST(CatalogueTest, TypesHelpAndLabelsMatchTheExposition) {
  HostMetrics m;
  exercise_everything(m);
  const Exposition e = parse_exposition(m.serialize());
  for (const MetricInfo& info : catalogue()) {
    SCOPED_TRACE(info.name);
    ASSERT_TRUE(e.type.count(info.name));
    EXPECT_EQ(e.type.at(info.name), metric_type_name(info.type));
    EXPECT_EQ(e.help.at(info.name), info.help);
    std::set<std::string> expected(info.labels.begin(), info.labels.end());
    int series = 0;
    for (const auto& s : e.samples) {
      const bool mine =
          s.name == info.name || (info.type == MetricType::kHistogram &&
                                  (s.name == info.name + "_bucket" ||
                                   s.name == info.name + "_sum" || s.name == info.name + "_count"));
      if (!mine) continue;
      ++series;
      std::set<std::string> names;
      for (const auto& [k, v] : s.labels) {
        if (k != "le") names.insert(k);
        EXPECT_FALSE(v.empty()) << k;
      }
      EXPECT_EQ(names, expected) << s.name;
    }
    EXPECT_GT(series, 0);
    if (info.type == MetricType::kHistogram) {
      EXPECT_TRUE(std::is_sorted(info.buckets.begin(), info.buckets.end()));
      EXPECT_FALSE(info.buckets.empty());
    } else {
      EXPECT_TRUE(info.buckets.empty());
    }
  }
}

TEST(CatalogueTest, NamingRules) {
  const std::set<std::string> forbidden_labels = {"sandbox", "sandbox_id", "id",  "sandbox_name",
                                                  "vm",      "vm_id",      "pid", "snapshot_id"};
  for (const MetricInfo& info : catalogue()) {
    SCOPED_TRACE(info.name);
    EXPECT_TRUE(prometheus::CheckMetricName(info.name));
    EXPECT_EQ(info.name.rfind("memsnap_", 0), 0u);
    EXPECT_FALSE(info.help.empty());
    EXPECT_EQ(info.help.back(), '.') << "help is a sentence";
    const bool total = info.name.ends_with("_total");
    EXPECT_EQ(total, info.type == MetricType::kCounter) << "_total on counters, and only there";
    const std::string base = total ? info.name.substr(0, info.name.size() - 6) : info.name;
    if (info.unit.empty()) {
      EXPECT_FALSE(base.ends_with("_seconds") || base.ends_with("_bytes"));
    } else {
      EXPECT_TRUE(info.unit == "seconds" || info.unit == "bytes") << info.unit;
      EXPECT_TRUE(base.ends_with("_" + info.unit)) << "the unit ends the name (before _total)";
    }
    if (info.type == MetricType::kHistogram) {
      EXPECT_EQ(info.unit, "seconds");
    }
    for (const char* non_base : {"millis", "micros", "nanos", "_ms", "_us", "kib", "mib", "kb_"}) {
      EXPECT_EQ(info.name.find(non_base), std::string::npos) << non_base;
    }
    for (const std::string& label : info.labels) {
      EXPECT_TRUE(prometheus::CheckLabelName(label)) << label;
      EXPECT_FALSE(forbidden_labels.count(label)) << "no per-sandbox label: " << label;
    }
  }
}

// After real use, no series anywhere carries a per-sandbox label.
TEST(CatalogueTest, NoSandboxIdLabelInTheExposition) {
  HostMetrics m;
  exercise_everything(m);
  for (const auto& s : parse_exposition(m.serialize()).samples) {
    for (const char* forbidden : {"sandbox", "sandbox_id", "id"}) {
      EXPECT_FALSE(s.labels.count(forbidden)) << s.name;
    }
  }
}

TEST(CatalogueTest, BucketsSpanWhatTheIssueAsksFor) {
  EXPECT_DOUBLE_EQ(operation_duration_buckets().front(), 0.001);
  EXPECT_DOUBLE_EQ(operation_duration_buckets().back(), 60);
  EXPECT_DOUBLE_EQ(fault_latency_buckets().front(), 1e-6);
  EXPECT_DOUBLE_EQ(fault_latency_buckets().back(), 1e-2);
  EXPECT_LE(phase_duration_buckets().front(), 0.001);
  EXPECT_DOUBLE_EQ(phase_duration_buckets().back(), 60);
}

// promtool's linter is the reference for the naming conventions (units, _total, help).
TEST(PromtoolTest, ExpositionPassesCheckMetrics) {
  const std::string promtool = testing::find_promtool();
  if (promtool.empty()) GTEST_SKIP() << "promtool not installed (Debian package prometheus)";
  HostMetricsOptions o;
  o.strategies = {"memfd", "process_vm_readv", "hole_punch"};
  HostMetrics m(o);
  exercise_everything(m);
  char path[] = "/tmp/memsnap-metrics-XXXXXX";
  const int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ::close(fd);
  { std::ofstream(path) << m.serialize(); }
  const auto r = testing::run_command({promtool, "check", "metrics"}, path);
  ::unlink(path);
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

}  // namespace
}  // namespace memsnap::metrics
