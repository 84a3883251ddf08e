// A strategy that fails on purpose half way through an export, for the fault tests: it reads the
// memfd like the memfd strategy, hands the first part of the dirty set to the snapshot, can punch
// what it wrote out of the memfd (like hole_punch), and then returns an error. Never installed:
// it is built into its own directory, which no daemon or CLI loads.
//
// Options: fail_after_percent (0..100, default 50) of the dirty bytes before failing;
//          punch (true|false, default true): release what was written before failing;
//          seal (true|false, default false): after punching, seal the memfd against writes
//            (F_SEAL_FUTURE_WRITE; the memfd must allow sealing), so that the pipeline cannot
//            write the released memory back -- the case where a pause leaves data at risk.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "plugins/plugin_api/plugin_api.h"
#include "plugins/plugin_api/plugin_util.h"

namespace {

using namespace memsnap::plugin;

class FailsHalfWay final : public Strategy {
 public:
  FailsHalfWay(std::uint64_t fail_after_percent, bool punch, bool seal)
      : fail_after_percent_(fail_after_percent), punch_(punch), seal_(seal) {}

  Status export_ranges(const ExportRequest& request, BlockSink& sink,
                       ExportStats& stats) noexcept override {
    if (Status s = check_request_ranges(request); !s.ok()) return s;
    std::uint64_t total = 0;
    for (std::size_t i = 0; i < request.range_count; ++i) total += request.ranges[i].length;
    const std::uint64_t budget = total * fail_after_percent_ / 100;

    std::vector<char> buf(request.block_size);
    std::vector<ByteRange> written;
    std::uint64_t done = 0;
    for (std::size_t i = 0; i < request.range_count && done < budget; ++i) {
      const ByteRange& r = request.ranges[i];
      for (std::uint64_t off = r.offset; off < r.offset + r.length && done < budget;
           off += request.block_size) {
        const ssize_t n = pread(request.memfd, buf.data(), buf.size(), static_cast<off_t>(off));
        if (n != static_cast<ssize_t>(buf.size())) {
          return Status::Error(StatusCode::kIoError, errno, "fixture: pread at %llu failed",
                               static_cast<unsigned long long>(off));
        }
        const Chunk chunk{off, buf.data(), buf.size()};
        if (Status s = write_chunks(sink, &chunk, 1); !s.ok()) return s;
        stats.bytes_read += buf.size();
        ++stats.read_calls;
        done += buf.size();
        if (!written.empty() && written.back().offset + written.back().length == off) {
          written.back().length += buf.size();
        } else {
          written.push_back({off, buf.size()});
        }
      }
    }
    if (punch_ && !written.empty()) {
      if (Status s = sink.make_durable(); !s.ok()) return s;
      for (const ByteRange& w : written) {
        if (fallocate(request.memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      static_cast<off_t>(w.offset), static_cast<off_t>(w.length)) != 0) {
          return Status::Error(StatusCode::kIoError, errno, "fixture: punching failed");
        }
        sink.released(w.offset, w.length);
        stats.bytes_released += w.length;
      }
      if (seal_ && fcntl(request.memfd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE) != 0) {
        return Status::Error(StatusCode::kIoError, errno, "fixture: sealing the memfd failed");
      }
    }
    return Status::Error(
        StatusCode::kIoError, EIO, "injected failure after %llu of %llu bytes (%llu released)",
        static_cast<unsigned long long>(done), static_cast<unsigned long long>(total),
        static_cast<unsigned long long>(stats.bytes_released));
  }

 private:
  std::uint64_t fail_after_percent_;
  bool punch_;
  bool seal_;
};

Status create(Strategy** out, const Option* options, std::size_t count) noexcept {
  std::uint64_t percent = 50;
  bool punch = true;
  bool seal = false;
  for (std::size_t i = 0; i < count; ++i) {
    const char* key = options[i].key;
    const char* value = options[i].value;
    if (std::strcmp(key, "fail_after_percent") == 0 && parse_u64(value, &percent) &&
        percent <= 100) {
      continue;
    }
    if (std::strcmp(key, "punch") == 0 &&
        (std::strcmp(value, "true") == 0 || std::strcmp(value, "false") == 0)) {
      punch = std::strcmp(value, "true") == 0;
      continue;
    }
    if (std::strcmp(key, "seal") == 0 &&
        (std::strcmp(value, "true") == 0 || std::strcmp(value, "false") == 0)) {
      seal = std::strcmp(value, "true") == 0;
      continue;
    }
    return Status::Error(StatusCode::kInvalidArgument, 0, "bad option '%s'='%s'", key, value);
  }
  *out = new (std::nothrow) FailsHalfWay(percent, punch, seal);
  return *out != nullptr ? Status::Ok()
                         : Status::Error(StatusCode::kNoMemory, ENOMEM, "out of memory");
}

}  // namespace

MEMSNAP_PLUGIN("fails_half_way", "1.0.0", kCapNeedsMemfd | kCapReleasesMemory | kCapExperimental,
               "test fixture: exports part of the dirty set, then fails", create)
