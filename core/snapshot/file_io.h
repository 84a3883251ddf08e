// Internal to core/snapshot: whole-buffer positional I/O that retries EINTR and short transfers
// and turns failures into memsnap errors naming the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/base/result.h"

namespace memsnap::snapshot_io {

// "<what>: <strerror(err)>"
std::string errno_message(const std::string& what, int err);

// Writes all of [buf, buf+len) at offset. kIoError with errno on failure.
Status pwrite_all(int fd, const void* buf, std::size_t len, std::uint64_t offset,
                  const std::string& what);

// Reads exactly len bytes at offset. kSnapshotTruncated if the file ends first, kIoError with
// errno on failure.
Status pread_exact(int fd, void* buf, std::size_t len, std::uint64_t offset,
                   const std::string& what);

}  // namespace memsnap::snapshot_io
