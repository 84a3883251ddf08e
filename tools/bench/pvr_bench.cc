// process_vm_readv's two-copy pipeline taken apart (issue 18 part 3): which of its parts bounds a
// full export, and what buffer size, iovec batching and overlap of reading and writing buy. Part
// of memsnap-bench; run it next to the write() reference it is judged against:
//
//   memsnap-bench --benchmark_filter='BM_WriteReference/.*/[02]/|BM_Pvr'
//                 --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true
//
// BM_PvrPipeline/<buffer KiB>/<variant>/<remote iovec KiB> moves 1 GiB of this process's own
// anonymous memory (no THP, as a VMM's guest memory often is) without the snapshot writer:
//   variant 0  process_vm_readv into the buffer only: the read's bound
//   variant 1  write() of the same buffer again and again, no read: the write's bound when its
//              source is cache-hot
//   variant 2  one thread: read a buffer, write() it to a new file, repeat
//   variant 3  two threads: a reader fills one buffer while this thread write()s the other
// remote iovec KiB 0 reads a whole buffer with one remote iovec; otherwise the buffer is asked
// for in iovecs of that size, at most IOV_MAX a call (how a scattered diff reaches the kernel).
//
// BM_PvrExport/<buffer KiB> is the strategy itself through pause() (snapshot writer included:
// zero detection, checksums, writev) with that buffer_bytes. A reader_thread option that
// overlapped the reads with the sink's writes was measured with this benchmark at commit a158e4f
// and taken out again (docs/performance.md, issue 18 part 3).
#include <fcntl.h>
#include <limits.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

#include "core/pattern/pattern.h"
#include "core/pause.h"
#include "tools/bench/bench_support.h"

namespace memsnap {
namespace {

constexpr std::uint64_t kPage = 4096;

// 1 GiB of the pattern in anonymous memory of our own: memsnap-bench's other source lives in
// export_bench.cc, and a second GiB costs only memory.
struct PvrSource {
  char* data = nullptr;
  std::uint64_t size = 0;

  static const PvrSource& get() {
    static const PvrSource* s = [] {
      auto* src = new PvrSource();
      const char* gib = std::getenv("MEMSNAP_BENCH_GIB");
      src->size = (gib ? std::strtoull(gib, nullptr, 10) : 1) << 30;
      src->data = static_cast<char*>(
          mmap(nullptr, src->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
      if (src->data == MAP_FAILED) std::abort();
      madvise(src->data, src->size, MADV_NOHUGEPAGE);
      for (std::uint64_t p = 0; p < src->size / kPage; ++p) {
        pattern::fill_page(src->data + p * kPage, kPage, 1, p, 1);
      }
      return src;
    }();
    return *s;
  }
};

const std::string& dir() { return bench::bench_dir("memsnap-bench"); }

using bench::process_cpu_seconds;

// Reads source [offset, offset+length) into buffer with process_vm_readv of our own pid: one
// remote iovec, or iovecs of iov_bytes each, at most IOV_MAX a call.
void read_span(const char* source, std::uint64_t offset, std::uint64_t length, char* buffer,
               std::uint64_t iov_bytes, std::vector<iovec>& remote) {
  const std::uint64_t piece = iov_bytes == 0 ? length : iov_bytes;
  for (std::uint64_t done = 0; done < length;) {
    const std::uint64_t call = std::min<std::uint64_t>(length - done, piece * IOV_MAX);
    remote.clear();
    for (std::uint64_t at = 0; at < call; at += piece) {
      remote.push_back(
          iovec{const_cast<char*>(source) + offset + done + at, std::min(piece, call - at)});
    }
    const iovec local{buffer + done, call};
    if (process_vm_readv(getpid(), &local, 1, remote.data(), remote.size(), 0) !=
        static_cast<ssize_t>(call)) {
      std::abort();  // our own resident memory: a short read here is a broken benchmark
    }
    done += call;
  }
}

void write_all(int fd, const char* data, std::uint64_t size) {
  for (std::uint64_t done = 0; done < size;) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) std::abort();
    done += static_cast<std::uint64_t>(n);
  }
}

// Variant 3: buffers alternate between a reader thread and this (writing) thread; each buffer
// has a semaphore saying "filled" and one saying "free".
void overlapped(const PvrSource& src, std::uint64_t buffer_bytes, std::uint64_t iov_bytes,
                std::vector<char>* buffers, int fd) {
  std::binary_semaphore filled[2] = {std::binary_semaphore(0), std::binary_semaphore(0)};
  std::binary_semaphore free_[2] = {std::binary_semaphore(1), std::binary_semaphore(1)};
  const std::uint64_t count = src.size / buffer_bytes;
  std::thread reader([&] {
    std::vector<iovec> remote;
    for (std::uint64_t i = 0; i < count; ++i) {
      free_[i % 2].acquire();
      read_span(src.data, i * buffer_bytes, buffer_bytes, buffers[i % 2].data(), iov_bytes, remote);
      filled[i % 2].release();
    }
  });
  for (std::uint64_t i = 0; i < count; ++i) {
    filled[i % 2].acquire();
    write_all(fd, buffers[i % 2].data(), buffer_bytes);
    free_[i % 2].release();
  }
  reader.join();
}

void BM_PvrPipeline(benchmark::State& state) {
  const PvrSource& src = PvrSource::get();
  const std::uint64_t buffer_bytes = static_cast<std::uint64_t>(state.range(0)) << 10;
  const int variant = static_cast<int>(state.range(1));
  const std::uint64_t iov_bytes = static_cast<std::uint64_t>(state.range(2)) << 10;
  std::vector<char> buffers[2] = {std::vector<char>(buffer_bytes, 1),
                                  std::vector<char>(buffer_bytes, 1)};
  std::vector<iovec> remote;
  const std::string path = dir() + "/pvr-pipeline";
  double cpu = 0;
  for (auto _ : state) {
    const double cpu_start = process_cpu_seconds();
    const int fd =
        variant == 0 ? -1 : ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
    if (variant == 3) {
      overlapped(src, buffer_bytes, iov_bytes, buffers, fd);
    } else {
      for (std::uint64_t at = 0; at < src.size; at += buffer_bytes) {
        if (variant != 1)
          read_span(src.data, at, buffer_bytes, buffers[0].data(), iov_bytes, remote);
        if (variant != 0) write_all(fd, buffers[0].data(), buffer_bytes);
      }
    }
    benchmark::DoNotOptimize(buffers[0].data());
    if (fd >= 0) ::close(fd);  // timed, as in BM_WriteReference
    cpu += process_cpu_seconds() - cpu_start;
    state.PauseTiming();
    if (fd >= 0) ::unlink(path.c_str());
    state.ResumeTiming();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * src.size));
  state.counters["process_cpu_s"] = cpu / double(std::max<std::int64_t>(1, state.iterations()));
  static const char* const kNames[] = {"read only", "write only (hot buffer)",
                                       "read then write, one thread",
                                       "read and write overlapped, two threads"};
  state.SetLabel(std::string(kNames[variant]) +
                 (iov_bytes == 0 ? "" : ", " + std::to_string(iov_bytes >> 10) + " KiB iovecs"));
}

void BM_PvrExport(benchmark::State& state) {
  const PvrSource& src = PvrSource::get();
  const std::uint64_t buffer_bytes = static_cast<std::uint64_t>(state.range(0)) << 10;
  PauseRequest req;
  req.strategy = "process_vm_readv";
  req.strategy_options = {{"buffer_bytes", std::to_string(buffer_bytes)}};
  req.guest_size = src.size;
  req.sync = false;
  req.dirty = std::vector<plugin::ByteRange>{{0, src.size}};
  req.pid = getpid();
  req.regions = {{0, reinterpret_cast<std::uint64_t>(src.data), src.size}};
  req.out_path = dir() + "/pvr-export.snap";
  const bench::PauseCost cost = bench::time_pauses(state, req);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * src.size));
  const double n = double(std::max<std::int64_t>(1, state.iterations()));
  state.counters["cpu_s_per_pause"] = cost.cpu_seconds / n;
  state.counters["process_cpu_s"] = cost.process_cpu_seconds / n;
  state.SetLabel(std::to_string(buffer_bytes >> 10) + " KiB buffer");
}

BENCHMARK(BM_PvrPipeline)
    ->ArgsProduct({{256, 1024, 4096, 16384}, {0, 1, 2, 3}, {0}})
    ->Args({1024, 0, 4})
    ->Args({1024, 0, 64})
    ->Args({4096, 0, 4})
    ->Args({4096, 2, 4})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);
BENCHMARK(BM_PvrExport)
    ->Arg(256)
    ->Arg(1024)
    ->Arg(2048)
    ->Arg(4096)
    ->Arg(16384)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);

}  // namespace
}  // namespace memsnap
