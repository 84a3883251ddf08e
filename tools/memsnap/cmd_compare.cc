// memsnap compare: the default job. For each loaded strategy it runs one sandbox cycle (see
// tools/cycle/cycle.h): a fresh stand-in VMM is paused into a base snapshot, killed, resumed
// from it through the UFFD handshake and checked page by page; a share of its pages is dirtied,
// paused into a diff, the VMM killed, resumed from the chain and checked again. One row per
// strategy shows pause and resume side by side, next to the single-copy reference (write() +
// fsync of a resident buffer of the same size into the same directory).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <sstream>
#include <stdexcept>

#include "core/snapshot/snapshot_chain.h"
#include "core/vmm_process.h"
#include "tools/cycle/cycle.h"
#include "tools/memsnap/checks.h"
#include "tools/memsnap/cli.h"
#include "tools/memsnap/progress.h"

namespace memsnap::cli {
namespace {

struct Row {
  std::string strategy;
  CycleReport cycle;
  std::string error;
  bool ok() const {
    return error.empty() && cycle.generations.size() == 2 && cycle.total_mismatches() == 0;
  }
};

// Wall seconds of write() of a resident buffer into a new file in dir, plus fsync when sync.
double reference_write_seconds(const std::string& dir, std::uint64_t size, bool sync) {
  std::vector<char> buf(8 << 20);
  for (std::size_t i = 0; i < buf.size(); i += 4096) buf[i] = static_cast<char>(i >> 12 | 1);
  const std::string path = dir + "/reference-write.tmp";
  const auto start = std::chrono::steady_clock::now();
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
  if (fd < 0) return 0;
  for (std::uint64_t done = 0; done < size;) {
    const ssize_t n = ::write(fd, buf.data(), std::min<std::uint64_t>(buf.size(), size - done));
    if (n <= 0) break;
    done += static_cast<std::uint64_t>(n);
  }
  if (sync) ::fsync(fd);
  ::close(fd);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ::unlink(path.c_str());
  return seconds;
}

Row run_one(const PluginRegistry& registry, const std::string& strategy, const std::string& dir,
            std::uint64_t size, double dirty_fraction, bool sync,
            std::function<void(const std::string&)> progress) {
  Row row;
  row.strategy = strategy;
  CycleOptions o;
  o.strategy = strategy;
  o.size = size;
  o.dirty_fraction = dirty_fraction;
  o.zero_fraction = 0.05;  // some never-written pages, stored as map entries only
  o.generations = 2;
  o.sync = sync;
  o.dir = dir + "/" + strategy;
  o.progress = std::move(progress);
  std::filesystem::create_directories(o.dir);
  auto r = run_cycle(registry, o);
  if (!r.ok()) {
    row.error = r.error().to_string();
  } else {
    row.cycle = std::move(*r);
  }
  std::filesystem::remove_all(o.dir);
  return row;
}

// The loaded strategies to compare (all, or those of --strategies, each of which must be
// loaded): production ones first, experimental ones last.
std::vector<const PluginInfo*> pick_strategies(const PluginRegistry& registry,
                                               const std::string& dir, const std::string& only) {
  std::vector<std::string> wanted;
  if (!only.empty()) {
    wanted = split_names("--strategies", only);
    require_loaded_strategies(registry, dir, "--strategies", wanted);
  }
  std::vector<const PluginInfo*> strategies;
  for (const auto& p : registry.plugins()) {
    if (p.state != PluginState::kLoaded) continue;
    if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), p.name) == wanted.end())
      continue;
    strategies.push_back(&p);
  }
  std::stable_sort(strategies.begin(), strategies.end(),
                   [](const PluginInfo* a, const PluginInfo* b) {
                     return !a->experimental() && b->experimental();
                   });
  return strategies;
}

struct CompareRun {
  std::vector<Row> rows;
  double reference_seconds = 0;  // median of the write() references
};

CompareRun run_all(const PluginRegistry& registry, const std::vector<const PluginInfo*>& strategies,
                   const std::string& dir, std::uint64_t size, double fraction, bool sync,
                   bool json) {
  // The reference runs next to every strategy and the median is used, so a noisy moment on a
  // shared machine skews it less than one measurement at the start would.
  std::vector<double> refs;
  CompareRun run;
  const auto status = StatusLine::on_stderr(json);
  for (std::size_t i = 0; i < strategies.size(); ++i) {
    const std::string& name = strategies[i]->name;
    if (status->shown()) {
      status->update("compare: " + name, i + 1, strategies.size(), "reference write()");
    } else if (!json) {
      std::fprintf(stderr, "  running %s...\n", name.c_str());
    }
    refs.push_back(reference_write_seconds(dir, size, sync));
    std::function<void(const std::string&)> progress;
    if (status->shown()) progress = [&status](const std::string& line) { status->detail(line); };
    run.rows.push_back(run_one(registry, name, dir, size, fraction, sync, progress));
  }
  status->finish();
  std::sort(refs.begin(), refs.end());
  run.reference_seconds = refs[refs.size() / 2];
  return run;
}

nlohmann::json rows_json(const CompareRun& run) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& row : run.rows) {
    const auto& gens = row.cycle.generations;
    nlohmann::json j = {{"strategy", row.strategy},
                        {"ok", row.ok()},
                        {"error", row.error},
                        {"reference_write_seconds", run.reference_seconds}};
    nlohmann::json g = nlohmann::json::array();
    for (const auto& gen : gens) {
      g.push_back({{"generation", gen.generation},
                   {"pause", to_json(gen.pause)},
                   {"resume", to_json(gen.resume)},
                   {"faults", to_json(gen.faults)},
                   {"verify_seconds", gen.verify_seconds},
                   {"pages", gen.pages},
                   {"mismatches", gen.mismatches}});
    }
    j["generations"] = g;
    out.push_back(j);
  }
  return out;
}

void print_row(const Row& row, std::uint64_t size, double ref) {
  const auto& gens = row.cycle.generations;
  if (!row.error.empty() || gens.size() != 2) {
    std::printf("%-18s FAILED: %s\n", row.strategy.c_str(), row.error.c_str());
    return;
  }
  const PauseReport& base = gens[0].pause;
  const PauseReport& diff = gens[1].pause;
  const CycleGeneration& last = gens[1];
  const double base_s = base.wall_seconds, diff_s = diff.wall_seconds;
  char ratio[16], check[128];
  // Bytes per second against the reference's (the base skips never-written pages).
  std::snprintf(ratio, sizeof(ratio), "%.2fx",
                (double(base.dirty_bytes) / base_s) / (double(size) / ref));
  const std::uint64_t pages = gens[0].pages + gens[1].pages;
  if (row.cycle.total_mismatches() == 0) {
    std::snprintf(check, sizeof(check), "ok, %llu", static_cast<unsigned long long>(pages));
  } else {
    std::snprintf(check, sizeof(check), "%llu BAD (%s)",
                  static_cast<unsigned long long>(row.cycle.total_mismatches()),
                  (gens[0].mismatches ? gens[0] : gens[1]).first_mismatch.c_str());
  }
  const double us_per_fault =
      last.faults.faults ? last.faults.service_seconds / double(last.faults.faults) * 1e6 : 0;
  std::printf(
      "%-18s %9.1f %7.2f %8s %9.1f %9.3f | %-10s %8.2f %9.1f %9.1f | %9s %s\n",
      row.strategy.c_str(), base_s * 1e3, double(base.dirty_bytes) / base_s / double(1 << 30),
      ratio, diff_s * 1e3, diff_s / base_s, std::string(resume_mode_name(last.resume.mode)).c_str(),
      last.resume.ready_seconds * 1e3, last.verify_seconds * 1e3, us_per_fault,
      format_bytes(double(base.export_stats.bytes_released + diff.export_stats.bytes_released))
          .c_str(),
      check);
}

void print_table(const CompareRun& run, std::uint64_t size, double fraction, bool sync) {
  const double ref = run.reference_seconds;
  std::printf("\n%-18s %9s %7s %8s %9s %9s | %-10s %8s %9s %9s | %9s %s\n", "STRATEGY", "BASE ms",
              "GiB/s", "vs write", "DIFF ms", "DIFF/BASE", "RESUME", "READY ms", "TOUCH ms",
              "us/fault", "RELEASED", "PAGES CHECKED");
  std::printf("%-18s %9.1f %7.2f %8s\n", "(write() median)", ref * 1e3,
              double(size) / ref / double(1 << 30), "1.00x");
  for (const auto& row : run.rows) print_row(row, size, ref);
  std::printf(
      "\nEach strategy: a stand-in VMM is filled, paused (BASE, all populated memory), killed,\n"
      "resumed into a new VMM through the UFFD handshake and checked page by page; then %.0f%%\n"
      "of its pages are dirtied, paused again (DIFF, only what the guest wrote, found by\n"
      "userfaultfd write tracking), killed, resumed from base+diff and checked again.\n"
      "vs write = BASE bytes per second over write()%s of resident memory into a new file here.\n"
      "RESUME = how the second resume served memory; READY = from the VMM's handshake to it\n"
      "being able to run; TOUCH = the resumed guest reading every page once (faults included);\n"
      "us/fault = mean fault service time in memsnap. PAGES CHECKED = both resumes, every page.\n"
      "One run each on a shared machine: expect noise (memsnap-bench gives medians).\n",
      fraction * 100, sync ? "+fsync" : "");
}

}  // namespace

int cmd_compare(Args& args) {
  const std::uint64_t size = parse_size(args.value("--size", "256M"));
  const double fraction = parse_fraction("--dirty-fraction", args.value("--dirty-fraction", "0.1"));
  const std::string only = args.value("--strategies");
  std::string keep = args.value("--keep");
  const bool json = args.flag("--json");
  const bool sync = !args.flag("--no-sync");
  const std::string plugins = plugin_dir(args);
  args.expect_done();
  if (size == 0 || size % 4096 != 0) {
    throw std::invalid_argument("--size must be a positive multiple of 4 KiB");
  }

  PluginRegistry registry;
  load_plugins(registry, plugins);
  const auto strategies = pick_strategies(registry, plugins, only);
  if (strategies.empty()) {
    std::fprintf(stderr, "memsnap compare: no strategy loaded from %s\n", plugins.c_str());
    return 1;
  }
  const bool temporary = keep.empty();
  keep = work_dir(keep, "memsnap-compare");
  if (keep.empty()) return 1;

  if (!json) {
    std::printf(
        "memsnap compare: %s stand-in VMM per strategy, pause -> resume -> verify, then a "
        "%.0f%% random diff, pause -> resume -> verify; snapshots in %s (%s)\n",
        format_bytes(double(size)).c_str(), fraction * 100, keep.c_str(),
        sync ? "fsync at commit" : "no fsync");
    std::fflush(stdout);
  }
  const CompareRun run = run_all(registry, strategies, keep, size, fraction, sync, json);
  int failures = 0;
  for (const auto& row : run.rows) failures += row.ok() ? 0 : 1;
  if (json) {
    std::printf("%s\n", rows_json(run).dump(2).c_str());
  } else {
    print_table(run, size, fraction, sync);
  }
  if (temporary) std::filesystem::remove_all(keep);
  return failures == 0 ? 0 : 1;
}

}  // namespace memsnap::cli
