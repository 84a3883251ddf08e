// Dirty sets: which guest byte ranges a pause exports. Either given by the caller (normalized
// here) or "everything populated", found with SEEK_DATA/SEEK_HOLE on the guest memfd or with the
// PAGEMAP_SCAN ioctl on the VMM process (falling back to reading /proc/PID/pagemap on kernels
// without it). All results are sorted, disjoint, block-aligned and inside [0, guest_size).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <vector>

#include "core/base/result.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap {

using plugin::ByteRange;
using plugin::Region;

// Sorts and merges ranges, widens them to whole blocks and checks they lie inside the guest.
// kInvalidArgument for a range past guest_size or an overflowing one.
Result<std::vector<ByteRange>> normalize_ranges(std::vector<ByteRange> ranges,
                                                std::uint64_t guest_size, std::uint64_t block_size);

// Total bytes in ranges.
std::uint64_t total_bytes(const std::vector<ByteRange>& ranges) noexcept;

// The data (non-hole) ranges of a memfd, as guest offsets (guest offset == file offset).
Result<std::vector<ByteRange>> populated_ranges_of_memfd(int memfd, std::uint64_t guest_size,
                                                         std::uint64_t block_size);

// Pages of the VMM's guest regions that are present or swapped, as guest offsets.
struct ScanStats {
  bool used_pagemap_scan = false;  // false: read /proc/PID/pagemap instead
  std::uint64_t ioctl_calls = 0;
};
enum class ScanMethod {
  kAuto,         // PAGEMAP_SCAN, or reading /proc/PID/pagemap where the kernel lacks it
  kPagemapRead,  // always read /proc/PID/pagemap (the fallback; tests use it to cover it)
};
Result<std::vector<ByteRange>> populated_ranges_of_process(pid_t pid,
                                                           const std::vector<Region>& regions,
                                                           std::uint64_t block_size,
                                                           ScanStats* stats = nullptr,
                                                           ScanMethod method = ScanMethod::kAuto);

// Pages of the VMM's guest regions written since they were last write-protected through
// userfaultfd in WP_ASYNC mode (PAGEMAP_SCAN, PAGE_IS_WRITTEN), as guest offsets. With rearm, the
// same ioctl write-protects them again, so the next call reports only later writes.
// kUnsupported when the kernel or the registration does not allow it (the caller falls back to
// "everything populated" and says so).
Result<std::vector<ByteRange>> written_ranges_of_process(pid_t pid,
                                                         const std::vector<Region>& regions,
                                                         std::uint64_t block_size, bool rearm);

// Write-protects every page of the VMM's guest regions (registered for userfaultfd WP_ASYNC),
// populated or not, and returns the pages that were writable until then (written, or mapped by a
// read: a superset of the written ones), as guest offsets. It arms tracking while the VMM runs:
// together with later written_ranges_of_process() calls it misses no write. About 7 ms per GiB.
Result<std::vector<ByteRange>> arm_write_tracking(pid_t pid, const std::vector<Region>& regions,
                                                  std::uint64_t block_size);

// Synchronous write tracking (a userfaultfd registered for write-protect without WP_ASYNC: each
// write to a protected page is a fault its server resolves): the pages of the VMM's guest regions
// that are mapped and not write-protected -- written since they were protected, or installed
// without protection -- as guest offsets. Only reads; re-protecting is the userfaultfd's
// UFFDIO_WRITEPROTECT (protect_guest_ranges).
Result<std::vector<ByteRange>> writable_ranges_of_process(pid_t pid,
                                                          const std::vector<Region>& regions,
                                                          std::uint64_t block_size);

// Write-protects guest ranges of the VMM through its userfaultfd (UFFDIO_WRITEPROTECT), one call
// per run, runs fewer than join_gap_bytes apart joined into one call (protecting a page that is
// already protected changes nothing; one call costs more than ~20 pages of walking).
Status protect_guest_ranges(int uffd, const std::vector<Region>& regions,
                            const std::vector<ByteRange>& ranges,
                            std::uint64_t join_gap_bytes = 64 * 1024);

// Sorts regions by guest offset and checks they are disjoint, page-aligned and inside the guest.
Status validate_regions(std::vector<Region>& regions, std::uint64_t guest_size);

}  // namespace memsnap
