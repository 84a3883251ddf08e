// Export throughput of every strategy next to the references that bound a pause on this machine,
// all in one run: memcpy (a copy in memory), the best write() of an already-resident buffer into
// a new file in the same directory (chunk sizes and preallocation varied: the single-copy limit
// of a pause), and the single-copy ways out of a memfd (write from a filled mapping, sendfile,
// splice) next to the two-copy pread + write. Then the framework's
// own overhead: loading the plugins, and a pause whose diff is empty.
//
//   memsnap-bench --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true
//
// tools/bench/ratios.py turns its JSON output into the ratio table of docs/performance.md.
// Options via environment: MEMSNAP_BENCH_DIR (where files go; default /var/tmp),
// MEMSNAP_BENCH_GIB (guest size, default 1).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/dirty_set.h"
#include "core/pattern/pattern.h"
#include "core/pause.h"
#include "tools/bench/bench_support.h"

namespace memsnap {
namespace {

constexpr std::uint64_t kPage = 4096;

using bench::guest_bytes;

const std::string& bench_dir() { return bench::bench_dir("memsnap-bench"); }
using bench::plugin_dir;
using bench::registry;

void fill(char* mem, std::uint64_t size, std::uint64_t generation) {
  for (std::uint64_t p = 0; p < size / kPage; ++p) {
    pattern::fill_page(mem + p * kPage, kPage, 1, p, generation);
  }
}

// The guest memory both kinds of source read: an anonymous buffer (process_vm_readv reads it
// through our own pid) and a memfd (memfd, hole_punch), filled with the pattern.
struct Source {
  char* anon = nullptr;
  int memfd = -1;
  char* memfd_map = nullptr;
  std::uint64_t size = 0;

  static Source& get() {
    static Source* s = [] {
      auto* src = new Source();
      src->size = guest_bytes();
      src->anon = static_cast<char*>(
          mmap(nullptr, src->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
      madvise(src->anon, src->size, MADV_NOHUGEPAGE);
      fill(src->anon, src->size, 1);
      src->memfd = memfd_create("memsnap-bench", MFD_CLOEXEC);
      if (ftruncate(src->memfd, static_cast<off_t>(src->size)) != 0) std::abort();
      src->memfd_map = static_cast<char*>(
          mmap(nullptr, src->size, PROT_READ | PROT_WRITE, MAP_SHARED, src->memfd, 0));
      fill(src->memfd_map, src->size, 1);
      return src;
    }();
    return *s;
  }
  // hole_punch empties the memfd; put the pattern back (outside the timed region).
  void refill_memfd_if_punched() {
    struct stat st {};
    fstat(memfd, &st);
    if (std::uint64_t(st.st_blocks) * 512 < size) fill(memfd_map, size, 1);
  }
};

// percent of the guest's pages, chosen at random in runs of run_pages pages (1: single 4 KiB
// pages, the worst case for a diff; 16: 64 KiB runs, closer to how a guest kernel dirties memory).
std::vector<plugin::ByteRange> dirty_set(std::uint64_t size, int percent, std::uint64_t run_pages = 1) {
  if (percent == 100) return {{0, size}};
  std::vector<plugin::ByteRange> ranges;
  const std::uint64_t run = run_pages * kPage;
  for (std::uint64_t p : pattern::select_pages(size / run, percent / 100.0, 42, false)) {
    if (!ranges.empty() && ranges.back().offset + ranges.back().length == p * run) {
      ranges.back().length += run;  // adjacent runs are one range, as a dirty tracker reports them
    } else {
      ranges.push_back({p * run, run});
    }
  }
  return ranges;
}

void BM_Memcpy(benchmark::State& state) {
  Source& src = Source::get();
  std::vector<char> dst(src.size);
  std::memset(dst.data(), 1, dst.size());  // touched, as the reference says
  for (auto _ : state) {
    std::memcpy(dst.data(), src.anon, src.size);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations() * src.size));
}

// Writes [data, data+size) to fd in chunk-sized write() calls; false on a failed call.
bool write_all(int fd, const char* data, std::uint64_t size, std::uint64_t chunk) {
  for (std::uint64_t done = 0; done < size;) {
    const ssize_t n = ::write(fd, data + done, std::min(chunk, size - done));
    if (n <= 0) return false;
    done += std::uint64_t(n);
  }
  return true;
}

// The best way this machine writes the guest's bytes into a new file, for the ratios: write() of
// the resident buffer into a new file in the bench directory, in chunks of arg 0 KiB (256 KiB to
// 16 MiB); arg 1: 0 plain, 1 with fsync, 2 into a file allocated first (fallocate, no fsync).
// tools/bench/ratios.py takes the fastest variant of the run as the reference. (One single
// write() of the whole GiB is left out: it was slow and bimodal here, a reference nobody would
// choose.)
void BM_WriteReference(benchmark::State& state) {
  Source& src = Source::get();
  const std::uint64_t chunk = std::uint64_t(state.range(0)) << 10;
  const bool sync = state.range(1) == 1;
  const bool preallocate = state.range(1) == 2;
  const std::string path = bench_dir() + "/reference";
  for (auto _ : state) {
    const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
    if (preallocate && ::fallocate(fd, 0, 0, static_cast<off_t>(src.size)) != 0) std::abort();
    if (!write_all(fd, src.anon, src.size, chunk)) std::abort();
    if (sync) ::fsync(fd);
    ::close(fd);
    state.PauseTiming();
    ::unlink(path.c_str());
    state.ResumeTiming();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations() * src.size));
  state.SetLabel(std::to_string(chunk >> 10) + " KiB writes" +
                 (sync ? ", fsync" : preallocate ? ", fallocate first" : ""));
}

// The ways to move a memfd's bytes into a new file with one copy, and the two-copy way the memfd
// strategy reads today, without the snapshot format: arg 0 = write() straight from a mapping of
// the memfd whose page tables are filled (the fill was paid before, as a long-lived mapping would
// have it), 1 = sendfile(), 2 = splice() through a pipe, 3 = pread() into a 4 MiB buffer, then
// write() (two copies), 4 = write() from a mapping made and populated (MADV_POPULATE_READ) in the
// timed loop, as an export that maps the memfd afresh has it. 1 MiB per call.
void BM_MemfdToFile(benchmark::State& state) {
  Source& src = Source::get();
  src.refill_memfd_if_punched();
  const int method = static_cast<int>(state.range(0));
  constexpr std::uint64_t kCall = 1 << 20;
  const std::string path = bench_dir() + "/memfd-copy";
  std::vector<char> buffer(4 << 20);
  int pipe_fds[2] = {-1, -1};
  if (method == 2 && ::pipe2(pipe_fds, O_CLOEXEC) != 0) std::abort();
  if (method == 2) ::fcntl(pipe_fds[1], F_SETPIPE_SZ, int(kCall));
  for (auto _ : state) {
    const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
    bool ok = true;
    if (method == 0) ok = write_all(fd, src.memfd_map, src.size, kCall);
    if (method == 4) {
      void* fresh = ::mmap(nullptr, src.size, PROT_READ, MAP_SHARED, src.memfd, 0);
      ok = fresh != MAP_FAILED && ::madvise(fresh, src.size, MADV_POPULATE_READ) == 0 &&
           write_all(fd, static_cast<const char*>(fresh), src.size, kCall);
      if (fresh != MAP_FAILED) ::munmap(fresh, src.size);
    }
    for (std::uint64_t done = 0; ok && method != 0 && method != 4 && done < src.size;) {
      const std::uint64_t want = std::min<std::uint64_t>(method == 3 ? buffer.size() : kCall,
                                                         src.size - done);
      off_t in = static_cast<off_t>(done);
      ssize_t n = 0;
      if (method == 1) {
        n = ::sendfile(fd, src.memfd, &in, want);
      } else if (method == 2) {
        n = ::splice(src.memfd, &in, pipe_fds[1], nullptr, want, SPLICE_F_MOVE);
        for (ssize_t left = n; ok && left > 0;) {
          const ssize_t m = ::splice(pipe_fds[0], nullptr, fd, nullptr, std::size_t(left),
                                     SPLICE_F_MOVE);
          ok = m > 0;
          left -= m;
        }
      } else {
        n = ::pread(src.memfd, buffer.data(), want, in);
        ok = n > 0 && write_all(fd, buffer.data(), std::uint64_t(n), std::uint64_t(n));
      }
      ok = ok && n > 0;
      done += std::uint64_t(std::max<ssize_t>(n, 0));
    }
    if (!ok) std::abort();
    ::close(fd);
    state.PauseTiming();
    ::unlink(path.c_str());
    state.ResumeTiming();
  }
  if (pipe_fds[0] >= 0) {
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
  }
  state.SetBytesProcessed(std::int64_t(state.iterations() * src.size));
  static const char* const kNames[] = {"write() from a filled mapping", "sendfile()",
                                       "splice() through a pipe", "pread() + write()",
                                       "write() from a fresh populated mapping"};
  state.SetLabel(kNames[method]);
}

// One full pause through the pipeline: resolve, dirty set, export, commit.
void run_pause(benchmark::State& state, const std::string& strategy,
               std::vector<std::pair<std::string, std::string>> options = {},
               bool clustered = false, bool full_no_sync = false) {
  Source& src = Source::get();
  // BM_Pause_*: (percent, fsync); BM_PauseClustered_*: (percent, pages per dirty run), no fsync;
  // full_no_sync: the arguments are the caller's own, the pause is of 100% without fsync.
  const int percent = full_no_sync ? 100 : static_cast<int>(state.range(0));
  const bool sync = !clustered && !full_no_sync && state.range(1) != 0;
  const std::uint64_t run_pages = clustered ? static_cast<std::uint64_t>(state.range(1)) : 1;
  PauseRequest req;
  req.strategy = strategy;
  req.strategy_options = std::move(options);
  req.guest_size = src.size;
  req.sync = sync;
  req.dirty = dirty_set(src.size, percent, run_pages);
  if (strategy == "process_vm_readv") {
    req.pid = getpid();
    req.regions = {{0, reinterpret_cast<std::uint64_t>(src.anon), src.size}};
  } else {
    req.memfd = src.memfd;
  }
  req.out_path = bench_dir() + "/" + strategy + ".snap";
  const std::uint64_t bytes = total_bytes(*req.dirty);
  const double cpu =
      bench::time_pauses(state, req, [&src] { src.refill_memfd_if_punched(); }).cpu_seconds;
  state.SetBytesProcessed(std::int64_t(state.iterations() * bytes));
  state.counters["cpu_s_per_pause"] = cpu / double(std::max<std::int64_t>(1, state.iterations()));
  state.SetLabel(std::to_string(percent) + "% dirty" + (sync ? ", fsync" : "") +
                 (clustered ? ", " + std::to_string(run_pages * 4) + " KiB runs" : ""));
}

void BM_Pause_process_vm_readv(benchmark::State& s) { run_pause(s, "process_vm_readv"); }
void BM_Pause_memfd(benchmark::State& s) { run_pause(s, "memfd"); }
void BM_Pause_hole_punch(benchmark::State& s) { run_pause(s, "hole_punch"); }
// The memfd strategy's other read method: pointers into a read-only mapping, no copy to a buffer.
void BM_PauseClustered_process_vm_readv(benchmark::State& s) {
  run_pause(s, "process_vm_readv", {}, true);
}
void BM_PauseClustered_memfd(benchmark::State& s) { run_pause(s, "memfd", {}, true); }
void BM_PauseClustered_hole_punch(benchmark::State& s) { run_pause(s, "hole_punch", {}, true); }
void BM_Pause_memfd_mmap(benchmark::State& s) { run_pause(s, "memfd", {{"read_method", "mmap"}}); }
// The mmap method as it was before the windows were populated in bulk: each page of a fresh
// window costs a page fault when the sink first reads it.
void BM_Pause_memfd_mmap_unpopulated(benchmark::State& s) {
  run_pause(s, "memfd", {{"read_method", "mmap"}, {"populate", "false"}});
}
// memfd and process_vm_readv with arg 0 KiB read buffers (buffer_bytes: also the size of each
// write() the snapshot writer makes, one batch a buffer); arg 1: 0 memfd, 1 process_vm_readv.
// 100% dirty, no fsync: what the size of the copies does to the export.
void BM_Pause_buffer(benchmark::State& s) {
  const std::string bytes = std::to_string(std::uint64_t(s.range(0)) << 10);
  run_pause(s, s.range(1) == 1 ? "process_vm_readv" : "memfd", {{"buffer_bytes", bytes}}, false,
            /*full_no_sync=*/true);
}
// hole_punch with arg 0 MiB of data per make_durable + punch (its chunk_bytes), read_method arg 1
// (0 pread, 1 mmap): what punching in larger runs saves. 100% dirty, no fsync.
void BM_Pause_hole_punch_chunk(benchmark::State& s) {
  const std::string chunk = std::to_string(std::uint64_t(s.range(0)) << 20);
  run_pause(s, "hole_punch",
            {{"chunk_bytes", chunk}, {"read_method", s.range(1) == 1 ? "mmap" : "pread"}},
            false, /*full_no_sync=*/true);
}

// What filling a mapping's page tables costs here, next to what the copy out of it costs: mmap of
// the whole memfd read-only, arg 0 = 1: MADV_POPULATE_READ in one call, 0: touching one byte a
// page (a fault each, as a fresh mapping is read), then munmap. Counter us_per_page.
void BM_PopulateMapping(benchmark::State& state) {
  Source& src = Source::get();
  src.refill_memfd_if_punched();
  const bool bulk = state.range(0) == 1;
  for (auto _ : state) {
    auto* map = static_cast<volatile char*>(
        mmap(nullptr, src.size, PROT_READ, MAP_SHARED, src.memfd, 0));
    if (map == MAP_FAILED) std::abort();
    if (bulk) {
      if (madvise(const_cast<char*>(map), src.size, MADV_POPULATE_READ) != 0) std::abort();
    } else {
      for (std::uint64_t p = 0; p < src.size; p += kPage) (void)map[p];
    }
    munmap(const_cast<char*>(map), src.size);
  }
  const double pages = double(src.size / kPage) * double(state.iterations());
  // A rate inverted: elapsed seconds / (pages / 1e6).
  state.counters["us_per_page"] =
      benchmark::Counter(pages / 1e6, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.SetLabel(bulk ? "mmap + MADV_POPULATE_READ + munmap" : "mmap + a fault a page + munmap");
}

// Framework overhead: a pause whose diff is empty (resolve + dispatch + commit of a snapshot
// that is only a header and one inherited run).
void BM_EmptyDiffPause(benchmark::State& state) {
  Source& src = Source::get();
  const bool sync = state.range(0) != 0;
  PauseRequest req;
  req.strategy = "memfd";
  req.memfd = src.memfd;
  req.guest_size = src.size;
  req.sync = sync;
  req.dirty = std::vector<plugin::ByteRange>{{0, kPage}};
  req.out_path = bench_dir() + "/parent.snap";
  if (!pause(registry(), req).ok()) std::abort();
  req.parent_path = req.out_path;
  req.dirty = std::vector<plugin::ByteRange>{};
  std::uint64_t n = 0;
  for (auto _ : state) {
    // A new name each time, as in production: renaming over an existing file costs ext4 extra
    // work that a real pause never pays.
    req.out_path = bench_dir() + "/empty-" + std::to_string(n++) + ".snap";
    auto r = pause(registry(), req);
    if (!r.ok()) {
      state.SkipWithError(r.error().to_string().c_str());
      break;
    }
    state.PauseTiming();
    ::unlink(req.out_path.c_str());
    state.ResumeTiming();
  }
  state.SetLabel(sync ? "fsync" : "no fsync");
}

// The floor of an empty diff's commit with fsync, without memsnap: write a small file, fsync it,
// rename it into place and fsync the directory.
void BM_CommitReference(benchmark::State& state) {
  std::vector<char> small(4096 + 40, 1);
  std::uint64_t n = 0;
  for (auto _ : state) {
    const std::string tmp = bench_dir() + "/.ref.tmp";
    const std::string final_path = bench_dir() + "/ref-" + std::to_string(n++);
    const int fd = ::open(tmp.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0640);
    if (::write(fd, small.data(), small.size()) < 0) std::abort();
    ::fsync(fd);
    ::close(fd);
    ::rename(tmp.c_str(), final_path.c_str());
    const int dir = ::open(bench_dir().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    ::fsync(dir);
    ::close(dir);
    state.PauseTiming();
    ::unlink(final_path.c_str());
    state.ResumeTiming();
  }
}

// What one 4 KiB page of a scattered 10% diff costs to read out of a memfd, by method, without
// the snapshot writer: pread per page (what the memfd strategy does), process_vm_readv of our own
// fresh read-only mapping (1,024 iovecs a call), memcpy from a fresh mapping (a fault per page),
// and memcpy from a mapping whose page tables are already filled (a long-lived mapping).
void BM_ScatteredRead(benchmark::State& state) {
  Source& src = Source::get();
  src.refill_memfd_if_punched();
  const int method = static_cast<int>(state.range(0));
  const auto pages = pattern::select_pages(src.size / kPage, 0.10, 42, false);
  std::vector<char> buf(1024 * kPage);
  std::vector<iovec> local(1024), remote(1024);
  char* warm = nullptr;
  if (method == 3) {
    warm = static_cast<char*>(mmap(nullptr, src.size, PROT_READ, MAP_SHARED, src.memfd, 0));
    for (std::uint64_t p : pages) benchmark::DoNotOptimize(warm[p * kPage]);
  }
  for (auto _ : state) {
    char* map = warm;
    if (method == 1 || method == 2) {
      map = static_cast<char*>(mmap(nullptr, src.size, PROT_READ, MAP_SHARED, src.memfd, 0));
    }
    for (std::size_t i = 0; i < pages.size();) {
      const std::size_t n = std::min<std::size_t>(1024, pages.size() - i);
      for (std::size_t j = 0; j < n; ++j) {
        const std::uint64_t off = pages[i + j] * kPage;
        if (method == 0) {
          if (::pread(src.memfd, buf.data() + j * kPage, kPage, static_cast<off_t>(off)) !=
              ssize_t(kPage))
            std::abort();
        } else if (method == 1) {
          local[j] = {buf.data() + j * kPage, kPage};
          remote[j] = {map + off, kPage};
        } else {
          std::memcpy(buf.data() + j * kPage, map + off, kPage);
        }
      }
      if (method == 1 &&
          process_vm_readv(getpid(), local.data(), n, remote.data(), n, 0) != ssize_t(n * kPage)) {
        std::abort();
      }
      benchmark::DoNotOptimize(buf.data());
      i += n;
    }
    if (method == 1 || method == 2) munmap(map, src.size);
  }
  if (warm != nullptr) munmap(warm, src.size);
  state.SetItemsProcessed(std::int64_t(state.iterations() * pages.size()));
  static const char* const kNames[] = {"pread per page", "process_vm_readv of own fresh mapping",
                                       "memcpy from fresh mapping", "memcpy from warm mapping"};
  state.SetLabel(kNames[method]);
}

// Loading every plugin of the directory and creating one strategy.
void BM_LoadPlugins(benchmark::State& state) {
  for (auto _ : state) {
    PluginRegistry r;
    if (!r.load_directory(plugin_dir()).ok()) std::abort();
    auto s = r.create("memfd", {});
    benchmark::DoNotOptimize(s.ok());
  }
}

BENCHMARK(BM_Memcpy)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(5);
BENCHMARK(BM_WriteReference)
    ->ArgsProduct({{256, 1024, 4096, 16384}, {0, 1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);
BENCHMARK(BM_MemfdToFile)->DenseRange(0, 4)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(5);
BENCHMARK(BM_Pause_process_vm_readv)
    ->ArgsProduct({{100, 10}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);
BENCHMARK(BM_Pause_memfd)
    ->ArgsProduct({{100, 10}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);
BENCHMARK(BM_Pause_memfd_mmap)
    ->ArgsProduct({{100, 10}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);
BENCHMARK(BM_Pause_hole_punch)
    ->ArgsProduct({{100, 10}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);
BENCHMARK(BM_Pause_memfd_mmap_unpopulated)
    ->Args({100, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2);
BENCHMARK(BM_Pause_buffer)
    ->ArgsProduct({{256, 1024, 4096}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);
BENCHMARK(BM_Pause_hole_punch_chunk)
    ->ArgsProduct({{2, 16, 64}, {0}})
    ->Args({2, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);
BENCHMARK(BM_PopulateMapping)->DenseRange(0, 1)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);
BENCHMARK(BM_PauseClustered_process_vm_readv)
    ->Args({10, 16})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);
BENCHMARK(BM_PauseClustered_memfd)->Args({10, 16})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(5);
BENCHMARK(BM_PauseClustered_hole_punch)
    ->Args({10, 16})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);
BENCHMARK(BM_EmptyDiffPause)
    ->Arg(0)
    ->Arg(1)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime()
    ->Iterations(200);
BENCHMARK(BM_ScatteredRead)
    ->DenseRange(0, 3)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);
BENCHMARK(BM_CommitReference)->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(200);
BENCHMARK(BM_LoadPlugins)->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(50);

}  // namespace
}  // namespace memsnap

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  std::filesystem::remove_all(memsnap::bench_dir());
  return 0;
}
