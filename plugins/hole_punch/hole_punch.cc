#include "plugins/hole_punch/hole_punch.h"
#include "plugins/plugin_api/plugin_util.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <cerrno>
#include <cinttypes>
#include <cstring>
#include <new>

namespace memsnap::plugins {
namespace {

using plugin::ByteRange;
using plugin::Status;
using plugin::StatusCode;

Status allocated_bytes(int fd, std::uint64_t* out) {
  struct stat st;
  if (fstat(fd, &st) != 0) {
    return Status::Error(StatusCode::kIoError, errno, "fstat of the memfd: %s",
                         std::strerror(errno));
  }
  *out = static_cast<std::uint64_t>(st.st_blocks) * 512;
  return Status::Ok();
}

class Puncher final : public ChunkHook {
 public:
  Puncher(int fd, plugin::BlockSink& sink, plugin::ExportStats& stats, std::uint64_t allocated)
      : fd_(fd), sink_(sink), stats_(stats), allocated_(allocated) {}

  Status after_chunk(const ByteRange* pieces, std::size_t count) noexcept override {
    Status durable = sink_.make_durable();
    if (!durable.ok()) {
      return Status::Error(StatusCode::kSinkError, durable.sys_errno,
                           "make_durable failed, nothing of the chunk released: %s",
                           durable.message);
    }
    for (std::size_t i = 0; i < count; ++i) {
      int rc;
      do {
        rc = fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       static_cast<off_t>(pieces[i].offset), static_cast<off_t>(pieces[i].length));
      } while (rc != 0 && errno == EINTR);
      if (rc != 0) {
        return Status::Error(StatusCode::kIoError, errno,
                             "punching [0x%" PRIx64 ", +0x%" PRIx64 ") out of the memfd: %s",
                             pieces[i].offset, pieces[i].length, std::strerror(errno));
      }
      sink_.released(pieces[i].offset, pieces[i].length);
    }
    std::uint64_t now = 0;
    if (Status s = allocated_bytes(fd_, &now); !s.ok()) return s;
    if (now < allocated_) stats_.bytes_released += allocated_ - now;
    allocated_ = now;
    return Status::Ok();
  }

 private:
  const int fd_;
  plugin::BlockSink& sink_;
  plugin::ExportStats& stats_;
  std::uint64_t allocated_;
};

}  // namespace

plugin::Status HolePunchStrategy::export_ranges(const plugin::ExportRequest& request,
                                                plugin::BlockSink& sink,
                                                plugin::ExportStats& stats) noexcept {
  if (request.memfd < 0)
    return Status::Error(StatusCode::kUnsupported, 0, "the guest has no memfd");
  // The exporter checks the request and that chunk_bytes is whole blocks.
  std::uint64_t allocated = 0;
  if (Status s = allocated_bytes(request.memfd, &allocated); !s.ok()) return s;
  Puncher puncher(request.memfd, sink, stats, allocated);
  return exporter_.run(request, sink, stats, &puncher, options_.chunk_bytes);
}

plugin::Status create_hole_punch(plugin::Strategy** out, const plugin::Option* options,
                                 std::size_t count) noexcept {
  if (out == nullptr || (count != 0 && options == nullptr)) {
    return Status::Error(StatusCode::kInvalidArgument, 0, "hole_punch: null argument");
  }
  HolePunchOptions parsed;
  for (std::size_t i = 0; i < count; ++i) {
    const char* key = options[i].key != nullptr ? options[i].key : "";
    if (std::strcmp(key, "chunk_bytes") == 0) {
      std::uint64_t n = 0;
      if (!plugin::parse_u64(options[i].value, &n) || n < 4096 || n > (1u << 30) || n % 4096 != 0) {
        return Status::Error(StatusCode::kInvalidArgument, 0,
                             "hole_punch: bad value '%s' for option 'chunk_bytes'",
                             options[i].value != nullptr ? options[i].value : "(null)");
      }
      parsed.chunk_bytes = n;
      continue;
    }
    Status s = apply_memfd_option(options[i], &parsed.memfd);
    if (!s.ok()) {
      s.code = StatusCode::kInvalidArgument;
      return s;
    }
  }
  auto* strategy = new (std::nothrow) HolePunchStrategy(parsed);
  if (strategy == nullptr) {
    return Status::Error(StatusCode::kNoMemory, ENOMEM, "hole_punch: out of memory");
  }
  *out = strategy;
  return Status::Ok();
}

}  // namespace memsnap::plugins
