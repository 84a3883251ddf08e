#include "core/dirty_set.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>

namespace memsnap::plugin {
static bool operator==(const ByteRange& a, const ByteRange& b) {
  return a.offset == b.offset && a.length == b.length;
}
}  // namespace memsnap::plugin

namespace memsnap {
namespace {

constexpr std::uint64_t kPage = 4096;

TEST(NormalizeRangesTest, SortsMergesAndWidensToBlocks) {
  auto r = normalize_ranges({{3 * kPage + 10, 5}, {0, 1}, {kPage, kPage}, {4 * kPage - 1, 2}},
                            16 * kPage, kPage);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[0], (ByteRange{0, 2 * kPage}));
  EXPECT_EQ((*r)[1], (ByteRange{3 * kPage, 2 * kPage}));
}

TEST(NormalizeRangesTest, RejectsRangesOutsideTheGuest) {
  auto r = normalize_ranges({{15 * kPage, 2 * kPage}}, 16 * kPage, kPage);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::kInvalidArgument);
  auto overflow = normalize_ranges({{~0ULL - 10, 100}}, 16 * kPage, kPage);
  ASSERT_FALSE(overflow.ok());
}

TEST(PopulatedRangesTest, MemfdHolesAreLeftOut) {
  const int fd = memfd_create("dirty_set_test", MFD_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 64 * kPage), 0);
  char page[kPage];
  std::memset(page, 1, sizeof(page));
  for (std::uint64_t p : {3, 10, 11, 12, 63}) {
    ASSERT_EQ(pwrite(fd, page, kPage, static_cast<off_t>(p * kPage)), ssize_t(kPage));
  }
  auto r = populated_ranges_of_memfd(fd, 64 * kPage, kPage);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  ASSERT_EQ(r->size(), 3u);
  EXPECT_EQ((*r)[0], (ByteRange{3 * kPage, kPage}));
  EXPECT_EQ((*r)[1], (ByteRange{10 * kPage, 3 * kPage}));
  EXPECT_EQ((*r)[2], (ByteRange{63 * kPage, kPage}));
  close(fd);
}

TEST(PopulatedRangesTest, ProcessScanFindsTouchedPagesOnly) {
  const std::uint64_t size = 256 * kPage;
  auto* mem = static_cast<char*>(
      mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(mem, MAP_FAILED);
  madvise(mem, size, MADV_NOHUGEPAGE);
  for (std::uint64_t p : {0, 1, 2, 100, 255}) mem[p * kPage] = 1;
  // Two regions: guest [0, 128 pages) and [1 GiB, +128 pages) backed by the two halves.
  const std::uint64_t high = 1ULL << 30;
  std::vector<Region> regions = {
      {0, reinterpret_cast<std::uint64_t>(mem), 128 * kPage},
      {high, reinterpret_cast<std::uint64_t>(mem) + 128 * kPage, 128 * kPage}};
  ScanStats stats;
  auto r = populated_ranges_of_process(getpid(), regions, kPage, &stats);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  ASSERT_EQ(r->size(), 3u);
  EXPECT_EQ((*r)[0], (ByteRange{0, 3 * kPage}));
  // Page 100 lies in the first region; pages 255 in the second (guest high + 127 pages).
  EXPECT_EQ((*r)[1], (ByteRange{100 * kPage, kPage}));
  EXPECT_EQ((*r)[2], (ByteRange{high + 127 * kPage, kPage}));
  EXPECT_TRUE(stats.used_pagemap_scan) << "this kernel should have PAGEMAP_SCAN";
  // The /proc/PID/pagemap fallback (kernels before 6.7) must find exactly the same pages.
  ScanStats fallback_stats;
  auto fallback = populated_ranges_of_process(getpid(), regions, kPage, &fallback_stats,
                                              ScanMethod::kPagemapRead);
  ASSERT_TRUE(fallback.ok()) << fallback.error().to_string();
  EXPECT_FALSE(fallback_stats.used_pagemap_scan);
  ASSERT_EQ(fallback->size(), r->size());
  for (std::size_t i = 0; i < r->size(); ++i) EXPECT_EQ((*fallback)[i], (*r)[i]) << i;
  munmap(mem, size);
}

// A shared mapping of a memfd holds data in pages the process's page tables no longer map
// (MADV_DONTNEED drops the mapping, not the memfd's page): a scan of the page tables must not
// pass for the populated set there, or those pages are exported as zeros. Refused, saying why.
TEST(PopulatedRangesTest, AProcessScanOfASharedMemfdMappingIsRefusedNotTakenForHoles) {
  const std::uint64_t size = 16 * kPage;
  const int fd = memfd_create("dirty_set_test_shared", MFD_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0);
  auto* mem = static_cast<char*>(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  ASSERT_NE(mem, MAP_FAILED);
  for (std::uint64_t p = 0; p < 8; ++p) mem[p * kPage] = 1;
  ASSERT_EQ(madvise(mem + 4 * kPage, 4 * kPage, MADV_DONTNEED), 0);
  ASSERT_EQ(mem[5 * kPage], 1) << "the memfd kept the page";
  ASSERT_EQ(madvise(mem + 4 * kPage, 4 * kPage, MADV_DONTNEED), 0);  // read it back in: out again
  const std::vector<Region> regions = {{0, reinterpret_cast<std::uint64_t>(mem), size}};
  auto r = populated_ranges_of_process(getpid(), regions, kPage);
  if (r.ok()) {
    // Only acceptable if every page that holds data is in the set.
    std::uint64_t covered = 0;
    for (const ByteRange& b : *r) {
      if (b.offset < 8 * kPage) covered += std::min(b.offset + b.length, 8 * kPage) - b.offset;
    }
    EXPECT_EQ(covered, 8 * kPage) << "pages of the memfd that hold data were left out";
  } else {
    EXPECT_EQ(r.error().code, Errc::kUnsupported) << r.error().to_string();
    EXPECT_NE(r.error().message.find("shared"), std::string::npos) << r.error().message;
  }
  munmap(mem, size);
  close(fd);
}

TEST(PopulatedRangesTest, GoneProcessIsReported) {
  std::vector<Region> regions = {{0, 0x10000, kPage}};
  auto r = populated_ranges_of_process(999999999, regions, kPage);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::kProcessGone);
}

#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#endif

// Arming write tracking while the owner of the memory already runs: what was touched before the
// arm is reported by the arm itself, what is written after it by the next scan, nothing twice
// after a re-arm, and untouched pages never.
TEST(WriteTrackingTest, ArmReportsEarlierTouchesAndLaterWritesAreScanned) {
  const std::uint64_t pages = 64;
  const int memfd = memfd_create("dirty_set_test_wp", MFD_CLOEXEC);
  ASSERT_GE(memfd, 0);
  ASSERT_EQ(ftruncate(memfd, static_cast<off_t>(pages * kPage)), 0);
  auto* mem = static_cast<volatile char*>(
      mmap(nullptr, pages * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0));
  ASSERT_NE(mem, MAP_FAILED);
  const int uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (uffd < 0) GTEST_SKIP() << "no userfaultfd here: " << std::strerror(errno);
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
  if (ioctl(uffd, UFFDIO_API, &api) != 0) GTEST_SKIP() << "no UFFD_FEATURE_WP_ASYNC";
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<std::uint64_t>(mem);
  reg.range.len = pages * kPage;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  ASSERT_EQ(ioctl(uffd, UFFDIO_REGISTER, &reg), 0) << std::strerror(errno);
  const std::vector<Region> regions = {{0, reinterpret_cast<std::uint64_t>(mem), pages * kPage}};

  // Before the arm: two writes and a read.
  mem[1 * kPage] = 1;
  mem[5 * kPage] = 1;
  const char seen = mem[9 * kPage];
  (void)seen;
  auto armed = arm_write_tracking(getpid(), regions, kPage);
  if (!armed.ok() && armed.error().code == Errc::kUnsupported) GTEST_SKIP() << "no PAGEMAP_SCAN";
  ASSERT_TRUE(armed.ok()) << armed.error().to_string();
  // The writes must be there; the read may be (it mapped the page writable): a superset is safe.
  ASSERT_EQ(armed->size(), 3u);
  EXPECT_EQ((*armed)[0], (ByteRange{1 * kPage, kPage}));
  EXPECT_EQ((*armed)[1], (ByteRange{5 * kPage, kPage}));
  EXPECT_EQ((*armed)[2], (ByteRange{9 * kPage, kPage}));

  // After the arm: only these writes, including to a page the arm already reported and to a
  // page that was an empty page-table entry when armed.
  mem[5 * kPage] = 2;
  mem[40 * kPage] = 2;
  const char again = mem[41 * kPage];  // a read after the arm is not a write
  (void)again;
  auto written = written_ranges_of_process(getpid(), regions, kPage, /*rearm=*/true);
  ASSERT_TRUE(written.ok()) << written.error().to_string();
  ASSERT_EQ(written->size(), 2u);
  EXPECT_EQ((*written)[0], (ByteRange{5 * kPage, kPage}));
  EXPECT_EQ((*written)[1], (ByteRange{40 * kPage, kPage}));
  auto none = written_ranges_of_process(getpid(), regions, kPage, /*rearm=*/true);
  ASSERT_TRUE(none.ok()) << none.error().to_string();
  EXPECT_TRUE(none->empty());

  munmap(const_cast<char*>(mem), pages * kPage);
  close(uffd);
  close(memfd);
}

TEST(ValidateRegionsTest, RejectsOverlapAndMisalignment) {
  std::vector<Region> overlap = {{0, 0x10000, 2 * kPage}, {kPage, 0x20000, kPage}};
  EXPECT_FALSE(validate_regions(overlap, 16 * kPage).ok());
  std::vector<Region> unaligned = {{0, 0x10001, kPage}};
  EXPECT_FALSE(validate_regions(unaligned, 16 * kPage).ok());
  std::vector<Region> past_end = {{15 * kPage, 0x10000, 2 * kPage}};
  EXPECT_FALSE(validate_regions(past_end, 16 * kPage).ok());
  std::vector<Region> good = {{8 * kPage, 0x20000, kPage}, {0, 0x10000, kPage}};
  EXPECT_TRUE(validate_regions(good, 16 * kPage).ok());
  EXPECT_EQ(good[0].guest_offset, 0u);
}

// A region whose guest_offset + size (or host_addr + size) wraps past 2^64 used to pass the
// "ends past the guest size" check with the wrapped sum.
TEST(ValidateRegionsTest, RejectsRegionsWhoseEndWrapsAround) {
  const std::uint64_t top = ~std::uint64_t{0} - kPage + 1;  // the last page-aligned offset
  std::vector<Region> guest_wraps = {{top, 0x10000, 2 * kPage}};
  const Status s = validate_regions(guest_wraps, 16 * kPage);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, Errc::kInvalidArgument);
  std::vector<Region> host_wraps = {{0, top, 2 * kPage}};
  EXPECT_FALSE(validate_regions(host_wraps, 16 * kPage).ok());
  // Two regions where the second wraps: the overlap check must not be fooled either.
  std::vector<Region> second_wraps = {{0, 0x10000, kPage}, {top, 0x20000, 2 * kPage}};
  EXPECT_FALSE(validate_regions(second_wraps, 16 * kPage).ok());
}

}  // namespace
}  // namespace memsnap
