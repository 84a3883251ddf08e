#include "core/dirty_set.h"

#include <linux/userfaultfd.h>

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "core/base/file_io.h"
#include "core/vmm_identity.h"

namespace memsnap {
namespace {

// PAGEMAP_SCAN (Linux 6.7+). Debian 12's kernel headers predate it, so the ABI is declared here
// from the kernel's documented uapi (include/uapi/linux/fs.h).
struct PageRegion {
  std::uint64_t start;
  std::uint64_t end;
  std::uint64_t categories;
};
struct PmScanArg {
  std::uint64_t size;
  std::uint64_t flags;
  std::uint64_t start;
  std::uint64_t end;
  std::uint64_t walk_end;
  std::uint64_t vec;
  std::uint64_t vec_len;
  std::uint64_t max_pages;
  std::uint64_t category_inverted;
  std::uint64_t category_mask;
  std::uint64_t category_anyof_mask;
  std::uint64_t return_mask;
};
constexpr std::uint64_t kPageIsWritten = 1u << 1;
constexpr std::uint64_t kPageIsPresent = 1u << 3;
constexpr std::uint64_t kPageIsSwapped = 1u << 4;
constexpr std::uint64_t kScanWpMatching = 1u << 0;    // PM_SCAN_WP_MATCHING: re-protect matches
constexpr std::uint64_t kScanCheckWpAsync = 1u << 1;  // PM_SCAN_CHECK_WPASYNC
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);

// What one PAGEMAP_SCAN walk asks for.
struct ScanQuery {
  std::uint64_t flags = 0;
  std::uint64_t category_mask = 0;        // all of these
  std::uint64_t category_anyof_mask = 0;  // at least one of these
  std::uint64_t return_mask = 0;
  // Keep only returned regions with all of keep_all and one of keep_any (0: no condition). A scan
  // that must visit every page (to arm it) matches everything and filters here.
  std::uint64_t keep_all = 0;
  std::uint64_t keep_any = 0;
};
constexpr ScanQuery kPopulatedQuery{0, 0, kPageIsPresent | kPageIsSwapped,
                                    kPageIsPresent | kPageIsSwapped};

std::string errno_text(int err) { return std::strerror(err); }

void append_merged(std::vector<ByteRange>& out, std::uint64_t start, std::uint64_t end) {
  if (!out.empty() && out.back().offset + out.back().length >= start) {
    const std::uint64_t back_end = out.back().offset + out.back().length;
    out.back().length = std::max(back_end, end) - out.back().offset;
  } else {
    out.push_back({start, end - start});
  }
}

// Adds the host-address range [start, end) of region r, translated to guest offsets and widened
// to blocks.
void add_host_range(std::vector<ByteRange>& out, const Region& r, std::uint64_t start,
                    std::uint64_t end, std::uint64_t block_size) {
  std::uint64_t g_start = r.guest_offset + (start - r.host_addr);
  std::uint64_t g_end = r.guest_offset + (end - r.host_addr);
  g_start -= g_start % block_size;
  g_end = (g_end + block_size - 1) / block_size * block_size;
  append_merged(out, g_start, std::min(g_end, r.guest_offset + r.size));
}

Result<bool> scan_with_ioctl(int fd, const Region& r, std::uint64_t block_size,
                             const ScanQuery& query, std::vector<ByteRange>& out,
                             ScanStats& stats) {
  std::vector<PageRegion> vec(512);
  std::uint64_t start = r.host_addr;
  const std::uint64_t end = r.host_addr + r.size;
  while (start < end) {
    PmScanArg arg{};
    arg.size = sizeof(arg);
    arg.start = start;
    arg.end = end;
    arg.vec = reinterpret_cast<std::uint64_t>(vec.data());
    arg.vec_len = vec.size();
    arg.flags = query.flags;
    arg.category_mask = query.category_mask;
    arg.category_anyof_mask = query.category_anyof_mask;
    arg.return_mask = query.return_mask;
    const int n = ::ioctl(fd, kPagemapScan, &arg);
    ++stats.ioctl_calls;
    if (n < 0) {
      if (errno == EINTR) continue;
      const bool no_wp_async = errno == EPERM && (query.flags & kScanCheckWpAsync) != 0;
      if ((errno == ENOTTY || errno == EINVAL || no_wp_async) && stats.ioctl_calls == 1) {
        return false;
      }
      return make_error(Errc::kIoError, "PAGEMAP_SCAN failed: " + errno_text(errno), errno);
    }
    for (int i = 0; i < n; ++i) {
      if ((vec[i].categories & query.keep_all) != query.keep_all) continue;
      if (query.keep_any != 0 && (vec[i].categories & query.keep_any) == 0) continue;
      add_host_range(out, r, vec[i].start, vec[i].end, block_size);
    }
    // walk_end is stale when the vector filled up; the scan is only complete when fewer regions
    // than vec_len came back, otherwise it resumes after the last region returned.
    if (static_cast<std::uint64_t>(n) < arg.vec_len) break;
    start = vec[n - 1].end;
  }
  return true;
}

Status scan_with_pagemap(int fd, const Region& r, std::uint64_t block_size,
                         std::vector<ByteRange>& out) {
  const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  std::vector<std::uint64_t> entries(4096);
  for (std::uint64_t addr = r.host_addr; addr < r.host_addr + r.size;) {
    const std::uint64_t pages =
        std::min<std::uint64_t>(entries.size(), (r.host_addr + r.size - addr) / page);
    const ssize_t n = ::pread(fd, entries.data(), pages * 8, static_cast<off_t>(addr / page * 8));
    if (n < 0) {
      if (errno == EINTR) continue;
      return make_error(Errc::kIoError, "reading pagemap: " + errno_text(errno), errno);
    }
    if (n == 0) return make_error(Errc::kIoError, "pagemap ended early");
    const std::uint64_t got = static_cast<std::uint64_t>(n) / 8;
    for (std::uint64_t i = 0; i < got; ++i) {
      if (entries[i] & ((1ULL << 63) | (1ULL << 62))) {
        add_host_range(out, r, addr + i * page, addr + (i + 1) * page, block_size);
      }
    }
    addr += got * page;
  }
  return {};
}

Result<io::UniqueFd> open_pagemap(pid_t pid) {
  const std::string path = "/proc/" + std::to_string(pid) + "/pagemap";
  io::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    const int err = errno;
    return make_error(err == ENOENT ? Errc::kProcessGone : Errc::kIoError,
                      "cannot open " + path + ": " + errno_text(err), err);
  }
  return fd;
}

}  // namespace

std::uint64_t total_bytes(const std::vector<ByteRange>& ranges) noexcept {
  std::uint64_t sum = 0;
  for (const auto& r : ranges) sum += r.length;
  return sum;
}

Result<std::vector<ByteRange>> normalize_ranges(std::vector<ByteRange> ranges,
                                                std::uint64_t guest_size,
                                                std::uint64_t block_size) {
  for (const auto& r : ranges) {
    if (r.offset + r.length < r.offset || r.offset + r.length > guest_size) {
      return make_error(Errc::kInvalidArgument,
                        "dirty range " + std::to_string(r.offset) + "+" + std::to_string(r.length) +
                            " is outside the guest (" + std::to_string(guest_size) + " bytes)");
    }
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const ByteRange& a, const ByteRange& b) { return a.offset < b.offset; });
  std::vector<ByteRange> out;
  out.reserve(ranges.size());
  for (const auto& r : ranges) {
    if (r.length == 0) continue;
    const std::uint64_t start = r.offset / block_size * block_size;
    const std::uint64_t end =
        std::min(guest_size, (r.offset + r.length + block_size - 1) / block_size * block_size);
    append_merged(out, start, end);
  }
  return out;
}

Result<std::vector<ByteRange>> populated_ranges_of_memfd(int memfd, std::uint64_t guest_size,
                                                         std::uint64_t block_size) {
  std::vector<ByteRange> out;
  off_t pos = 0;
  while (static_cast<std::uint64_t>(pos) < guest_size) {
    const off_t data = ::lseek(memfd, pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // no data after pos
      return make_error(Errc::kIoError, "lseek(SEEK_DATA) on the memfd: " + errno_text(errno),
                        errno);
    }
    if (static_cast<std::uint64_t>(data) >= guest_size) break;
    off_t hole = ::lseek(memfd, data, SEEK_HOLE);
    if (hole < 0) {
      return make_error(Errc::kIoError, "lseek(SEEK_HOLE) on the memfd: " + errno_text(errno),
                        errno);
    }
    const std::uint64_t start = static_cast<std::uint64_t>(data) / block_size * block_size;
    const std::uint64_t end = std::min<std::uint64_t>(
        guest_size, (static_cast<std::uint64_t>(hole) + block_size - 1) / block_size * block_size);
    append_merged(out, start, end);
    pos = hole;
  }
  return out;
}

Result<std::vector<ByteRange>> populated_ranges_of_process(pid_t pid,
                                                           const std::vector<Region>& regions,
                                                           std::uint64_t block_size,
                                                           ScanStats* stats_out,
                                                           ScanMethod method) {
  // The pagemap reports nothing for an unmapped range, which would read as "nothing populated"
  // and export as zeros: a range the process does not map is an error.
  MEMSNAP_RETURN_IF_ERROR(check_regions_mapped(pid, regions));
  // In a shared mapping (a memfd) a page the page tables do not map may still hold data: the
  // scan would take it for a hole and the pause would export it as zeros.
  MEMSNAP_ASSIGN_OR_RETURN(const bool shared, regions_in_shared_mapping(pid, regions));
  if (shared) {
    return make_error(Errc::kUnsupported,
                      "the guest memory of process " + std::to_string(pid) +
                          " is a shared mapping (a memfd or file): its page tables do not show "
                          "every page that holds data, so their scan would export some as "
                          "zeros. Give its memfd (memfd_fd at registration; --memfd-of-pid or "
                          "--memfd-fd to memsnap pause)");
  }
  MEMSNAP_ASSIGN_OR_RETURN(auto opened, open_pagemap(pid));
  const io::UniqueFd fd = std::move(opened);
  ScanStats stats;
  stats.used_pagemap_scan = method == ScanMethod::kAuto;
  std::vector<ByteRange> out;
  for (const auto& r : regions) {
    if (stats.used_pagemap_scan) {
      MEMSNAP_ASSIGN_OR_RETURN(
          auto used, scan_with_ioctl(fd.get(), r, block_size, kPopulatedQuery, out, stats));
      if (used) continue;
      stats.used_pagemap_scan = false;
    }
    MEMSNAP_RETURN_IF_ERROR(scan_with_pagemap(fd.get(), r, block_size, out));
  }
  if (stats_out) *stats_out = stats;
  return out;
}

namespace {

// Runs one PAGEMAP_SCAN query over every region of pid (which must support it) and returns what
// it kept, sorted and merged, as guest offsets.
Result<std::vector<ByteRange>> scan_process(pid_t pid, const std::vector<Region>& regions,
                                            std::uint64_t block_size, const ScanQuery& query) {
  MEMSNAP_ASSIGN_OR_RETURN(auto opened, open_pagemap(pid));
  const io::UniqueFd fd = std::move(opened);
  ScanStats stats;
  std::vector<ByteRange> out;
  for (const auto& r : regions) {
    MEMSNAP_ASSIGN_OR_RETURN(auto used,
                             scan_with_ioctl(fd.get(), r, block_size, query, out, stats));
    if (!used) {
      return make_error(Errc::kUnsupported,
                        "PAGEMAP_SCAN with write tracking is not available (kernel < 6.7, or the "
                        "guest memory is not registered for userfaultfd WP_ASYNC)");
    }
  }
  // Regions were scanned in their given order; make the result sorted and merged.
  std::vector<ByteRange> sorted;
  std::sort(out.begin(), out.end(),
            [](const ByteRange& a, const ByteRange& b) { return a.offset < b.offset; });
  for (const auto& b : out) append_merged(sorted, b.offset, b.offset + b.length);
  return sorted;
}

}  // namespace

Result<std::vector<ByteRange>> written_ranges_of_process(pid_t pid,
                                                         const std::vector<Region>& regions,
                                                         std::uint64_t block_size, bool rearm) {
  const ScanQuery query{kScanCheckWpAsync | (rearm ? kScanWpMatching : 0), kPageIsWritten, 0,
                        kPageIsWritten};
  return scan_process(pid, regions, block_size, query);
}

Result<std::vector<ByteRange>> arm_write_tracking(pid_t pid, const std::vector<Region>& regions,
                                                  std::uint64_t block_size) {
  // No category required: every page and every empty page-table entry is visited and
  // write-protected (empty entries get a marker), and each is reported with its categories as
  // they were until then. The kernel does both under the page-table lock, so a write lands
  // either before (reported here) or after (reported by the next scan): none is missed. Empty
  // entries count as "written" in this walk (measured: kernel 6.x reports a never-protected hole
  // so), but nothing was written there: only mapped (present or swapped) unprotected pages are
  // kept.
  const std::uint64_t mapped = kPageIsPresent | kPageIsSwapped;
  const ScanQuery query{kScanCheckWpAsync | kScanWpMatching, 0, 0, kPageIsWritten | mapped,
                        kPageIsWritten, mapped};
  return scan_process(pid, regions, block_size, query);
}

Result<std::vector<ByteRange>> writable_ranges_of_process(pid_t pid,
                                                          const std::vector<Region>& regions,
                                                          std::uint64_t block_size) {
  // No PM_SCAN_CHECK_WPASYNC: the categories are read the same way for a synchronous
  // registration. Empty entries count as "written" in this walk: only mapped pages are kept.
  const std::uint64_t mapped = kPageIsPresent | kPageIsSwapped;
  const ScanQuery query{0, kPageIsWritten, mapped, kPageIsWritten | mapped, kPageIsWritten, mapped};
  return scan_process(pid, regions, block_size, query);
}

Status protect_guest_ranges(int uffd, const std::vector<Region>& regions,
                            const std::vector<ByteRange>& ranges, std::uint64_t join_gap_bytes) {
  std::vector<ByteRange> joined;
  for (const auto& r : ranges) {
    if (!joined.empty() &&
        joined.back().offset + joined.back().length + join_gap_bytes >= r.offset) {
      joined.back().length =
          std::max(joined.back().offset + joined.back().length, r.offset + r.length) -
          joined.back().offset;
    } else {
      joined.push_back(r);
    }
  }
  for (const auto& g : joined) {
    for (const auto& reg : regions) {
      const std::uint64_t s = std::max(g.offset, reg.guest_offset);
      const std::uint64_t e = std::min(g.offset + g.length, reg.guest_offset + reg.size);
      if (s >= e) continue;
      uffdio_writeprotect wp{};
      wp.range.start = reg.host_addr + (s - reg.guest_offset);
      wp.range.len = e - s;
      wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
      // EAGAIN: the address space is changing (a discard whose event the fault server has not
      // read yet); give its thread time to read it, for up to ~1 s.
      int rc = ::ioctl(uffd, UFFDIO_WRITEPROTECT, &wp);
      for (int tries = 0; rc != 0 && errno == EAGAIN && tries < 1000; ++tries) {
        ::usleep(1000);
        rc = ::ioctl(uffd, UFFDIO_WRITEPROTECT, &wp);
      }
      if (rc != 0) {
        const int err = errno;
        return make_error(
            Errc::kIoError,
            "UFFDIO_WRITEPROTECT at guest offset " + std::to_string(s) + ": " + errno_text(err),
            err);
      }
    }
  }
  return {};
}

Status validate_regions(std::vector<Region>& regions, std::uint64_t guest_size) {
  std::sort(regions.begin(), regions.end(),
            [](const Region& a, const Region& b) { return a.guest_offset < b.guest_offset; });
  const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  std::uint64_t prev_end = 0;
  for (const auto& r : regions) {
    if (r.size == 0 || r.host_addr % page || r.size % page || r.guest_offset % page) {
      return make_error(Errc::kInvalidArgument, "region at guest offset " +
                                                    std::to_string(r.guest_offset) +
                                                    " is empty or not page-aligned");
    }
    if (r.guest_offset < prev_end) {
      return make_error(Errc::kInvalidArgument,
                        "regions overlap at guest offset " + std::to_string(r.guest_offset));
    }
    if (r.host_addr > ~std::uint64_t{0} - r.size) {
      return make_error(Errc::kInvalidArgument, "region at guest offset " +
                                                    std::to_string(r.guest_offset) +
                                                    " ends past the end of the address space");
    }
    // Written so that nothing wraps: guest_offset + size can pass 2^64.
    if (r.size > guest_size || r.guest_offset > guest_size - r.size) {
      return make_error(
          Errc::kInvalidArgument,
          "region at guest offset " + std::to_string(r.guest_offset) + " ends past the guest size");
    }
    prev_end = r.guest_offset + r.size;
  }
  return {};
}

}  // namespace memsnap
