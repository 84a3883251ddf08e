// SnapshotReader: opens one snapshot file, validates it and reads guest bytes from it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/snapshot/snapshot_format.h"
#include "core/snapshot/snapshot_origin.h"

namespace memsnap {

enum class Verify {
  kHeaderAndMap,  // check header and map; DATA checksums only through verify_data()/verify_run()
  kFull,          // also hash every DATA run at open
};

// The largest guest a snapshot may describe unless the caller allows more (1 TiB).
inline constexpr std::uint64_t kDefaultMaxGuestSize = std::uint64_t{1} << 40;

// What a snapshot file may make its reader do. A header is checked against these before anything
// is sized by it (memsnapd sets them from its config: limits.max_guest_size).
struct ReaderLimits {
  std::uint64_t max_guest_size = kDefaultMaxGuestSize;
};

struct SnapshotSummary {
  std::uint64_t data_blocks = 0;
  std::uint64_t zero_blocks = 0;
  std::uint64_t parent_blocks = 0;
  std::uint64_t data_runs = 0;
  std::uint64_t zero_runs = 0;
  std::uint64_t parent_runs = 0;
};

// Immutable after open(); every const method may be called from several threads at once (reads
// use pread on the one descriptor the reader owns). Errors name the file.
class SnapshotReader {
 public:
  // The file is opened with O_NOFOLLOW | O_NONBLOCK and must be a regular file: treat every
  // byte of it as hostile. Errors, each checked in this order:
  //   kPathNotAllowed     the path names a symbolic link (it is not followed)
  //   kInvalidArgument    not a regular file (a FIFO or device: refused, never waited on)
  //   kSnapshotTruncated  the file is shorter than its header, data area or map say, or they
  //                       lie over a hole (a sparse file does not store what its header claims)
  //   kSnapshotBadMagic, kSnapshotBadVersion
  //   kSnapshotBadHeader  header checksum, header_size, a malformed origin record, block
  //                       size, guest size (also above limits.max_guest_size), flags,
  //                       generation, ids, offsets inconsistent, or bytes after the map
  //   kSnapshotBadMap     map checksum; runs unsorted, with gaps or overlaps, not covering the
  //                       guest, of an unknown kind, PARENT in a base snapshot, DATA too long or
  //                       not packed in guest order in the data area
  //   kSnapshotChecksumMismatch  (kFull) a DATA run's bytes; the message names its guest offset
  //   kIoError, kNotFound  the file cannot be opened or read
  static Result<std::unique_ptr<SnapshotReader>> open(const std::string& path,
                                                      Verify verify = Verify::kFull,
                                                      const ReaderLimits& limits = {});

  ~SnapshotReader();
  SnapshotReader(const SnapshotReader&) = delete;
  SnapshotReader& operator=(const SnapshotReader&) = delete;

  const std::string& path() const { return path_; }
  const FileHeader& header() const { return header_; }
  // How the snapshot was written (strategy, ...); empty for a version 1 file.
  const SnapshotOrigin& origin() const { return origin_; }
  std::uint64_t block_size() const { return header_.block_size; }
  std::uint64_t guest_size() const { return header_.guest_size; }
  std::uint64_t block_count() const { return header_.guest_size / header_.block_size; }
  bool is_base() const { return is_zero_id(header_.parent_id); }
  std::span<const MapRun> runs() const { return runs_; }
  const SnapshotSummary& summary() const { return summary_; }
  // The descriptor of the open file, owned by the reader (e.g. to map the data area).
  int fd() const { return fd_; }

  // Index into runs() of the run that holds this guest block; nullopt beyond the guest.
  std::optional<std::size_t> find_run(std::uint64_t block) const;

  // Copies guest bytes [guest_offset, guest_offset+length) into dst. Any byte range works.
  // Checksums are not checked here (see verify_run()). kSnapshotChainMismatch if the range
  // touches a PARENT run: those bytes live in an older snapshot, read them through
  // SnapshotChain. kInvalidArgument outside the guest; kIoError, kSnapshotTruncated.
  Status read(std::uint64_t guest_offset, std::uint64_t length, void* dst) const;

  // Hashes the DATA of runs()[index] (any other kind passes): kSnapshotChecksumMismatch.
  Status verify_run(std::size_t index) const;
  // verify_run() over every DATA run.
  Status verify_data() const;

 private:
  SnapshotReader(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  Status load(Verify verify, const ReaderLimits& limits);
  Status load_header(std::uint64_t file_size, const ReaderLimits& limits);
  Status check_stored() const;
  Status load_map();
  Status verify_run_with(std::size_t index, std::vector<std::uint8_t>& buffer) const;
  Error error(Errc code, const std::string& message) const;

  const std::string path_;
  const int fd_;
  FileHeader header_{};
  SnapshotOrigin origin_;
  std::vector<MapRun> runs_;
  SnapshotSummary summary_;
};

}  // namespace memsnap
