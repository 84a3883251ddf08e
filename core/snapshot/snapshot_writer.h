// SnapshotWriter: the BlockSink a strategy plugin exports guest memory into. It writes one
// snapshot file (format in snapshot_format.h) under a temporary name and renames it into place
// at commit, so a reader never sees a half-written snapshot.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/snapshot/snapshot_format.h"
#include "plugins/plugin_api/plugin_api.h"

struct XXH3_state_s;

namespace memsnap {

struct SnapshotParams {
  std::uint64_t block_size = kSmallBlockSize;  // kSmallBlockSize or kHugeBlockSize
  std::uint64_t guest_size = 0;                // a non-zero multiple of block_size
  std::uint64_t generation = 1;                // >= 1; a diff's is greater than its parent's
  SnapshotId snapshot_id{};                    // all zero: a random one is generated
  SnapshotId parent_id{};                      // all zero: a base snapshot
  bool sync_on_commit = true;                  // fsync the file and its directory in commit()
  bool sync_on_make_durable = false;           // fdatasync in make_durable()
  // Hash big batches of DATA on a helper thread while this thread writes them: write() then
  // keeps pace with a plain write() of the same bytes, at the cost of a second busy CPU (and
  // ~40% more CPU in all). Inline hashing made it ~15% slower. Ignored with a single CPU.
  bool hash_in_parallel = true;
};

// What the writer has recorded. Before commit() it counts the blocks written so far
// (parent_blocks is 0 and run_count counts written runs); after, the whole committed map.
struct WriterStats {
  std::uint64_t data_blocks = 0;
  std::uint64_t zero_blocks = 0;
  std::uint64_t parent_blocks = 0;
  std::uint64_t data_bytes = 0;  // bytes in the data area of the file
  std::uint64_t run_count = 0;
};

// Not thread-safe: one thread at a time, as BlockSink requires (a helper thread it may start
// only runs inside write() and commit()). Owns its temporary file: the
// destructor removes it unless commit() succeeded or keep_temp_file() was called.
//
// Blocks inside the dirty ranges must each be written exactly once; all-zero blocks are stored
// as map entries only. Blocks outside the dirty ranges become PARENT runs in a diff (parent_id
// set) and ZERO runs in a base snapshot.
//
// A write() that breaks the BlockSink contract, or fails to write, poisons the writer: every
// later write(), make_durable() and commit() fails with the first error.
class SnapshotWriter final : public plugin::BlockSink {
 public:
  // Creates `.<name>.tmp.<pid>.<random>` (mode 0640) next to final_path. dirty_ranges must be
  // sorted, disjoint, non-empty, block-aligned and inside the guest; touching ranges are merged.
  // kInvalidArgument for bad params or ranges, kIoError if the file cannot be created.
  static Result<std::unique_ptr<SnapshotWriter>> create(
      std::string final_path, SnapshotParams params, std::vector<plugin::ByteRange> dirty_ranges);

  ~SnapshotWriter();
  SnapshotWriter(const SnapshotWriter&) = delete;
  SnapshotWriter& operator=(const SnapshotWriter&) = delete;

  // BlockSink. write() returns once the chunks' bytes are in the file (kSinkError otherwise,
  // with errno for failed system calls). make_durable() adds fdatasync if sync_on_make_durable.
  // released() only records the range (touching ones merged); it cannot report failure, so
  // running out of memory there terminates rather than forget memory that must be restored.
  plugin::Status write(const plugin::Chunk* chunks, std::size_t count) noexcept override;
  plugin::Status make_durable() noexcept override;
  void released(std::uint64_t guest_offset, std::uint64_t length) noexcept override;

  // Writes the map and header, fsyncs (if sync_on_commit) and renames the file to final_path,
  // then fsyncs the directory. kSnapshotIncomplete if a dirty byte was never written; the
  // writer's poison error; kIoError for a failed system call (if only the directory fsync
  // failed, the file is already in place). On failure final_path is untouched and the temporary
  // file is removed, except when released() was called: then it stays (it may hold the only
  // copy of released memory) until abort(), keep_temp_file() or the destructor. Call once.
  Status commit();

  // Gives up: removes the temporary file (unless kept) and closes it. No-op after commit().
  void abort() noexcept;

  // Leaves the temporary file on disk for good and returns its path (empty if it is already
  // gone). For a failed pause whose released memory could not be put back.
  std::string keep_temp_file() noexcept;

  // Copies written guest bytes [guest_offset, guest_offset+length) into dst: DATA from the
  // file, ZERO as zeros. Works until abort() or destruction, also after a failed commit().
  // kNotFound for bytes not written (yet), kInvalidArgument outside the guest, kIoError.
  Status read_back(std::uint64_t guest_offset, std::uint64_t length, void* dst) const;

  // released() ranges in call order.
  const std::vector<plugin::ByteRange>& released_ranges() const { return released_; }
  const WriterStats& stats() const { return stats_; }
  // CPU seconds spent by the helper thread that hashes in parallel with the writes (0 if none
  // ran), so callers can account a pause's whole CPU cost.
  double helper_cpu_seconds() const { return helper_cpu_seconds_; }
  const SnapshotId& snapshot_id() const { return params_.snapshot_id; }
  const SnapshotId& parent_id() const { return params_.parent_id; }
  std::uint64_t generation() const { return params_.generation; }
  const std::string& temp_path() const { return temp_path_; }
  const std::string& final_path() const { return final_path_; }
  bool committed() const { return state_ == State::kCommitted; }

 private:
  enum class State { kOpen, kCommitted, kFailed, kAborted };
  struct HashStateDeleter {
    void operator()(XXH3_state_s* state) const noexcept;
  };
  // One step of checksumming DATA runs, in order: kReset starts a run, kUpdate hashes
  // [data, data+length), kDigest stores the checksum of run `run` (index into written_).
  struct HashOp {
    enum Kind { kReset, kUpdate, kDigest } kind;
    const std::uint8_t* data;
    std::uint64_t length;
    std::size_t run;
  };
  struct Digest {
    std::size_t run;
    std::uint64_t checksum;
  };
  class HashWorker;
  static void run_hash_ops(const std::vector<HashOp>& ops, XXH3_state_s* state,
                           std::vector<Digest>& out) noexcept;

  SnapshotWriter(std::string final_path, SnapshotParams params,
                 std::vector<plugin::ByteRange> dirty, int fd, std::string temp_path,
                 std::unique_ptr<XXH3_state_s, HashStateDeleter> hash);

  plugin::Status poison(Error error) noexcept;
  plugin::Status sink_error() const noexcept;
  std::optional<Error> check_chunks(const plugin::Chunk* chunks, std::size_t count) const;
  void append_chunk(const std::uint8_t* data, std::uint64_t guest_offset, std::uint64_t length);
  void add_zero_blocks(std::uint64_t first_block, std::uint64_t count);
  void add_data_blocks(const std::uint8_t* data, std::uint64_t first_block, std::uint64_t count);
  void close_data_run();
  Status execute_batch();
  Status flush_data();
  std::optional<std::uint64_t> first_unwritten_dirty_byte() const;
  std::vector<MapRun> build_map() const;
  Status finish_commit();
  Status fail_commit(Error error);
  void remove_temp_file() noexcept;

  const std::string final_path_;
  SnapshotParams params_;
  const std::vector<plugin::ByteRange> dirty_;  // merged
  std::uint64_t dirty_bytes_ = 0;
  int fd_ = -1;
  const std::string temp_path_;
  bool temp_exists_ = true;
  bool keep_temp_ = false;
  State state_ = State::kOpen;
  std::optional<Error> poison_;

  // Contract cursor: the next chunk starts at or after next_offset_, in dirty_[range_index_] or
  // a later range.
  std::uint64_t next_offset_ = 0;
  std::size_t range_index_ = 0;
  std::uint64_t written_bytes_ = 0;

  // DATA and ZERO runs written so far, in guest order; the last one may be an open DATA run
  // whose checksum is still being hashed in hash_.
  std::vector<MapRun> written_;
  bool data_run_open_ = false;
  std::unique_ptr<XXH3_state_s, HashStateDeleter> hash_;

  // The batch being built: bytes of the data area assigned so far and bytes already in the
  // file; the difference is queued in iov_ and hash_ops_ (pointers into the caller's chunks,
  // executed before write() returns).
  std::uint64_t data_end_ = 0;
  std::uint64_t data_flushed_ = 0;
  std::vector<iovec> iov_;
  std::vector<HashOp> hash_ops_;
  std::vector<Digest> digests_;
  std::unique_ptr<HashWorker> worker_;  // started on the first big batch

  std::vector<plugin::ByteRange> released_;
  WriterStats stats_;
  double helper_cpu_seconds_ = 0;
};

}  // namespace memsnap
