// On-disk layout of a memsnap snapshot file, format version 2 (docs/snapshot-format.md).
//
//   [0, 128)                         FileHeader
//   [128, header_size)               version 2: the origin record (snapshot_origin.h), text
//   [header_size, data_offset)       zeros
//   [data_offset, +data_bytes)       packed DATA blocks, in guest order
//   [map_offset, +run_count * 40)    block map: MapRun records sorted by first_block
//
// Everything is little-endian; the structs below are the exact bytes on disk (checked by the
// static_asserts), so this header only builds on little-endian hosts.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

namespace memsnap {

// 16 random bytes naming one snapshot; all zero means "none" (the parent of a base snapshot).
using SnapshotId = std::array<std::uint8_t, 16>;

inline constexpr std::array<char, 8> kSnapshotMagic = {'M', 'E', 'M', 'S', 'N', 'A', 'P', '\0'};
// The version writers write. Readers also read every version from kOldestSnapshotFormatVersion:
// version 1 is version 2 without the origin record (header_size is 128).
inline constexpr std::uint32_t kSnapshotFormatVersion = 2;
inline constexpr std::uint32_t kOldestSnapshotFormatVersion = 1;
// The most header bytes (FileHeader and origin record) a reader accepts.
inline constexpr std::uint32_t kMaxHeaderSize = 64 * 1024;
inline constexpr std::uint32_t kSmallBlockSize = 4096;
inline constexpr std::uint32_t kHugeBlockSize = 2 * 1024 * 1024;
// Where the writer puts the data area: page-aligned, so DATA blocks can be mapped or copied
// page by page straight from the file.
inline constexpr std::uint64_t kSnapshotDataOffset = 4096;
// A DATA run covers at most this many bytes (or one block, if blocks are bigger), so one run
// checksum can be verified without reading much when a single page is faulted in.
inline constexpr std::uint64_t kMaxRunDataBytes = 1024 * 1024;

enum class RunKind : std::uint32_t {
  kData = 1,    // bytes stored in the data area
  kZero = 2,    // all-zero blocks, nothing stored
  kParent = 3,  // unchanged since the parent snapshot: read them from there
};

struct FileHeader {
  std::array<char, 8> magic;      // kSnapshotMagic
  std::uint32_t version;          // kSnapshotFormatVersion
  std::uint32_t header_size;      // 128 + the origin record's bytes (version 1: 128)
  std::uint32_t block_size;       // kSmallBlockSize or kHugeBlockSize
  std::uint32_t flags;            // none defined in version 1: must be 0
  std::uint64_t guest_size;       // bytes, a non-zero multiple of block_size
  std::uint64_t generation;       // >= 1, strictly greater than the parent's
  SnapshotId snapshot_id;         // random, never all zero
  SnapshotId parent_id;           // all zero for a base snapshot
  std::uint64_t created_unix_ns;  // CLOCK_REALTIME at commit
  std::uint64_t data_offset;      // file offset of the data area (multiple of 4096)
  std::uint64_t data_bytes;       // size of the data area
  std::uint64_t map_offset;       // == data_offset + data_bytes
  std::uint64_t run_count;        // MapRun records in the map
  std::uint64_t map_checksum;     // XXH3_64 of the map bytes
  std::uint64_t header_checksum;  // XXH3_64 of the header_size bytes with this field zeroed
};

struct MapRun {
  std::uint64_t first_block;  // guest block index (guest offset / block_size)
  std::uint64_t block_count;  // >= 1
  RunKind kind;
  std::uint32_t reserved;     // 0
  std::uint64_t data_offset;  // DATA: offset inside the data area; otherwise 0
  std::uint64_t checksum;     // DATA: XXH3_64 of the run's bytes; otherwise 0
};

static_assert(std::endian::native == std::endian::little,
              "the snapshot structs are written as they are in memory: little-endian hosts only");
static_assert(std::is_trivially_copyable_v<FileHeader> && std::is_standard_layout_v<FileHeader>);
static_assert(sizeof(FileHeader) == 128);
static_assert(offsetof(FileHeader, version) == 8);
static_assert(offsetof(FileHeader, header_size) == 12);
static_assert(offsetof(FileHeader, block_size) == 16);
static_assert(offsetof(FileHeader, flags) == 20);
static_assert(offsetof(FileHeader, guest_size) == 24);
static_assert(offsetof(FileHeader, generation) == 32);
static_assert(offsetof(FileHeader, snapshot_id) == 40);
static_assert(offsetof(FileHeader, parent_id) == 56);
static_assert(offsetof(FileHeader, created_unix_ns) == 72);
static_assert(offsetof(FileHeader, data_offset) == 80);
static_assert(offsetof(FileHeader, data_bytes) == 88);
static_assert(offsetof(FileHeader, map_offset) == 96);
static_assert(offsetof(FileHeader, run_count) == 104);
static_assert(offsetof(FileHeader, map_checksum) == 112);
static_assert(offsetof(FileHeader, header_checksum) == 120);
static_assert(kSnapshotDataOffset >= sizeof(FileHeader));

static_assert(std::is_trivially_copyable_v<MapRun> && std::is_standard_layout_v<MapRun>);
static_assert(sizeof(MapRun) == 40);
static_assert(offsetof(MapRun, block_count) == 8);
static_assert(offsetof(MapRun, kind) == 16);
static_assert(offsetof(MapRun, reserved) == 20);
static_assert(offsetof(MapRun, data_offset) == 24);
static_assert(offsetof(MapRun, checksum) == 32);

[[nodiscard]] constexpr bool is_valid_block_size(std::uint64_t block_size) {
  return block_size == kSmallBlockSize || block_size == kHugeBlockSize;
}

// Most bytes one DATA run may hold for this block size.
[[nodiscard]] constexpr std::uint64_t max_run_data_bytes(std::uint64_t block_size) {
  return block_size > kMaxRunDataBytes ? block_size : kMaxRunDataBytes;
}

[[nodiscard]] bool is_zero_id(const SnapshotId& id) noexcept;
// 32 lowercase hex digits.
[[nodiscard]] std::string to_hex(const SnapshotId& id);
// "data", "zero", "parent" or "unknown".
[[nodiscard]] std::string_view run_kind_name(RunKind kind) noexcept;

// The value FileHeader::header_checksum must hold: XXH3-64 of the header's bytes (the FileHeader
// and, from version 2, the origin record after it), computed with that field taken as zero.
[[nodiscard]] std::uint64_t compute_header_checksum(const FileHeader& header,
                                                    std::string_view origin = {}) noexcept;
// The value FileHeader::map_checksum must hold for these runs.
[[nodiscard]] std::uint64_t compute_map_checksum(std::span<const MapRun> runs) noexcept;

}  // namespace memsnap
