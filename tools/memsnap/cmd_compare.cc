// memsnap compare: the default job. For each loaded strategy it starts a fresh stand-in VMM,
// takes a base snapshot of all of its memory, dirties a share of the pages, takes a diff on top,
// reads the chain back and checks every page against the pattern the VMM wrote, then prints one
// row per strategy next to the single-copy reference (write() + fsync of a resident buffer of
// the same size into the same directory).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <stdexcept>

#include "core/snapshot/snapshot_chain.h"
#include "core/vmm_process.h"
#include "tools/guest_client/guest_client.h"
#include "tools/memsnap/cli.h"

namespace memsnap::cli {
namespace {

struct Row {
  std::string strategy;
  PauseReport base, diff;
  ChainCheck check;
  std::string error;
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
            std::uint64_t size, double dirty_fraction, bool sync) {
  Row row;
  row.strategy = strategy;
  GuestOptions go;
  go.size = size;
  go.backing = "memfd";
  go.seed = 7;
  go.zero_fraction = 0.05;  // some never-written pages, stored as map entries only
  auto guest = GuestProcess::spawn(go);
  if (!guest.ok()) {
    row.error = guest.error().to_string();
    return row;
  }
  auto memfd = take_fd_of_process((*guest)->pid(), (*guest)->memfd_number());
  if (!memfd.ok()) {
    row.error = memfd.error().to_string();
    return row;
  }
  PauseRequest req;
  req.pid = (*guest)->pid();
  req.regions = (*guest)->regions();
  req.memfd = *memfd;
  req.strategy = strategy;
  req.freeze = true;
  req.sync = sync;
  req.out_path = dir + "/" + strategy + "-base.snap";
  auto base = pause(registry, req);
  if (!base.ok()) {
    ::close(*memfd);
    row.error = "base: " + base.error().to_string();
    return row;
  }
  row.base = *base;
  auto dirty = (*guest)->dirty(dirty_fraction, false, 11);
  if (!dirty.ok()) {
    ::close(*memfd);
    row.error = dirty.error().to_string();
    return row;
  }
  req.dirty = *dirty;
  req.parent_path = req.out_path;
  req.out_path = dir + "/" + strategy + "-diff.snap";
  auto diff = pause(registry, req);
  ::close(*memfd);
  if (!diff.ok()) {
    row.error = "diff: " + diff.error().to_string();
    return row;
  }
  row.diff = *diff;
  auto chain = SnapshotChain::open({req.parent_path, req.out_path}, Verify::kFull);
  if (!chain.ok()) {
    row.error = "chain: " + chain.error().to_string();
    return row;
  }
  auto check =
      check_chain_against_pattern(*chain, (*guest)->seed(), (*guest)->expected_generations());
  if (!check.ok()) {
    row.error = "check: " + check.error().to_string();
    return row;
  }
  row.check = *check;
  return row;
}

}  // namespace

int cmd_compare(Args& args) {
  const std::uint64_t size = parse_size(args.value("--size", "256M"));
  const double fraction = std::stod(args.value("--dirty-fraction", "0.1"));
  const std::string only = args.value("--strategies");
  std::string keep = args.value("--keep");
  const bool json = args.flag("--json");
  const bool sync = !args.flag("--no-sync");
  const std::string plugins = plugin_dir(args);
  args.expect_done();
  if (size == 0 || size % 4096 != 0)
    throw std::invalid_argument("--size must be a multiple of 4 KiB");

  PluginRegistry registry;
  load_plugins(registry, plugins);
  std::vector<const PluginInfo*> strategies;
  for (const auto& p : registry.plugins()) {
    if (p.state != PluginState::kLoaded) continue;
    if (!only.empty() && ("," + only + ",").find("," + p.name + ",") == std::string::npos) continue;
    strategies.push_back(&p);
  }
  // Production strategies first, experimental ones last.
  std::stable_sort(strategies.begin(), strategies.end(),
                   [](const PluginInfo* a, const PluginInfo* b) {
                     return !a->experimental() && b->experimental();
                   });
  if (strategies.empty()) {
    std::fprintf(stderr, "memsnap compare: no strategy loaded from %s\n", plugins.c_str());
    return 1;
  }
  const bool temporary = keep.empty();
  if (temporary) {
    char templ[] = "/var/tmp/memsnap-compare-XXXXXX";
    if (::mkdtemp(templ) == nullptr) {
      std::perror("mkdtemp");
      return 1;
    }
    keep = templ;
  } else {
    std::filesystem::create_directories(keep);
  }

  if (!json) {
    std::printf(
        "memsnap compare: %s memfd-backed stand-in VMM, base snapshot of all memory then a "
        "%.0f%% random diff, snapshots in %s (%s)\n",
        format_bytes(double(size)).c_str(), fraction * 100, keep.c_str(),
        sync ? "fsync at commit" : "no fsync");
  }
  // The reference runs next to every strategy and the median is used, so a noisy moment on a
  // shared machine skews it less than one measurement at the start would.
  std::vector<double> refs;
  std::vector<Row> rows;
  for (const auto* s : strategies) {
    if (!json) std::fprintf(stderr, "  running %s...\n", s->name.c_str());
    refs.push_back(reference_write_seconds(keep, size, sync));
    rows.push_back(run_one(registry, s->name, keep, size, fraction, sync));
  }
  std::sort(refs.begin(), refs.end());
  const double ref = refs[refs.size() / 2];

  int failures = 0;
  nlohmann::json out = nlohmann::json::array();
  if (!json) {
    std::printf("\n%-18s %10s %8s %9s %11s %9s %10s %9s %s\n", "STRATEGY", "BASE ms", "GiB/s",
                "vs write", "DIFF ms", "DIFF/BASE", "CPU ms", "RELEASED", "CHAIN CHECK");
    std::printf("%-18s %10.1f %8.2f %9s %11s %9s %10s %9s %s\n", "(write() median)", ref * 1e3,
                double(size) / ref / double(1 << 30), "1.00x", "-", "-", "-", "-", "-");
  }
  for (const auto& row : rows) {
    const bool ok = row.error.empty() && row.check.mismatches == 0 && row.check.pages > 0;
    failures += ok ? 0 : 1;
    if (json) {
      nlohmann::json j = {{"strategy", row.strategy},
                          {"ok", ok},
                          {"error", row.error},
                          {"reference_write_seconds", ref}};
      if (row.error.empty()) {
        j["base"] = to_json(row.base);
        j["diff"] = to_json(row.diff);
        j["pages_checked"] = row.check.pages;
        j["mismatches"] = row.check.mismatches;
      }
      out.push_back(j);
      continue;
    }
    if (!row.error.empty()) {
      std::printf("%-18s FAILED: %s\n", row.strategy.c_str(), row.error.c_str());
      continue;
    }
    const double base_s = row.base.wall_seconds, diff_s = row.diff.wall_seconds;
    char ratio[16], released[32], check[96];
    // Bytes per second against the reference's (the base skips never-written pages).
    std::snprintf(ratio, sizeof(ratio), "%.2fx",
                  (double(row.base.dirty_bytes) / base_s) / (double(size) / ref));
    std::snprintf(released, sizeof(released), "%s",
                  format_bytes(double(row.base.export_stats.bytes_released +
                                      row.diff.export_stats.bytes_released))
                      .c_str());
    if (row.check.mismatches == 0) {
      std::snprintf(check, sizeof(check), "ok, %llu pages",
                    static_cast<unsigned long long>(row.check.pages));
    } else {
      std::snprintf(check, sizeof(check), "%llu BAD (%s)",
                    static_cast<unsigned long long>(row.check.mismatches),
                    row.check.first_mismatch.c_str());
    }
    std::printf("%-18s %10.1f %8.2f %9s %11.1f %9.3f %10.1f %9s %s\n", row.strategy.c_str(),
                base_s * 1e3, double(row.base.dirty_bytes) / base_s / double(1 << 30), ratio,
                diff_s * 1e3, diff_s / base_s, (row.base.cpu_seconds + row.diff.cpu_seconds) * 1e3,
                released, check);
  }
  if (json) {
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    std::printf(
        "\nBASE = pause of all populated memory; vs write = its bytes per second over "
        "those of write()+fsync of resident memory into a new file here (median of one run "
        "before each strategy; one run each, so expect noise: memsnap-bench gives medians).\n"
        "DIFF = pause of the dirtied pages on top of the base. CPU = the pausing thread, "
        "base + diff. RELEASED = host memory the strategy freed, base + diff.\n"
        "CHAIN CHECK reads base+diff back and checks every page against what the VMM wrote.\n");
  }
  if (temporary) std::filesystem::remove_all(keep);
  return failures == 0 ? 0 : 1;
}

}  // namespace memsnap::cli
