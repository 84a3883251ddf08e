// What memsnap's benchmark executables share: a scratch directory, the plugin directory and a
// loaded plugin registry (each made once per process), the guest size, and a timed pause loop.
#pragma once

#include <time.h>
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>

#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"

namespace memsnap::bench {

// A fresh directory under $MEMSNAP_BENCH_DIR (default /var/tmp), named after `prefix`; made on
// the first call, the same one afterwards.
inline const std::string& bench_dir(const char* prefix) {
  static const std::string dir = [prefix] {
    const char* base = std::getenv("MEMSNAP_BENCH_DIR");
    std::string templ = std::string(base ? base : "/var/tmp") + "/" + prefix + "-XXXXXX";
    if (::mkdtemp(templ.data()) == nullptr) std::abort();
    return templ;
  }();
  return dir;
}

// $MEMSNAP_PLUGIN_DIR, else <exe>/../lib/memsnap/plugins.
inline std::string plugin_dir() {
  if (const char* env = std::getenv("MEMSNAP_PLUGIN_DIR")) return env;
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path().parent_path() / "lib" /
          "memsnap" / "plugins")
      .string();
}

// Every plugin of plugin_dir(), loaded once; aborts if the directory cannot be read.
inline const PluginRegistry& registry() {
  static PluginRegistry* r = [] {
    auto* reg = new PluginRegistry();
    if (!reg->load_directory(plugin_dir()).ok()) std::abort();
    return reg;
  }();
  return *r;
}

// The guest size of the export benchmarks: $MEMSNAP_BENCH_GIB GiB, default 1.
inline std::uint64_t guest_bytes() {
  const char* gib = std::getenv("MEMSNAP_BENCH_GIB");
  return (gib ? std::strtoull(gib, nullptr, 10) : 1) << 30;
}

// CPU seconds of the whole process: a pipeline's threads are not all the benchmark's thread, and
// PauseReport::cpu_seconds counts only the calling thread and the snapshot writer's helper.
inline double process_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

// What a benchmark's pauses cost in CPU, summed over its iterations.
struct PauseCost {
  double cpu_seconds = 0;          // PauseReport::cpu_seconds
  double process_cpu_seconds = 0;  // the whole process, during the pause() calls
};

// Pauses with req once per iteration of state, timed; untimed around each: before() (if given)
// and the removal of the snapshot. A failed pause ends the benchmark with its error.
inline PauseCost time_pauses(benchmark::State& state, const PauseRequest& req,
                             const std::function<void()>& before = nullptr) {
  PauseCost cost;
  for (auto _ : state) {
    if (before) {
      state.PauseTiming();
      before();
      state.ResumeTiming();
    }
    const double cpu_start = process_cpu_seconds();
    auto r = pause(registry(), req);
    cost.process_cpu_seconds += process_cpu_seconds() - cpu_start;
    if (!r.ok()) {
      state.SkipWithError(r.error().to_string().c_str());
      break;
    }
    cost.cpu_seconds += r->cpu_seconds;
    state.PauseTiming();
    ::unlink(req.out_path.c_str());
    state.ResumeTiming();
  }
  return cost;
}

}  // namespace memsnap::bench
