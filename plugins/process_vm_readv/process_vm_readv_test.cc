#include "plugins/process_vm_readv/process_vm_readv.h"

#include <limits.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "plugins/plugin_api/testing/recording_sink.h"

namespace memsnap::plugins {
namespace {

using plugin::ByteRange;
using plugin::ExportRequest;
using plugin::ExportStats;
using plugin::Option;
using plugin::Region;
using plugin::Status;
using plugin::StatusCode;
using plugin::testing::RecordingSink;
using plugin::testing::total_bytes;

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kMiB = 1 << 20;

unsigned char pattern(std::uint64_t guest_offset, unsigned seed) {
  const std::uint64_t page = guest_offset / kPage;
  return static_cast<unsigned char>(page * 131 + guest_offset * 7 + seed * 29 + 1);
}

// Anonymous memory of this process laid out as guest regions, with unmapped gaps between them
// and in reverse host order, so that no two regions are contiguous on the host.
class Guest {
 public:
  explicit Guest(const std::vector<std::uint64_t>& region_sizes, unsigned seed = 1) {
    std::uint64_t total = 0;
    for (std::uint64_t s : region_sizes) total += s + kPage;
    reserve_size_ = total + kPage;
    void* base = mmap(nullptr, reserve_size_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(base, MAP_FAILED);
    base_ = static_cast<unsigned char*>(base);
    std::uint64_t host_pos = total;  // fill from the top down
    std::uint64_t guest = 0;
    for (std::uint64_t size : region_sizes) {
      host_pos -= size + kPage;
      unsigned char* host = base_ + host_pos + kPage;
      EXPECT_EQ(mprotect(host, size, PROT_READ | PROT_WRITE), 0);
      regions_.push_back(Region{guest, reinterpret_cast<std::uint64_t>(host), size});
      guest += size;
    }
    guest_size_ = guest;
    fill(seed);
  }
  ~Guest() { munmap(base_, reserve_size_); }

  void fill(unsigned seed) {
    for (const Region& r : regions_) {
      auto* host = reinterpret_cast<unsigned char*>(r.host_addr);
      for (std::uint64_t i = 0; i < r.size; ++i) host[i] = pattern(r.guest_offset + i, seed);
    }
  }

  const std::vector<Region>& regions() const { return regions_; }
  std::uint64_t size() const { return guest_size_; }

 private:
  unsigned char* base_ = nullptr;
  std::uint64_t reserve_size_ = 0;
  std::uint64_t guest_size_ = 0;
  std::vector<Region> regions_;
};

ExportRequest make_request(pid_t pid, const std::vector<Region>& regions, std::uint64_t guest_size,
                           const std::vector<ByteRange>& ranges, std::uint64_t block_size = kPage) {
  ExportRequest r;
  r.pid = pid;
  r.regions = regions.data();
  r.region_count = regions.size();
  r.guest_size = guest_size;
  r.block_size = block_size;
  r.ranges = ranges.data();
  r.range_count = ranges.size();
  return r;
}

std::unique_ptr<ProcessVmReadvStrategy> make_strategy(const std::vector<Option>& options = {}) {
  plugin::Strategy* s = nullptr;
  Status st = create_process_vm_readv(&s, options.data(), options.size());
  EXPECT_TRUE(st.ok()) << st.message;
  return std::unique_ptr<ProcessVmReadvStrategy>(static_cast<ProcessVmReadvStrategy*>(s));
}

// Requested bytes carry the pattern, all others are untouched (0xEE).
void expect_image(const RecordingSink& sink, const std::vector<ByteRange>& ranges, unsigned seed) {
  EXPECT_EQ(sink.contract_violation(), "");
  EXPECT_EQ(sink.mismatches(ranges, [seed](std::uint64_t g) { return pattern(g, seed); }), 0u);
}

// About 10% of the pages, in runs of 1-4 pages.
std::vector<ByteRange> scattered_ranges(std::uint64_t guest_size, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::vector<ByteRange> ranges;
  std::uint64_t page = rng() % 8;
  const std::uint64_t pages = guest_size / kPage;
  while (page < pages) {
    const std::uint64_t run =
        std::min<std::uint64_t>(rng() % 8 == 0 ? 2 + rng() % 3 : 1, pages - page);
    ranges.push_back({page * kPage, run * kPage});
    page += run + 1 + rng() % (run * 16);
  }
  return ranges;
}

// A scripted stand-in for the syscall that records what it was asked and can fail on purpose.
struct Injector {
  enum Action { kReal, kEintr, kEagain, kEnomem, kPartial, kZero, kEsrch };
  std::vector<Action> script;       // one action per call, then kReal
  std::uint64_t partial_limit = 0;  // if set, every real call moves at most this many bytes
  std::size_t calls = 0;
  std::size_t max_remote_count = 0;
  std::uint64_t max_call_bytes = 0;
  bool local_overrun = false;

  static ssize_t call(void* context, pid_t pid, const iovec* local, unsigned long local_count,
                      const iovec* remote, unsigned long remote_count) {
    auto* self = static_cast<Injector*>(context);
    std::uint64_t asked = 0;
    for (unsigned long i = 0; i < remote_count; ++i) asked += remote[i].iov_len;
    std::uint64_t room = 0;
    for (unsigned long i = 0; i < local_count; ++i) room += local[i].iov_len;
    self->local_overrun |= asked > room;
    self->max_remote_count = std::max<std::size_t>(self->max_remote_count, remote_count);
    self->max_call_bytes = std::max(self->max_call_bytes, asked);
    const Action action = self->calls < self->script.size() ? self->script[self->calls] : kReal;
    ++self->calls;
    switch (action) {
      case kEintr:
        errno = EINTR;
        return -1;
      case kEagain:
        errno = EAGAIN;
        return -1;
      case kEnomem:
        errno = ENOMEM;
        return -1;
      case kEsrch:
        errno = ESRCH;
        return -1;
      case kZero:
        return 0;
      case kPartial:
        return limited(pid, local, local_count, remote, remote_count, asked / 2 + 1);
      case kReal:
        break;
    }
    if (self->partial_limit != 0) {
      return limited(pid, local, local_count, remote, remote_count, self->partial_limit);
    }
    return ::process_vm_readv(pid, local, local_count, remote, remote_count, 0);
  }

  // A real read of only the first `limit` remote bytes: what the kernel does on a partial read.
  static ssize_t limited(pid_t pid, const iovec* local, unsigned long local_count,
                         const iovec* remote, unsigned long remote_count, std::uint64_t limit) {
    std::vector<iovec> cut;
    for (unsigned long i = 0; i < remote_count && limit > 0; ++i) {
      const std::uint64_t n = std::min<std::uint64_t>(remote[i].iov_len, limit);
      cut.push_back({remote[i].iov_base, n});
      limit -= n;
    }
    return ::process_vm_readv(pid, local, local_count, cut.data(), cut.size(), 0);
  }
};

TEST(ProcessVmReadvTest, FullExportOfOneRegionIsByteExact) {
  Guest guest({4 * kMiB});
  const std::vector<ByteRange> ranges = {{0, guest.size()}};
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy();
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, 1);
  EXPECT_EQ(stats.bytes_read, guest.size());
  EXPECT_EQ(stats.read_calls, 1u);
  EXPECT_EQ(stats.retries, 0u);
  EXPECT_EQ(stats.partial_reads, 0u);
  EXPECT_EQ(sink.write_calls(), 1u);
}

TEST(ProcessVmReadvTest, SmallBufferTakesSeveralFills) {
  Guest guest({3 * kMiB + 5 * kPage});
  const std::vector<ByteRange> ranges = {{0, guest.size()}};
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy({{"buffer_bytes", "1048576"}});
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, 1);
  EXPECT_EQ(sink.write_calls(), 4u);
  EXPECT_EQ(stats.bytes_read, guest.size());
}

TEST(ProcessVmReadvTest, RangesSpanningSeveralRegions) {
  Guest guest({kMiB, 3 * kPage, 2 * kMiB, kPage, kMiB});
  const std::uint64_t r1 = kMiB;                         // start of the 3-page region
  const std::uint64_t r3 = kMiB + 3 * kPage + 2 * kMiB;  // start of the 1-page region
  const std::vector<ByteRange> ranges = {
      {kPage, kPage},                                       // inside region 0
      {r1 - 2 * kPage, 2 * kPage + 3 * kPage + 4 * kPage},  // regions 0, 1 and 2
      {r3 - kPage, 3 * kPage},                              // regions 2, 3 and 4
      {guest.size() - kPage, kPage},                        // the last page
  };
  for (const char* buffer : {"8388608", "4096", "8192"}) {
    RecordingSink sink(guest.size(), kPage, ranges);
    ExportStats stats;
    auto strategy = make_strategy({{"buffer_bytes", buffer}});
    Status st = strategy->export_ranges(
        make_request(getpid(), guest.regions(), guest.size(), ranges), sink, stats);
    ASSERT_TRUE(st.ok()) << st.message;
    expect_image(sink, ranges, 1);
    EXPECT_EQ(stats.bytes_read, total_bytes(ranges));
  }
  // And everything, over all five regions.
  const std::vector<ByteRange> all = {{0, guest.size()}};
  RecordingSink sink(guest.size(), kPage, all);
  ExportStats stats;
  auto strategy = make_strategy();
  ASSERT_TRUE(
      strategy
          ->export_ranges(make_request(getpid(), guest.regions(), guest.size(), all), sink, stats)
          .ok());
  expect_image(sink, all, 1);
}

TEST(ProcessVmReadvTest, ScatteredTenPercentIsByteExactWithFewSinkCalls) {
  Guest guest({16 * kMiB, 16 * kMiB});
  const std::vector<ByteRange> ranges = scattered_ranges(guest.size(), 7);
  ASSERT_GT(ranges.size(), 500u);
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy();
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, 1);
  EXPECT_EQ(stats.bytes_read, total_bytes(ranges));
  // At most IOV_MAX chunks per sink call, and nearly full ones.
  EXPECT_LE(sink.write_calls(), ranges.size() / IOV_MAX + 2);
}

TEST(ProcessVmReadvTest, MoreThanIovMaxRangesAreBatched) {
  const std::uint64_t pages = 6000;
  Guest guest({pages * kPage});
  std::vector<ByteRange> ranges;
  for (std::uint64_t p = 0; p < pages; p += 2) ranges.push_back({p * kPage, kPage});
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  Injector injector;
  auto strategy = make_strategy();
  strategy->set_syscall_for_test(&Injector::call, &injector);
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, 1);
  EXPECT_EQ(injector.max_remote_count, static_cast<std::size_t>(IOV_MAX));
  EXPECT_EQ(stats.read_calls, (ranges.size() + IOV_MAX - 1) / IOV_MAX);
  EXPECT_EQ(sink.write_calls(), (ranges.size() + IOV_MAX - 1) / IOV_MAX);
  EXPECT_FALSE(injector.local_overrun);
}

// One range over 3000 one-page regions: one chunk, but 3000 remote iovecs.
TEST(ProcessVmReadvTest, MoreThanIovMaxRegionsInOneRangeAreBatched) {
  Guest guest(std::vector<std::uint64_t>(3000, kPage));
  const std::vector<ByteRange> ranges = {{0, guest.size()}};
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  Injector injector;
  auto strategy = make_strategy({{"buffer_bytes", "16777216"}});
  strategy->set_syscall_for_test(&Injector::call, &injector);
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, 1);
  EXPECT_EQ(injector.max_remote_count, static_cast<std::size_t>(IOV_MAX));
  EXPECT_EQ(stats.read_calls, 3u);
  EXPECT_EQ(sink.write_calls(), 1u);
}

TEST(ProcessVmReadvTest, MaxCallBytesSplitsCalls) {
  Guest guest({kMiB, kMiB});
  const std::vector<ByteRange> ranges = {{0, guest.size()}};
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  Injector injector;
  auto strategy = make_strategy({{"max_call_bytes", "10000"}});
  strategy->set_syscall_for_test(&Injector::call, &injector);
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, 1);
  EXPECT_EQ(injector.max_call_bytes, 10000u);
  EXPECT_EQ(stats.read_calls, (guest.size() + 9999) / 10000);
  EXPECT_EQ(stats.partial_reads, 0u);
}

TEST(ProcessVmReadvTest, ReadsAForkedChild) {
  Guest guest({2 * kMiB, kMiB});
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    guest.fill(2);  // the child's own copy differs from the parent's
    char c = 'r';
    if (write(ready[1], &c, 1) != 1) _exit(1);
    for (;;) pause();
  }
  char c = 0;
  ASSERT_EQ(read(ready[0], &c, 1), 1);
  guest.fill(3);
  const std::vector<ByteRange> ranges = scattered_ranges(guest.size(), 3);
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy();
  Status st = strategy->export_ranges(make_request(child, guest.regions(), guest.size(), ranges),
                                      sink, stats);
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  close(ready[0]);
  close(ready[1]);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, 2);
}

TEST(ProcessVmReadvTest, DeadChildIsProcessGone) {
  Guest guest({kMiB});
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) _exit(0);
  ASSERT_EQ(waitpid(child, nullptr, 0), child);
  const std::vector<ByteRange> ranges = {{0, guest.size()}};
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy();
  Status st = strategy->export_ranges(make_request(child, guest.regions(), guest.size(), ranges),
                                      sink, stats);
  EXPECT_EQ(st.code, StatusCode::kProcessGone) << st.message;
  EXPECT_EQ(st.sys_errno, ESRCH);
  EXPECT_EQ(sink.bytes_written(), 0u);
}

// Three pages with the middle one unmapped: the export stops at the middle page, names it, and
// writes nothing after it.
class UnmappedMiddleTest : public ::testing::TestWithParam<const char*> {};

TEST_P(UnmappedMiddleTest, IsBadAddressNamingTheAddress) {
  void* mem = mmap(nullptr, 3 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  auto* bytes = static_cast<unsigned char*>(mem);
  for (std::uint64_t i = 0; i < 3 * kPage; ++i) bytes[i] = pattern(i, 1);
  ASSERT_EQ(munmap(bytes + kPage, kPage), 0);
  const std::vector<Region> regions = {{0, reinterpret_cast<std::uint64_t>(bytes), 3 * kPage}};
  const std::vector<ByteRange> ranges = {{0, 3 * kPage}};
  RecordingSink sink(3 * kPage, kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy({{"buffer_bytes", GetParam()}});
  Status st =
      strategy->export_ranges(make_request(getpid(), regions, 3 * kPage, ranges), sink, stats);
  EXPECT_EQ(st.code, StatusCode::kBadAddress) << st.message;
  EXPECT_EQ(st.sys_errno, EFAULT);
  char hole[64];
  std::snprintf(hole, sizeof(hole), "0x%lx", reinterpret_cast<unsigned long>(bytes + kPage));
  EXPECT_NE(std::string(st.message).find(hole), std::string::npos) << st.message;
  EXPECT_NE(std::string(st.message).find("guest offset 0x1000"), std::string::npos) << st.message;
  for (std::uint64_t g = kPage; g < 3 * kPage; ++g) ASSERT_EQ(sink.image()[g], 0xEE) << g;
  EXPECT_LE(sink.bytes_written(), kPage);
  munmap(bytes, kPage);
  munmap(bytes + 2 * kPage, kPage);
}

INSTANTIATE_TEST_SUITE_P(Buffers, UnmappedMiddleTest, ::testing::Values("8388608", "4096"));

TEST(ProcessVmReadvTest, PagesBeforeAHoleAreWrittenWhenTheBufferFlushesFirst) {
  void* mem = mmap(nullptr, 3 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  auto* bytes = static_cast<unsigned char*>(mem);
  for (std::uint64_t i = 0; i < 3 * kPage; ++i) bytes[i] = pattern(i, 1);
  ASSERT_EQ(munmap(bytes + kPage, kPage), 0);
  const std::vector<Region> regions = {{0, reinterpret_cast<std::uint64_t>(bytes), 3 * kPage}};
  const std::vector<ByteRange> ranges = {{0, 3 * kPage}};
  RecordingSink sink(3 * kPage, kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy({{"buffer_bytes", "4096"}});
  Status st =
      strategy->export_ranges(make_request(getpid(), regions, 3 * kPage, ranges), sink, stats);
  EXPECT_EQ(st.code, StatusCode::kBadAddress);
  EXPECT_EQ(sink.bytes_written(), kPage);
  for (std::uint64_t g = 0; g < kPage; ++g) ASSERT_EQ(sink.image()[g], pattern(g, 1));
  munmap(bytes, kPage);
  munmap(bytes + 2 * kPage, kPage);
}

TEST(ProcessVmReadvTest, PartialReadContinuesFromTheFirstUnreadByte) {
  void* mem = mmap(nullptr, 3 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  ASSERT_EQ(munmap(static_cast<unsigned char*>(mem) + kPage, kPage), 0);
  // The kernel reads the first page, stops at the hole: one partial read, then EFAULT.
  const std::vector<Region> regions = {{0, reinterpret_cast<std::uint64_t>(mem), 3 * kPage}};
  const std::vector<ByteRange> ranges = {{0, 3 * kPage}};
  RecordingSink sink(3 * kPage, kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy();
  Status st =
      strategy->export_ranges(make_request(getpid(), regions, 3 * kPage, ranges), sink, stats);
  EXPECT_EQ(st.code, StatusCode::kBadAddress);
  EXPECT_EQ(stats.read_calls, 1u);
  EXPECT_EQ(stats.partial_reads, 1u);
  EXPECT_EQ(stats.bytes_read, kPage);
  munmap(mem, kPage);
  munmap(static_cast<unsigned char*>(mem) + 2 * kPage, kPage);
}

TEST(ProcessVmReadvTest, RangeOutsideEveryRegionIsBadAddress) {
  Guest guest({kMiB});
  std::vector<Region> regions = guest.regions();
  regions[0].size = kMiB / 2;  // the second half of the guest is in no region
  const std::vector<ByteRange> ranges = {{0, kPage}, {kMiB / 2 - kPage, 2 * kPage}};
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy();
  Status st =
      strategy->export_ranges(make_request(getpid(), regions, guest.size(), ranges), sink, stats);
  EXPECT_EQ(st.code, StatusCode::kBadAddress) << st.message;
  EXPECT_NE(std::string(st.message).find("0x80000"), std::string::npos) << st.message;
  EXPECT_EQ(sink.bytes_written(), 0u);
}

TEST(ProcessVmReadvTest, InjectedEintrEagainEnomemAndPartialReadsContinue) {
  Guest guest({kMiB, kMiB});
  const std::vector<ByteRange> ranges = scattered_ranges(guest.size(), 11);
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  Injector injector;
  injector.script = {Injector::kEintr,   Injector::kEagain, Injector::kEnomem,
                     Injector::kPartial, Injector::kEnomem, Injector::kPartial};
  auto strategy = make_strategy({{"enomem_backoff_us", "1"}});
  strategy->set_syscall_for_test(&Injector::call, &injector);
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, 1);
  EXPECT_EQ(stats.retries, 4u);
  EXPECT_EQ(stats.partial_reads, 2u);
  EXPECT_EQ(stats.read_calls, 3u);
  EXPECT_EQ(stats.bytes_read, total_bytes(ranges));
  EXPECT_FALSE(injector.local_overrun);
}

TEST(ProcessVmReadvTest, EveryCallPartialAtOddSizesStillExact) {
  Guest guest({kMiB, 3 * kPage, kMiB});
  std::vector<ByteRange> ranges = scattered_ranges(guest.size(), 5);
  ranges.push_back({guest.size() - kPage, kPage});
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  Injector injector;
  injector.partial_limit = 1000;
  auto strategy = make_strategy({{"max_call_bytes", "70000"}});
  strategy->set_syscall_for_test(&Injector::call, &injector);
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, 1);
  const std::uint64_t bytes = total_bytes(ranges);
  EXPECT_EQ(stats.bytes_read, bytes);
  EXPECT_EQ(stats.read_calls, injector.calls);
  EXPECT_GE(stats.read_calls, bytes / 1000);
  EXPECT_GT(stats.partial_reads, bytes / 1000 - bytes / 70000 - 2);
  EXPECT_FALSE(injector.local_overrun);
}

TEST(ProcessVmReadvTest, PersistentEnomemBacksOffThenFails) {
  Guest guest({kMiB});
  const std::vector<ByteRange> ranges = {{0, guest.size()}};
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  Injector injector;
  injector.script.assign(100, Injector::kEnomem);
  auto strategy = make_strategy({{"enomem_retries", "3"}, {"enomem_backoff_us", "10"}});
  strategy->set_syscall_for_test(&Injector::call, &injector);
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  EXPECT_EQ(st.code, StatusCode::kNoMemory) << st.message;
  EXPECT_EQ(st.sys_errno, ENOMEM);
  EXPECT_EQ(stats.retries, 3u);
  EXPECT_EQ(injector.calls, 4u);
  EXPECT_EQ(sink.bytes_written(), 0u);
}

TEST(ProcessVmReadvTest, CallWithoutProgressIsBadAddress) {
  Guest guest({kMiB});
  const std::vector<ByteRange> ranges = {{kPage, kPage}};
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  Injector injector;
  injector.script = {Injector::kZero};
  auto strategy = make_strategy();
  strategy->set_syscall_for_test(&Injector::call, &injector);
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  EXPECT_EQ(st.code, StatusCode::kBadAddress) << st.message;
  char host[64];
  std::snprintf(host, sizeof(host), "0x%lx",
                static_cast<unsigned long>(guest.regions()[0].host_addr + kPage));
  EXPECT_NE(std::string(st.message).find(host), std::string::npos) << st.message;
  EXPECT_EQ(sink.bytes_written(), 0u);
}

TEST(ProcessVmReadvTest, InjectedEsrchIsProcessGone) {
  Guest guest({kMiB});
  const std::vector<ByteRange> ranges = {{0, guest.size()}};
  RecordingSink sink(guest.size(), kPage, ranges);
  ExportStats stats;
  Injector injector;
  injector.script = {Injector::kEintr, Injector::kEsrch};
  auto strategy = make_strategy();
  strategy->set_syscall_for_test(&Injector::call, &injector);
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  EXPECT_EQ(st.code, StatusCode::kProcessGone);
  EXPECT_EQ(stats.retries, 1u);
}

TEST(ProcessVmReadvTest, SinkFailureStopsTheExport) {
  Guest guest({4 * kMiB});
  const std::vector<ByteRange> ranges = {{0, guest.size()}};
  RecordingSink sink(guest.size(), kPage, ranges);
  sink.fail_after_bytes(kMiB);
  ExportStats stats;
  auto strategy = make_strategy({{"buffer_bytes", "1048576"}});
  Status st = strategy->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                      sink, stats);
  EXPECT_EQ(st.code, StatusCode::kSinkError);
  EXPECT_EQ(st.sys_errno, 28);
  EXPECT_NE(std::string(st.message).find("ENOSPC"), std::string::npos) << st.message;
  EXPECT_EQ(sink.write_calls(), 1u);
  EXPECT_EQ(stats.bytes_read, kMiB);
}

TEST(ProcessVmReadvTest, HugeBlocks) {
  Guest guest({4 * kMiB, 2 * kMiB});
  const std::vector<ByteRange> ranges = {{2 * kMiB, 4 * kMiB}};
  RecordingSink sink(guest.size(), 2 * kMiB, ranges);
  ExportStats stats;
  auto strategy = make_strategy({{"buffer_bytes", "4194304"}});
  Status st = strategy->export_ranges(
      make_request(getpid(), guest.regions(), guest.size(), ranges, 2 * kMiB), sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, 1);

  auto small = make_strategy({{"buffer_bytes", "1048576"}});
  RecordingSink sink2(guest.size(), 2 * kMiB, ranges);
  st = small->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges, 2 * kMiB),
                            sink2, stats);
  EXPECT_EQ(st.code, StatusCode::kInvalidArgument) << st.message;
}

TEST(ProcessVmReadvTest, MalformedRequests) {
  Guest guest({kMiB});
  auto strategy = make_strategy();
  ExportStats stats;
  const std::vector<ByteRange> ok = {{0, kPage}};
  RecordingSink sink(guest.size(), kPage, ok);
  EXPECT_EQ(
      strategy->export_ranges(make_request(-1, guest.regions(), guest.size(), ok), sink, stats)
          .code,
      StatusCode::kUnsupported);
  const std::vector<std::vector<ByteRange>> bad = {
      {{1, kPage}},                      // unaligned
      {{0, 100}},                        // not whole blocks
      {{kPage, kPage}, {0, kPage}},      // unsorted
      {{0, 2 * kPage}, {kPage, kPage}},  // overlapping
      {{0, 0}},                          // empty
      {{guest.size(), kPage}},           // past the guest
  };
  for (const auto& ranges : bad) {
    EXPECT_EQ(strategy
                  ->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ranges),
                                  sink, stats)
                  .code,
              StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(strategy
                ->export_ranges(make_request(getpid(), guest.regions(), guest.size(), ok, 3000),
                                sink, stats)
                .code,
            StatusCode::kInvalidArgument);
  EXPECT_EQ(sink.bytes_written(), 0u);
}

TEST(ProcessVmReadvTest, Options) {
  ProcessVmReadvOptions parsed;
  const std::vector<Option> good = {{"buffer_bytes", "16777216"},
                                    {"max_call_bytes", "4096"},
                                    {"enomem_retries", "2"},
                                    {"enomem_backoff_us", "0"}};
  ASSERT_TRUE(parse_process_vm_readv_options(good.data(), good.size(), &parsed).ok());
  EXPECT_EQ(parsed.buffer_bytes, 16u * kMiB);
  EXPECT_EQ(parsed.max_call_bytes, 4096u);
  EXPECT_EQ(parsed.enomem_retries, 2u);
  EXPECT_EQ(parsed.enomem_backoff_us, 0u);

  const ProcessVmReadvOptions defaults;
  EXPECT_EQ(defaults.max_call_bytes, static_cast<std::uint64_t>(INT_MAX & ~(4096 - 1)));

  const std::vector<Option> bad = {
      {"buffer_size", "4096"},        {"buffer_bytes", "0"},
      {"buffer_bytes", "4095"},       {"buffer_bytes", "8M"},
      {"buffer_bytes", ""},           {"buffer_bytes", "-4096"},
      {"buffer_bytes", "2147483648"}, {"buffer_bytes", "99999999999999999999999"},
      {"max_call_bytes", "0"},        {"max_call_bytes", "2147479553"},
      {"enomem_retries", "65"},       {"enomem_backoff_us", "1000001"},
      {"buffer_bytes", nullptr},      {nullptr, "1"},
  };
  for (const Option& option : bad) {
    plugin::Strategy* s = nullptr;
    Status st = create_process_vm_readv(&s, &option, 1);
    EXPECT_EQ(st.code, StatusCode::kInvalidArgument)
        << (option.key ? option.key : "null") << "=" << (option.value ? option.value : "null");
    EXPECT_EQ(s, nullptr);
  }
}

}  // namespace
}  // namespace memsnap::plugins
