#include "plugins/memfd_io/memfd_exporter.h"
#include "plugins/plugin_api/plugin_util.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace memsnap::plugins {
namespace {

using plugin::ByteRange;
using plugin::Chunk;
using plugin::ExportRequest;
using plugin::ExportStats;
using plugin::Status;
using plugin::StatusCode;

// Holes are handed to the sink from here. Never written; in .bss, so reading it maps the shared
// zero page and costs no memory. Its size bounds the block size.
constexpr std::uint64_t kZeroBytes = 2u << 20;
alignas(4096) unsigned char g_zeros[kZeroBytes];

constexpr std::size_t kMaxChunksPerWrite = 1024;
// Ranges shorter than this are read with pread as they are, holes and all, by either method (a
// pread of a hole returns zeros and allocates nothing). Longer ones are first split into data and
// holes (SEEK_DATA / SEEK_HOLE), and with the mmap method their data is read through the mapping.
// Probing short ranges costs more than reading them: SEEK_HOLE walks every page of the data extent
// it lands in (15 ms a GiB here), and on a scattered 10% diff of 1 GiB that walk alone was 12% of
// the pause.
constexpr std::uint64_t kShortRangeBytes = 256u << 10;
constexpr std::uint64_t kMaxSize = 1u << 30;
#ifdef MADV_POPULATE_READ
constexpr int kMadvPopulateRead = MADV_POPULATE_READ;
#else
constexpr int kMadvPopulateRead = 22;  // Linux 5.14; older headers lack the name
#endif

using plugin::is_power_of_two;
std::uint64_t round_down(std::uint64_t v, std::uint64_t to) { return v / to * to; }
std::uint64_t round_up(std::uint64_t v, std::uint64_t to) { return (v + to - 1) / to * to; }

Status validate_request(const ExportRequest& r) {
  if (r.memfd < 0) return Status::Error(StatusCode::kUnsupported, 0, "the guest has no memfd");
  if (!is_power_of_two(r.block_size) || r.block_size < 4096 || r.block_size > kZeroBytes) {
    return Status::Error(StatusCode::kInvalidArgument, 0, "bad block size %" PRIu64, r.block_size);
  }
  return plugin::check_request_ranges(r);
}

// The state of one export.
class Run {
 public:
  Run(const MemfdOptions& options, MemfdExporter::PreadFn pread_fn, void* pread_context,
      const ExportRequest& request, plugin::BlockSink& sink, ExportStats& stats, ChunkHook* hook,
      std::uint64_t chunk_bytes)
      : options_(options),
        pread_(pread_fn),
        pread_context_(pread_context),
        request_(request),
        sink_(sink),
        stats_(stats),
        hook_(hook),
        chunk_bytes_(chunk_bytes),
        block_(request.block_size) {}
  ~Run() { unmap(); }
  Run(const Run&) = delete;
  Run& operator=(const Run&) = delete;

  Status run() {
    if (Status s = prepare(); !s.ok()) return s;
    chunk_left_ = chunk_bytes_;
    const bool mmap_method = options_.read_method == MemfdReadMethod::kMmap;
    for (std::size_t i = 0; i < request_.range_count; ++i) {
      std::uint64_t offset = request_.ranges[i].offset;
      const std::uint64_t end = offset + request_.ranges[i].length;
      if (end - offset < kShortRangeBytes) {
        // Read as it is, holes and all (see kShortRangeBytes).
        if (Status s = emit_data(offset, end - offset, false); !s.ok()) return s;
        continue;
      }
      while (offset < end) {
        bool data = false;
        std::uint64_t extent_end = 0;
        if (Status s = classify(offset, end, &data, &extent_end); !s.ok()) return s;
        const Status s = data ? emit_data(offset, extent_end - offset, mmap_method)
                              : emit_hole(offset, extent_end - offset);
        if (!s.ok()) return s;
        offset = extent_end;
      }
    }
    return end_chunk();
  }

 private:
  Status prepare() {
    if (hook_ != nullptr && (chunk_bytes_ == 0 || chunk_bytes_ % block_ != 0)) {
      return Status::Error(StatusCode::kInvalidArgument, 0,
                           "chunk_bytes %" PRIu64 " is not a multiple of the block size %" PRIu64,
                           chunk_bytes_, block_);
    }
    struct stat st;
    if (fstat(request_.memfd, &st) != 0) {
      return Status::Error(StatusCode::kIoError, errno, "fstat of the memfd: %s",
                           std::strerror(errno));
    }
    file_size_ = static_cast<std::uint64_t>(st.st_size);
    if (request_.range_count > 0) {
      const ByteRange& last = request_.ranges[request_.range_count - 1];
      if (last.offset + last.length > file_size_) {
        // Never zeros in place of missing memory, and never a mapping past EOF (SIGBUS).
        return Status::Error(StatusCode::kShortRead, 0,
                             "range [0x%" PRIx64 ", 0x%" PRIx64
                             ") ends past the end of the memfd (size 0x%" PRIx64 ")",
                             last.offset, last.offset + last.length, file_size_);
      }
    }
    bool short_ranges = false;
    for (std::size_t i = 0; i < request_.range_count; ++i) {
      short_ranges = short_ranges || request_.ranges[i].length < kShortRangeBytes;
    }
    if (options_.read_method == MemfdReadMethod::kMmap && options_.window_bytes % block_ != 0) {
      return Status::Error(StatusCode::kInvalidArgument, 0,
                           "window_bytes is not a multiple of the block size");
    }
    if (options_.read_method == MemfdReadMethod::kPread || short_ranges) {
      capacity_ = round_down(options_.buffer_bytes, block_);
      if (capacity_ == 0) {
        return Status::Error(StatusCode::kInvalidArgument, 0,
                             "buffer_bytes %" PRIu64 " is smaller than the block size %" PRIu64,
                             options_.buffer_bytes, block_);
      }
      if (request_.range_count > 0) {
        buffer_.reset(new (std::nothrow) unsigned char[capacity_]);
        if (!buffer_) {
          return Status::Error(StatusCode::kNoMemory, ENOMEM,
                               "cannot allocate a %" PRIu64 "-byte buffer", capacity_);
        }
      }
    }
    page_size_ = static_cast<std::uint64_t>(sysconf(_SC_PAGESIZE));
    chunks_.reserve(kMaxChunksPerWrite);
    if (hook_ != nullptr) pieces_.reserve(std::min<std::uint64_t>(chunk_bytes_ / block_, 1024));
    return Status::Ok();
  }

  // Whether the block at offset holds data, and where that extent ends (at most at limit).
  // Remembers the last extent found: sorted ranges often fall in one extent.
  Status classify(std::uint64_t offset, std::uint64_t limit, bool* data, std::uint64_t* end) {
    if (offset < known_start_ || offset >= known_end_) {
      const off_t found = lseek(request_.memfd, static_cast<off_t>(offset), SEEK_DATA);
      if (found < 0 && errno != ENXIO) {
        return Status::Error(StatusCode::kIoError, errno, "lseek(SEEK_DATA, 0x%" PRIx64 "): %s",
                             offset, std::strerror(errno));
      }
      known_start_ = offset;
      const std::uint64_t data_block =
          found < 0 ? UINT64_MAX : round_down(static_cast<std::uint64_t>(found), block_);
      if (data_block > offset) {
        known_end_ = data_block;
        known_data_ = false;
      } else {
        const off_t hole = lseek(request_.memfd, found, SEEK_HOLE);
        if (hole < 0) {
          return Status::Error(StatusCode::kIoError, errno, "lseek(SEEK_HOLE, 0x%" PRIx64 "): %s",
                               static_cast<std::uint64_t>(found), std::strerror(errno));
        }
        // A block with any data in it is data; one that is partly hole is "mixed".
        known_end_ = round_up(static_cast<std::uint64_t>(hole), block_);
        known_data_ = true;
        mixed_head_ = static_cast<std::uint64_t>(found) % block_ != 0 ? data_block : kNone;
        mixed_tail_ = static_cast<std::uint64_t>(hole) % block_ != 0
                          ? round_down(static_cast<std::uint64_t>(hole), block_)
                          : kNone;
      }
    }
    *data = known_data_;
    *end = std::min(known_end_, limit);
    return Status::Ok();
  }

  // Hands [offset, offset+length) on, through the mapping or read into the buffer, cut at
  // chunk boundaries for the hook.
  Status emit_data(std::uint64_t offset, std::uint64_t length, bool mapped) {
    while (length > 0) {
      const std::uint64_t n = hook_ != nullptr ? std::min(length, chunk_left_) : length;
      if (Status s = mapped ? emit_mmap(offset, n) : emit_read(offset, n); !s.ok()) return s;
      if (hook_ != nullptr) {
        add_piece(offset, n);
        chunk_left_ -= n;
        if (chunk_left_ == 0) {
          if (Status s = end_chunk(); !s.ok()) return s;
          chunk_left_ = chunk_bytes_;
        }
      }
      offset += n;
      length -= n;
    }
    return Status::Ok();
  }

  Status emit_hole(std::uint64_t offset, std::uint64_t length) {
    while (length > 0) {
      const std::uint64_t n = std::min(length, kZeroBytes);
      if (Status s = add_chunk(offset, g_zeros, n); !s.ok()) return s;
      offset += n;
      length -= n;
    }
    return Status::Ok();
  }

  // Mixed blocks (only with blocks larger than a page) are read with pread, which returns zeros
  // for the hole pages without allocating them, where a read through the mapping would.
  Status emit_mmap(std::uint64_t offset, std::uint64_t length) {
    while (length > 0) {
      if (offset == mixed_head_ || offset == mixed_tail_) {
        if (Status s = emit_bounced(offset); !s.ok()) return s;
        offset += block_;
        length -= block_;
        continue;
      }
      std::uint64_t n = length;
      if (mixed_tail_ > offset && mixed_tail_ - offset < n) n = mixed_tail_ - offset;
      if (Status s = emit_mapped(offset, n); !s.ok()) return s;
      offset += n;
      length -= n;
    }
    return Status::Ok();
  }

  Status emit_bounced(std::uint64_t offset) {
    if (bounce_used_) {
      if (Status s = flush(); !s.ok()) return s;
    }
    if (!bounce_) {
      bounce_.reset(new (std::nothrow) unsigned char[block_]);
      if (!bounce_) {
        return Status::Error(StatusCode::kNoMemory, ENOMEM, "cannot allocate a block buffer");
      }
    }
    if (Status s = read_fully(offset, bounce_.get(), block_); !s.ok()) return s;
    bounce_used_ = true;
    return add_chunk(offset, bounce_.get(), block_);
  }

  Status emit_mapped(std::uint64_t offset, std::uint64_t length) {
    while (length > 0) {
      if (window_ == nullptr || offset < window_offset_ ||
          offset >= window_offset_ + window_length_) {
        if (Status s = flush(); !s.ok()) return s;  // pending chunks point into the old window
        unmap();
        window_offset_ = round_down(offset, options_.window_bytes);
        window_length_ =
            std::min(options_.window_bytes, round_up(file_size_, page_size_) - window_offset_);
        void* p = mmap(nullptr, window_length_, PROT_READ, MAP_SHARED, request_.memfd,
                       static_cast<off_t>(window_offset_));
        if (p == MAP_FAILED) {
          return Status::Error(errno == ENOMEM ? StatusCode::kNoMemory : StatusCode::kIoError,
                               errno, "mmap of memfd window at 0x%" PRIx64 ": %s", window_offset_,
                               std::strerror(errno));
        }
        window_ = static_cast<unsigned char*>(p);
        ++stats_.read_calls;
      }
      const std::uint64_t n = std::min(length, window_offset_ + window_length_ - offset);
      if (Status s = populate(offset, n); !s.ok()) return s;
      if (Status s = add_chunk(offset, window_ + (offset - window_offset_), n); !s.ok()) return s;
      stats_.bytes_read += n;
      offset += n;
      length -= n;
    }
    return Status::Ok();
  }

  // Fills the window's page tables for the data extent [offset, offset+length) in one call,
  // before the sink reads it (zero scan, checksums, write). Without it every page of a fresh
  // mapping costs a fault, ~12 us here: a 1 GiB export ran at 0.1x of pread+write. In bulk the
  // same entries cost ~0.2 us a page. Only data extents come here (holes of long ranges are
  // never mapped, mixed blocks are bounced): populating a shmem hole would allocate it.
  Status populate(std::uint64_t offset, std::uint64_t length) {
    if (!options_.populate || populate_unsupported_) return Status::Ok();
    unsigned char* from = window_ + (offset - window_offset_);
    for (;;) {
      if (madvise(from, length, kMadvPopulateRead) == 0) break;
      if (errno == EINTR || errno == EAGAIN) {
        ++stats_.retries;
        continue;
      }
      if (errno == EINVAL) {  // a kernel before 5.14: pages are faulted in as they are read
        populate_unsupported_ = true;
        break;
      }
      if (errno == EFAULT) {
        // A page of the range is past the end of the file: the memfd shrank under the export.
        return Status::Error(StatusCode::kShortRead, EFAULT,
                             "the memfd shrank under the export: [0x%" PRIx64 ", 0x%" PRIx64
                             ") is no longer inside it",
                             offset, offset + length);
      }
      return Status::Error(errno == ENOMEM ? StatusCode::kNoMemory : StatusCode::kIoError, errno,
                           "populating the mapping of [0x%" PRIx64 ", 0x%" PRIx64 "): %s", offset,
                           offset + length, std::strerror(errno));
    }
    return Status::Ok();
  }

  Status emit_read(std::uint64_t offset, std::uint64_t length) {
    while (length > 0) {
      if (fill_ == capacity_) {
        if (Status s = flush(); !s.ok()) return s;
      }
      const std::uint64_t n = std::min(length, capacity_ - fill_);
      unsigned char* to = buffer_.get() + fill_;
      if (Status s = read_fully(offset, to, n); !s.ok()) return s;
      if (Status s = add_chunk(offset, to, n); !s.ok()) return s;
      fill_ += n;
      offset += n;
      length -= n;
    }
    return Status::Ok();
  }

  Status read_fully(std::uint64_t offset, unsigned char* to, std::uint64_t length) {
    while (length > 0) {
      const ssize_t got =
          pread_(pread_context_, request_.memfd, to, length, static_cast<off_t>(offset));
      if (got < 0) {
        if (errno == EINTR || errno == EAGAIN) {
          ++stats_.retries;
          continue;
        }
        return Status::Error(StatusCode::kIoError, errno, "pread of the memfd at 0x%" PRIx64 ": %s",
                             offset, std::strerror(errno));
      }
      if (got == 0) {
        return Status::Error(StatusCode::kShortRead, 0,
                             "the memfd ended at 0x%" PRIx64 " inside a requested range", offset);
      }
      const auto n = static_cast<std::uint64_t>(got);
      ++stats_.read_calls;
      stats_.bytes_read += n;
      if (n < length) ++stats_.partial_reads;
      to += n;
      offset += n;
      length -= n;
    }
    return Status::Ok();
  }

  Status add_chunk(std::uint64_t offset, const unsigned char* data, std::uint64_t length) {
    if (!chunks_.empty()) {
      Chunk& last = chunks_.back();
      if (last.guest_offset + last.length == offset &&
          static_cast<const unsigned char*>(last.data) + last.length == data) {
        last.length += length;
        return Status::Ok();
      }
      if (chunks_.size() == kMaxChunksPerWrite) {
        if (Status s = flush(); !s.ok()) return s;
      }
    }
    chunks_.push_back(Chunk{offset, data, length});
    return Status::Ok();
  }

  void add_piece(std::uint64_t offset, std::uint64_t length) {
    if (!pieces_.empty() && pieces_.back().offset + pieces_.back().length == offset) {
      pieces_.back().length += length;
    } else {
      pieces_.push_back(ByteRange{offset, length});
    }
  }

  // Hands every pending chunk to the sink; afterwards the buffer may be reused.
  Status flush() {
    if (Status s = plugin::write_chunks(sink_, chunks_.data(), chunks_.size()); !s.ok()) return s;
    chunks_.clear();
    fill_ = 0;
    bounce_used_ = false;
    return Status::Ok();
  }

  // Everything of the chunk is written and unmapped before the hook may release it.
  Status end_chunk() {
    if (Status s = flush(); !s.ok()) return s;
    unmap();
    if (hook_ == nullptr || pieces_.empty()) return Status::Ok();
    Status s = hook_->after_chunk(pieces_.data(), pieces_.size());
    pieces_.clear();
    return s;
  }

  void unmap() {
    if (window_ != nullptr) munmap(window_, window_length_);
    window_ = nullptr;
  }

  const MemfdOptions& options_;
  const MemfdExporter::PreadFn pread_;
  void* const pread_context_;
  const ExportRequest& request_;
  plugin::BlockSink& sink_;
  ExportStats& stats_;
  ChunkHook* const hook_;
  const std::uint64_t chunk_bytes_;
  const std::uint64_t block_;
  std::uint64_t chunk_left_ = 0;  // data bytes until the hook's next chunk ends

  std::uint64_t file_size_ = 0;
  std::uint64_t page_size_ = 4096;
  std::vector<Chunk> chunks_;
  std::vector<ByteRange> pieces_;

  std::unique_ptr<unsigned char[]> buffer_;
  std::uint64_t capacity_ = 0;
  std::uint64_t fill_ = 0;

  unsigned char* window_ = nullptr;
  bool populate_unsupported_ = false;
  std::uint64_t window_offset_ = 0;
  std::uint64_t window_length_ = 0;

  std::unique_ptr<unsigned char[]> bounce_;  // one block, for mixed blocks
  bool bounce_used_ = false;

  static constexpr std::uint64_t kNone = UINT64_MAX;
  std::uint64_t known_start_ = 0;  // [known_start_, known_end_) is all data or all hole
  std::uint64_t known_end_ = 0;
  bool known_data_ = false;
  std::uint64_t mixed_head_ = kNone;  // first / last block of a data extent, if partly hole
  std::uint64_t mixed_tail_ = kNone;
};

}  // namespace

plugin::Status apply_memfd_option(const plugin::Option& option, MemfdOptions* options) noexcept {
  const char* key = option.key != nullptr ? option.key : "";
  const char* value = option.value != nullptr ? option.value : "";
  std::uint64_t n = 0;
  bool valid = false;
  if (std::strcmp(key, "read_method") == 0) {
    valid = true;
    if (std::strcmp(value, "mmap") == 0) {
      options->read_method = MemfdReadMethod::kMmap;
    } else if (std::strcmp(value, "pread") == 0) {
      options->read_method = MemfdReadMethod::kPread;
    } else {
      valid = false;
    }
  } else if (std::strcmp(key, "populate") == 0) {
    valid = std::strcmp(value, "true") == 0 || std::strcmp(value, "false") == 0;
    if (valid) options->populate = std::strcmp(value, "true") == 0;
  } else if (std::strcmp(key, "window_bytes") == 0) {
    valid = plugin::parse_u64(option.value, &n) && n >= kZeroBytes && n <= kMaxSize &&
            n % kZeroBytes == 0;
    if (valid) options->window_bytes = n;
  } else if (std::strcmp(key, "buffer_bytes") == 0) {
    valid = plugin::parse_u64(option.value, &n) && n >= 4096 && n <= kMaxSize && n % 4096 == 0;
    if (valid) options->buffer_bytes = n;
  } else {
    return Status::Error(StatusCode::kUnsupported, 0, "unknown option '%s'", key);
  }
  if (!valid) {
    return Status::Error(StatusCode::kInvalidArgument, 0, "bad value '%s' for option '%s'", value,
                         key);
  }
  return Status::Ok();
}

plugin::Status MemfdExporter::run(const plugin::ExportRequest& request, plugin::BlockSink& sink,
                                  plugin::ExportStats& stats, ChunkHook* hook,
                                  std::uint64_t chunk_bytes) const noexcept {
  try {
    if (Status s = validate_request(request); !s.ok()) return s;
    Run run(options_, pread_, pread_context_, request, sink, stats, hook, chunk_bytes);
    return run.run();
  } catch (const std::bad_alloc&) {
    return Status::Error(StatusCode::kNoMemory, ENOMEM, "memfd export: out of memory");
  } catch (...) {
    return Status::Error(StatusCode::kInternal, 0, "memfd export: unexpected exception");
  }
}

void MemfdExporter::set_pread_for_test(PreadFn fn, void* context) noexcept {
  pread_ = fn != nullptr ? fn : &MemfdExporter::real_pread;
  pread_context_ = fn != nullptr ? context : nullptr;
}

ssize_t MemfdExporter::real_pread(void* /*context*/, int fd, void* buffer, std::size_t count,
                                  off_t offset) {
  return ::pread(fd, buffer, count, offset);
}

}  // namespace memsnap::plugins
