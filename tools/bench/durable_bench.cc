// Durable pauses (issue 18 part 4): the ways this machine writes the guest's bytes into a new file
// *and waits for the disk* -- write() through the page cache then fsync, against O_DIRECT then
// fsync (from a page-aligned buffer, and from an unaligned one copied through an aligned bounce
// buffer, as the snapshot writer must for the strategies' malloc'd buffers) -- next to full
// pauses with fsync whose snapshot writer uses each way. Part of memsnap-bench:
//
//   memsnap-bench --benchmark_filter=Durable --benchmark_repetitions=3
//       --benchmark_enable_random_interleaving=true   (one command line)
//
// Every benchmark reports cpu_s_per_gib: CPU seconds of the process (all its threads: the
// writer's hashing helper included) per GiB written. Kernel writeback done by flusher threads is
// in no process's account; with 1 GiB and fsync right after, the writeback is started by fsync
// in the calling thread (1 GiB stays below the background dirty threshold of this machine).
#include <fcntl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/pattern/pattern.h"
#include "core/pause.h"
#include "tools/bench/bench_support.h"

namespace memsnap {
namespace {

constexpr std::uint64_t kPage = 4096;

using bench::guest_bytes;

const std::string& dir() { return bench::bench_dir("memsnap-bench"); }

using bench::process_cpu_seconds;

// The guest's bytes, filled with the test pattern: a page-aligned anonymous mapping (the source
// of the references and of process_vm_readv) and a memfd (the memfd strategy's source). Made on
// first use, once per process.
struct DurableSource {
  char* anon = nullptr;
  int memfd = -1;
  std::uint64_t size = 0;

  static DurableSource& get() {
    static DurableSource* s = [] {
      auto* src = new DurableSource();
      src->size = guest_bytes();
      // One page more, so that the unaligned variant can start 16 bytes in (where malloc puts a
      // large buffer) and still read size bytes.
      src->anon = static_cast<char*>(::mmap(nullptr, src->size + kPage, PROT_READ | PROT_WRITE,
                                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
      if (src->anon == MAP_FAILED) std::abort();
      ::madvise(src->anon, src->size + kPage, MADV_NOHUGEPAGE);
      for (std::uint64_t p = 0; p < src->size / kPage; ++p) {
        pattern::fill_page(src->anon + p * kPage, kPage, 1, p, 1);
      }
      src->memfd = ::memfd_create("memsnap-durable-bench", MFD_CLOEXEC);
      if (src->memfd < 0 || ::ftruncate(src->memfd, static_cast<off_t>(src->size)) != 0) {
        std::abort();
      }
      for (std::uint64_t done = 0; done < src->size;) {
        const ssize_t n = ::pwrite(src->memfd, src->anon + done, src->size - done,
                                   static_cast<off_t>(done));
        if (n <= 0) std::abort();
        done += std::uint64_t(n);
      }
      return src;
    }();
    return *s;
  }
};

// How a reference gets its bytes to the disk.
enum class Way : int {
  kBuffered = 0,        // write() of chunk bytes, then fsync
  kDirect = 1,          // O_DIRECT write() of chunk bytes from the page-aligned source, fsync
  kDirectBounced = 2,   // O_DIRECT from an unaligned source: memcpy each chunk into an aligned
                        // buffer first (what the writer does for a malloc'd strategy buffer)
};

bool write_chunks(int fd, const char* data, std::uint64_t size, std::uint64_t chunk,
                  char* bounce) {
  for (std::uint64_t done = 0; done < size;) {
    const std::uint64_t want = std::min(chunk, size - done);
    const char* from = data + done;
    if (bounce != nullptr) {
      std::memcpy(bounce, from, want);
      from = bounce;
    }
    const ssize_t n = ::write(fd, from, want);
    if (n != static_cast<ssize_t>(want)) return false;  // O_DIRECT: a short write is an error here
    done += want;
  }
  return true;
}

// The best durable write of the run, for the ratios: a new file in the bench directory, chunk
// calls of arg 0 KiB, way arg 1 (Way), fsync before the clock stops. Like memsnap-bench's
// BM_WriteReference/<KiB>/1, whose buffered variant this repeats so both ways share one run.
void BM_DurableWriteReference(benchmark::State& state) {
  DurableSource& src = DurableSource::get();
  const std::uint64_t chunk = std::uint64_t(state.range(0)) << 10;
  const auto way = static_cast<Way>(state.range(1));
  const std::string path = dir() + "/durable-reference";
  char* bounce = nullptr;
  if (way == Way::kDirectBounced) {
    bounce = static_cast<char*>(std::aligned_alloc(kPage, chunk));
    std::memset(bounce, 0, chunk);
  }
  const char* data = way == Way::kDirectBounced ? src.anon + 16 : src.anon;
  const int flags = O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC | (way == Way::kBuffered ? 0 : O_DIRECT);
  double cpu = 0;
  for (auto _ : state) {
    const double c0 = process_cpu_seconds();
    const int fd = ::open(path.c_str(), flags, 0600);
    if (fd < 0) {
      state.SkipWithError("open failed (O_DIRECT not supported here?)");
      break;
    }
    const bool ok = write_chunks(fd, data, src.size, chunk, bounce);
    ::fsync(fd);
    ::close(fd);
    cpu += process_cpu_seconds() - c0;
    if (!ok) {
      state.SkipWithError("write failed");
      break;
    }
    state.PauseTiming();
    ::unlink(path.c_str());
    state.ResumeTiming();
  }
  std::free(bounce);
  const double gib = double(src.size) / double(1 << 30);
  state.SetBytesProcessed(std::int64_t(state.iterations() * src.size));
  state.counters["cpu_s_per_gib"] = cpu / gib / double(std::max<std::int64_t>(1, state.iterations()));
  static const char* const kWays[] = {"write() + fsync", "O_DIRECT + fsync",
                                      "O_DIRECT via bounce buffer + fsync"};
  state.SetLabel(std::to_string(chunk >> 10) + " KiB, " + kWays[state.range(1)]);
}

// A full pause of the whole guest with fsync, its snapshot writer putting the data area into the
// file by arg 1 (0 buffered, 1 O_DIRECT); arg 0 picks the strategy and how its chunks arrive:
// 0 memfd (pread into a malloc'd buffer: unaligned, bounced), 1 memfd read_method=mmap (pointers
// into a mapping: page-aligned), 2 process_vm_readv (its malloc'd buffer: unaligned).
void BM_DurablePause(benchmark::State& state) {
  DurableSource& src = DurableSource::get();
  const int source = static_cast<int>(state.range(0));
  PauseRequest req;
  req.strategy = source == 2 ? "process_vm_readv" : "memfd";
  if (source == 1) req.strategy_options = {{"read_method", "mmap"}};
  req.guest_size = src.size;
  req.sync = true;
  req.data_write = state.range(1) == 1 ? DataWrite::kDirect : DataWrite::kBuffered;
  req.dirty = std::vector<plugin::ByteRange>{{0, src.size}};
  if (source == 2) {
    req.pid = ::getpid();
    req.regions = {{0, reinterpret_cast<std::uint64_t>(src.anon), src.size}};
  } else {
    req.memfd = src.memfd;
  }
  req.out_path = dir() + "/durable.snap";
  const double cpu = bench::time_pauses(state, req).cpu_seconds;
  const double gib = double(src.size) / double(1 << 30);
  state.SetBytesProcessed(std::int64_t(state.iterations() * src.size));
  state.counters["cpu_s_per_gib"] = cpu / gib / double(std::max<std::int64_t>(1, state.iterations()));
  static const char* const kSources[] = {"memfd (pread buffer)", "memfd (mmap)",
                                         "process_vm_readv"};
  state.SetLabel(std::string(kSources[source]) + ", fsync, " +
                 (state.range(1) == 1 ? "direct" : "buffered"));
}

BENCHMARK(BM_DurableWriteReference)
    ->ArgsProduct({{1024, 4096, 16384}, {0, 1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);
BENCHMARK(BM_DurablePause)
    ->ArgsProduct({{0, 1, 2}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);

}  // namespace
}  // namespace memsnap
