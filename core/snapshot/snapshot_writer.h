// SnapshotWriter: the BlockSink a strategy plugin exports guest memory into. It writes one
// snapshot file (format in snapshot_format.h) under a temporary name and renames it into place
// at commit, so a reader never sees a half-written snapshot.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"
#include "core/snapshot/snapshot_format.h"
#include "core/snapshot/snapshot_origin.h"
#include "plugins/plugin_api/plugin_api.h"

struct XXH3_state_s;

namespace memsnap {

// How the writer puts the data area (the guest's bytes) into the file of a synced snapshot.
// Measured on this project's machines (docs/performance.md, "Durable pauses"): kBuffered is
// never slower on the wall clock (a direct write() waits for the disk before it returns); kDirect
// costs 2-9x less CPU for the write itself, and 25-50% less for a whole pause with
// process_vm_readv or memfd's mmap reads; with memfd's pread buffer (copied through the bounce
// buffer) loaded runs showed no dependable saving, the quiet run of 2026-12-07 44% ("Export at
// the machine's limit"). The header and the map are always written through the page cache.
enum class DataWrite : std::uint8_t {
  // pwritev through the page cache; the fsync at commit writes it back. Also what every
  // unsynced snapshot gets, whatever was asked (O_DIRECT would make it wait for the disk).
  kBuffered,
  // O_DIRECT, straight from the caller's buffers to the disk: no copy into the page cache and
  // no writeback at commit. Chunks whose memory is not aligned for direct I/O are copied through
  // an aligned bounce buffer. Where the file system refuses O_DIRECT, or a write leaves the file
  // offset unaligned, the rest is written buffered and SnapshotWriter::direct_fallback() says
  // why. Only for synced snapshots.
  kDirect,
};
// "buffered", "direct": the names reports (and memsnapd's snapshots.durable_write) use.
std::string_view data_write_name(DataWrite mode);

struct SnapshotParams {
  std::uint64_t block_size = kSmallBlockSize;  // kSmallBlockSize or kHugeBlockSize
  std::uint64_t guest_size = 0;                // a non-zero multiple of block_size
  std::uint64_t generation = 1;                // >= 1; a diff's is greater than its parent's
  SnapshotId snapshot_id{};                    // all zero: a random one is generated
  SnapshotId parent_id{};                      // all zero: a base snapshot
  bool sync_on_commit = true;                  // fsync the file and its directory in commit()
  bool sync_on_make_durable = false;           // fdatasync in make_durable()
  // Share the hashing of big batches of DATA with a helper thread, which hashes while this
  // thread writes the same bytes; this thread hashes whatever the helper has not reached when
  // the write returns, so a helper kept off its CPU by other work never stalls it. On a quiet
  // machine write() then keeps pace with a plain write() of the same bytes; inline hashing made
  // it ~15% slower. Ignored with a single CPU.
  bool hash_in_parallel = true;
  // Allocate the data area ahead of the writes (fallocate, 64 MiB at a time, never beyond the
  // dirty bytes; the unused tail is cut off at commit), unless the snapshot is synced (either
  // sync option). Writing into allocated blocks spares ext4 its per-block delayed allocation:
  // about a quarter less time in write() for 1 GiB here. But the blocks are then unwritten
  // extents that writeback must convert, which made write + fsync ~15% slower: so not when the
  // pause waits for the disk. Best effort: if fallocate fails, the writes go on without it.
  bool preallocate = true;
  // See DataWrite; kDirect only takes effect with sync_on_commit or sync_on_make_durable.
  DataWrite data_write = DataWrite::kBuffered;
  // Stored in the header (format version 2): the strategy that writes the snapshot and the rest
  // a resume needs to know. At most kMaxOriginBytes of text.
  SnapshotOrigin origin;
};

// Tests only: replaces the pwritev of the O_DIRECT data writes (null: the real one), to inject
// what a real disk rarely shows (EINVAL half way, short writes, EIO). Not thread-safe: set it
// before creating a writer, reset it after.
using DirectPwritevFn = ssize_t (*)(int fd, const iovec* iov, int count, off_t offset);
void set_direct_pwritev_for_testing(DirectPwritevFn fn);

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
  // with errno for failed system calls). make_durable() records what was written so far in the
  // recovery journal beside the temporary file (recovery_journal.h), so that memory released
  // after it can be found again even if this process dies, and adds fdatasync of both if
  // sync_on_make_durable.
  // released() only records the range (touching ones merged); it cannot report failure, so
  // running out of memory there terminates rather than forget memory that must be restored.
  plugin::Status write(const plugin::Chunk* chunks, std::size_t count) noexcept override;
  plugin::Status make_durable() noexcept override;
  void released(std::uint64_t guest_offset, std::uint64_t length) noexcept override;

  // Writes the map and header, fsyncs (if sync_on_commit) and renames the file to final_path,
  // then fsyncs the directory. Never replaces a file: kAlreadyExists if final_path exists at
  // the rename (RENAME_NOREPLACE). kSnapshotIncomplete if a dirty byte was never written; the
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
  // Whether the data area is being written with O_DIRECT (DataWrite::kDirect, synced, and no
  // fallback so far), and why a writer asked for it writes buffered instead ("" if it does not).
  bool writes_direct() const { return direct_fd_ >= 0; }
  const std::string& direct_fallback() const { return direct_fallback_; }

 private:
  enum class State { kOpen, kCommitted, kFailed, kAborted };
  struct HashStateDeleter {
    void operator()(XXH3_state_s* state) const noexcept;
  };
  // The checksum work of one DATA run within one batch: its pieces of data (hash_pieces_
  // [first_piece, first_piece + piece_count)), whether it continues a run begun in an earlier
  // batch (resume) and whether it ends in this one (finish: its checksum is stored). Tasks are
  // independent of each other, so the writer's thread and the helper can share them out.
  struct HashTask {
    std::size_t run;  // index into written_
    std::size_t first_piece;
    std::size_t piece_count;
    bool resume;
    bool finish;
    int state;  // carried streaming state (0 or 1) for runs that cross batches, else -1
  };
  struct HashPiece {
    const std::uint8_t* data;
    std::uint64_t length;
  };
  class HashWorker;
  // Claims and runs tasks of the current batch until none is left. scratch: the caller's own
  // state for runs of several pieces. Called by the writer's thread and the helper at once.
  void drain_hash_tasks(XXH3_state_s* scratch) noexcept;
  static void drain_hash_tasks_of(void* writer, XXH3_state_s* scratch) noexcept;
  void run_hash_task(std::size_t index, XXH3_state_s* scratch) noexcept;

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
  void preallocate(std::uint64_t end) noexcept;
  Status flush_data();
  Status flush_buffered(std::size_t& next_iov);
  Status flush_direct(std::size_t& next_iov);
  // Moves the cursor over iov_ (next_iov and the base of the iovec it names) n written bytes on.
  void consume_iov(std::size_t& next_iov, std::uint64_t n) noexcept;
  bool direct_aligned(const iovec& iov) const noexcept;
  void open_direct();
  void fall_back_to_buffered(std::string why);
  std::optional<std::uint64_t> first_unwritten_dirty_byte() const;
  std::vector<MapRun> build_map() const;
  Status finish_commit();
  Status fail_commit(Error error);
  Status rename_into_place();
  void remove_temp_file() noexcept;
  // Appends the runs written since the last call to the recovery journal (creating it first):
  // see core/snapshot/recovery_journal.h. Called by make_durable(), before any memory is released.
  Status append_recovery_journal();

  const std::string final_path_;
  SnapshotParams params_;
  const std::vector<plugin::ByteRange> dirty_;  // merged
  std::uint64_t dirty_bytes_ = 0;
  int fd_ = -1;
  const std::string temp_path_;
  bool temp_exists_ = true;
  bool keep_temp_ = false;
  int journal_fd_ = -1;              // the recovery journal, once make_durable() started it
  std::size_t journaled_runs_ = 0;   // written_ entries recorded in it (the last may have grown)
  State state_ = State::kOpen;
  std::optional<Error> poison_;

  // Contract cursor: the next chunk starts at or after next_offset_, in dirty_[range_index_] or
  // a later range.
  std::uint64_t next_offset_ = 0;
  std::size_t range_index_ = 0;
  std::uint64_t written_bytes_ = 0;

  // DATA and ZERO runs written so far, in guest order; the last one may be an open DATA run
  // whose checksum is still being hashed.
  std::vector<MapRun> written_;
  bool data_run_open_ = false;
  // hash_: the writer thread's scratch state. carry_[carry_index_]: the streaming state of the
  // open DATA run while it spans batches.
  std::unique_ptr<XXH3_state_s, HashStateDeleter> hash_;
  std::unique_ptr<XXH3_state_s, HashStateDeleter> carry_[2];
  int carry_index_ = 0;

  // The batch being built: bytes of the data area assigned so far and bytes already in the
  // file; the difference is queued in iov_ and hash_tasks_ (pointers into the caller's chunks,
  // executed before write() returns). checksums_[i] receives task i's checksum.
  std::uint64_t data_end_ = 0;
  std::uint64_t data_flushed_ = 0;
  std::uint64_t allocated_end_ = 0;  // file offset up to which preallocate() allocated
  std::vector<iovec> iov_;
  std::vector<HashTask> hash_tasks_;
  std::vector<HashPiece> hash_pieces_;
  std::vector<std::uint64_t> checksums_;
  std::atomic<std::size_t> next_task_{0};  // the next unclaimed task of the batch
  std::unique_ptr<HashWorker> worker_;     // started on the first big batch

  // DataWrite::kDirect: a second descriptor of the temporary file, opened with O_DIRECT (-1 when
  // writing buffered), the memory alignment its buffers need, and the bounce buffer that
  // unaligned chunks are copied through (allocated on first need).
  int direct_fd_ = -1;
  std::uint64_t direct_mem_align_ = 4096;
  struct FreeDeleter {
    void operator()(void* p) const noexcept;
  };
  std::unique_ptr<std::uint8_t, FreeDeleter> bounce_;
  std::string direct_fallback_;

  std::vector<plugin::ByteRange> released_;
  WriterStats stats_;
  double helper_cpu_seconds_ = 0;
};

}  // namespace memsnap
