#include "core/live_image.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <string>

namespace memsnap {
namespace {

// Copies [offset, offset + len) from one memfd to the same offset of another: in the kernel
// (copy_file_range works memfd to memfd), else through a buffer.
Status copy_block(int from, int to, std::uint64_t offset, std::uint64_t len) {
  std::uint64_t done = 0;
  while (done < len) {
    loff_t in = static_cast<loff_t>(offset + done), out = in;
    const ssize_t n = ::copy_file_range(from, &in, to, &out, len - done, 0);
    if (n > 0) {
      done += static_cast<std::uint64_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n == 0 || errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP || errno == ENOSYS) {
      break;  // a short source (holes read as zeros below) or no kernel copy
    }
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("copy_file_range (live copy)", err), err);
  }
  if (done == len) return {};
  std::vector<std::uint8_t> buf(len - done);
  const ssize_t r = ::pread(from, buf.data(), buf.size(), static_cast<off_t>(offset + done));
  if (r < 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("pread (live copy)", err), err);
  }
  // Beyond the end of the source: zeros (buf is zero-filled).
  return io::pwrite_all(to, buf.data(), buf.size(), offset + done, "live copy");
}

}  // namespace

Result<std::shared_ptr<LiveImage>> LiveImage::create(int memfd, std::uint64_t guest_size,
                                                     std::uint64_t block_size,
                                                     std::vector<plugin::ByteRange> ranges) {
  if (block_size == 0 || guest_size % block_size != 0) {
    return make_error(Errc::kInvalidArgument, "live image: bad guest or block size");
  }
  std::shared_ptr<LiveImage> image(new LiveImage());
  const std::string path = "/proc/self/fd/" + std::to_string(memfd);
  image->source_.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (image->source_.get() < 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("reopening the guest memfd " + path, err),
                      err);
  }
  image->copies_fd_.reset(::memfd_create("memsnap-live-copies", MFD_CLOEXEC));
  if (image->copies_fd_.get() < 0 ||
      ::ftruncate(image->copies_fd_.get(), static_cast<off_t>(guest_size)) != 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("memfd for live copies", err), err);
  }
  image->guest_size_ = guest_size;
  image->block_size_ = block_size;
  image->blocks_ = guest_size / block_size;
  image->marks_ = std::make_unique<std::atomic<std::uint8_t>[]>(image->blocks_);
  for (std::uint64_t b = 0; b < image->blocks_; ++b) {
    image->marks_[b].store(kOutside, std::memory_order_relaxed);
  }
  for (const auto& r : ranges) {
    if (r.offset % block_size != 0 || r.length % block_size != 0 ||
        r.offset + r.length > guest_size) {
      return make_error(Errc::kInvalidArgument, "live image: a range is not block-aligned");
    }
    for (std::uint64_t b = r.offset / block_size; b < (r.offset + r.length) / block_size; ++b) {
      image->marks_[b].store(kNeeded, std::memory_order_relaxed);
    }
  }
  std::atomic_thread_fence(std::memory_order_release);
  return image;
}

bool LiveImage::needed(std::uint64_t block) const {
  return block < blocks_ && marks_[block].load(std::memory_order_acquire) == kNeeded;
}

Status LiveImage::preserve(std::uint64_t block) {
  if (closed_.load(std::memory_order_acquire) || !needed(block)) return {};
  Status copied = copy_block(source_.get(), copies_fd_.get(), block * block_size_, block_size_);
  if (!copied.ok()) {
    std::lock_guard lock(mu_);
    if (broken_.ok()) broken_ = copied;
    return copied;
  }
  marks_[block].store(kPreserved, std::memory_order_release);
  copies_.fetch_add(1, std::memory_order_relaxed);
  return {};
}

void LiveImage::discarded(std::uint64_t offset, std::uint64_t length) {
  if (closed_.load(std::memory_order_acquire)) return;
  for (std::uint64_t b = offset / block_size_;
       b < (offset + length + block_size_ - 1) / block_size_ && b < blocks_; ++b) {
    if (!needed(b)) continue;
    std::lock_guard lock(mu_);
    if (broken_.ok()) {
      broken_ = make_error(Errc::kExportFailed, "the guest discarded memory at guest offset " +
                                                    std::to_string(b * block_size_) +
                                                    " while the live export still needed it");
    }
    return;
  }
}

Status LiveImage::patch(std::uint64_t guest_offset, std::uint8_t* buf, std::uint64_t length) const {
  // The bytes in buf were read before this point; no mark may be loaded ahead of that read.
  std::atomic_thread_fence(std::memory_order_acquire);
  const std::uint64_t first = guest_offset / block_size_;
  const std::uint64_t end = (guest_offset + length) / block_size_;
  for (std::uint64_t b = first; b < end && b < blocks_; ++b) {
    if (marks_[b].load(std::memory_order_acquire) != kPreserved) continue;
    MEMSNAP_RETURN_IF_ERROR(io::pread_exact(copies_fd_.get(), buf + (b - first) * block_size_,
                                            block_size_, b * block_size_, "live copy"));
  }
  return {};
}

void LiveImage::close() { closed_.store(true, std::memory_order_release); }

Status LiveImage::broken() const {
  std::lock_guard lock(mu_);
  return broken_;
}

}  // namespace memsnap
