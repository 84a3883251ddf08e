// memsnap-guest: a stand-in for a VMM, for tests, benchmarks and demos. It holds "guest memory"
// (anonymous memory or a memfd, mapped as one or more regions), fills it with a verifiable
// per-page pattern, and then obeys one command per line on stdin, answering one JSON line each:
//
//   dirty FRACTION random|sequential SEED   write a new generation into that share of the pages
//   verify                                  check every page against the generation it should hold
//   discard FIRST_PAGE COUNT                release pages like a balloon: {"discarded":COUNT}
//   write-loop FIRST_PAGE COUNT             a thread writes those pages over and over, each
//                                           round a new generation, the i-th write of a round
//                                           to page FIRST + (i * STRIDE) % COUNT (a scattered
//                                           order): {"writing":true,"stride":STRIDE}
//   write-status                            {"rounds":N}: rounds the thread has finished
//   write-stop                              stops it: {"generation":G,"position":K,"rounds":N}:
//                                           the round's first K pages hold G, the rest
//                                           G-1 (or what they held before, when G-1 is
//                                           "before": the generation when the loop began)
//   ping                                    {"ok":true,"ready":true,"uffd","wp_async",
//                                            "memfd_from_memsnap","memfd_fd","backing",
//                                            "generation"}
//   exit
//
// At start it prints its layout: {"pid", "backing", "memfd_fd", "guest_size", "page_size",
// "seed", "generation", "uffd", "wp_async", "uffd_features",
// "regions":[{"guest_offset","host_addr","size"}]}. memsnap can SIGSTOP and SIGCONT it like any
// VMM.
//
// Resume, like Firecracker restoring with the UFFD memory backend (--handshake SOCKET): it
// creates a userfaultfd, registers every region, prints the layout, then sends the handshake
// (core/handshake) and keeps the connection open. It never reads the userfaultfd: whoever
// accepted the handshake serves its faults, and a page access blocks until they do. Commands are
// read only once the handshake (and, with --accept-memfd, the memsnap reply) is done, so `ping`
// answering means "ready".
//   --no-fill           do not write the pattern (a resumed guest's memory comes from memsnap)
//   --expect FILE       with --no-fill: little-endian uint32 per page, the generation it should
//                       hold; the generation counter continues from the largest
//   --accept-memfd      wait up to 30 s for memsnap's reply; a memfd in it (size == guest size) is
//                       mapped MAP_FIXED over the regions, registered for write tracking, becomes
//                       the guest's memfd (same fd number when there was one), and is acked
//   --no-track-writes   no UFFD_FEATURE_WP_ASYNC / UFFDIO_REGISTER_MODE_WP
//   --track-writes sync write-protect without WP_ASYNC (memfd memory only): each write to a
//                       protected page is a fault whoever serves the userfaultfd must resolve
//                       (what memsnap's live pauses need); "async" is the default
// A misbehaving VMM, for the tests of what memsnap does then:
//   --ack ok|bad|none   with --accept-memfd: after mapping a handed memfd, ack it (ok, the
//                       default), send a wrong ack (bad), or never ack (none); the guest runs on
//                       either way
//   --stray-page        also register one page outside every region it announces; the command
//                       `touch-stray` answers {"touching":true}, then reads that page (a fault
//                       nobody can serve: memsnap's fault server stops on it) and answers
//                       {"touched":true} if the read ever returns
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/handshake/handshake.h"
#include "core/pattern/pattern.h"

// The build's kernel headers (6.1) predate these; the running kernel decides whether it has them.
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

namespace {

using nlohmann::json;
constexpr std::uint64_t kPage = 4096;
constexpr auto kReplyTimeout = std::chrono::seconds(30);

struct Options {
  std::uint64_t size = 64ULL << 20;
  std::string backing = "memfd";
  int regions = 1;
  bool thp = false;
  std::uint64_t seed = 1;
  double zero_fraction = 0.0;
  std::string memfd_name = "memsnap-guest";
  std::string handshake;  // socket path; empty: no userfaultfd, no handshake
  bool no_fill = false;
  std::string expect_file;
  bool accept_memfd = false;
  bool track_writes = true;
  bool write_faults = false;  // --track-writes sync
  std::string ack = "ok";
  bool stray_page = false;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "memsnap-guest: %s\n"
               "usage: memsnap-guest [--size BYTES[K|M|G]] [--backing anon|memfd] [--regions N]\n"
               "                     [--thp] [--seed N] [--zero-fraction F] [--memfd-name NAME]\n"
               "                     [--handshake SOCKET [--accept-memfd] [--no-track-writes]]\n"
               "                     [--no-fill [--expect FILE]]\n",
               why.c_str());
  std::exit(2);
}

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "memsnap-guest: %s\n", what.c_str());
  std::exit(1);
}

[[noreturn]] void die_errno(const std::string& what) { die(what + ": " + std::strerror(errno)); }

std::uint64_t parse_size(const std::string& s) {
  char* end = nullptr;
  std::uint64_t v = std::strtoull(s.c_str(), &end, 10);
  if (end == s.c_str()) usage("bad size " + s);
  switch (*end) {
    case 'G':
    case 'g':
      v <<= 30;
      break;
    case 'M':
    case 'm':
      v <<= 20;
      break;
    case 'K':
    case 'k':
      v <<= 10;
      break;
    case '\0':
      break;
    default:
      usage("bad size " + s);
  }
  return v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--size")
      o.size = parse_size(next());
    else if (a == "--backing")
      o.backing = next();
    else if (a == "--regions")
      o.regions = std::atoi(next().c_str());
    else if (a == "--thp")
      o.thp = true;
    else if (a == "--seed")
      o.seed = std::strtoull(next().c_str(), nullptr, 10);
    else if (a == "--zero-fraction")
      o.zero_fraction = std::atof(next().c_str());
    else if (a == "--memfd-name")
      o.memfd_name = next();
    else if (a == "--handshake")
      o.handshake = next();
    else if (a == "--no-fill")
      o.no_fill = true;
    else if (a == "--expect")
      o.expect_file = next();
    else if (a == "--accept-memfd")
      o.accept_memfd = true;
    else if (a == "--no-track-writes")
      o.track_writes = false;
    else if (a == "--track-writes") {
      const std::string how = next();
      if (how != "sync" && how != "async") usage("--track-writes is sync or async");
      o.write_faults = how == "sync";
    } else if (a == "--ack")
      o.ack = next();
    else if (a == "--stray-page")
      o.stray_page = true;
    else
      usage("unknown argument " + a);
  }
  if (o.backing != "anon" && o.backing != "memfd") usage("--backing is anon or memfd");
  if (o.size == 0 || o.size % kPage != 0) usage("--size must be a positive multiple of 4 KiB");
  if (o.regions < 1 || o.size / kPage < static_cast<std::uint64_t>(o.regions))
    usage("bad --regions");
  if (!o.expect_file.empty() && !o.no_fill) usage("--expect needs --no-fill");
  if (o.accept_memfd && o.handshake.empty()) usage("--accept-memfd needs --handshake");
  if (o.ack != "ok" && o.ack != "bad" && o.ack != "none") usage("--ack is ok, bad or none");
  if (o.stray_page && o.handshake.empty()) usage("--stray-page needs --handshake");
  if (o.write_faults && (!o.track_writes || o.backing != "memfd")) {
    usage("--track-writes sync needs memfd memory and write tracking");
  }
  return o;
}

std::vector<std::uint32_t> read_expect(const std::string& path, std::uint64_t pages) {
  std::ifstream in(path, std::ios::binary);
  if (!in) die("cannot read --expect file " + path);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() != pages * 4) {
    die("--expect file " + path + " holds " + std::to_string(bytes.size()) + " bytes, not " +
        std::to_string(pages * 4) + " (one little-endian uint32 per page)");
  }
  std::vector<std::uint32_t> out(pages);
  const auto* b = reinterpret_cast<const unsigned char*>(bytes.data());
  for (std::uint64_t p = 0; p < pages; ++p) {
    out[p] = static_cast<std::uint32_t>(b[4 * p]) | static_cast<std::uint32_t>(b[4 * p + 1]) << 8 |
             static_cast<std::uint32_t>(b[4 * p + 2]) << 16 |
             static_cast<std::uint32_t>(b[4 * p + 3]) << 24;
  }
  return out;
}

// A new userfaultfd, non-blocking and close-on-exec like Firecracker's: /dev/userfaultfd when it
// is accessible (works without CAP_SYS_PTRACE even if vm.unprivileged_userfaultfd is 0), else
// the system call.
int new_userfaultfd() {
  const int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    const int fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    close(dev);
    if (fd >= 0) return fd;
  }
  return static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
}

// Opens a userfaultfd and enables `features` on it; -1 (errno set) if the kernel refuses them.
int userfaultfd_with(std::uint64_t features) {
  const int fd = new_userfaultfd();
  if (fd < 0) die_errno("userfaultfd");
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = features;
  if (ioctl(fd, UFFDIO_API, &api) != 0) {
    const int err = errno;
    close(fd);
    errno = err;
    return -1;
  }
  return fd;
}

struct Region {
  std::uint64_t guest_offset;
  char* host;
  std::uint64_t size;
};

class Guest {
 public:
  explicit Guest(const Options& o) : o_(o), backing_(o.backing), expected_(o.size / kPage, 0) {
    if (o.backing == "memfd") {
      // Sealing allowed so that the fault tests' fixture plugin can seal it against writes.
      memfd_ = memfd_create(o.memfd_name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
      if (memfd_ < 0 || ftruncate(memfd_, static_cast<off_t>(o.size)) != 0) die_errno("memfd");
    }
    const std::uint64_t pages = o.size / kPage;
    std::uint64_t offset = 0;
    for (int i = 0; i < o.regions; ++i) {
      const std::uint64_t region_pages =
          pages / o.regions + (static_cast<std::uint64_t>(i) < pages % o.regions ? 1 : 0);
      const std::uint64_t size = region_pages * kPage;
      void* p = memfd_ >= 0 ? mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd_,
                                   static_cast<off_t>(offset))
                            : mmap(nullptr, size, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) die_errno("mmap");
      madvise(p, size, o.thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
      regions_.push_back({offset, static_cast<char*>(p), size});
      offset += size;
    }
    if (o.no_fill) {
      // A resumed guest: its memory comes from whoever serves it; only what it should hold is
      // known.
      if (!o.expect_file.empty()) expected_ = read_expect(o.expect_file, pages);
      generation_ = expected_.empty() ? 0 : *std::max_element(expected_.begin(), expected_.end());
    } else {
      std::vector<bool> zero(pages, false);
      for (std::uint64_t p :
           memsnap::pattern::never_written_pages(pages, o.zero_fraction, o.seed)) {
        zero[p] = true;
      }
      generation_ = 1;
      for (std::uint64_t p = 0; p < pages; ++p) {
        if (zero[p]) continue;
        memsnap::pattern::fill_page(page(p), kPage, o.seed, p, generation_);
        expected_[p] = static_cast<std::uint32_t>(generation_);
      }
    }
    if (!o.handshake.empty()) setup_userfaultfd();
  }

  ~Guest() {
    if (writer_.joinable()) {
      loop_stop_ = true;
      writer_.join();
    }
  }
  Guest(const Guest&) = delete;
  Guest& operator=(const Guest&) = delete;

  json layout() const {
    json regions = json::array();
    for (const auto& r : regions_) {
      regions.push_back({{"guest_offset", r.guest_offset},
                         {"host_addr", reinterpret_cast<std::uint64_t>(r.host)},
                         {"size", r.size}});
    }
    return {{"pid", getpid()},
            {"backing", backing_},
            {"memfd_fd", memfd_},
            {"guest_size", o_.size},
            {"page_size", kPage},
            {"seed", o_.seed},
            {"generation", generation_},
            {"uffd", uffd_ >= 0},
            {"wp_async", wp_async_},
            {"uffd_features", features_},
            {"write_faults", write_faults_},
            {"regions", regions}};
  }

  json ping() const {
    return {{"ok", true},
            {"ready", true},
            {"uffd", uffd_ >= 0},
            {"wp_async", wp_async_},
            {"write_faults", write_faults_},
            {"memfd_from_memsnap", memfd_from_memsnap_},
            {"memfd_fd", memfd_},
            {"backing", backing_},
            {"generation", generation_}};
  }

  // Sends the handshake and, with --accept-memfd, takes over the memfd memsnap may hand back.
  void handshake() {
    std::vector<memsnap::handshake::GuestRegion> regions;
    for (const auto& r : regions_) {
      regions.push_back({reinterpret_cast<std::uint64_t>(r.host), r.size, r.guest_offset, kPage});
    }
    auto conn = memsnap::handshake::connect_and_send(o_.handshake, regions, uffd_, memfd_);
    if (!conn.ok()) die("handshake: " + conn.error().to_string());
    connection_ = std::move(*conn);
    if (!o_.accept_memfd) return;
    auto reply = memsnap::handshake::receive_reply(connection_.get(), kReplyTimeout);
    if (!reply.ok()) die("memsnap reply: " + reply.error().to_string());
    if (reply->has_memfd) adopt_memfd(*reply);
  }

  json dirty(double fraction, bool sequential, std::uint64_t seed) {
    ++generation_;
    const auto pages = memsnap::pattern::select_pages(expected_.size(), fraction, seed, sequential);
    json ranges = json::array();
    std::uint64_t run_start = 0, run_end = 0;
    for (std::uint64_t p : pages) {
      memsnap::pattern::fill_page(page(p), kPage, o_.seed, p, generation_);
      expected_[p] = static_cast<std::uint32_t>(generation_);
      if (run_end != run_start && p * kPage == run_end) {
        run_end += kPage;
        continue;
      }
      if (run_end != run_start) ranges.push_back({run_start, run_end - run_start});
      run_start = p * kPage;
      run_end = run_start + kPage;
    }
    if (run_end != run_start) ranges.push_back({run_start, run_end - run_start});
    return {{"generation", generation_}, {"pages", pages.size()}, {"dirty", ranges}};
  }

  json verify() const {
    std::uint64_t mismatches = 0;
    json first = json::array();
    for (std::uint64_t p = 0; p < expected_.size(); ++p) {
      const auto c = memsnap::pattern::check_page(page(p), kPage, o_.seed, p, expected_[p]);
      if (c.ok) continue;
      if (++mismatches <= 10) {
        first.push_back({{"page", p},
                         {"expected_generation", expected_[p]},
                         {"found_page", c.found_page},
                         {"found_generation", c.found_generation}});
      }
    }
    return {{"pages", expected_.size()}, {"mismatches", mismatches}, {"first_mismatches", first}};
  }

  // Gives pages back like a balloon driver: MADV_DONTNEED on private anonymous memory,
  // MADV_REMOVE (punches the memfd) on a shared mapping. Both raise UFFD_EVENT_REMOVE on a
  // registered range (a plain fallocate(PUNCH_HOLE) would not) and block until the handler has
  // read it.
  json discard(std::uint64_t first, std::uint64_t count) {
    if (count == 0 || first >= expected_.size() || count > expected_.size() - first) {
      return {{"error", "discard: pages out of range"}};
    }
    const std::uint64_t begin = first * kPage, end = (first + count) * kPage;
    for (const auto& r : regions_) {
      const std::uint64_t lo = std::max(begin, r.guest_offset);
      const std::uint64_t hi = std::min(end, r.guest_offset + r.size);
      if (lo >= hi) continue;
      if (madvise(r.host + (lo - r.guest_offset), hi - lo,
                  memfd_ >= 0 ? MADV_REMOVE : MADV_DONTNEED) != 0) {
        return {{"error", std::string("discard: madvise: ") + std::strerror(errno)}};
      }
    }
    std::fill(expected_.begin() + static_cast<std::ptrdiff_t>(first),
              expected_.begin() + static_cast<std::ptrdiff_t>(first + count), 0U);
    return {{"discarded", count}};
  }

  // write-loop: one thread writes pages [first, first + count) in order, round after round, each
  // round a new generation, until write-stop. Other commands must leave those pages alone.
  json write_loop(std::uint64_t first, std::uint64_t count) {
    if (writer_.joinable()) return {{"error", "write-loop: already writing"}};
    if (count == 0 || first >= expected_.size() || count > expected_.size() - first) {
      return {{"error", "write-loop: pages out of range"}};
    }
    loop_first_ = first;
    loop_count_ = count;
    loop_stride_ = count % kLoopStride == 0 ? 1 : kLoopStride;
    loop_base_ = generation_;
    loop_stop_ = false;
    loop_rounds_ = 0;
    writer_ = std::thread([this] {
      std::uint64_t gen = loop_base_;
      for (;;) {
        ++gen;
        for (std::uint64_t i = 0; i < loop_count_; ++i) {
          if (loop_stop_.load(std::memory_order_relaxed)) {
            loop_gen_ = gen;
            loop_pos_ = i;
            return;
          }
          const std::uint64_t p = loop_page(i);
          memsnap::pattern::fill_page(page(p), kPage, o_.seed, p, gen);
        }
        loop_rounds_.fetch_add(1, std::memory_order_relaxed);
      }
    });
    return {{"writing", true}, {"first", first}, {"count", count}, {"stride", loop_stride_}};
  }
  // The page of the loop's i-th write in a round. A prime stride scatters consecutive writes, so
  // that no order of reading the pages (a snapshot's, ascending) follows the order of writing.
  static constexpr std::uint64_t kLoopStride = 1031;
  std::uint64_t loop_page(std::uint64_t i) const {
    return loop_first_ + (i * loop_stride_) % loop_count_;
  }
  json write_status() const { return {{"rounds", loop_rounds_.load()}}; }
  json write_stop() {
    if (!writer_.joinable()) return {{"error", "write-stop: not writing"}};
    loop_stop_ = true;
    writer_.join();
    for (std::uint64_t i = 0; i < loop_count_; ++i) {
      if (i < loop_pos_) {
        expected_[loop_page(i)] = static_cast<std::uint32_t>(loop_gen_);
      } else if (loop_gen_ - 1 > loop_base_) {
        expected_[loop_page(i)] = static_cast<std::uint32_t>(loop_gen_ - 1);
      }
    }
    generation_ = loop_gen_;
    return {{"generation", loop_gen_},
            {"position", loop_pos_},
            {"rounds", loop_rounds_.load()},
            {"before", loop_base_}};
  }

  // --stray-page: reads the page no region holds (blocks until someone serves it, if ever).
  bool has_stray() const { return stray_ != nullptr; }
  void touch_stray() const {
    const volatile char* p = stray_;
    [[maybe_unused]] const char c = *p;
  }

 private:
  void setup_userfaultfd() {
    // Shared-memory features whenever the guest is or may become (--accept-memfd) memfd-backed:
    // registering a shmem range needs them.
    const bool shmem = o_.backing == "memfd" || o_.accept_memfd;
    std::uint64_t base = UFFD_FEATURE_EVENT_REMOVE;
    if (shmem) base |= UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM;
    // WP_ASYNC: writes to write-protected pages are resolved by the kernel itself (no message),
    // so memsnap can find them with PAGEMAP_SCAN. The kernel turns on WP_UNPOPULATED with it
    // (anonymous none PTEs get write-protect markers), so it is not asked for separately.
    // --track-writes sync: write-protect faults reach whoever serves the userfaultfd.
    const std::uint64_t wp = (o_.track_writes && !o_.write_faults ? UFFD_FEATURE_WP_ASYNC : 0) |
                             (shmem ? UFFD_FEATURE_WP_HUGETLBFS_SHMEM : 0);
    uffd_ = userfaultfd_with(base | wp);
    features_ = base | wp;
    if (uffd_ < 0) {
      // UFFDIO_API works once per userfaultfd: retry on a new one.
      std::fprintf(stderr,
                   "memsnap-guest: UFFDIO_API refused features 0x%llx (%s); retrying "
                   "without write-protect features\n",
                   static_cast<unsigned long long>(base | wp), std::strerror(errno));
      uffd_ = userfaultfd_with(base);
      features_ = base;
      if (uffd_ < 0) die_errno("UFFDIO_API");
    }
    wp_async_ = (features_ & UFFD_FEATURE_WP_ASYNC) != 0;
    write_faults_ = o_.write_faults && (features_ & UFFD_FEATURE_WP_HUGETLBFS_SHMEM) != 0;
    const std::uint64_t mode = UFFDIO_REGISTER_MODE_MISSING |
                               (memfd_ >= 0 ? UFFDIO_REGISTER_MODE_MINOR : 0) |
                               (wp_async_ || write_faults_ ? UFFDIO_REGISTER_MODE_WP : 0);
    for (const auto& r : regions_) register_range(r, mode);
    if (o_.stray_page) {
      void* p = mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) die_errno("mmap of the stray page");
      stray_ = static_cast<char*>(p);
      register_range({0, stray_, kPage}, UFFDIO_REGISTER_MODE_MISSING);
    }
  }

  void register_range(const Region& r, std::uint64_t mode) const {
    uffdio_register reg{};
    reg.range.start = reinterpret_cast<std::uint64_t>(r.host);
    reg.range.len = r.size;
    reg.mode = mode;
    if (ioctl(uffd_, UFFDIO_REGISTER, &reg) != 0) {
      die_errno("UFFDIO_REGISTER mode " + std::to_string(mode) + " at guest offset " +
                std::to_string(r.guest_offset));
    }
  }

  // Maps memsnap's memfd over every region at the same addresses and makes it guest memory.
  void adopt_memfd(memsnap::handshake::ResumeReply& reply) {
    struct stat st {};
    if (fstat(reply.memfd.get(), &st) != 0) die_errno("fstat of memsnap's memfd");
    if (static_cast<std::uint64_t>(st.st_size) != o_.size || reply.size != o_.size) {
      die("memsnap's memfd holds " + std::to_string(st.st_size) + " bytes (reply says " +
          std::to_string(reply.size) + "), guest memory is " + std::to_string(o_.size));
    }
    for (const auto& r : regions_) {
      void* p = mmap(r.host, r.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                     reply.memfd.get(), static_cast<off_t>(r.guest_offset));
      if (p != r.host) die_errno("mmap of memsnap's memfd");
      madvise(p, r.size, o_.thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
      // All of guest memory is in the memfd (holes read as zeros), so no MISSING/MINOR faults
      // need serving; only write tracking stays.
      // Register for write tracking. Arm it here only when memsnap asks (its
      // arm_tracking_before_ready): arming 1 GiB takes ~7 ms, far longer than the rest of a warm
      // resume, so by default memsnap arms it after the ack, while the guest runs, and counts
      // what the guest touches before its page is armed.
      if (wp_async_ || write_faults_) {
        register_range(r, UFFDIO_REGISTER_MODE_WP);
        if (reply.arm_writes) {
          uffdio_writeprotect wp{};
          wp.range.start = reinterpret_cast<std::uint64_t>(r.host);
          wp.range.len = r.size;
          wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
          if (ioctl(uffd_, UFFDIO_WRITEPROTECT, &wp) != 0) die_errno("UFFDIO_WRITEPROTECT");
        }
      }
    }
    if (memfd_ >= 0) {
      // Keep the fd number the layout announced; dup3 closes the original memfd.
      if (dup3(reply.memfd.get(), memfd_, O_CLOEXEC) < 0) die_errno("dup3");
      reply.memfd.reset();
    } else {
      memfd_ = reply.memfd.release();
      fcntl(memfd_, F_SETFD, FD_CLOEXEC);
    }
    backing_ = "memfd";
    memfd_from_memsnap_ = true;
    if (o_.ack == "none") return;
    if (o_.ack == "bad") {
      const char bad[] = "{\"memsnap_mapped\":false}";
      if (write(connection_.get(), bad, sizeof(bad) - 1) < 0) die_errno("bad ack");
      return;
    }
    if (auto s = memsnap::handshake::send_mapped_ack(connection_.get()); !s.ok()) {
      die("memsnap mapped ack: " + s.error().to_string());
    }
  }

  char* page(std::uint64_t p) const {
    const std::uint64_t off = p * kPage;
    for (const auto& r : regions_) {
      if (off >= r.guest_offset && off < r.guest_offset + r.size)
        return r.host + (off - r.guest_offset);
    }
    std::abort();
  }

  Options o_;
  std::string backing_;
  int memfd_ = -1;
  std::vector<Region> regions_;
  std::vector<std::uint32_t> expected_;
  std::uint64_t generation_ = 0;
  char* stray_ = nullptr;  // --stray-page
  int uffd_ = -1;  // kept open for the life of the process, like Firecracker; never read here
  std::uint64_t features_ = 0;
  bool wp_async_ = false;
  bool write_faults_ = false;  // write-protect faults reach memsnap (--track-writes sync)
  bool memfd_from_memsnap_ = false;
  // write-loop
  std::thread writer_;
  std::atomic<bool> loop_stop_{false};
  std::atomic<std::uint64_t> loop_rounds_{0};
  std::uint64_t loop_first_ = 0, loop_count_ = 0, loop_base_ = 0, loop_gen_ = 0, loop_pos_ = 0;
  std::uint64_t loop_stride_ = 1;
  memsnap::io::UniqueFd connection_;  // the handshake connection, never closed
};

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  signal(SIGPIPE, SIG_IGN);  // a vanished driver or memsnap shows up as EPIPE, not death
  Guest guest(o);
  // The layout comes first, so a driver can read it before anyone accepts the handshake.
  std::cout << guest.layout().dump() << std::endl;
  if (!o.handshake.empty()) guest.handshake();
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    if (cmd == "dirty") {
      double fraction = 0;
      std::string mode;
      std::uint64_t seed = 0;
      if (!(in >> fraction >> mode >> seed) || (mode != "random" && mode != "sequential")) {
        std::cout << json{{"error", "usage: dirty FRACTION random|sequential SEED"}}.dump()
                  << std::endl;
        continue;
      }
      std::cout << guest.dirty(fraction, mode == "sequential", seed).dump() << std::endl;
    } else if (cmd == "verify") {
      std::cout << guest.verify().dump() << std::endl;
    } else if (cmd == "discard") {
      std::uint64_t first = 0, count = 0;
      if (!(in >> first >> count)) {
        std::cout << json{{"error", "usage: discard FIRST_PAGE COUNT"}}.dump() << std::endl;
        continue;
      }
      std::cout << guest.discard(first, count).dump() << std::endl;
    } else if (cmd == "write-loop") {
      std::uint64_t first = 0, count = 0;
      if (!(in >> first >> count)) {
        std::cout << json{{"error", "usage: write-loop FIRST_PAGE COUNT"}}.dump() << std::endl;
        continue;
      }
      std::cout << guest.write_loop(first, count).dump() << std::endl;
    } else if (cmd == "write-status") {
      std::cout << guest.write_status().dump() << std::endl;
    } else if (cmd == "write-stop") {
      std::cout << guest.write_stop().dump() << std::endl;
    } else if (cmd == "touch-stray") {
      if (!guest.has_stray()) {
        std::cout << json{{"error", "touch-stray needs --stray-page"}}.dump() << std::endl;
        continue;
      }
      std::cout << json{{"touching", true}}.dump() << std::endl;
      guest.touch_stray();
      std::cout << json{{"touched", true}}.dump() << std::endl;
    } else if (cmd == "ping") {
      std::cout << guest.ping().dump() << std::endl;
    } else if (cmd == "exit") {
      return 0;
    } else if (!cmd.empty()) {
      std::cout << json{{"error", "unknown command " + cmd}}.dump() << std::endl;
    }
  }
  return 0;
}
