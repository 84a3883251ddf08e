// Resume latency and page-fault service latency, per strategy, next to raw userfaultfd
// references measured in the same run (issue 3).
//
//   memsnap-resume-bench --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true
//
// 1. Fault service, per 4 KiB fault, timed by the faulting thread while it reads one byte of
//    every page of a fresh registered region (MEMSNAP_RESUME_BENCH_FAULT_MIB, default 64 MiB):
//      BM_Fault_RawCopy          minimal handler thread: poll + read uffd_msg + UFFDIO_COPY from a
//                                ready buffer (anonymous region, MISSING)
//      BM_Fault_ServerLazy       memsnap FaultServer on a committed snapshot of the same image
//      BM_Fault_RawContinue      minimal handler: UFFDIO_CONTINUE (memfd MAP_SHARED, MINOR, page
//                                cache filled beforehand)
//      BM_Fault_ServerContinue   FaultServer with fill_memfd (background mode) after the fill
//                                finished, so every fault is MINOR -> UFFDIO_CONTINUE
//    each with the handler on the faulting thread's CPU (same_cpu) or the other one
//    (other_cpu); plus BM_FirstTouch (fresh anonymous memory, no userfaultfd) as a floor.
//    Manual time = time to touch the whole region; counter us_per_fault.
// 2. Resume of a MEMSNAP_RESUME_BENCH_GIB (default 1) GiB guest through ResumeSession with a real
//    memsnap-guest, per mode (lazy, background, eager, warm): manual time =
//    ResumeReport::ready_seconds; counters: touch_all_ms (from accept_and_serve's return until the
//    guest answered `verify` over every page against its expect table), and memsnap's phases.
//    warm: write tracking armed by memsnap after ready, while the guest runs (counter
//    arm_after_ready_ms); warm_arm_before_ready: armed by the VMM before it acks (exact diffs,
//    slower resume); warm_no_tracking: none.
//    BM_WarmArm measures, in this process, what a VMM arming before its ack does (mmap of the
//    memfd, UFFDIO_REGISTER WP, UFFDIO_WRITEPROTECT). BM_LiveArm the same write-protect of a
//    guest whose every page is mapped (a live snapshot's arm), against mprotect of the range.
//
// tools/bench/resume_ratios.py turns the JSON output into the tables of docs/performance.md.
// Files go to MEMSNAP_BENCH_DIR (default /var/tmp).
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/fault_server.h"
#include "core/pattern/pattern.h"
#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/resume.h"
#include "core/snapshot/snapshot_chain.h"
#include "core/snapshot/snapshot_format.h"
#include "core/snapshot/snapshot_writer.h"
#include "core/vmm_process.h"
#include "tools/bench/bench_support.h"
#include "tools/guest_client/guest_client.h"

// Debian 12's kernel headers (6.1) predate these; the running kernel decides.
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

namespace memsnap {
namespace {

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kSeed = 1;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::strtoull(v, nullptr, 10) : fallback;
}

std::uint64_t fault_bytes() { return env_u64("MEMSNAP_RESUME_BENCH_FAULT_MIB", 64) << 20; }
std::uint64_t resume_bytes() { return env_u64("MEMSNAP_RESUME_BENCH_GIB", 1) << 30; }

const std::string& bench_dir() { return bench::bench_dir("memsnap-resume-bench"); }
using bench::plugin_dir;
using bench::registry;

// ---------------------------------------------------------------------------------------------
// CPU placement

cpu_set_t& initial_mask() {
  static cpu_set_t mask = [] {
    cpu_set_t m;
    CPU_ZERO(&m);
    if (::sched_getaffinity(0, sizeof(m), &m) != 0) std::abort();
    return m;
  }();
  return mask;
}

std::vector<int> usable_cpus() {
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &initial_mask())) cpus.push_back(c);
  }
  return cpus;
}

void pin_self(int cpu) {
  cpu_set_t m;
  CPU_ZERO(&m);
  CPU_SET(cpu, &m);
  if (::pthread_setaffinity_np(::pthread_self(), sizeof(m), &m) != 0) std::abort();
}

void unpin_self() {
  if (::pthread_setaffinity_np(::pthread_self(), sizeof(cpu_set_t), &initial_mask()) != 0) {
    std::abort();
  }
}

// The toucher runs on the first usable CPU; the handler on the same one or on the second.
struct Placement {
  int toucher = 0;
  int handler = 0;
  bool ok = false;
};

Placement placement(bool other_cpu) {
  const std::vector<int> cpus = usable_cpus();
  Placement p;
  if (cpus.empty() || (other_cpu && cpus.size() < 2)) return p;
  p.toucher = cpus[0];
  p.handler = other_cpu ? cpus[1] : cpus[0];
  p.ok = true;
  return p;
}

struct UnpinAtExit {
  ~UnpinAtExit() { unpin_self(); }
};

// ---------------------------------------------------------------------------------------------
// userfaultfd helpers

int new_uffd(std::uint64_t features) {
  int fd = -1;
  const int dev = ::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    fd = ::ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    ::close(dev);
  }
  if (fd < 0) fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd < 0) return -1;
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = features;
  if (::ioctl(fd, UFFDIO_API, &api) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

bool uffd_register(int uffd, void* addr, std::uint64_t len, std::uint64_t mode) {
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<std::uint64_t>(addr);
  reg.range.len = len;
  reg.mode = mode;
  return ::ioctl(uffd, UFFDIO_REGISTER, &reg) == 0;
}

// The pattern image every fault benchmark serves (generation 1 of seed kSeed, no zero pages).
const std::vector<std::uint8_t>& image() {
  static const std::vector<std::uint8_t>* img = [] {
    auto* v = new std::vector<std::uint8_t>(fault_bytes());
    for (std::uint64_t p = 0; p < v->size() / kPage; ++p) {
      pattern::fill_page(v->data() + p * kPage, kPage, kSeed, p, 1);
    }
    return v;
  }();
  return *img;
}

// The same image as a committed snapshot, written with SnapshotWriter, opened as a chain.
std::shared_ptr<const SnapshotChain> image_chain() {
  static std::shared_ptr<const SnapshotChain> chain = [] {
    const std::string path = bench_dir() + "/fault-image.snap";
    SnapshotParams params;
    params.guest_size = fault_bytes();
    params.sync_on_commit = false;
    auto w = SnapshotWriter::create(path, params, {{0, fault_bytes()}});
    if (!w.ok()) std::abort();
    const plugin::Chunk chunk{0, image().data(), fault_bytes()};
    if (!(*w)->write(&chunk, 1).ok() || !(*w)->commit().ok()) std::abort();
    auto c = SnapshotChain::open({path}, Verify::kFull);
    if (!c.ok()) std::abort();
    return std::make_shared<const SnapshotChain>(std::move(*c));
  }();
  return chain;
}

// A minimal fault handler: poll + read a batch of messages + one ioctl per fault.
class RawHandler {
 public:
  enum class Kind { kCopy, kContinue };
  RawHandler(int uffd, Kind kind, int cpu, std::uint64_t base, const std::uint8_t* src)
      : uffd_(uffd), kind_(kind), base_(base), src_(src) {
    stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    thread_ = std::thread([this, cpu] {
      pin_self(cpu);
      run();
    });
  }
  ~RawHandler() {
    stop();
    ::close(stop_fd_);
  }
  void stop() {
    if (!thread_.joinable()) return;
    const std::uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = ::write(stop_fd_, &one, sizeof(one));
    thread_.join();
  }
  std::uint64_t served() const { return served_.load(); }
  bool failed() const { return failed_.load(); }

 private:
  void run() {
    uffd_msg msgs[64];
    for (;;) {
      pollfd fds[2] = {{uffd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
      if (::poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        failed_ = true;
        return;
      }
      if (fds[1].revents & POLLIN) return;
      const ssize_t got = ::read(uffd_, msgs, sizeof(msgs));
      if (got <= 0) continue;
      for (ssize_t i = 0; i < got / static_cast<ssize_t>(sizeof(uffd_msg)); ++i) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        serve(msgs[i].arg.pagefault.address & ~(kPage - 1));
      }
    }
  }
  void serve(std::uint64_t page) {
    for (;;) {
      int rc;
      if (kind_ == Kind::kCopy) {
        uffdio_copy c{};
        c.dst = page;
        c.src = reinterpret_cast<std::uint64_t>(src_ + (page - base_));
        c.len = kPage;
        rc = ::ioctl(uffd_, UFFDIO_COPY, &c);
      } else {
        uffdio_continue c{};
        c.range.start = page;
        c.range.len = kPage;
        rc = ::ioctl(uffd_, UFFDIO_CONTINUE, &c);
      }
      if (rc == 0) break;
      if (errno == EAGAIN) continue;
      if (errno == EEXIST) {
        uffdio_range r{page, kPage};
        ::ioctl(uffd_, UFFDIO_WAKE, &r);
        break;
      }
      failed_ = true;
      return;
    }
    served_.fetch_add(1, std::memory_order_relaxed);
  }

  int uffd_;
  Kind kind_;
  std::uint64_t base_;
  const std::uint8_t* src_;
  int stop_fd_ = -1;
  std::atomic<std::uint64_t> served_{0};
  std::atomic<bool> failed_{false};
  std::thread thread_;
};

double cpu_seconds(clockid_t clock) {
  timespec ts{};
  ::clock_gettime(clock, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// CPU time of the whole process and of the calling (touching) thread.
struct CpuSample {
  double process = cpu_seconds(CLOCK_PROCESS_CPUTIME_ID);
  double thread = cpu_seconds(CLOCK_THREAD_CPUTIME_ID);
};

struct Touched {
  double seconds = 0;
  double toucher_cpu = 0;  // CPU of the faulting thread (its side of every fault, in the kernel)
  double handler_cpu = 0;  // CPU of every other thread meanwhile: the handler's work
};

// Reads (or writes) one byte of every page, timed from this thread.
Touched touch_all(const std::uint8_t* base, std::uint64_t bytes, bool write) {
  const CpuSample before;
  const auto t0 = Clock::now();
  std::uint64_t sum = 0;
  if (write) {
    for (std::uint64_t off = 0; off < bytes; off += kPage) {
      *reinterpret_cast<volatile std::uint8_t*>(const_cast<std::uint8_t*>(base) + off) = 1;
    }
  } else {
    for (std::uint64_t off = 0; off < bytes; off += kPage) {
      sum += *reinterpret_cast<const volatile std::uint8_t*>(base + off);
    }
  }
  Touched t;
  t.seconds = seconds_since(t0);
  const CpuSample after;
  benchmark::DoNotOptimize(sum);
  t.toucher_cpu = after.thread - before.thread;
  t.handler_cpu = (after.process - before.process) - t.toucher_cpu;
  return t;
}

// Checks a few served pages against the image.
bool spot_check(const std::uint8_t* base, std::uint64_t bytes) {
  const std::uint64_t pages = bytes / kPage;
  for (std::uint64_t p : {std::uint64_t{0}, pages / 3, pages / 2, pages - 1}) {
    if (!pattern::check_page(base + p * kPage, kPage, kSeed, p, 1).ok) return false;
  }
  return true;
}

struct Mapping {
  std::uint8_t* base = nullptr;
  std::uint64_t size = 0;
  int memfd = -1;
  int uffd = -1;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (base) ::munmap(base, size);
    if (uffd >= 0) ::close(uffd);
    if (memfd >= 0) ::close(memfd);
  }
};

// An anonymous region registered MISSING.
bool make_anon(Mapping& m, std::uint64_t size) {
  m.size = size;
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  m.base = static_cast<std::uint8_t*>(p);
  ::madvise(p, size, MADV_NOHUGEPAGE);
  m.uffd = new_uffd(0);
  return m.uffd >= 0 && uffd_register(m.uffd, p, size, UFFDIO_REGISTER_MODE_MISSING);
}

// A memfd mapped MAP_SHARED, registered MISSING|MINOR; with prefill, its page cache holds the
// image first.
bool make_memfd(Mapping& m, std::uint64_t size, bool prefill) {
  m.size = size;
  m.memfd = ::memfd_create("memsnap-resume-bench", MFD_CLOEXEC);
  if (m.memfd < 0 || ::ftruncate(m.memfd, static_cast<off_t>(size)) != 0) return false;
  if (prefill) {
    const std::uint8_t* src = image().data();
    for (std::uint64_t done = 0; done < size;) {
      const ssize_t n = ::pwrite(m.memfd, src + done, std::min<std::uint64_t>(size - done, 8 << 20),
                                 static_cast<off_t>(done));
      if (n <= 0) return false;
      done += static_cast<std::uint64_t>(n);
    }
  }
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, m.memfd, 0);
  if (p == MAP_FAILED) return false;
  m.base = static_cast<std::uint8_t*>(p);
  ::madvise(p, size, MADV_NOHUGEPAGE);
  m.uffd = new_uffd(UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM);
  return m.uffd >= 0 &&
         uffd_register(m.uffd, p, size, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR);
}

struct FaultTotals {
  double seconds = 0;
  double toucher_cpu = 0;
  double handler_cpu = 0;
  std::uint64_t pages = 0;
  void add(benchmark::State& state, const Touched& t, std::uint64_t p) {
    state.SetIterationTime(t.seconds);
    seconds += t.seconds;
    pages += p;
    toucher_cpu += t.toucher_cpu;
    handler_cpu += t.handler_cpu;
  }
  void report(benchmark::State& state, int handler_on, int toucher_on) const {
    const double per = pages ? 1e6 / static_cast<double>(pages) : 0;
    state.counters["us_per_fault"] = seconds * per;
    state.counters["toucher_cpu_us_per_fault"] = toucher_cpu * per;
    state.counters["handler_cpu_us_per_fault"] = handler_cpu * per;
    state.counters["faults_per_iteration"] =
        state.iterations() ? static_cast<double>(pages) / static_cast<double>(state.iterations())
                           : 0;
    state.counters["handler_on_cpu"] = handler_on;
    state.counters["toucher_on_cpu"] = toucher_on;
    state.SetItemsProcessed(static_cast<std::int64_t>(pages));
  }
};

enum class FaultCase { kRawCopy, kServerLazy, kRawContinue, kServerContinue };

// One fault-service measurement: a fresh registered region, its handler started on
// where.handler, every page touched once from where.toucher. Empty error: ok.
std::string run_fault_case(FaultCase which, const Placement& where, Touched& out) {
  const std::uint64_t size = fault_bytes();
  const std::uint64_t pages = size / kPage;
  Mapping m;
  const bool memfd_case = which == FaultCase::kRawContinue || which == FaultCase::kServerContinue;
  const bool ok =
      memfd_case ? make_memfd(m, size, which == FaultCase::kRawContinue) : make_anon(m, size);
  if (!ok) return "cannot set up the registered region";
  const std::uint64_t base = reinterpret_cast<std::uint64_t>(m.base);
  if (which == FaultCase::kRawCopy || which == FaultCase::kRawContinue) {
    RawHandler h(
        m.uffd,
        which == FaultCase::kRawCopy ? RawHandler::Kind::kCopy : RawHandler::Kind::kContinue,
        where.handler, base, image().data());
    pin_self(where.toucher);
    out = touch_all(m.base, size, false);
    h.stop();  // joins the thread: its counters are final
    if (h.failed() || h.served() != pages) {
      return "raw handler failed or served an unexpected number of faults";
    }
  } else {
    FaultServerOptions opts;
    if (which == FaultCase::kServerContinue) opts.fill_memfd = m.memfd;
    pin_self(where.handler);  // the server's thread inherits this affinity
    auto server = FaultServer::start(m.uffd, {{0, base, size}}, image_chain(), opts);
    pin_self(where.toucher);
    if (!server.ok()) return server.error().to_string();
    if (which == FaultCase::kServerContinue &&
        !(*server)->wait_filled(std::chrono::seconds(120)).ok()) {
      return "background fill did not finish";
    }
    out = touch_all(m.base, size, false);
    const FaultStats st = (*server)->stats(true);
    (*server)->stop();
    const std::uint64_t expected_op = which == FaultCase::kServerLazy ? st.copies : st.continues;
    if (!(*server)->error().ok() || st.faults != pages || expected_op != pages) {
      return "FaultServer served an unexpected mix of faults";
    }
  }
  if (!spot_check(m.base, size)) return "served pages do not hold the image";
  return {};
}

void BM_Fault(benchmark::State& state, FaultCase which, bool other_cpu) {
  const Placement where = placement(other_cpu);
  if (!where.ok) {
    state.SkipWithError("needs two usable CPUs");
    return;
  }
  UnpinAtExit unpin;
  const std::uint64_t pages = fault_bytes() / kPage;
  FaultTotals totals;
  for (auto _ : state) {
    Touched t;
    if (std::string err = run_fault_case(which, where, t); !err.empty()) {
      state.SkipWithError(err.c_str());
      return;
    }
    totals.add(state, t, pages);
  }
  totals.report(state, where.handler, where.toucher);
}

// The same comparison, paired: each iteration measures the raw handler and FaultServer back to
// back (alternating which goes first), so both see the same moment of a noisy machine. Manual
// time: both together; counters: each side's us/fault and server/raw.
void BM_FaultPaired(benchmark::State& state, FaultCase raw, FaultCase server, bool other_cpu) {
  const Placement where = placement(other_cpu);
  if (!where.ok) {
    state.SkipWithError("needs two usable CPUs");
    return;
  }
  UnpinAtExit unpin;
  const std::uint64_t pages = fault_bytes() / kPage;
  double raw_s = 0, server_s = 0;
  std::vector<double> ratios;
  for (auto _ : state) {
    Touched r, v;
    const bool raw_first = ratios.size() % 2 == 0;
    for (int k = 0; k < 2; ++k) {
      const bool do_raw = (k == 0) == raw_first;
      if (std::string err = run_fault_case(do_raw ? raw : server, where, do_raw ? r : v);
          !err.empty()) {
        state.SkipWithError(err.c_str());
        return;
      }
    }
    state.SetIterationTime(r.seconds + v.seconds);
    raw_s += r.seconds;
    server_s += v.seconds;
    ratios.push_back(v.seconds / r.seconds);
  }
  std::sort(ratios.begin(), ratios.end());
  const double per = 1e6 / static_cast<double>(pages * state.iterations());
  state.counters["raw_us_per_fault"] = raw_s * per;
  state.counters["server_us_per_fault"] = server_s * per;
  state.counters["server_over_raw"] = server_s / raw_s;
  state.counters["median_pair_ratio"] = ratios[ratios.size() / 2];
  state.counters["handler_on_cpu"] = where.handler;
  state.counters["toucher_on_cpu"] = where.toucher;
}

// Floor: first touch of fresh anonymous memory, no userfaultfd.
void BM_FirstTouch(benchmark::State& state, bool write) {
  const std::uint64_t size = fault_bytes();
  FaultTotals totals;
  for (auto _ : state) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      state.SkipWithError("mmap");
      return;
    }
    ::madvise(p, size, MADV_NOHUGEPAGE);
    totals.add(state, touch_all(static_cast<std::uint8_t*>(p), size, write), size / kPage);
    ::munmap(p, size);
  }
  totals.report(state, -1, -1);
}

// ---------------------------------------------------------------------------------------------
// Resume

// A paused 1 GiB guest: its committed snapshot, the expect table and a dup of its memfd, which
// still holds exactly the snapshot's image (the guest was paused with stay_frozen, then killed).
struct PausedGuest {
  std::string snapshot;
  std::string snapshot_id;
  std::uint64_t generation = 0;
  std::uint64_t size = 0;
  std::vector<std::uint32_t> expected;
  io::UniqueFd memfd;

  static PausedGuest& get() {
    static PausedGuest* g = [] {
      auto* pg = new PausedGuest();
      pg->size = resume_bytes();
      GuestOptions go;
      go.size = pg->size;
      go.backing = "memfd";
      go.seed = kSeed;
      go.zero_fraction = 0.05;
      auto guest = GuestProcess::spawn(go);
      if (!guest.ok()) {
        std::fprintf(stderr, "spawn: %s\n", guest.error().to_string().c_str());
        std::abort();
      }
      auto taken = take_fd_of_process((*guest)->pid(), (*guest)->memfd_number());
      if (!taken.ok()) std::abort();
      io::UniqueFd memfd(*taken);
      PauseRequest req;
      req.pid = (*guest)->pid();
      req.regions = (*guest)->regions();
      req.memfd = memfd.get();
      req.guest_size = pg->size;
      req.strategy = "memfd";
      req.freeze = true;
      req.stay_frozen = true;
      req.sync = true;
      req.out_path = bench_dir() + "/resume-base.snap";
      auto paused = pause(registry(), req);
      if (!paused.ok()) {
        std::fprintf(stderr, "pause: %s\n", paused.error().to_string().c_str());
        std::abort();
      }
      pg->snapshot = req.out_path;
      pg->snapshot_id = paused->snapshot_id;
      pg->generation = paused->generation;
      pg->expected = (*guest)->expected_generations();
      pg->memfd = std::move(memfd);
      (*guest)->kill();
      return pg;
    }();
    return *g;
  }
};

const PhaseTiming* find_phase(const ResumeReport& r, const char* name) {
  for (const auto& p : r.phases) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

void BM_Resume(benchmark::State& state, ResumeMode mode, bool track_writes,
               bool arm_before_ready) {
  PausedGuest& pg = PausedGuest::get();
  static int counter = 0;
  double touch_all_s = 0, hand_over_s = 0, fill_s = 0, serve_s = 0, ready_s = 0;
  double faults = 0, arm_s = 0;
  std::int64_t n = 0;
  for (auto _ : state) {
    RetainedMemory kept;
    if (mode == ResumeMode::kWarm) {
      kept.memfd.reset(::dup(pg.memfd.get()));
      kept.snapshot_id = pg.snapshot_id;
      kept.generation = pg.generation;
      kept.guest_size = pg.size;
    }
    const std::string socket = bench_dir() + "/resume-" + std::to_string(++counter) + ".sock";
    ResumeRequest rr;
    rr.chain = {pg.snapshot};
    rr.socket_path = socket;
    rr.strategy = "memfd";
    rr.mode = mode;
    rr.retained = &kept;
    rr.verify_checksums = false;  // open is not part of ready_seconds; saves bench time
    rr.track_writes = track_writes;
    rr.arm_tracking_before_ready = arm_before_ready;
    auto session = ResumeSession::prepare(registry(), std::move(rr));
    if (!session.ok()) {
      state.SkipWithError(session.error().to_string().c_str());
      return;
    }
    GuestOptions go;
    go.size = pg.size;
    // lazy is the mode of process_vm_readv sandboxes: anonymous guest memory.
    go.backing = mode == ResumeMode::kLazy ? "anon" : "memfd";
    go.seed = kSeed;
    go.handshake_socket = socket;
    go.no_fill = true;
    go.expect = pg.expected;
    go.accept_memfd = true;
    go.track_writes = track_writes;
    auto guest = GuestProcess::spawn(go);
    if (!guest.ok()) {
      state.SkipWithError(guest.error().to_string().c_str());
      return;
    }
    if (Status s = (*session)->accept_and_serve(); !s.ok()) {
      state.SkipWithError(s.error().to_string().c_str());
      return;
    }
    const auto served = Clock::now();
    if (Status s = (*guest)->wait_ready(std::chrono::seconds(60)); !s.ok()) {
      state.SkipWithError(s.error().to_string().c_str());
      return;
    }
    auto verified = (*guest)->command("verify");
    const double touched = seconds_since(served);
    if (!verified.ok() || verified->value("mismatches", 1ULL) != 0 ||
        verified->value("pages", 0ULL) != pg.size / kPage) {
      state.SkipWithError("the resumed guest does not hold the snapshot");
      return;
    }
    const ResumeReport& rep = (*session)->report();
    if (rep.mode != mode || (track_writes && !rep.write_tracking)) {
      state.SkipWithError(("unexpected mode or no write tracking: " + rep.mode_reason + "; " +
                           rep.write_tracking_reason)
                              .c_str());
      return;
    }
    if (Status s = (*session)->wait_tracking_armed(); !s.ok()) {
      state.SkipWithError(s.error().to_string().c_str());
      return;
    }
    arm_s += rep.tracking_arm_seconds;
    faults += static_cast<double>((*session)->fault_stats().faults);
    state.SetIterationTime(rep.ready_seconds);
    ready_s += rep.ready_seconds;
    touch_all_s += touched;
    if (const auto* p = find_phase(rep, "hand_over")) hand_over_s += p->wall_seconds;
    if (const auto* p = find_phase(rep, "fill")) fill_s += p->wall_seconds;
    if (const auto* p = find_phase(rep, "serve")) serve_s += p->wall_seconds;
    ++n;
    (*guest)->kill();
    (*session)->stop();
  }
  if (n == 0) return;
  const double k = 1e3 / static_cast<double>(n);
  state.counters["ready_ms"] = ready_s * k;
  state.counters["touch_all_ms"] = touch_all_s * k;
  state.counters["hand_over_ms"] = hand_over_s * k;
  state.counters["fill_ms"] = fill_s * k;
  state.counters["serve_ms"] = serve_s * k;
  state.counters["faults"] = faults / static_cast<double>(n);
  // Warm/eager, tracking armed by memsnap after ready: how long that took (off the resume path).
  state.counters["arm_after_ready_ms"] = arm_s * k;
  state.counters["guest_mib"] = static_cast<double>(pg.size >> 20);
}

// What arming a live snapshot (issue 19) costs a running guest: its memory is mapped and every
// page present, so write-protecting it rewrites every page-table entry (a warm arm, above, finds
// none). Timed: UFFDIO_REGISTER WP and UFFDIO_WRITEPROTECT over the whole guest; the reference in
// the same run is mprotect(PROT_READ) of the same populated range, the kernel's plain way to
// write-protect it. The guest would be stopped for the write-protect.
void BM_LiveArm(benchmark::State& state, bool reference) {
  PausedGuest& pg = PausedGuest::get();
  double populate_s = 0, register_s = 0, protect_s = 0;
  std::int64_t n = 0;
  for (auto _ : state) {
    void* p = ::mmap(nullptr, pg.size, PROT_READ | PROT_WRITE, MAP_SHARED, pg.memfd.get(), 0);
    if (p == MAP_FAILED) {
      state.SkipWithError("mmap");
      return;
    }
    ::madvise(p, pg.size, MADV_NOHUGEPAGE);
    const auto t0 = Clock::now();
    if (::madvise(p, pg.size, MADV_POPULATE_WRITE) != 0) {
      ::munmap(p, pg.size);
      state.SkipWithError("MADV_POPULATE_WRITE");
      return;
    }
    populate_s += seconds_since(t0);
    int uffd = -1;
    const auto t1 = Clock::now();
    if (reference) {
      if (::mprotect(p, pg.size, PROT_READ) != 0) {
        ::munmap(p, pg.size);
        state.SkipWithError("mprotect");
        return;
      }
    } else {
      uffd = new_uffd(UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
      if (uffd < 0 || !uffd_register(uffd, p, pg.size, UFFDIO_REGISTER_MODE_WP)) {
        state.SkipWithError("UFFDIO_REGISTER WP");
        return;
      }
      register_s += seconds_since(t1);
      uffdio_writeprotect wp{};
      wp.range.start = reinterpret_cast<std::uint64_t>(p);
      wp.range.len = pg.size;
      wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
      if (::ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0) {
        state.SkipWithError("UFFDIO_WRITEPROTECT");
        return;
      }
    }
    const double t = seconds_since(t1);
    state.SetIterationTime(t);
    protect_s += t;
    ++n;
    ::munmap(p, pg.size);
    if (uffd >= 0) ::close(uffd);
  }
  if (n == 0) return;
  const double k = 1e3 / static_cast<double>(n);
  state.counters["populate_ms"] = populate_s * k;
  state.counters["register_ms"] = register_s * k;
  state.counters["protect_ms"] = protect_s * k;
  state.counters["us_per_page"] = protect_s * k * 1e3 / static_cast<double>(pg.size / 4096);
  state.counters["guest_mib"] = static_cast<double>(pg.size >> 20);
}

// What the stand-in does with a warm hand-over before it acks, in this process: map the
// retained memfd, then (with write tracking) register the range for WP and write-protect it.
void BM_WarmArm(benchmark::State& state, bool track_writes) {
  PausedGuest& pg = PausedGuest::get();
  double map_s = 0, register_s = 0, protect_s = 0;
  std::int64_t n = 0;
  for (auto _ : state) {
    const int uffd =
        new_uffd(UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM |
                 UFFD_FEATURE_WP_HUGETLBFS_SHMEM | (track_writes ? UFFD_FEATURE_WP_ASYNC : 0));
    if (uffd < 0) {
      state.SkipWithError("userfaultfd");
      return;
    }
    const auto t0 = Clock::now();
    void* p = ::mmap(nullptr, pg.size, PROT_READ | PROT_WRITE, MAP_SHARED, pg.memfd.get(), 0);
    if (p == MAP_FAILED) {
      ::close(uffd);
      state.SkipWithError("mmap");
      return;
    }
    ::madvise(p, pg.size, MADV_NOHUGEPAGE);
    const double t_map = seconds_since(t0);
    double t_reg = t_map, t_wp = t_map;
    if (track_writes) {
      if (!uffd_register(uffd, p, pg.size, UFFDIO_REGISTER_MODE_WP)) {
        state.SkipWithError("UFFDIO_REGISTER WP");
        return;
      }
      t_reg = seconds_since(t0);
      uffdio_writeprotect wp{};
      wp.range.start = reinterpret_cast<std::uint64_t>(p);
      wp.range.len = pg.size;
      wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
      if (::ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0) {
        state.SkipWithError("UFFDIO_WRITEPROTECT");
        return;
      }
      t_wp = seconds_since(t0);
    }
    state.SetIterationTime(t_wp);
    map_s += t_map;
    register_s += t_reg - t_map;
    protect_s += t_wp - t_reg;
    ++n;
    ::munmap(p, pg.size);
    ::close(uffd);
  }
  if (n == 0) return;
  const double k = 1e3 / static_cast<double>(n);
  state.counters["mmap_ms"] = map_s * k;
  state.counters["register_ms"] = register_s * k;
  state.counters["writeprotect_ms"] = protect_s * k;
}

// FaultServer::start on the resume benchmark's 1 GiB chain (its "serve" phase in every mode):
// map the layers, flatten the chain, allocate the block states, start the thread.
void BM_ServerStart(benchmark::State& state) {
  PausedGuest& pg = PausedGuest::get();
  auto chain = SnapshotChain::open({pg.snapshot}, Verify::kHeaderAndMap);
  if (!chain.ok()) {
    state.SkipWithError(chain.error().to_string().c_str());
    return;
  }
  auto shared = std::make_shared<const SnapshotChain>(std::move(*chain));
  double flatten_s = 0;
  for (auto _ : state) {
    const int uffd = new_uffd(0);
    if (uffd < 0) {
      state.SkipWithError("userfaultfd");
      return;
    }
    const auto t0 = Clock::now();
    auto server = FaultServer::start(uffd, {{0, 0x7f0000000000ULL, pg.size}}, shared, {});
    state.SetIterationTime(seconds_since(t0));
    if (!server.ok()) {
      ::close(uffd);
      state.SkipWithError(server.error().to_string().c_str());
      return;
    }
    (*server)->stop();
    server->reset();
    ::close(uffd);
    const auto t1 = Clock::now();
    benchmark::DoNotOptimize(shared->flatten());
    flatten_s += seconds_since(t1);
  }
  state.counters["flatten_ms"] = flatten_s * 1e3 / static_cast<double>(state.iterations());
  state.counters["extents"] = static_cast<double>(shared->flatten().size());
}

void register_all() {
  const int fault_iters = static_cast<int>(env_u64("MEMSNAP_RESUME_BENCH_FAULT_ITERS", 8));
  const int resume_iters = static_cast<int>(env_u64("MEMSNAP_RESUME_BENCH_ITERS", 3));
  struct FaultDef {
    const char* name;
    FaultCase which;
  };
  for (const FaultDef& d : {FaultDef{"BM_Fault_RawCopy", FaultCase::kRawCopy},
                            FaultDef{"BM_Fault_ServerLazy", FaultCase::kServerLazy},
                            FaultDef{"BM_Fault_RawContinue", FaultCase::kRawContinue},
                            FaultDef{"BM_Fault_ServerContinue", FaultCase::kServerContinue}}) {
    for (bool other : {false, true}) {
      benchmark::RegisterBenchmark(
          (std::string(d.name) + (other ? "/other_cpu" : "/same_cpu")).c_str(),
          [which = d.which, other](benchmark::State& s) { BM_Fault(s, which, other); })
          ->Iterations(fault_iters)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    }
  }
  for (bool other : {false, true}) {
    const char* place = other ? "/other_cpu" : "/same_cpu";
    benchmark::RegisterBenchmark((std::string("BM_FaultPaired_Copy") + place).c_str(),
                                 [other](benchmark::State& st) {
                                   BM_FaultPaired(st, FaultCase::kRawCopy, FaultCase::kServerLazy,
                                                  other);
                                 })
        ->Iterations(fault_iters)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark((std::string("BM_FaultPaired_Continue") + place).c_str(),
                                 [other](benchmark::State& st) {
                                   BM_FaultPaired(st, FaultCase::kRawContinue,
                                                  FaultCase::kServerContinue, other);
                                 })
        ->Iterations(fault_iters)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  for (bool write : {false, true}) {
    benchmark::RegisterBenchmark(write ? "BM_FirstTouch/write" : "BM_FirstTouch/read",
                                 [write](benchmark::State& s) { BM_FirstTouch(s, write); })
        ->Iterations(fault_iters)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  struct ResumeDef {
    const char* name;
    ResumeMode mode;
    bool track;
    bool arm_before = false;
  };
  for (const ResumeDef& d : {ResumeDef{"BM_Resume/lazy", ResumeMode::kLazy, true},
                             ResumeDef{"BM_Resume/background", ResumeMode::kBackground, true},
                             ResumeDef{"BM_Resume/eager", ResumeMode::kEager, true},
                             ResumeDef{"BM_Resume/warm", ResumeMode::kWarm, true},
                             ResumeDef{"BM_Resume/warm_arm_before_ready", ResumeMode::kWarm, true,
                                       true},
                             ResumeDef{"BM_Resume/warm_no_tracking", ResumeMode::kWarm, false}}) {
    benchmark::RegisterBenchmark(d.name,
                                 [mode = d.mode, track = d.track, before = d.arm_before](
                                     benchmark::State& s) { BM_Resume(s, mode, track, before); })
        ->Iterations(resume_iters)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  benchmark::RegisterBenchmark("BM_ServerStart", BM_ServerStart)
      ->Iterations(20)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  for (bool reference : {false, true}) {
    benchmark::RegisterBenchmark(reference ? "BM_LiveArm/mprotect" : "BM_LiveArm/uffd_wp",
                                 [reference](benchmark::State& s) { BM_LiveArm(s, reference); })
        ->Iterations(5)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  for (bool track : {true, false}) {
    benchmark::RegisterBenchmark(track ? "BM_WarmArm/track_writes" : "BM_WarmArm/no_tracking",
                                 [track](benchmark::State& s) { BM_WarmArm(s, track); })
        ->Iterations(10)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace
}  // namespace memsnap

int main(int argc, char** argv) {
  memsnap::initial_mask();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  memsnap::register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  std::error_code ec;
  std::filesystem::remove_all(memsnap::bench_dir(), ec);
  return 0;
}
