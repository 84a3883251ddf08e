// A strategy that stops half way through an export until the test lets it go on, so that tests
// of "a pause in flight" (a drain, a kill -9 in its middle) see one in flight every time instead
// of racing a fast export. Never installed: built into its own directory; a test that wants it
// runs memsnapd with a plugin directory that holds it beside the real plugins.
//
// Built twice from this file:
// - memsnap_gated.so ("gated") reads guest memory through the VMM's address space
//   (process_vm_readv), so any registered sandbox can use it;
// - memsnap_gated_punch.so ("gated_punch", MEMSNAP_GATED_RELEASES) reads the memfd and, like
//   hole_punch, releases what it wrote (make_durable, punch, released) before it waits: a pause
//   that stops with part of the guest's memory only in its unfinished snapshot;
// - memsnap_gated_memfd.so ("gated_memfd", MEMSNAP_GATED_MEMFD) reads the memfd and leaves it
//   whole, like memfd: a handover export in flight whose held memory can serve a resume.
// The gate is the directory named by $MEMSNAP_GATE_DIR: once half of the dirty bytes are in the
// sink, it creates <dir>/waiting and waits until <dir>/open exists (checked every 2 ms, for at
// most 120 s, then it fails); without the variable it never waits.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <string>
#include <vector>

#include "plugins/plugin_api/plugin_api.h"
#include "plugins/plugin_api/plugin_util.h"

namespace {

using namespace memsnap::plugin;

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// Says it is waiting, then waits for the test to open the gate.
Status wait_at_gate() {
  const char* dir = std::getenv("MEMSNAP_GATE_DIR");
  if (dir == nullptr || *dir == '\0') return Status::Ok();
  const std::string waiting = std::string(dir) + "/waiting";
  const std::string open = std::string(dir) + "/open";
  if (FILE* f = std::fopen(waiting.c_str(), "w")) std::fclose(f);
  for (int i = 0; i < 60000; ++i) {
    if (exists(open)) return Status::Ok();
    ::usleep(2000);
  }
  return Status::Error(StatusCode::kIoError, ETIMEDOUT, "gated: the gate was never opened");
}

#ifdef MEMSNAP_GATED_RELEASES
constexpr bool kReleases = true;
#else
constexpr bool kReleases = false;
#endif
#ifdef MEMSNAP_GATED_MEMFD
constexpr bool kReadsMemfd = true;
#else
constexpr bool kReadsMemfd = kReleases;
#endif

// Reads n bytes of guest memory at guest offset off into buf: from the memfd (gated_punch) or
// the VMM's address space (gated).
Status read_guest(const ExportRequest& request, std::uint64_t off, std::uint64_t n, char* buf) {
  if (kReadsMemfd) {
    if (::pread(request.memfd, buf, n, static_cast<off_t>(off)) != static_cast<ssize_t>(n)) {
      return Status::Error(StatusCode::kIoError, errno, "gated: pread at 0x%llx failed",
                           static_cast<unsigned long long>(off));
    }
    return Status::Ok();
  }
  for (std::size_t k = 0; k < request.region_count; ++k) {
    const Region& g = request.regions[k];
    if (off < g.guest_offset || off + n > g.guest_offset + g.size) continue;
    iovec local{buf, n};
    iovec remote{reinterpret_cast<void*>(g.host_addr + (off - g.guest_offset)), n};
    if (::process_vm_readv(request.pid, &local, 1, &remote, 1, 0) != static_cast<ssize_t>(n)) {
      return Status::Error(errno == ESRCH ? StatusCode::kProcessGone : StatusCode::kIoError,
                           errno, "gated: process_vm_readv at 0x%llx failed",
                           static_cast<unsigned long long>(off));
    }
    return Status::Ok();
  }
  return Status::Error(StatusCode::kBadAddress, 0, "gated: no region holds 0x%llx",
                       static_cast<unsigned long long>(off));
}

// gated_punch: frees what was written so far from the memfd, as hole_punch does.
Status release(const ExportRequest& request, BlockSink& sink, ExportStats& stats,
               const std::vector<ByteRange>& written) {
  if (Status s = sink.make_durable(); !s.ok()) return s;
  for (const ByteRange& w : written) {
    if (::fallocate(request.memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(w.offset), static_cast<off_t>(w.length)) != 0) {
      return Status::Error(StatusCode::kIoError, errno, "gated: punching failed");
    }
    sink.released(w.offset, w.length);
    stats.bytes_released += w.length;
  }
  return Status::Ok();
}

class Gated final : public Strategy {
 public:
  Status export_ranges(const ExportRequest& request, BlockSink& sink,
                       ExportStats& stats) noexcept override {
    if (Status s = check_request_ranges(request); !s.ok()) return s;
    std::uint64_t total = 0;
    for (std::size_t i = 0; i < request.range_count; ++i) total += request.ranges[i].length;
    std::vector<char> buf(1 << 20);
    std::vector<ByteRange> written;
    std::uint64_t done = 0;
    bool gated = false;
    for (std::size_t i = 0; i < request.range_count; ++i) {
      const ByteRange& r = request.ranges[i];
      for (std::uint64_t off = r.offset; off < r.offset + r.length;) {
        if (!gated && done * 2 >= total) {
          gated = true;
          if (kReleases) {
            if (Status s = release(request, sink, stats, written); !s.ok()) return s;
          }
          if (Status s = wait_at_gate(); !s.ok()) return s;
        }
        // Within one region: regions are block-aligned, and so are the chunks read.
        std::uint64_t n = std::min<std::uint64_t>(buf.size(), r.offset + r.length - off);
        for (std::size_t k = 0; !kReadsMemfd && k < request.region_count; ++k) {
          const Region& g = request.regions[k];
          if (off >= g.guest_offset && off < g.guest_offset + g.size) {
            n = std::min(n, g.guest_offset + g.size - off);
          }
        }
        if (Status s = read_guest(request, off, n, buf.data()); !s.ok()) return s;
        const Chunk chunk{off, buf.data(), n};
        if (Status s = write_chunks(sink, &chunk, 1); !s.ok()) return s;
        stats.bytes_read += n;
        ++stats.read_calls;
        if (!written.empty() && written.back().offset + written.back().length == off) {
          written.back().length += n;
        } else {
          written.push_back({off, n});
        }
        done += n;
        off += n;
      }
    }
    return Status::Ok();
  }
};

Status create(Strategy** out, const Option* /*options*/, std::size_t count) noexcept {
  if (count != 0) return Status::Error(StatusCode::kInvalidArgument, 0, "gated takes no options");
  *out = new (std::nothrow) Gated();
  return *out != nullptr ? Status::Ok()
                         : Status::Error(StatusCode::kNoMemory, ENOMEM, "out of memory");
}

}  // namespace

#ifdef MEMSNAP_GATED_RELEASES
MEMSNAP_PLUGIN("gated_punch", "1.0.0", kCapNeedsMemfd | kCapReleasesMemory | kCapExperimental,
               "test fixture: releases what it wrote, then stops half way until the test opens "
               "its gate",
               create)
#elif defined(MEMSNAP_GATED_MEMFD)
MEMSNAP_PLUGIN("gated_memfd", "1.0.0", kCapNeedsMemfd | kCapExperimental,
               "test fixture: reads the memfd and keeps it whole; stops half way until the test "
               "opens its gate",
               create)
#else
MEMSNAP_PLUGIN("gated", "1.0.0", kCapNeedsPid | kCapExperimental,
               "test fixture: stops half way until the test opens its gate", create)
#endif
