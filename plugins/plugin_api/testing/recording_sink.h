// Test-only BlockSink that records what a strategy hands it and checks the sink contract
// (ascending, block-aligned, no overlap, inside the requested ranges). For plugin unit tests
// that run a strategy without the host.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "plugins/plugin_api/plugin_api.h"

namespace memsnap::plugin::testing {

class RecordingSink final : public BlockSink {
 public:
  // guest_size bytes of image, filled with 0xEE so unwritten bytes stand out.
  RecordingSink(std::uint64_t guest_size, std::uint64_t block_size,
                std::vector<ByteRange> expected_ranges)
      : image_(guest_size, 0xEE), block_size_(block_size), ranges_(std::move(expected_ranges)) {}

  Status write(const Chunk* chunks, std::size_t count) noexcept override {
    for (std::size_t i = 0; i < count; ++i) {
      const Chunk& c = chunks[i];
      if (c.length == 0 || c.guest_offset % block_size_ != 0 || c.length % block_size_ != 0) {
        return fail("unaligned or empty chunk");
      }
      if (c.guest_offset < next_offset_) return fail("chunk out of order or overlapping");
      if (!inside_ranges(c.guest_offset, c.length)) return fail("chunk outside requested ranges");
      std::memcpy(image_.data() + c.guest_offset, c.data, c.length);
      next_offset_ = c.guest_offset + c.length;
      bytes_written_ += c.length;
      ++chunks_;
    }
    ++write_calls_;
    if (fail_after_bytes_ != 0 && bytes_written_ >= fail_after_bytes_) {
      return Status::Error(StatusCode::kSinkError, 28, "injected sink failure (ENOSPC)");
    }
    return Status::Ok();
  }
  Status make_durable() noexcept override {
    durable_through_ = next_offset_;
    ++durable_calls_;
    return Status::Ok();
  }
  void released(std::uint64_t offset, std::uint64_t length) noexcept override {
    if (offset + length > durable_through_) released_beyond_durable_ = true;
    released_.push_back({offset, length});
  }

  // The sink fails the write() call that reaches this many bytes.
  void fail_after_bytes(std::uint64_t n) { fail_after_bytes_ = n; }

  const std::vector<unsigned char>& image() const { return image_; }

  // Bytes inside `ranges` that differ from expected(guest_offset), plus bytes outside them that
  // were written at all (they must still hold the 0xEE fill). 0 when the export was exact.
  template <typename Expected>
  std::uint64_t mismatches(const std::vector<ByteRange>& ranges, Expected expected) const {
    std::uint64_t next = 0;
    std::uint64_t bad = 0;
    for (const ByteRange& r : ranges) {
      for (std::uint64_t g = next; g < r.offset; ++g) bad += image_[g] != 0xEE;
      for (std::uint64_t g = r.offset; g < r.offset + r.length; ++g)
        bad += image_[g] != expected(g);
      next = r.offset + r.length;
    }
    for (std::uint64_t g = next; g < image_.size(); ++g) bad += image_[g] != 0xEE;
    return bad;
  }
  std::uint64_t bytes_written() const { return bytes_written_; }
  std::uint64_t write_calls() const { return write_calls_; }
  std::uint64_t durable_calls() const { return durable_calls_; }
  const std::vector<ByteRange>& released_ranges() const { return released_; }
  bool released_beyond_durable() const { return released_beyond_durable_; }
  const std::string& contract_violation() const { return violation_; }

 private:
  bool inside_ranges(std::uint64_t off, std::uint64_t len) const {
    for (const auto& r : ranges_) {
      if (off >= r.offset && off + len <= r.offset + r.length) return true;
    }
    return false;
  }
  Status fail(const char* why) {
    violation_ = why;
    return Status::Error(StatusCode::kSinkError, 0, "sink contract violated: %s", why);
  }

  std::vector<unsigned char> image_;
  std::uint64_t block_size_;
  std::vector<ByteRange> ranges_;
  std::uint64_t next_offset_ = 0;
  std::uint64_t bytes_written_ = 0;
  std::uint64_t write_calls_ = 0;
  std::uint64_t chunks_ = 0;
  std::uint64_t durable_calls_ = 0;
  std::uint64_t durable_through_ = 0;
  std::uint64_t fail_after_bytes_ = 0;
  std::vector<ByteRange> released_;
  bool released_beyond_durable_ = false;
  std::string violation_;
};

inline std::uint64_t total_bytes(const std::vector<ByteRange>& ranges) {
  std::uint64_t n = 0;
  for (const ByteRange& r : ranges) n += r.length;
  return n;
}

}  // namespace memsnap::plugin::testing
