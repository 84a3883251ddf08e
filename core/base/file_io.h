// File-descriptor helpers shared by the host: an owning fd, and whole-buffer positional I/O that
// retries EINTR and short transfers and turns failures into memsnap errors naming the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/base/result.h"

namespace memsnap::io {

// Owns one file descriptor and closes it when destroyed; -1 means none. Move-only.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const noexcept { return fd_; }
  int release() noexcept {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1) noexcept;

 private:
  int fd_ = -1;
};

// "<what>: <strerror(err)>"
std::string errno_message(const std::string& what, int err);

// Writes all of [buf, buf+len) at offset. kIoError with errno on failure.
Status pwrite_all(int fd, const void* buf, std::size_t len, std::uint64_t offset,
                  const std::string& what);

// Reads exactly len bytes at offset. kSnapshotTruncated (the file is shorter than it says) if
// the file ends first, kIoError with
// errno on failure.
Status pread_exact(int fd, void* buf, std::size_t len, std::uint64_t offset,
                   const std::string& what);

}  // namespace memsnap::io
