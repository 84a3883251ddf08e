#include "plugins/process_vm_readv/process_vm_readv.h"
#include "plugins/plugin_api/plugin_util.h"

#include <limits.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstring>
#include <ctime>
#include <memory>
#include <new>
#include <vector>

namespace memsnap::plugins {
namespace {

using plugin::ByteRange;
using plugin::Chunk;
using plugin::ExportRequest;
using plugin::ExportStats;
using plugin::Region;
using plugin::Status;
using plugin::StatusCode;

constexpr std::size_t kIovMax = IOV_MAX;
// Chunks per sink call: one writev's worth for a sink that writes them as they come.
constexpr std::size_t kMaxChunksPerWrite = IOV_MAX;
// EINTR / EAGAIN in a row without progress before giving up (a livelock, not a busy kernel).
constexpr std::uint32_t kMaxConsecutiveRetries = 1000;
constexpr std::uint64_t kMaxBackoffUs = 1000000;

using plugin::is_power_of_two;
using plugin::parse_u64;

Status validate_request(const ExportRequest& r) {
  if (r.pid <= 0) {
    return Status::Error(StatusCode::kUnsupported, 0, "process_vm_readv needs the VMM pid");
  }
  if (r.region_count != 0 && r.regions == nullptr) {
    return Status::Error(StatusCode::kInvalidArgument, 0, "null regions");
  }
  if (Status s = plugin::check_request_ranges(r); !s.ok()) return s;
  std::uint64_t previous_end = 0;
  for (std::size_t i = 0; i < r.region_count; ++i) {
    const Region& region = r.regions[i];
    if (region.size == 0 || region.guest_offset < previous_end ||
        region.guest_offset > UINT64_MAX - region.size ||
        region.host_addr > UINTPTR_MAX - region.size) {
      return Status::Error(StatusCode::kInvalidArgument, 0,
                           "region %zu is empty, unsorted, overlapping or overflows", i);
    }
    previous_end = region.guest_offset + region.size;
  }
  return Status::Ok();
}

// The state of one export.
class Export {
 public:
  Export(const ProcessVmReadvOptions& options, ProcessVmReadvStrategy::ReadvFn readv,
         void* readv_context, const ExportRequest& request, plugin::BlockSink& sink,
         ExportStats& stats)
      : options_(options),
        readv_(readv),
        readv_context_(readv_context),
        request_(request),
        sink_(sink),
        stats_(stats) {}

  Status run() {
    if (Status s = check_coverage(); !s.ok()) return s;
    capacity_ = options_.buffer_bytes / request_.block_size * request_.block_size;
    if (capacity_ == 0) {
      return Status::Error(StatusCode::kInvalidArgument, 0,
                           "buffer_bytes %" PRIu64 " is smaller than the block size %" PRIu64,
                           options_.buffer_bytes, request_.block_size);
    }
    if (request_.range_count == 0) return Status::Ok();
    buffer_.reset(new (std::nothrow) unsigned char[capacity_]);
    if (!buffer_) {
      return Status::Error(StatusCode::kNoMemory, ENOMEM,
                           "cannot allocate a %" PRIu64 "-byte buffer", capacity_);
    }
    chunks_.reserve(std::min<std::uint64_t>(kMaxChunksPerWrite, capacity_ / request_.block_size));

    for (std::size_t i = 0; i < request_.range_count; ++i) {
      std::uint64_t offset = request_.ranges[i].offset;
      const std::uint64_t end = offset + request_.ranges[i].length;
      while (offset < end) {
        if (capacity_ - fill_ < request_.block_size || chunks_.size() == kMaxChunksPerWrite) {
          if (Status s = flush(); !s.ok()) return s;
        }
        // Whole blocks only, so that every chunk stays block-aligned.
        const std::uint64_t room = (capacity_ - fill_) / request_.block_size * request_.block_size;
        const std::uint64_t take = std::min(end - offset, room);
        add_chunk(offset, take);
        if (Status s = add_guest_span(offset, take); !s.ok()) return s;
        fill_ += take;
        offset += take;
      }
    }
    return flush();
  }

 private:
  // Every requested byte must lie in a region; checked before anything is read or written.
  Status check_coverage() const {
    std::size_t region = 0;
    for (std::size_t i = 0; i < request_.range_count; ++i) {
      std::uint64_t pos = request_.ranges[i].offset;
      const std::uint64_t end = pos + request_.ranges[i].length;
      while (pos < end) {
        while (region < request_.region_count && region_end(region) <= pos) ++region;
        if (region == request_.region_count || request_.regions[region].guest_offset > pos) {
          return Status::Error(StatusCode::kBadAddress, EFAULT,
                               "guest offset 0x%" PRIx64 " (range %zu) is not in any region", pos,
                               i);
        }
        pos = std::min(end, region_end(region));
      }
    }
    return Status::Ok();
  }

  std::uint64_t region_end(std::size_t i) const {
    return request_.regions[i].guest_offset + request_.regions[i].size;
  }

  void add_chunk(std::uint64_t guest_offset, std::uint64_t length) {
    unsigned char* data = buffer_.get() + fill_;
    if (!chunks_.empty()) {
      Chunk& last = chunks_.back();
      if (last.guest_offset + last.length == guest_offset &&
          static_cast<const unsigned char*>(last.data) + last.length == data) {
        last.length += length;
        return;
      }
    }
    chunks_.push_back(Chunk{guest_offset, data, length});
  }

  // Queues the remote iovecs for guest [offset, offset+length), which may cross regions.
  Status add_guest_span(std::uint64_t offset, std::uint64_t length) {
    const std::uint64_t end = offset + length;
    while (offset < end) {
      while (region_ < request_.region_count && region_end(region_) <= offset) ++region_;
      if (region_ == request_.region_count || request_.regions[region_].guest_offset > offset) {
        return Status::Error(StatusCode::kInternal, 0, "guest offset 0x%" PRIx64 " lost its region",
                             offset);
      }
      const Region& region = request_.regions[region_];
      const std::uint64_t piece = std::min(end, region_end(region_)) - offset;
      if (Status s = add_remote(region.host_addr + (offset - region.guest_offset), offset, piece);
          !s.ok()) {
        return s;
      }
      offset += piece;
    }
    return Status::Ok();
  }

  Status add_remote(std::uint64_t host, std::uint64_t guest, std::uint64_t length) {
    while (length > 0) {
      if (remote_count_ == kIovMax || call_bytes_ == options_.max_call_bytes) {
        if (Status s = read_pending(); !s.ok()) return s;
      }
      const std::uint64_t n = std::min(length, options_.max_call_bytes - call_bytes_);
      iovec* last = remote_count_ > 0 ? &remote_[remote_count_ - 1] : nullptr;
      if (last != nullptr &&
          reinterpret_cast<std::uintptr_t>(last->iov_base) + last->iov_len == host &&
          remote_guest_[remote_count_ - 1] + last->iov_len == guest) {
        last->iov_len += n;
      } else {
        remote_[remote_count_] = iovec{reinterpret_cast<void*>(host), n};
        remote_guest_[remote_count_] = guest;
        ++remote_count_;
      }
      call_bytes_ += n;
      host += n;
      guest += n;
      length -= n;
    }
    return Status::Ok();
  }

  // Reads the queued remote iovecs into the buffer at read_pos_, continuing after partial reads.
  Status read_pending() {
    iovec local{buffer_.get() + read_pos_, call_bytes_};
    std::size_t first = 0;
    std::uint32_t consecutive_retries = 0;
    std::uint32_t enomem_attempts = 0;
    while (first < remote_count_) {
      const ssize_t got =
          readv_(readv_context_, request_.pid, &local, 1, &remote_[first], remote_count_ - first);
      if (got < 0) {
        const int err = errno;
        if (err == EINTR || err == EAGAIN) {
          ++stats_.retries;
          if (++consecutive_retries > kMaxConsecutiveRetries) {
            return Status::Error(StatusCode::kIoError, err, "process_vm_readv kept failing with %s",
                                 std::strerror(err));
          }
          continue;
        }
        if (err == ENOMEM) {
          if (enomem_attempts >= options_.enomem_retries) {
            return Status::Error(StatusCode::kNoMemory, err,
                                 "process_vm_readv: ENOMEM after %u retries", enomem_attempts);
          }
          back_off(enomem_attempts);
          ++enomem_attempts;
          ++stats_.retries;
          continue;
        }
        return syscall_error(err, first);
      }
      if (got == 0) return syscall_error(EFAULT, first);
      const std::uint64_t moved = static_cast<std::uint64_t>(got);
      if (moved > local.iov_len) {
        return Status::Error(StatusCode::kInternal, 0, "process_vm_readv moved more than asked");
      }
      ++stats_.read_calls;
      stats_.bytes_read += moved;
      consecutive_retries = 0;
      enomem_attempts = 0;
      local.iov_base = static_cast<unsigned char*>(local.iov_base) + moved;
      local.iov_len -= moved;
      std::uint64_t left = moved;
      while (first < remote_count_ && left >= remote_[first].iov_len) {
        left -= remote_[first].iov_len;
        ++first;
      }
      if (first < remote_count_) {
        ++stats_.partial_reads;
        remote_[first].iov_base = static_cast<unsigned char*>(remote_[first].iov_base) + left;
        remote_[first].iov_len -= left;
        remote_guest_[first] += left;
      }
    }
    read_pos_ += call_bytes_;
    call_bytes_ = 0;
    remote_count_ = 0;
    return Status::Ok();
  }

  Status syscall_error(int err, std::size_t at) const {
    const auto host = reinterpret_cast<std::uintptr_t>(remote_[at].iov_base);
    const std::uint64_t guest = remote_guest_[at];
    switch (err) {
      case ESRCH:
        return Status::Error(StatusCode::kProcessGone, err, "VMM pid %d is gone", request_.pid);
      case EFAULT:
        return Status::Error(StatusCode::kBadAddress, err,
                             "host address 0x%" PRIxPTR " (guest offset 0x%" PRIx64
                             ") is not mapped in pid %d",
                             host, guest, request_.pid);
      default:
        return Status::Error(StatusCode::kIoError, err,
                             "process_vm_readv of pid %d at host address 0x%" PRIxPTR
                             " (guest offset 0x%" PRIx64 "): %s",
                             request_.pid, host, guest, std::strerror(err));
    }
  }

  void back_off(std::uint32_t attempt) const {
    std::uint64_t us = options_.enomem_backoff_us;
    for (std::uint32_t i = 0; i < attempt && us < kMaxBackoffUs; ++i) us *= 2;
    us = std::min(us, kMaxBackoffUs);
    if (us == 0) return;
    timespec ts{static_cast<time_t>(us / 1000000), static_cast<long>(us % 1000000) * 1000};
    nanosleep(&ts, nullptr);  // an interrupted sleep only shortens the back-off
  }

  Status flush() {
    if (remote_count_ > 0) {
      if (Status s = read_pending(); !s.ok()) return s;
    }
    if (Status s = plugin::write_chunks(sink_, chunks_.data(), chunks_.size()); !s.ok()) return s;
    chunks_.clear();
    fill_ = 0;
    read_pos_ = 0;
    return Status::Ok();
  }

  const ProcessVmReadvOptions& options_;
  const ProcessVmReadvStrategy::ReadvFn readv_;
  void* const readv_context_;
  const ExportRequest& request_;
  plugin::BlockSink& sink_;
  ExportStats& stats_;

  std::unique_ptr<unsigned char[]> buffer_;
  std::uint64_t capacity_ = 0;
  std::uint64_t fill_ = 0;      // bytes of the buffer assigned to chunks
  std::uint64_t read_pos_ = 0;  // bytes of the buffer already read
  std::vector<Chunk> chunks_;
  std::size_t region_ = 0;

  // The next syscall: remote iovecs, the guest offset of each, and their total size.
  iovec remote_[kIovMax];
  std::uint64_t remote_guest_[kIovMax];
  std::size_t remote_count_ = 0;
  std::uint64_t call_bytes_ = 0;
};

}  // namespace

plugin::Status parse_process_vm_readv_options(const plugin::Option* options, std::size_t count,
                                              ProcessVmReadvOptions* out) noexcept {
  ProcessVmReadvOptions parsed;
  if (count != 0 && options == nullptr) {
    return Status::Error(StatusCode::kInvalidArgument, 0, "null options");
  }
  for (std::size_t i = 0; i < count; ++i) {
    const char* key = options[i].key != nullptr ? options[i].key : "";
    std::uint64_t value = 0;
    const bool number = parse_u64(options[i].value, &value);
    bool valid = false;
    if (std::strcmp(key, "buffer_bytes") == 0) {
      valid = number && value >= 4096 && value <= (1ull << 30) && value % 4096 == 0;
      parsed.buffer_bytes = value;
    } else if (std::strcmp(key, "max_call_bytes") == 0) {
      valid = number && value >= 1 && value <= ProcessVmReadvOptions::kMaxRwCount;
      parsed.max_call_bytes = value;
    } else if (std::strcmp(key, "enomem_retries") == 0) {
      valid = number && value <= 64;
      parsed.enomem_retries = static_cast<std::uint32_t>(value);
    } else if (std::strcmp(key, "enomem_backoff_us") == 0) {
      valid = number && value <= kMaxBackoffUs;
      parsed.enomem_backoff_us = value;
    } else {
      return Status::Error(StatusCode::kInvalidArgument, 0, "process_vm_readv: unknown option '%s'",
                           key);
    }
    if (!valid) {
      return Status::Error(StatusCode::kInvalidArgument, 0,
                           "process_vm_readv: bad value '%s' for option '%s'",
                           options[i].value != nullptr ? options[i].value : "(null)", key);
    }
  }
  *out = parsed;
  return Status::Ok();
}

ProcessVmReadvStrategy::ProcessVmReadvStrategy(const ProcessVmReadvOptions& options) noexcept
    : options_(options) {}

void ProcessVmReadvStrategy::set_syscall_for_test(ReadvFn fn, void* context) noexcept {
  readv_ = fn != nullptr ? fn : &ProcessVmReadvStrategy::real_readv;
  readv_context_ = fn != nullptr ? context : nullptr;
}

ssize_t ProcessVmReadvStrategy::real_readv(void* /*context*/, pid_t pid, const struct iovec* local,
                                           unsigned long local_count, const struct iovec* remote,
                                           unsigned long remote_count) {
  return ::process_vm_readv(pid, local, local_count, remote, remote_count, 0);
}

plugin::Status ProcessVmReadvStrategy::export_ranges(const plugin::ExportRequest& request,
                                                     plugin::BlockSink& sink,
                                                     plugin::ExportStats& stats) noexcept {
  try {
    if (Status s = validate_request(request); !s.ok()) return s;
    // Heap-allocated: the iovec arrays are too large for a comfortable stack frame.
    auto run = std::make_unique<Export>(options_, readv_, readv_context_, request, sink, stats);
    return run->run();
  } catch (const std::bad_alloc&) {
    return Status::Error(StatusCode::kNoMemory, ENOMEM, "process_vm_readv: out of memory");
  } catch (...) {
    return Status::Error(StatusCode::kInternal, 0, "process_vm_readv: unexpected exception");
  }
}

plugin::Status create_process_vm_readv(plugin::Strategy** out, const plugin::Option* options,
                                       std::size_t count) noexcept {
  if (out == nullptr) return Status::Error(StatusCode::kInvalidArgument, 0, "null out");
  ProcessVmReadvOptions parsed;
  if (Status s = parse_process_vm_readv_options(options, count, &parsed); !s.ok()) return s;
  auto* strategy = new (std::nothrow) ProcessVmReadvStrategy(parsed);
  if (strategy == nullptr) {
    return Status::Error(StatusCode::kNoMemory, ENOMEM, "process_vm_readv: out of memory");
  }
  *out = strategy;
  return Status::Ok();
}

}  // namespace memsnap::plugins
