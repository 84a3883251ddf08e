// Compares SnapshotWriter::write() with plain write() of the same bytes into a new file in the
// same directory, alternating runs (page-cache state shifts between runs; ratios of medians are
// what to look at). Usage:
//   snapshot_writer_bench [dir=/tmp] [MiB=1024] [reps=7] [chunk KiB=2048] [inline]
// `inline` turns SnapshotParams::hash_in_parallel off.
#include <fcntl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/snapshot/snapshot_writer.h"

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double cpu() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

// Involuntary context switches of the calling thread: a run that has many was competing for a
// CPU (with other processes, or with the writer's own hash thread on a busy machine).
long preempted() {
  rusage ru{};
  ::getrusage(RUSAGE_THREAD, &ru);
  return ru.ru_nivcsw;
}

double process_cpu() {
  timespec ts{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/tmp";
  const std::uint64_t size = (argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1024) << 20;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 7;
  const std::uint64_t chunk = (argc > 4 ? std::strtoull(argv[4], nullptr, 10) : 2048) << 10;
  const bool parallel = !(argc > 5 && std::string(argv[5]) == "inline");
  if (size == 0 || chunk == 0 || size % chunk != 0 || chunk % 4096 != 0 || reps <= 0) {
    std::fprintf(stderr, "size must be a multiple of chunk, chunk a multiple of 4 KiB\n");
    return 2;
  }
  std::vector<std::uint8_t> buf(size);
  std::mt19937_64 rng(1);
  for (std::uint64_t i = 0; i < size; i += 8) {
    const std::uint64_t w = rng() | 1;
    std::memcpy(buf.data() + i, &w, 8);
  }
  const std::string plain_path = dir + "/memsnap-bench-plain";
  const std::string snap_path = dir + "/memsnap-bench.snap";
  // Plain write() of the same bytes, at file offset 0 and at the writer's data offset (the
  // offset changes how the page cache allocates, so the second is the like-for-like baseline).
  std::vector<double> plain, snap, plain_cpu, snap_cpu, plain0, plain0_cpu, snap_all_cpu;
  std::vector<long> snap_preempted;
  auto run_plain = [&](std::uint64_t start, std::vector<double>& wall, std::vector<double>& cpus) {
    const int fd = ::open(plain_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    if (fd < 0 || ::lseek(fd, static_cast<off_t>(start), SEEK_SET) < 0) std::abort();
    const double t0 = now(), c0 = cpu();
    for (std::uint64_t off = 0; off < size; off += chunk) {
      if (::write(fd, buf.data() + off, chunk) != static_cast<ssize_t>(chunk)) std::abort();
    }
    wall.push_back(now() - t0);
    cpus.push_back(cpu() - c0);
    ::fsync(fd);
    ::close(fd);
    ::unlink(plain_path.c_str());
  };
  auto run_snap = [&] {
    memsnap::SnapshotParams p;
    p.guest_size = size;
    p.sync_on_commit = false;
    p.hash_in_parallel = parallel;
    auto w = memsnap::SnapshotWriter::create(snap_path, p, {{0, size}});
    if (!w.ok()) std::abort();
    const double t0 = now(), c0 = cpu(), a0 = process_cpu();
    const long p0 = preempted();
    for (std::uint64_t off = 0; off < size; off += chunk) {
      const memsnap::plugin::Chunk c{off, buf.data() + off, chunk};
      if (!(*w)->write(&c, 1).ok()) std::abort();
    }
    snap.push_back(now() - t0);
    snap_cpu.push_back(cpu() - c0);
    snap_all_cpu.push_back(process_cpu() - a0);
    snap_preempted.push_back(preempted() - p0);
    if (!(*w)->commit().ok()) std::abort();
    const int fd = ::open(snap_path.c_str(), O_RDONLY | O_CLOEXEC);
    ::fsync(fd);
    ::close(fd);
    ::unlink(snap_path.c_str());
  };
  run_plain(0, plain0, plain0_cpu);  // warm-up: the first run pays for faulting memory in
  plain0.clear();
  plain0_cpu.clear();
  const std::uint64_t at = memsnap::kSnapshotDataOffset;
  auto gib = [size](double seconds) { return double(size) / seconds / (1 << 30); };
  for (int rep = 0; rep < reps; ++rep) {
    if (rep % 2 == 0) {
      run_plain(at, plain, plain_cpu);
      run_snap();
      run_plain(0, plain0, plain0_cpu);
    } else {
      run_plain(0, plain0, plain0_cpu);
      run_snap();
      run_plain(at, plain, plain_cpu);
    }
    std::printf(
        "rep %d: write()@%llu %.2f GiB/s (cpu %.0f ms), SnapshotWriter %.2f GiB/s (cpu %.0f ms, "
        "all threads %.0f ms, preempted %ld times), write()@0 %.2f GiB/s (cpu %.0f ms)\n",
        rep, static_cast<unsigned long long>(at), gib(plain.back()), plain_cpu.back() * 1e3,
        gib(snap.back()), snap_cpu.back() * 1e3, snap_all_cpu.back() * 1e3, snap_preempted.back(),
        gib(plain0.back()), plain0_cpu.back() * 1e3);
  }
  const double mp = median(plain), ms = median(snap), m0 = median(plain0);
  std::printf(
      "median: write()@%llu %.2f GiB/s, SnapshotWriter %.2f GiB/s (ratio %.3f), write()@0 "
      "%.2f GiB/s (ratio %.3f); cpu %.0f / %.0f / %.0f ms\n",
      static_cast<unsigned long long>(at), gib(mp), gib(ms), mp / ms, gib(m0), m0 / ms,
      median(plain_cpu) * 1e3, median(snap_cpu) * 1e3, median(plain0_cpu) * 1e3);
  return 0;
}
