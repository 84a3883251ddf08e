// memsnap demo: the README's main job. Starts memsnapd on built-in defaults (only its paths and
// metrics port are set) with an A/B/C flag file that splits sandboxes across the export
// strategies, launches a few stand-in VMMs, registers them, and pauses and resumes each of them
// a few times through the control API, exactly as an orchestrator would. The same flag file splits
// them across the pause modes (copy: answered once the snapshot is durable; handover: answered
// once the VMM is stopped and memsnapd holds its memory, the export running in the background):
// every pause prints both of its moments, answered and durable, and a handover pause is waited
// for until durable before the sandbox is resumed. Every resume is checked page by page. It
// prints where the metrics are while it runs and a per-strategy and mode comparison at the end.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>

#include "tools/fleet/fleet.h"
#include "tools/memsnap/checks.h"
#include "tools/memsnap/cli.h"

namespace memsnap::cli {
namespace {

// An even three-way split, bucketed by sandbox id (flagd's fractional): the same flag an operator
// would roll out for an A/B/C latency experiment (docs/experiments/strategy-ab-flag.yaml). And an
// even split across the pause modes, bucketed independently (flag key + sandbox id): of the
// default six sandboxes sb-1..sb-6, memfd gets sb-3 and sb-6 in copy and sb-5 in handover,
// hole_punch sb-1 and sb-4 in handover, process_vm_readv sb-2 in copy (a process_vm_readv
// sandbox drawn for handover would run in copy, with its mode_fallback counted).
constexpr const char* kSplitFlag = R"(# written by memsnap demo: an even split across the strategies,
# and another across the pause modes
flags:
  memory-export-strategy:
    state: ENABLED
    variants:
      process_vm_readv: process_vm_readv
      memfd: memfd
      hole_punch: hole_punch
    defaultVariant: process_vm_readv
    targeting:
      fractional:
        - [process_vm_readv, 1]
        - [memfd, 1]
        - [hole_punch, 1]
  pause-mode:
    state: ENABLED
    variants:
      copy: copy
      handover: handover
    defaultVariant: copy
    targeting:
      fractional:
        - [copy, 1]
        - [handover, 1]
)";

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

// One row of the final table: a strategy and the pause mode that ran.
struct PerStrategy {
  int sandboxes = 0;
  std::vector<double> resume_ms, base_answer_ms, base_durable_ms, diff_answer_ms, diff_durable_ms;
  std::uint64_t bytes = 0, released = 0, mismatches = 0, fallbacks = 0;
  std::map<std::string, int> modes;
};

struct DemoTotals {
  std::map<std::pair<std::string, std::string>, PerStrategy> by;  // (strategy, pause mode)
  nlohmann::json operations = nlohmann::json::array();
  int failures = 0;
};

// Where the running memsnapd can be reached, said to hold only while the demo runs (it stops
// memsnapd at the end, and removes the directory unless --keep): on stdout, or on stderr when
// stdout carries the JSON.
void print_banner(fleet::Daemon& d, const std::string& dir, bool temporary,
                  const std::string& flags_file, bool flags_given, bool json_out) {
  std::FILE* out = json_out ? stderr : stdout;
  std::fprintf(out,
               "memsnapd (pid %d) runs on built-in defaults until the demo ends (then the demo "
               "stops it); while it runs:\n",
               d.pid());
  std::fprintf(out, "  control API  curl --unix-socket %s http://memsnapd/v1/sandboxes\n",
               d.socket().c_str());
  std::fprintf(out, "  metrics      curl %s\n", d.metrics_url().c_str());
  std::fprintf(out, "  flags        %s%s\n", flags_file.c_str(),
               flags_given ? "" : " (even splits across the strategies and the pause modes)");
  std::fprintf(out, "  log          %s\n", d.log_path().c_str());
  std::fprintf(out, "  files in     %s (%s)\n\n", dir.c_str(),
               temporary ? "removed when the demo ends; --keep DIR keeps them" : "kept");
  std::fflush(out);
}

// One pause, resume, verify and dirty of sb in round `round`, added to totals.
void demo_operation(fleet::Sandbox& sb, int round, int rounds, double dirty, bool json_out,
                    DemoTotals& t) {
  const std::string& id = sb.spec().id;
  // A handover pause is waited for until durable: the resume would wait for it anyway.
  auto moments = sb.pause_until_durable();
  if (!moments.ok()) {
    std::fprintf(stderr, "  %s: %s\n", id.c_str(), moments.error().to_string().c_str());
    ++t.failures;
    return;
  }
  const nlohmann::json& paused = moments->durable;  // bytes, memory_released: once durable
  const std::string strategy = moments->answer["strategy"];
  const std::string pause_mode = moments->mode;
  PerStrategy& s = t.by[{strategy, pause_mode}];
  if (round == 1) ++s.sandboxes;
  const double answer_ms = moments->answer_seconds * 1e3;
  const double durable_ms = moments->durable_seconds * 1e3;
  (round == 1 ? s.base_answer_ms : s.diff_answer_ms).push_back(answer_ms);
  (round == 1 ? s.base_durable_ms : s.diff_durable_ms).push_back(durable_ms);
  const std::uint64_t bytes = paused.value("bytes", std::uint64_t{0});
  s.bytes += bytes;
  s.released += paused.contains("report") && paused["report"].is_object()
                    ? paused["report"].value("memory_released", std::uint64_t{0})
                    : paused.value("memory_released", std::uint64_t{0});
  if (!moments->answer["fallback"].is_null()) ++s.fallbacks;
  if (!moments->answer.value("mode_fallback", nlohmann::json()).is_null()) ++s.fallbacks;
  auto resumed = sb.resume();
  if (!resumed.ok()) {
    std::fprintf(stderr, "  %s: %s\n", id.c_str(), resumed.error().to_string().c_str());
    ++t.failures;
    return;
  }
  const double resume_ms = (*resumed)["ready_seconds"].get<double>() * 1e3;
  s.resume_ms.push_back(resume_ms);
  ++s.modes[(*resumed)["mode"].get<std::string>()];
  auto bad = sb.verify();
  const std::uint64_t mismatches = bad.ok() ? *bad : 1;
  s.mismatches += mismatches;
  if (mismatches) ++t.failures;
  if (Status st = sb.dirty(dirty, static_cast<std::uint64_t>(round)); !st.ok()) ++t.failures;
  t.operations.push_back({{"round", round},
                          {"sandbox", id},
                          {"strategy", strategy},
                          {"variant", moments->answer["variant"]},
                          {"pause_mode", pause_mode},
                          {"mode_fallback", moments->answer.value("mode_fallback", nlohmann::json())},
                          {"answer_ms", answer_ms},
                          {"durable_ms", durable_ms},
                          {"bytes", bytes},
                          {"resume_ms", resume_ms},
                          {"mode", (*resumed)["mode"]},
                          {"mismatches", mismatches}});
  if (!json_out) {
    std::printf(
        "  round %d/%d %-6s %-17s %-8s answered %7.1f ms, durable %7.1f ms (%s)  resume %6.2f ms "
        "(%s)  %s\n",
        round, rounds, id.c_str(), strategy.c_str(), pause_mode.c_str(), answer_ms, durable_ms,
        format_bytes(static_cast<double>(bytes)).c_str(), resume_ms,
        (*resumed)["mode"].get<std::string>().c_str(), mismatches ? "PAGES LOST" : "verified");
    std::fflush(stdout);
  }
}

void print_summary(const DemoTotals& t, fleet::Daemon& d) {
  std::printf(
      "\nper strategy and pause mode (medians; answered = from the request to memsnapd's answer: "
      "copy after freeze + export + commit with fsync, handover once the VMM is stopped and its "
      "memory held; durable = from the request to the committed snapshot; resume = handshake to "
      "VMM runnable):\n");
  std::printf("%-17s %-8s %9s %21s %21s %10s %-11s %12s %12s %9s %5s\n", "strategy", "mode",
              "sandboxes", "base answered/durable", "diff answered/durable", "resume ms",
              "resume mode", "exported", "released", "fallbacks", "lost");
  for (const auto& [key, s] : t.by) {
    std::string modes;
    for (const auto& [m, n] : s.modes) modes += (modes.empty() ? "" : ",") + m;
    char base[64], diff[64];
    std::snprintf(base, sizeof base, "%.1f/%.1f ms", median(s.base_answer_ms),
                  median(s.base_durable_ms));
    std::snprintf(diff, sizeof diff, "%.1f/%.1f ms", median(s.diff_answer_ms),
                  median(s.diff_durable_ms));
    std::printf("%-17s %-8s %9d %21s %21s %10.2f %-11s %12s %12s %9llu %5llu\n",
                key.first.c_str(), key.second.c_str(), s.sandboxes, base, diff,
                median(s.resume_ms), modes.c_str(),
                format_bytes(static_cast<double>(s.bytes)).c_str(),
                format_bytes(static_cast<double>(s.released)).c_str(),
                static_cast<unsigned long long>(s.fallbacks),
                static_cast<unsigned long long>(s.mismatches));
  }
  std::printf("\nthe same numbers from memsnapd's metrics (%s, read before it stops):\n",
              d.metrics_url().c_str());
  if (auto scraped = d.scrape(); scraped.ok()) {
    std::istringstream in(*scraped);
    std::string line;
    while (std::getline(in, line)) {
      // The two moments' histograms are declared for every strategy and mode: only those seen.
      const bool moment = line.rfind("memsnap_pause_handover_seconds_count", 0) == 0 ||
                          line.rfind("memsnap_pause_durable_seconds_count", 0) == 0;
      const bool wanted = line.rfind("memsnap_pause_duration_seconds_count", 0) == 0 ||
                          line.rfind("memsnap_resume_duration_seconds_count", 0) == 0 ||
                          line.rfind("memsnap_pause_released_bytes_total", 0) == 0 ||
                          (moment && line.substr(line.size() - 2) != " 0");
      if (wanted && line.find("outcome=\"aborted\"") == std::string::npos &&
          line.find("outcome=\"error\"") == std::string::npos) {
        std::printf("  %s\n", line.c_str());
      }
    }
  }
  std::printf("\n%s\n", t.failures ? "SOME OPERATIONS FAILED (see above and the log)"
                                   : "every resumed sandbox held exactly what it had when paused");
}

// memsnapd is stopped: says what remains. A temporary directory is removed, unless something
// failed (its log is then the only account of what happened, so it is kept and named).
int finish_demo(const std::string& dir, bool temporary, bool failed, bool json_out) {
  std::FILE* out = json_out ? stderr : stdout;
  if (temporary && !failed) {
    std::filesystem::remove_all(dir);
    std::fprintf(out, "memsnapd stopped; removed %s\n", dir.c_str());
  } else {
    std::fprintf(out, "memsnapd stopped; its log, flag file and snapshots are kept in %s%s\n",
                 dir.c_str(), temporary ? " (because something failed)" : "");
  }
  return failed ? 1 : 0;
}

}  // namespace

int cmd_demo(Args& args) {
  const int count = std::stoi(args.value("--sandboxes", "6"));
  const int rounds = std::stoi(args.value("--rounds", "3"));
  const std::uint64_t size = parse_size(args.value("--size", "64M"));
  const double dirty = parse_fraction("--dirty", args.value("--dirty", "0.1"));
  const std::string flags_given = args.value("--flags");
  const std::string keep = args.value("--keep");
  const bool json_out = args.flag("--json");
  args.expect_done();
  if (count < 1 || rounds < 1) throw std::invalid_argument("--sandboxes and --rounds must be >= 1");

  const std::string dir = work_dir(keep, "memsnap-demo");
  if (dir.empty()) return 1;
  std::string flags_file = flags_given;
  if (flags_file.empty()) {
    flags_file = dir + "/flags.yaml";
    if (!write_output_file(flags_file, kSplitFlag)) return 1;
  }
  fleet::DaemonOptions dopt;
  dopt.dir = dir;
  dopt.flags_file = flags_file;
  auto daemon = fleet::Daemon::start(dopt);
  if (!daemon.ok()) {
    std::fprintf(stderr, "memsnap demo: %s\n", daemon.error().to_string().c_str());
    return 1;
  }
  fleet::Daemon& d = **daemon;
  print_banner(d, dir, keep.empty(), flags_file, !flags_given.empty(), json_out);

  DemoTotals totals;
  std::vector<std::unique_ptr<fleet::Sandbox>> fleet_;
  for (int i = 1; i <= count && totals.failures == 0; ++i) {
    fleet::SandboxSpec spec;
    spec.id = "sb-" + std::to_string(i);
    spec.size = size;
    spec.backing = "memfd";
    spec.seed = static_cast<std::uint64_t>(i);
    spec.attributes = {{"team", i % 2 ? "web" : "batch"}};
    auto sb = fleet::Sandbox::launch(d, spec);
    if (!sb.ok()) {
      std::fprintf(stderr, "memsnap demo: %s\n", sb.error().to_string().c_str());
      ++totals.failures;
      continue;
    }
    fleet_.push_back(std::move(*sb));
  }
  if (totals.failures == 0) {
    if (!json_out) {
      std::printf("launched %d stand-in VMMs of %s each and registered them\n", count,
                  format_bytes(static_cast<double>(size)).c_str());
    }
    for (int round = 1; round <= rounds; ++round) {
      for (auto& sb : fleet_) demo_operation(*sb, round, rounds, dirty, json_out, totals);
    }
  }
  if (json_out) {
    std::printf("%s\n", nlohmann::json{{"metrics_url", d.metrics_url()},
                                       {"operations", totals.operations},
                                       {"failures", totals.failures}}
                            .dump(2)
                            .c_str());
  } else if (!fleet_.empty()) {
    print_summary(totals, d);
  }
  fleet_.clear();
  const int stopped = d.stop(SIGTERM, std::chrono::seconds(30));
  if (stopped != 0) std::fprintf(stderr, "memsnap demo: memsnapd exited with %d\n", stopped);
  return finish_demo(dir, keep.empty(), totals.failures > 0 || stopped != 0, json_out);
}

}  // namespace memsnap::cli
