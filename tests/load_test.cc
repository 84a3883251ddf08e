// Load: 32 stand-in sandboxes of 128 MiB, split across the three strategies by the flag, paused
// and resumed through one memsnapd all at once, round after round. The concurrency limit holds,
// memsnapd's memory stays bounded (independent of the 4 GiB of guest memory it moves), it leaks
// no descriptor and no thread, and every sandbox is verified intact after every round.
// MEMSNAP_LOAD_ROUNDS (default 3) and MEMSNAP_LOAD_SANDBOXES (default 32) make it longer or
// smaller; the figures it prints are recorded in docs/reliability.md.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tools/fleet/fleet.h"

namespace memsnap::fleet {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

// A field of /proc/PID/status ("VmRSS", "Threads"), in its own unit (kB for sizes).
long status_field(pid_t pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(field + ":", 0) == 0) return std::atol(line.c_str() + field.size() + 1);
  }
  return -1;
}

long open_fds(pid_t pid) {
  long n = 0;
  std::error_code ec;
  for (fs::directory_iterator it("/proc/" + std::to_string(pid) + "/fd", ec), end; !ec && it != end;
       it.increment(ec)) {
    ++n;
  }
  return n;
}

double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q * double(v.size() - 1);
  const auto lo = static_cast<std::size_t>(pos);
  const std::size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - double(lo));
}

TEST(LoadTest, ThirtyTwoSandboxesPausedAndResumedAtOnceLoseNothingAndLeakNothing) {
  const int sandboxes = env_int("MEMSNAP_LOAD_SANDBOXES", 32);
  const int rounds = env_int("MEMSNAP_LOAD_ROUNDS", 3);
  constexpr std::uint64_t kGuest = 128ULL << 20;
  constexpr int kLimit = 4;

  char templ[] = "/var/tmp/memsnap-load-XXXXXX";
  ASSERT_NE(::mkdtemp(templ), nullptr);
  const std::string dir = templ;
  const std::string flags = dir + "/flags.json";
  std::ofstream(flags) << R"({"flags": {"memory-export-strategy": {
      "state": "ENABLED",
      "variants": {"process_vm_readv": "process_vm_readv", "memfd": "memfd",
                   "hole_punch": "hole_punch"},
      "defaultVariant": "process_vm_readv",
      "targeting": {"if": [
        {"==": [{"var": "team"}, "b"]}, "memfd",
        {"==": [{"var": "team"}, "c"]}, "hole_punch", null]}}}})";
  DaemonOptions o;
  o.dir = dir;
  o.flags_file = flags;
  o.overrides = {"limits.max_concurrent_pauses=" + std::to_string(kLimit),
                 "limits.max_concurrent_resumes=" + std::to_string(kLimit), "logging.level=warn"};
  auto started = Daemon::start(o);
  ASSERT_TRUE(started.ok()) << started.error().to_string();
  std::unique_ptr<Daemon> daemon = std::move(*started);
  const pid_t pid = daemon->pid();

  std::vector<std::unique_ptr<Sandbox>> sbs;
  for (int i = 0; i < sandboxes; ++i) {
    SandboxSpec spec;
    spec.id = "sb-" + std::to_string(i);
    spec.size = kGuest;
    const char* team = i % 3 == 0 ? "a" : i % 3 == 1 ? "b" : "c";
    spec.backing = i % 3 == 0 ? "anon" : "memfd";
    spec.attributes = {{"team", team}};
    spec.seed = 1000 + static_cast<std::uint64_t>(i);
    auto sb = Sandbox::launch(*daemon, spec);
    ASSERT_TRUE(sb.ok()) << sb.error().to_string();
    sbs.push_back(std::move(*sb));
  }
  // The baseline once every sandbox is registered (no sessions yet).
  const long fds_before = open_fds(pid);
  const long threads_before = status_field(pid, "Threads");
  const long rss_before = status_field(pid, "VmRSS");

  // A sampler: memsnapd's RSS, and the pauses and resumes it has in flight (health).
  std::atomic<bool> sampling{true};
  std::atomic<long> rss_max{rss_before}, anon_max{0}, file_max{0}, shmem_max{0};
  std::atomic<int> pauses_max{0}, resumes_max{0};
  std::thread sampler([&] {
    while (sampling) {
      rss_max = std::max(rss_max.load(), status_field(pid, "VmRSS"));
      anon_max = std::max(anon_max.load(), status_field(pid, "RssAnon"));
      file_max = std::max(file_max.load(), status_field(pid, "RssFile"));
      shmem_max = std::max(shmem_max.load(), status_field(pid, "RssShmem"));
      auto h = daemon->call("GET", "/v1/health", nullptr, std::chrono::seconds(5));
      if (h.ok() && h->ok()) {
        pauses_max = std::max(pauses_max.load(), h->body.value("pauses_in_flight", 0));
        resumes_max = std::max(resumes_max.load(), h->body.value("resumes_in_flight", 0));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });

  std::mutex mu;
  std::vector<double> pause_s, resume_s;
  std::vector<std::string> failures;
  std::uint64_t lost = 0;
  const auto t0 = Clock::now();
  for (int r = 0; r < rounds; ++r) {
    std::vector<std::thread> workers;
    for (int i = 0; i < sandboxes; ++i) {
      workers.emplace_back([&, i, r] {
        Sandbox& sb = *sbs[static_cast<std::size_t>(i)];
        auto fail = [&](const std::string& what) {
          std::lock_guard lock(mu);
          failures.push_back(sb.spec().id + " round " + std::to_string(r) + ": " + what);
        };
        if (r > 0) {
          if (Status s = sb.dirty(0.05, 77 + static_cast<std::uint64_t>(r)); !s.ok()) {
            return fail("dirty: " + s.error().to_string());
          }
        }
        auto p0 = Clock::now();
        auto paused = sb.pause({{"sync", false}});
        if (!paused.ok()) return fail(paused.error().to_string());
        const double pause_seconds = std::chrono::duration<double>(Clock::now() - p0).count();
        auto r0 = Clock::now();
        auto resumed = sb.resume();
        if (!resumed.ok()) return fail(resumed.error().to_string());
        const double resume_seconds = std::chrono::duration<double>(Clock::now() - r0).count();
        auto bad = sb.verify();
        if (!bad.ok()) return fail("verify: " + bad.error().to_string());
        std::lock_guard lock(mu);
        pause_s.push_back(pause_seconds);
        resume_s.push_back(resume_seconds);
        lost += *bad;
      });
    }
    for (auto& w : workers) w.join();
  }
  const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  sampling = false;
  sampler.join();

  EXPECT_TRUE(failures.empty()) << failures.size() << " failed, first: " << failures.front();
  EXPECT_EQ(lost, 0u) << "pages lost under load";
  EXPECT_EQ(pause_s.size(), static_cast<std::size_t>(sandboxes * rounds));
  EXPECT_LE(pauses_max.load(), kLimit) << "more pauses at once than the limit";
  EXPECT_LE(resumes_max.load(), kLimit) << "more resumes at once than the limit";
  EXPECT_GE(pauses_max.load(), 2) << "the load never ran pauses concurrently";
  // memsnapd moved sandboxes x 128 MiB per round; the memory it owns (anonymous and shmem) must
  // not grow with that. RssFile is not counted: it is the snapshot files' page cache that the
  // fault servers map to serve faults, clean and reclaimable, shared with the page cache.
  EXPECT_LT(anon_max.load() + shmem_max.load(), 256L * 1024)
      << "memsnapd's own memory reached " << anon_max.load() << " kB anon + " << shmem_max.load()
      << " kB shmem";

  // Every sandbox paused and unregistered: memsnapd is back to where it was, fds and threads.
  for (auto& sb : sbs) ASSERT_TRUE(sb->pause().ok());
  for (auto& sb : sbs) {
    auto gone = daemon->call("DELETE", "/v1/sandboxes/" + sb->spec().id);
    ASSERT_TRUE(gone.ok() && gone->ok());
  }
  // Registered-but-idle sandboxes held fds in the baseline (none now): allow no growth at all,
  // once the connection of the last API call has been closed on memsnapd's side (a connection
  // holds a descriptor and a thread for a moment after its answer).
  long fds_after = open_fds(pid);
  long threads_after = status_field(pid, "Threads");
  for (int i = 0; i < 100 && (fds_after > fds_before || threads_after > threads_before); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    fds_after = open_fds(pid);
    threads_after = status_field(pid, "Threads");
  }
  EXPECT_LE(fds_after, fds_before) << "memsnapd leaked descriptors";
  EXPECT_LE(threads_after, threads_before) << "memsnapd leaked threads";

  const double ops = double(pause_s.size() + resume_s.size());
  std::printf(
      "load: %d sandboxes x %d rounds of 128 MiB in %.1f s: %.1f pauses+resumes/s; pause p50 "
      "%.0f ms p99 %.0f ms; resume p50 %.0f ms p99 %.0f ms (queueing included); memsnapd RSS "
      "%ld -> max %ld kB (anon max %ld, file max %ld, shmem max %ld); fds %ld -> %ld; threads %ld "
      "-> %ld; in flight max %d pauses, %d "
      "resumes (limit %d)\n",
      sandboxes, rounds, elapsed, ops / elapsed, quantile(pause_s, 0.5) * 1e3,
      quantile(pause_s, 0.99) * 1e3, quantile(resume_s, 0.5) * 1e3, quantile(resume_s, 0.99) * 1e3,
      rss_before, rss_max.load(), anon_max.load(), file_max.load(), shmem_max.load(), fds_before,
      fds_after, threads_before, threads_after, pauses_max.load(), resumes_max.load(), kLimit);
  sbs.clear();
  daemon.reset();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace memsnap::fleet
