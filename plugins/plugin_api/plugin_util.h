// Header-only helpers for plugin authors: the checks every strategy makes of its request and
// options. Not part of the ABI (nothing here crosses the boundary); a plugin may use them or not.
#pragma once

#include <cinttypes>
#include <cstdint>

#include "plugins/plugin_api/plugin_api.h"

namespace memsnap::plugin {

// Parses a decimal unsigned integer: digits only, no sign, no suffix, no overflow.
inline bool parse_u64(const char* text, std::uint64_t* out) noexcept {
  if (text == nullptr || *text == '\0') return false;
  std::uint64_t value = 0;
  for (const char* p = text; *p != '\0'; ++p) {
    if (*p < '0' || *p > '9') return false;
    const auto digit = static_cast<std::uint64_t>(*p - '0');
    if (value > (UINT64_MAX - digit) / 10) return false;
    value = value * 10 + digit;
  }
  *out = value;
  return true;
}

inline bool is_power_of_two(std::uint64_t v) noexcept { return v != 0 && (v & (v - 1)) == 0; }

// Checks what every strategy relies on: a power-of-two block size of at least 4096, and ranges
// that are present when counted, non-empty, block-aligned, ascending, disjoint and inside the
// guest. kInvalidArgument naming the first offending range.
inline Status check_request_ranges(const ExportRequest& r) noexcept {
  if (!is_power_of_two(r.block_size) || r.block_size < 4096) {
    return Status::Error(StatusCode::kInvalidArgument, 0, "bad block size %" PRIu64, r.block_size);
  }
  if (r.range_count != 0 && r.ranges == nullptr) {
    return Status::Error(StatusCode::kInvalidArgument, 0, "null ranges");
  }
  std::uint64_t previous_end = 0;
  for (std::size_t i = 0; i < r.range_count; ++i) {
    const ByteRange& range = r.ranges[i];
    if (range.length == 0 || range.offset % r.block_size != 0 || range.length % r.block_size != 0 ||
        range.offset < previous_end || range.length > r.guest_size ||
        range.offset > r.guest_size - range.length) {
      return Status::Error(StatusCode::kInvalidArgument, 0,
                           "range %zu [0x%" PRIx64 ", +0x%" PRIx64
                           ") is empty, unaligned, unsorted or outside the guest",
                           i, range.offset, range.length);
    }
    previous_end = range.offset + range.length;
  }
  return Status::Ok();
}

// Hands chunks to the sink; a refusal comes back as kSinkError naming the first chunk's offset
// and carrying the sink's own message.
inline Status write_chunks(BlockSink& sink, const Chunk* chunks, std::size_t count) noexcept {
  if (count == 0) return Status::Ok();
  const Status s = sink.write(chunks, count);
  if (s.ok()) return s;
  return Status::Error(StatusCode::kSinkError, s.sys_errno,
                       "sink write at guest offset 0x%" PRIx64 " failed: %s",
                       chunks[0].guest_offset, s.message);
}

}  // namespace memsnap::plugin
