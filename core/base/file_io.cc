#include "core/base/file_io.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace memsnap::io {

void UniqueFd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

std::string errno_message(const std::string& what, int err) {
  return what + ": " + std::strerror(err);
}

Status pwrite_all(int fd, const void* buf, std::size_t len, std::uint64_t offset,
                  const std::string& what) {
  const auto* p = static_cast<const std::uint8_t*>(buf);
  while (len > 0) {
    const ssize_t n = ::pwrite(fd, p, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      return make_error(Errc::kIoError, errno_message(what, err), err);
    }
    if (n == 0) return make_error(Errc::kIoError, what + ": write made no progress", EIO);
    p += n;
    len -= static_cast<std::size_t>(n);
    offset += static_cast<std::uint64_t>(n);
  }
  return {};
}

Status pread_exact(int fd, void* buf, std::size_t len, std::uint64_t offset,
                   const std::string& what) {
  auto* p = static_cast<std::uint8_t*>(buf);
  while (len > 0) {
    const ssize_t n = ::pread(fd, p, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      return make_error(Errc::kIoError, errno_message(what, err), err);
    }
    if (n == 0) {
      return make_error(Errc::kSnapshotTruncated, what + ": the file ends at offset " +
                                                      std::to_string(offset) + ", " +
                                                      std::to_string(len) + " bytes short");
    }
    p += n;
    len -= static_cast<std::size_t>(n);
    offset += static_cast<std::uint64_t>(n);
  }
  return {};
}

}  // namespace memsnap::io
