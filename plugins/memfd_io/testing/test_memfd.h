// Test-only: a memfd filled with a byte pattern, and requests over it, shared by the memfd and
// hole_punch strategy tests.
#pragma once

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

#include <gtest/gtest.h>

#include "plugins/plugin_api/plugin_api.h"

namespace memsnap::plugins::testing {

inline constexpr std::uint64_t kTestPage = 4096;

inline unsigned char pattern(std::uint64_t offset) {
  return static_cast<unsigned char>((offset / kTestPage) * 131 + offset * 7 + 1);
}

// A memfd of `size` bytes; fill() writes the pattern into [offset, offset+length).
class Memfd {
 public:
  explicit Memfd(std::uint64_t size, const char* name = "memfd_test") : size_(size) {
    fd_ = memfd_create(name, MFD_CLOEXEC);
    EXPECT_GE(fd_, 0);
    EXPECT_EQ(ftruncate(fd_, static_cast<off_t>(size)), 0);
  }
  ~Memfd() { close(fd_); }

  void fill(std::uint64_t offset, std::uint64_t length) {
    std::vector<unsigned char> bytes(length);
    for (std::uint64_t i = 0; i < length; ++i) bytes[i] = pattern(offset + i);
    ASSERT_EQ(pwrite(fd_, bytes.data(), length, static_cast<off_t>(offset)),
              static_cast<ssize_t>(length));
  }
  void fill() { fill(0, size_); }

  // Bytes of [offset, offset+length) that differ from the pattern (or from zero if zero).
  std::uint64_t mismatches(std::uint64_t offset, std::uint64_t length, bool zero) const {
    std::vector<unsigned char> bytes(length);
    EXPECT_EQ(pread(fd_, bytes.data(), length, static_cast<off_t>(offset)),
              static_cast<ssize_t>(length));
    std::uint64_t n = 0;
    for (std::uint64_t i = 0; i < length; ++i) {
      n += bytes[i] != (zero ? 0 : pattern(offset + i));
    }
    return n;
  }

  std::uint64_t allocated() const {
    struct stat st;
    EXPECT_EQ(fstat(fd_, &st), 0);
    return static_cast<std::uint64_t>(st.st_blocks) * 512;
  }
  int fd() const { return fd_; }
  std::uint64_t size() const { return size_; }

 private:
  int fd_ = -1;
  std::uint64_t size_;
};

inline plugin::ExportRequest make_request(int fd, std::uint64_t guest_size,
                                          const std::vector<plugin::ByteRange>& ranges,
                                          std::uint64_t block_size = kTestPage) {
  plugin::ExportRequest r;
  r.memfd = fd;
  r.guest_size = guest_size;
  r.block_size = block_size;
  r.ranges = ranges.data();
  r.range_count = ranges.size();
  return r;
}

}  // namespace memsnap::plugins::testing
