// memsnap experiment run: an A/B(/C) latency experiment on one host. Starts memsnapd (or uses a
// running one), launches N stand-in sandboxes, assigns each to a strategy (or, --split
// pause-mode, to a pause mode with the strategy fixed) through a flag file with the arms'
// weights (the real selection path: memsnapd evaluates the flag), and runs K
// pause/resume cycles per sandbox, interleaved in a fresh random order every cycle so that
// machine noise hits every arm alike. Every operation is recorded in a JSON results file, the
// input of `memsnap experiment report`. Each pause records both of its moments: the answer
// (handover_seconds, and the client's wall time) and durable (a handover pause is waited for,
// wait_while=exporting, before its sandbox is resumed).
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "core/vmm_process.h"
#include "tools/fleet/fleet.h"
#include "tools/memsnap/checks.h"
#include "tools/memsnap/cli.h"
#include "tools/memsnap/progress.h"

namespace memsnap::cli {
namespace {

using nlohmann::json;

// Resident memory (VmRSS) of a process.
std::uint64_t rss_of(pid_t pid) { return proc_kb_fields(pid, "status", {"VmRSS"}); }

// Samples host memory while a pause runs: memsnapd's RSS plus the sandbox VMM's (which counts its
// guest memory, shmem included, as long as it is mapped and not released). Keeps the peak.
class PeakSampler {
 public:
  PeakSampler(pid_t daemon, pid_t vmm) : daemon_(daemon), vmm_(vmm) {
    thread_ = std::thread([this] {
      while (!stop_) {
        peak_ = std::max<std::uint64_t>(peak_, rss_of(daemon_) + rss_of(vmm_));
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
    });
  }
  std::uint64_t finish() {
    stop_ = true;
    thread_.join();
    return peak_;
  }
  ~PeakSampler() {
    if (thread_.joinable()) finish();
  }

 private:
  pid_t daemon_, vmm_;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> peak_{0};
  std::thread thread_;
};

// "process_vm_readv=1,memfd=1,hole_punch=1"
std::vector<std::pair<std::string, int>> parse_weights(const std::string& text) {
  std::vector<std::pair<std::string, int>> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    const auto eq = item.find('=');
    if (eq == std::string::npos) throw std::invalid_argument("--arms: NAME=WEIGHT, got " + item);
    const int w = static_cast<int>(parse_integer("--arms weight of " + item.substr(0, eq),
                                                 item.substr(eq + 1), 0, 1000000));
    out.emplace_back(item.substr(0, eq), w);
  }
  if (out.empty()) throw std::invalid_argument("--arms is empty");
  return out;
}

// The flag that splits the sandboxes across the arms (flagd "fractional", bucketed by flag key +
// sandbox id). Split on the strategy: memory-export-strategy, every pause in copy mode (the
// default). Split on the pause mode: pause-mode, with memory-export-strategy fixed to one
// strategy for everyone (a flag without targeting: reason STATIC, still memsnapd's choice).
std::string split_flag(const std::string& key, const std::vector<std::pair<std::string, int>>& arms,
                       const std::string& fixed_strategy) {
  std::string variants, fractional;
  for (const auto& [name, w] : arms) {
    variants += "      " + name + ": " + name + "\n";
    fractional += "        - [" + name + ", " + std::to_string(w) + "]\n";
  }
  std::string text = "# written by memsnap experiment run\nflags:\n  " + key +
                     ":\n    state: ENABLED\n    variants:\n" + variants +
                     "    defaultVariant: " + arms.front().first +
                     "\n    targeting:\n      fractional:\n" + fractional;
  if (!fixed_strategy.empty()) {
    text += "  memory-export-strategy:\n    state: ENABLED\n    variants:\n      " +
            fixed_strategy + ": " + fixed_strategy + "\n    defaultVariant: " + fixed_strategy +
            "\n";
  }
  return text;
}

// "exp-1-3, cycle 2 of 4, 22% done, eta 40 s" for the status line.
std::string operation_text(const std::string& sandbox, int cycle, int cycles, std::size_t done,
                           std::size_t total, double elapsed) {
  std::string text = sandbox + ", cycle " + std::to_string(cycle) + " of " +
                     std::to_string(cycles) + ", " + std::to_string(done * 100 / total) + "% done";
  if (done > 0) {
    const double eta = elapsed / static_cast<double>(done) * static_cast<double>(total - done);
    text += ", eta " + std::to_string(static_cast<long>(eta)) + " s";
  }
  return text;
}

}  // namespace

int cmd_experiment_run(Args& args) {
  const int sandboxes = std::stoi(args.value("--sandboxes", "6"));
  const int cycles = std::stoi(args.value("--cycles", "4"));
  const std::uint64_t size = parse_size(args.value("--size", "64M"));
  const std::string backing = args.value("--backing", "memfd");
  const double dirty = parse_fraction("--dirty", args.value("--dirty", "0.1"));
  const bool sequential = args.value("--pattern", "random") == "sequential";
  const bool thp = args.flag("--thp");
  // What the arms are: export strategies (memory-export-strategy) or pause modes (pause-mode,
  // with one strategy for all, --strategy).
  const std::string split = args.value("--split", "strategy");
  const bool mode_split = split == "pause-mode";
  const std::string strategy = args.value("--strategy", mode_split ? "memfd" : "");
  const auto arms = parse_weights(args.value(
      "--arms", mode_split ? "copy=1,handover=1" : "process_vm_readv=1,memfd=1,hole_punch=1"));
  const std::string out_path = args.value("--out", "experiment-results.json");
  const std::uint64_t seed = std::stoull(args.value("--seed", "1"));
  const std::string keep = args.value("--keep");
  // A fixed metrics port, for a Prometheus that is already configured to scrape it.
  const int metrics_port = std::stoi(args.value("--metrics-port", "0"));
  args.expect_done();
  if (metrics_port < 0 || metrics_port > 65535) throw std::invalid_argument("--metrics-port");
  if (sandboxes < 1 || cycles < 1) throw std::invalid_argument("--sandboxes and --cycles >= 1");
  if (backing != "memfd" && backing != "anon") throw std::invalid_argument("--backing memfd|anon");
  if (split != "strategy" && !mode_split) throw std::invalid_argument("--split strategy|pause-mode");
  if (!mode_split && !strategy.empty()) {
    throw std::invalid_argument("--strategy fixes the strategy of a --split pause-mode run");
  }
  for (const auto& [name, w] : arms) {
    if (mode_split && name != "copy" && name != "handover" && name != "live") {
      throw std::invalid_argument("--arms of --split pause-mode are pause modes (copy, handover, "
                                  "live), not " + name);
    }
  }
  // Before the run, not after minutes of it.
  if (const std::string why = output_path_problem(out_path); !why.empty()) {
    throw std::invalid_argument("--out: " + why + " (nothing was run)");
  }

  const std::string dir = work_dir(keep, "memsnap-experiment");
  if (dir.empty()) return 1;
  const std::string flags_file = dir + "/flags.yaml";
  const std::string flag_key = mode_split ? "pause-mode" : "memory-export-strategy";
  if (!write_output_file(flags_file, split_flag(flag_key, arms, strategy))) return 1;
  fleet::DaemonOptions dopt;
  dopt.dir = dir;
  dopt.flags_file = flags_file;
  dopt.metrics_port = static_cast<std::uint16_t>(metrics_port);
  auto daemon = fleet::Daemon::start(dopt);
  if (!daemon.ok()) {
    std::fprintf(stderr, "memsnap experiment: %s\n", daemon.error().to_string().c_str());
    return 1;
  }
  fleet::Daemon& d = **daemon;
  if (metrics_port != 0) {
    // A scraper set up for this port sees every series at 0 before the first operation, so that
    // rate() and increase() over the run count all of it.
    std::this_thread::sleep_for(std::chrono::seconds(5));
  }
  std::fprintf(stderr, "memsnapd pid %d, metrics at %s; %d sandboxes x %d cycles, %s %s each%s\n",
               d.pid(), d.metrics_url().c_str(), sandboxes, cycles,
               format_bytes(static_cast<double>(size)).c_str(), backing.c_str(),
               mode_split ? (", split on pause-mode, strategy " + strategy).c_str() : "");

  std::vector<std::unique_ptr<fleet::Sandbox>> fleet_;
  for (int i = 1; i <= sandboxes; ++i) {
    fleet::SandboxSpec spec;
    spec.id = "exp-" + std::to_string(seed) + "-" + std::to_string(i);
    spec.size = size;
    spec.backing = backing;
    spec.seed = seed * 1000 + static_cast<std::uint64_t>(i);
    spec.thp = thp;
    auto sb = fleet::Sandbox::launch(d, spec);
    if (!sb.ok()) {
      std::fprintf(stderr, "memsnap experiment: %s\n", sb.error().to_string().c_str());
      return 1;
    }
    fleet_.push_back(std::move(*sb));
  }

  json operations = json::array();
  std::mt19937_64 rng(seed);
  const auto started = std::chrono::steady_clock::now();
  const std::size_t total = static_cast<std::size_t>(sandboxes) * static_cast<std::size_t>(cycles);
  std::size_t done = 0;
  const auto status = StatusLine::on_stderr(false);
  int failures = 0;
  std::vector<std::size_t> order(fleet_.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  for (int cycle = 1; cycle <= cycles; ++cycle) {
    std::shuffle(order.begin(), order.end(), rng);
    for (const std::size_t i : order) {
      fleet::Sandbox& sb = *fleet_[i];
      status->update(
          "experiment run", done + 1, total,
          operation_text(
              sb.spec().id, cycle, cycles, done, total,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count()));
      json op = {{"cycle", cycle},
                 {"sandbox", sb.spec().id},
                 {"guest_huge_bytes", huge_page_bytes(sb.vmm()->pid())}};
      PeakSampler sampler(d.pid(), sb.vmm()->pid());
      // Until durable (a handover pause's VMM is gone after its answer; the exporter process
      // that writes the snapshot afterwards is not counted).
      auto paused = sb.pause_until_durable();
      op["peak_memory_bytes"] = sampler.finish();
      if (!paused.ok()) {
        op["error"] = paused.error().to_string();
        ++failures;
      } else {
        const json& p = paused->answer;
        const json& durable = paused->durable;
        const json& report = durable.contains("report") ? durable["report"] : json();
        auto pick = [&](const char* key) {
          if (durable.contains(key) && !durable[key].is_null()) return durable[key];
          return report.is_object() && report.contains(key) ? report[key] : json();
        };
        op["strategy"] = p["strategy"];
        op["variant"] = p["variant"];
        op["reason"] = p["reason"];
        op["fallback"] = p["fallback"];
        op["mode"] = paused->mode;
        op["requested_mode"] = p.value("requested_mode", "copy");
        op["mode_source"] = p.value("mode_source", "default");
        op["mode_fallback"] = p.contains("mode_fallback") ? p["mode_fallback"] : json();
        // The pause-mode flag's variant (the arm of a pause-mode split), null without it.
        op["mode_variant"] =
            op["mode_source"] == "flag" ? op["requested_mode"] : json(nullptr);
        op["pause_seconds"] = p["seconds"];
        op["answer_seconds"] = paused->answer_seconds;
        op["answer_wall_seconds"] = paused->answer_wall_seconds;
        op["durable_seconds"] = paused->durable_seconds;
        op["export_cpu_seconds"] = paused->export_cpu_seconds;
        op["pause_phases"] = pick("phases");
        op["bytes"] = pick("bytes");
        op["cpu_seconds"] = pick("cpu_seconds");
        op["released_bytes"] = pick("memory_released");
        op["guest_memory_bytes"] = size;
        // What the host keeps holding for the paused sandbox (its VMM is gone by now): a memfd
        // kept for a warm resume, or nothing.
        if (auto state = d.call("GET", "/v1/sandboxes/" + sb.spec().id);
            state.ok() && state->ok() && state->body.contains("warm_memory_bytes")) {
          op["held_memory_bytes"] = state->body["warm_memory_bytes"];
        }
        auto resumed = sb.resume();
        if (!resumed.ok()) {
          op["error"] = resumed.error().to_string();
          ++failures;
        } else {
          op["resume_seconds"] = (*resumed)["ready_seconds"];
          op["resume_phases"] = (*resumed)["phases"];
          op["resume_mode"] = (*resumed)["mode"];
          auto bad = sb.verify();
          op["mismatches"] = bad.ok() ? *bad : 1;
          if (!bad.ok() || *bad) ++failures;
          if (Status s = sb.dirty(dirty, seed * 7919 + static_cast<std::uint64_t>(cycle),
                                  sequential);
              !s.ok()) {
            op["error"] = s.error().to_string();
            ++failures;
          }
        }
      }
      operations.push_back(op);
      ++done;
    }
  }
  status->finish();
  json weights = json::object();
  for (const auto& [name, w] : arms) weights[name] = w;
  json results = {{"experiment",
                   {{"sandboxes", sandboxes},
                    {"cycles", cycles},
                    {"guest_bytes", size},
                    {"backing", backing},
                    {"dirty_fraction", dirty},
                    {"pattern", sequential ? "sequential" : "random"},
                    {"thp", thp},
                    {"thp_enabled", thp_setting("enabled")},
                    {"thp_shmem_enabled", thp_setting("shmem_enabled")},
                    {"seed", seed},
                    {"weights", weights},
                    {"flag", flag_key},
                    {"split", mode_split ? "pause-mode" : "strategy"},
                    {"strategy", mode_split ? json(strategy) : json(nullptr)},
                    {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                              started)
                                    .count()}}},
                  {"operations", operations},
                  {"failures", failures}};
  const bool written = write_output_file(out_path, results.dump(1) + "\n");
  if (written) {
    std::fprintf(stderr, "%zu operations (%d failed) written to %s\n", operations.size(), failures,
                 out_path.c_str());
  }
  if (metrics_port != 0) {
    // A scraper set up for this port takes its last samples before memsnapd goes.
    std::this_thread::sleep_for(std::chrono::seconds(5));
  }
  fleet_.clear();
  d.stop(SIGTERM, std::chrono::seconds(30));
  if (keep.empty()) std::filesystem::remove_all(dir);
  return failures > 0 || !written ? 1 : 0;
}

}  // namespace memsnap::cli
