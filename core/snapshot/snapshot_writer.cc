#include "core/snapshot/snapshot_writer.h"

#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <sched.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>

#include "core/base/file_io.h"
#include "core/snapshot/recovery_journal.h"

namespace memsnap {
namespace {

using io::errno_message;

// Data is hashed and written in batches of about this size: large enough that syscall and
// thread hand-off costs vanish (each write call costs ~15 us here), small enough to stay in cache
// between the hash and the copy into the page cache.
constexpr std::uint64_t kBatchBytes = 4 * 1024 * 1024;
// Below this a batch is hashed inline: handing it to the helper would cost more than it saves.
constexpr std::uint64_t kParallelMinBytes = 512 * 1024;
// preallocate() allocates this much of the data area ahead of the writes at a time: few
// fallocate calls, and at most this much allocated beyond what a snapshot with many zero blocks
// ends up using (until commit cuts it off).
constexpr std::uint64_t kPreallocateBytes = 64 * 1024 * 1024;
// DataWrite::kDirect: chunks whose memory is not aligned for direct I/O (the strategies' malloc'd
// read buffers start 16 bytes into a page) are copied into a buffer of this size, then written.
// One batch's worth: the copy stays in cache and costs a tenth of what the write waits.
constexpr std::uint64_t kBounceBytes = kBatchBytes;
// The file offsets and lengths of the data area are multiples of this (it starts at
// kSnapshotDataOffset, and blocks are 4 KiB or 2 MiB); a file system that needs more cannot take
// O_DIRECT writes of it.
constexpr std::uint64_t kDirectOffsetAlign = 4096;
static_assert(kSnapshotDataOffset % kDirectOffsetAlign == 0);
static_assert(sizeof(FileHeader) + kMaxOriginBytes <= kSnapshotDataOffset,
              "the header and its origin record must fit before the data area");
static_assert(kBounceBytes % kDirectOffsetAlign == 0);

DirectPwritevFn g_direct_pwritev = nullptr;  // tests only

bool is_zero_block(const std::uint8_t* p, std::size_t size) noexcept {
  std::uint64_t first;
  std::memcpy(&first, p, sizeof(first));
  if (first != 0) return false;  // guest pages with data almost always fail here
  for (std::size_t i = 0; i < size; i += 64) {
    std::uint64_t w[8];
    std::memcpy(w, p + i, sizeof(w));
    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0) return false;
  }
  return true;
}

Status fill_random(void* buf, std::size_t len) {
  auto* p = static_cast<std::uint8_t*>(buf);
  while (len > 0) {
    const ssize_t n = ::getrandom(p, len, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      return make_error(Errc::kIoError, errno_message("getrandom", err), err);
    }
    p += n;
    len -= static_cast<std::size_t>(n);
  }
  return {};
}

std::uint64_t unix_now_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000u +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

std::string range_text(std::uint64_t offset, std::uint64_t length) {
  return "[" + std::to_string(offset) + ", " + std::to_string(offset + length) + ")";
}

Status validate_params(const SnapshotParams& p) {
  if (!is_valid_block_size(p.block_size)) {
    return make_error(Errc::kInvalidArgument, "block size " + std::to_string(p.block_size) +
                                                  " is not supported (4096 or 2097152)");
  }
  if (p.guest_size == 0 || p.guest_size % p.block_size != 0) {
    return make_error(Errc::kInvalidArgument, "guest size " + std::to_string(p.guest_size) +
                                                  " is not a non-zero multiple of the block size " +
                                                  std::to_string(p.block_size));
  }
  if (p.generation == 0) {
    return make_error(Errc::kInvalidArgument, "generation must be at least 1");
  }
  if (const std::size_t n = p.origin.serialize().size(); n > kMaxOriginBytes) {
    return make_error(Errc::kInvalidArgument, "the origin record has " + std::to_string(n) +
                                                  " bytes, more than " +
                                                  std::to_string(kMaxOriginBytes));
  }
  if (!is_zero_id(p.parent_id) && p.parent_id == p.snapshot_id) {
    return make_error(Errc::kInvalidArgument, "a snapshot cannot be its own parent");
  }
  return {};
}

Result<std::vector<plugin::ByteRange>> normalize_dirty(const std::vector<plugin::ByteRange>& in,
                                                       const SnapshotParams& p) {
  std::vector<plugin::ByteRange> out;
  out.reserve(in.size());
  std::uint64_t prev_end = 0;
  for (const auto& r : in) {
    // Built only for an error: this loop runs once per dirty range (tens of thousands).
    auto what = [&r] { return "dirty range " + range_text(r.offset, r.length); };
    if (r.length == 0) return make_error(Errc::kInvalidArgument, what() + " is empty");
    if (r.offset % p.block_size != 0 || r.length % p.block_size != 0) {
      return make_error(Errc::kInvalidArgument, what() + " is not aligned to the block size " +
                                                    std::to_string(p.block_size));
    }
    if (r.offset > p.guest_size || r.length > p.guest_size - r.offset) {
      return make_error(Errc::kInvalidArgument,
                        what() + " ends beyond the guest size " + std::to_string(p.guest_size));
    }
    if (r.offset < prev_end) {
      return make_error(Errc::kInvalidArgument,
                        what() + " is out of order or overlaps the previous");
    }
    if (!out.empty() && r.offset == prev_end) {
      out.back().length += r.length;
    } else {
      out.push_back(r);
    }
    prev_end = r.offset + r.length;
  }
  return out;
}

}  // namespace

std::string_view data_write_name(DataWrite mode) {
  return mode == DataWrite::kDirect ? "direct" : "buffered";
}

void set_direct_pwritev_for_testing(DirectPwritevFn fn) { g_direct_pwritev = fn; }

void SnapshotWriter::FreeDeleter::operator()(void* p) const noexcept { std::free(p); }

void SnapshotWriter::HashStateDeleter::operator()(XXH3_state_s* state) const noexcept {
  XXH3_freeState(state);
}

void SnapshotWriter::run_hash_task(std::size_t index, XXH3_state_s* scratch) noexcept {
  const HashTask& t = hash_tasks_[index];
  const HashPiece* piece = hash_pieces_.data() + t.first_piece;
  if (!t.resume && t.finish && t.piece_count == 1) {
    checksums_[index] = XXH3_64bits(piece->data, piece->length);  // the common case: one shot
    return;
  }
  XXH3_state_s* state = t.state >= 0 ? carry_[t.state].get() : scratch;
  if (!t.resume) XXH3_64bits_reset(state);
  for (std::size_t i = 0; i < t.piece_count; ++i) {
    XXH3_64bits_update(state, piece[i].data, piece[i].length);
  }
  if (t.finish) checksums_[index] = XXH3_64bits_digest(state);
}

void SnapshotWriter::drain_hash_tasks(XXH3_state_s* scratch) noexcept {
  const std::size_t count = hash_tasks_.size();
  for (;;) {
    const std::size_t i = next_task_.fetch_add(1, std::memory_order_relaxed);
    if (i >= count) return;
    run_hash_task(i, scratch);
  }
}

void SnapshotWriter::drain_hash_tasks_of(void* writer, XXH3_state_s* scratch) noexcept {
  static_cast<SnapshotWriter*>(writer)->drain_hash_tasks(scratch);
}

// A thread that shares the hashing of each batch with the writer's thread: the writer opens the
// batch, writes its bytes, then claims whatever tasks (one per DATA run) the helper has not
// claimed yet, and finally closes the batch and waits for the helper to finish the task it is
// on. So the helper hashes while the writer is in the kernel, and when the helper is late
// (the other CPU busy with someone else's work, as on a shared build machine), the writer does
// the rest itself instead of waiting for it: at worst a batch costs what inline hashing costs,
// plus the one task the helper may be in the middle of (a run holds at most 1 MiB).
//
// The scheduler tends to wake the helper on the waker's CPU (measured: 507 of 512 batches), and
// the two threads then take turns instead of running side by side. So the helper is kept off
// the CPU the writer is on (re-checked at every batch, a syscall only when that CPU changes).
// Only built when the process may use 2+ CPUs.
class SnapshotWriter::HashWorker {
 public:
  using DrainFn = void (*)(void* context, XXH3_state_s* scratch) noexcept;

  // Null if the process may run on one CPU only, or no hash state can be allocated.
  static std::unique_ptr<HashWorker> create() {
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    if (::sched_getaffinity(0, sizeof(allowed), &allowed) != 0 || CPU_COUNT(&allowed) < 2) {
      return nullptr;
    }
    std::unique_ptr<XXH3_state_s, HashStateDeleter> scratch(XXH3_createState());
    if (!scratch) return nullptr;
    return std::unique_ptr<HashWorker>(new HashWorker(allowed, std::move(scratch)));
  }
  ~HashWorker() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }

  // Opens a batch: the helper may now call drain(context, its scratch) once.
  void open(DrainFn drain, void* context) {
    const int cpu = ::sched_getcpu();
    if (cpu >= 0 && cpu < CPU_SETSIZE && cpu != avoided_cpu_) {
      avoided_cpu_ = cpu;
      cpu_set_t others = allowed_;
      CPU_CLR(cpu, &others);
      // Best effort: if it fails, the helper still works, only perhaps on the same CPU.
      if (CPU_COUNT(&others) > 0) {
        ::pthread_setaffinity_np(thread_.native_handle(), sizeof(others), &others);
      }
    }
    {
      std::lock_guard lock(mu_);
      drain_ = drain;
      context_ = context;
      open_ = true;
      ++generation_;
    }
    wake_.notify_one();
  }

  // Closes the batch: a helper that has not joined it yet never will, and one inside it has
  // finished when this returns. Call after draining the tasks yourself.
  void close() {
    std::unique_lock lock(mu_);
    open_ = false;
    left_.wait(lock, [this] { return !inside_; });
  }

  // CPU time the helper thread has used so far; call after close().
  double cpu_seconds() {
    std::lock_guard lock(mu_);
    return cpu_seconds_;
  }

 private:
  HashWorker(const cpu_set_t& allowed, std::unique_ptr<XXH3_state_s, HashStateDeleter> scratch)
      : allowed_(allowed), scratch_(std::move(scratch)), thread_([this] { loop(); }) {}

  void loop() {
    std::unique_lock lock(mu_);
    std::uint64_t seen = 0;
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || (open_ && generation_ != seen); });
      if (stop_) return;
      seen = generation_;
      inside_ = true;
      const DrainFn drain = drain_;
      void* const context = context_;
      lock.unlock();
      drain(context, scratch_.get());
      timespec cpu{};
      ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu);
      lock.lock();
      cpu_seconds_ = double(cpu.tv_sec) + double(cpu.tv_nsec) * 1e-9;
      inside_ = false;
      left_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;  // a batch opened, or stop
  std::condition_variable left_;  // the helper left a batch
  bool open_ = false;
  bool inside_ = false;
  bool stop_ = false;
  std::uint64_t generation_ = 0;
  DrainFn drain_ = nullptr;
  void* context_ = nullptr;
  double cpu_seconds_ = 0;
  const cpu_set_t allowed_;
  int avoided_cpu_ = -1;
  const std::unique_ptr<XXH3_state_s, HashStateDeleter> scratch_;
  std::thread thread_;  // last: starts after the members it uses exist
};

Result<std::unique_ptr<SnapshotWriter>> SnapshotWriter::create(
    std::string final_path, SnapshotParams params, std::vector<plugin::ByteRange> dirty_ranges) {
  MEMSNAP_RETURN_IF_ERROR(validate_params(params));
  MEMSNAP_ASSIGN_OR_RETURN(auto dirty, normalize_dirty(dirty_ranges, params));

  const std::size_t slash = final_path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : final_path.substr(0, slash + 1);
  const std::string base = slash == std::string::npos ? final_path : final_path.substr(slash + 1);
  if (base.empty() || base == "." || base == "..") {
    return make_error(Errc::kInvalidArgument, "snapshot path '" + final_path + "' names no file");
  }

  if (is_zero_id(params.snapshot_id)) {
    MEMSNAP_RETURN_IF_ERROR(fill_random(params.snapshot_id.data(), params.snapshot_id.size()));
  }
  MEMSNAP_RETURN_IF_ERROR(validate_params(params));

  std::unique_ptr<XXH3_state_s, HashStateDeleter> hash(XXH3_createState());
  std::unique_ptr<XXH3_state_s, HashStateDeleter> carry0(XXH3_createState());
  std::unique_ptr<XXH3_state_s, HashStateDeleter> carry1(XXH3_createState());
  if (!hash || !carry0 || !carry1) {
    return make_error(Errc::kInternal, "out of memory for the hash state");
  }

  int fd = -1;
  std::string temp_path;
  for (int attempt = 0; fd < 0; ++attempt) {
    std::uint64_t tag = 0;
    MEMSNAP_RETURN_IF_ERROR(fill_random(&tag, sizeof(tag)));
    SnapshotId tag_bytes{};
    std::memcpy(tag_bytes.data(), &tag, sizeof(tag));
    temp_path = (slash == std::string::npos ? "" : dir) + "." + base + ".tmp." +
                std::to_string(::getpid()) + "." + to_hex(tag_bytes).substr(0, 16);
    fd = ::open(temp_path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
    if (fd < 0 && (errno != EEXIST || attempt >= 8)) {
      const int err = errno;
      return make_error(Errc::kIoError, errno_message("creating " + temp_path, err), err);
    }
  }
  auto writer = std::unique_ptr<SnapshotWriter>(new SnapshotWriter(
      std::move(final_path), params, std::move(dirty), fd, std::move(temp_path), std::move(hash)));
  writer->carry_[0] = std::move(carry0);
  writer->carry_[1] = std::move(carry1);
  if (params.data_write == DataWrite::kDirect &&
      (params.sync_on_commit || params.sync_on_make_durable)) {
    writer->open_direct();
  }
  return writer;
}

SnapshotWriter::SnapshotWriter(std::string final_path, SnapshotParams params,
                               std::vector<plugin::ByteRange> dirty, int fd, std::string temp_path,
                               std::unique_ptr<XXH3_state_s, HashStateDeleter> hash)
    : final_path_(std::move(final_path)),
      params_(params),
      dirty_(std::move(dirty)),
      fd_(fd),
      temp_path_(std::move(temp_path)),
      hash_(std::move(hash)) {
  for (const auto& r : dirty_) dirty_bytes_ += r.length;
  iov_.reserve(IOV_MAX);
}

SnapshotWriter::~SnapshotWriter() {
  worker_.reset();
  if (state_ != State::kCommitted) remove_temp_file();
  if (fd_ >= 0) ::close(fd_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (journal_fd_ >= 0) ::close(journal_fd_);
}

// A second descriptor of the temporary file, with O_DIRECT, reopened through /proc/self/fd so
// that it is the same file whatever happened to its name since. Anything in the way (no /proc,
// a file system without direct I/O, alignment needs the data area's layout cannot meet) leaves
// the writer buffered, with the reason in direct_fallback_.
void SnapshotWriter::open_direct() {
  const std::string self = "/proc/self/fd/" + std::to_string(fd_);
  const int fd = ::open(self.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0) {
    fall_back_to_buffered(errno_message("opening " + temp_path_ + " with O_DIRECT", errno));
    return;
  }
#ifdef STATX_DIOALIGN
  struct statx st {};
  if (::statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &st) == 0 && (st.stx_mask & STATX_DIOALIGN)) {
    if (st.stx_dio_mem_align == 0 || st.stx_dio_offset_align == 0) {
      ::close(fd);
      fall_back_to_buffered("the file system of " + temp_path_ + " does not support O_DIRECT");
      return;
    }
    if (kDirectOffsetAlign % st.stx_dio_offset_align != 0) {
      ::close(fd);
      fall_back_to_buffered("O_DIRECT on " + temp_path_ + " needs file offsets aligned to " +
                            std::to_string(st.stx_dio_offset_align) + " bytes");
      return;
    }
    direct_mem_align_ = st.stx_dio_mem_align;
  }
#endif
  direct_fd_ = fd;
}

// Direct writes that fail with EINVAL write nothing, so what is left of the batch (and every
// later one) goes through the page cache: no byte is lost or written twice.
void SnapshotWriter::fall_back_to_buffered(std::string why) {
  if (direct_fd_ >= 0) ::close(direct_fd_);
  direct_fd_ = -1;
  bounce_.reset();
  if (direct_fallback_.empty()) direct_fallback_ = std::move(why);
}

plugin::Status SnapshotWriter::sink_error() const noexcept {
  return plugin::Status::Error(plugin::StatusCode::kSinkError, poison_->sys_errno, "%s",
                               poison_->message.c_str());
}

plugin::Status SnapshotWriter::poison(Error error) noexcept {
  if (!poison_) poison_ = std::move(error);
  return sink_error();
}

std::optional<Error> SnapshotWriter::check_chunks(const plugin::Chunk* chunks,
                                                  std::size_t count) const {
  const std::uint64_t bs = params_.block_size;
  std::uint64_t next = next_offset_;
  std::size_t range = range_index_;
  for (std::size_t i = 0; i < count; ++i) {
    const plugin::Chunk& c = chunks[i];
    auto bad = [&c](const std::string& why) {
      return make_error(
          Errc::kInvalidArgument,
          "snapshot writer: chunk " + range_text(c.guest_offset, c.length) + " " + why);
    };
    if (c.length == 0) return bad("is empty");
    if (c.data == nullptr) return bad("has no data");
    if (c.guest_offset % bs != 0 || c.length % bs != 0) {
      return bad("is not aligned to the block size " + std::to_string(bs));
    }
    if (c.guest_offset > params_.guest_size || c.length > params_.guest_size - c.guest_offset) {
      return bad("ends beyond the guest size " + std::to_string(params_.guest_size));
    }
    if (c.guest_offset < next) {
      return bad("is out of order or overlaps: earlier chunks reached guest offset " +
                 std::to_string(next));
    }
    while (range < dirty_.size() && dirty_[range].offset + dirty_[range].length <= c.guest_offset) {
      ++range;
    }
    if (range == dirty_.size() || c.guest_offset < dirty_[range].offset ||
        c.guest_offset + c.length > dirty_[range].offset + dirty_[range].length) {
      return bad("is not inside a dirty range");
    }
    next = c.guest_offset + c.length;
  }
  return std::nullopt;
}

plugin::Status SnapshotWriter::write(const plugin::Chunk* chunks, std::size_t count) noexcept {
  if (poison_) return sink_error();
  try {
    if (state_ != State::kOpen) {
      return poison(
          make_error(Errc::kInvalidArgument, "snapshot writer: write() after commit() or abort()"));
    }
    if (count > 0 && chunks == nullptr) {
      return poison(make_error(Errc::kInvalidArgument, "snapshot writer: null chunk array"));
    }
    if (auto error = check_chunks(chunks, count)) return poison(std::move(*error));
    for (std::size_t i = 0; i < count; ++i) {
      const plugin::Chunk& c = chunks[i];
      append_chunk(static_cast<const std::uint8_t*>(c.data), c.guest_offset, c.length);
      if (poison_) return sink_error();
      next_offset_ = c.guest_offset + c.length;
      written_bytes_ += c.length;
    }
    while (range_index_ < dirty_.size() &&
           dirty_[range_index_].offset + dirty_[range_index_].length <= next_offset_) {
      ++range_index_;
    }
    // The caller's buffers are only valid until we return.
    if (auto s = execute_batch(); !s.ok()) return poison(std::move(s).error());
    return plugin::Status::Ok();
  } catch (const std::bad_alloc&) {
    return poison(make_error(Errc::kInternal, "snapshot writer: out of memory", ENOMEM));
  }
}

void SnapshotWriter::append_chunk(const std::uint8_t* data, std::uint64_t guest_offset,
                                  std::uint64_t length) {
  const std::uint64_t bs = params_.block_size;
  const std::uint64_t limit_blocks = max_run_data_bytes(bs) / bs;
  std::uint64_t block = guest_offset / bs;
  std::uint64_t left = length / bs;
  while (left > 0) {
    std::uint64_t n = 1;
    if (is_zero_block(data, bs)) {
      while (n < left && is_zero_block(data + n * bs, bs)) ++n;
      add_zero_blocks(block, n);
    } else {
      std::uint64_t room = limit_blocks;
      if (data_run_open_) {
        const MapRun& run = written_.back();
        if (run.first_block + run.block_count == block) room = limit_blocks - run.block_count;
      }
      while (n < left && n < room && !is_zero_block(data + n * bs, bs)) ++n;
      add_data_blocks(data, block, n);
      if (poison_) return;
    }
    data += n * bs;
    block += n;
    left -= n;
  }
}

void SnapshotWriter::add_zero_blocks(std::uint64_t first_block, std::uint64_t count) {
  close_data_run();
  stats_.zero_blocks += count;
  if (!written_.empty()) {
    MapRun& last = written_.back();
    if (last.kind == RunKind::kZero && last.first_block + last.block_count == first_block) {
      last.block_count += count;
      return;
    }
  }
  written_.push_back(MapRun{first_block, count, RunKind::kZero, 0, 0, 0});
  ++stats_.run_count;
}

void SnapshotWriter::add_data_blocks(const std::uint8_t* data, std::uint64_t first_block,
                                     std::uint64_t count) {
  const std::uint64_t bs = params_.block_size;
  const std::uint64_t bytes = count * bs;
  bool extend = false;
  if (data_run_open_) {
    const MapRun& run = written_.back();
    extend = run.first_block + run.block_count == first_block &&
             (run.block_count + count) * bs <= max_run_data_bytes(bs);
  }
  if (!extend) {
    close_data_run();
    written_.push_back(MapRun{first_block, 0, RunKind::kData, 0, data_end_, 0});
    hash_tasks_.push_back(HashTask{written_.size() - 1, hash_pieces_.size(), 0, false, false, -1});
    data_run_open_ = true;
    ++stats_.run_count;
  } else if (hash_tasks_.empty()) {
    // The open run goes on from an earlier batch.
    hash_tasks_.push_back(HashTask{written_.size() - 1, hash_pieces_.size(), 0, true, false, -1});
  }
  HashTask& task = hash_tasks_.back();
  if (task.piece_count > 0 && hash_pieces_.back().data + hash_pieces_.back().length == data) {
    hash_pieces_.back().length += bytes;
  } else {
    hash_pieces_.push_back(HashPiece{data, bytes});
    ++task.piece_count;
  }
  written_.back().block_count += count;
  data_end_ += bytes;
  stats_.data_blocks += count;
  stats_.data_bytes += bytes;

  void* base = const_cast<std::uint8_t*>(data);  // writev only reads through it
  if (!iov_.empty() && static_cast<std::uint8_t*>(iov_.back().iov_base) + iov_.back().iov_len ==
                           static_cast<std::uint8_t*>(base)) {
    iov_.back().iov_len += bytes;
  } else {
    iov_.push_back(iovec{base, bytes});
  }
  if (data_end_ - data_flushed_ >= kBatchBytes || iov_.size() >= IOV_MAX) {
    if (auto s = execute_batch(); !s.ok()) poison(std::move(s).error());
  }
}

void SnapshotWriter::close_data_run() {
  if (!data_run_open_) return;
  if (hash_tasks_.empty()) {
    // The run was begun in an earlier batch and gets no more data: only its digest is left.
    hash_tasks_.push_back(HashTask{written_.size() - 1, hash_pieces_.size(), 0, true, false, -1});
  }
  hash_tasks_.back().finish = true;
  data_run_open_ = false;
}

Status SnapshotWriter::execute_batch() {
  // Only the first task can go on from an earlier batch (in carry_[carry_index_]), and only the
  // last can stay open after this one; it streams into the other carried state, so that the two
  // can run at the same time.
  if (!hash_tasks_.empty()) {
    if (hash_tasks_.front().resume) hash_tasks_.front().state = carry_index_;
    HashTask& last = hash_tasks_.back();
    if (!last.finish) {
      if (!last.resume) last.state = 1 - carry_index_;
      carry_index_ = last.state;
    }
  }
  checksums_.resize(hash_tasks_.size());
  next_task_.store(0, std::memory_order_relaxed);
  bool parallel = false;
  if (params_.hash_in_parallel && data_end_ - data_flushed_ >= kParallelMinBytes) {
    if (!worker_) {
      try {
        worker_ = HashWorker::create();
      } catch (const std::system_error&) {
        worker_ = nullptr;
      }
      if (!worker_) params_.hash_in_parallel = false;  // one CPU or no thread: hash inline
    }
    parallel = worker_ != nullptr;
  }
  Status written;
  if (parallel) {
    worker_->open(&SnapshotWriter::drain_hash_tasks_of, this);
    written = flush_data();
    drain_hash_tasks(hash_.get());  // whatever the helper has not taken yet
    worker_->close();               // it reads the caller's buffers: never return before it is out
    helper_cpu_seconds_ = worker_->cpu_seconds();
  } else {
    drain_hash_tasks(hash_.get());  // first, so the write copies from cache
    written = flush_data();
  }
  for (std::size_t i = 0; i < hash_tasks_.size(); ++i) {
    if (hash_tasks_[i].finish) written_[hash_tasks_[i].run].checksum = checksums_[i];
  }
  hash_tasks_.clear();
  hash_pieces_.clear();
  return written;
}

void SnapshotWriter::preallocate(std::uint64_t end) noexcept {
  if (!params_.preallocate || end <= allocated_end_) return;
  if (params_.sync_on_commit || params_.sync_on_make_durable) return;
  // The data area never holds more than the dirty bytes (zero blocks only make it smaller).
  const std::uint64_t limit = kSnapshotDataOffset + dirty_bytes_;
  const std::uint64_t start = std::max(allocated_end_, kSnapshotDataOffset);
  const std::uint64_t stop = std::min(limit, std::max(end, start + kPreallocateBytes));
  if (stop <= start) return;
  if (::fallocate(fd_, 0, static_cast<off_t>(start), static_cast<off_t>(stop - start)) != 0) {
    params_.preallocate = false;  // not supported, no space: the writes will tell
    return;
  }
  allocated_end_ = stop;
}

Status SnapshotWriter::flush_data() {
  if (!iov_.empty()) preallocate(kSnapshotDataOffset + data_end_);
  std::size_t next = 0;
  Status s = direct_fd_ >= 0 ? flush_direct(next) : Status{};
  // Buffered: everything, or whatever a direct write that fell back left.
  if (s.ok()) s = flush_buffered(next);
  iov_.clear();
  return s;
}

void SnapshotWriter::consume_iov(std::size_t& next_iov, std::uint64_t n) noexcept {
  while (n > 0) {
    iovec& v = iov_[next_iov];
    if (n >= v.iov_len) {
      n -= v.iov_len;
      ++next_iov;
    } else {
      v.iov_base = static_cast<std::uint8_t*>(v.iov_base) + n;
      v.iov_len -= n;
      n = 0;
    }
  }
}

Status SnapshotWriter::flush_buffered(std::size_t& next_iov) {
  while (next_iov < iov_.size()) {
    const int batch = static_cast<int>(std::min<std::size_t>(iov_.size() - next_iov, IOV_MAX));
    const ssize_t n = ::pwritev(fd_, &iov_[next_iov], batch,
                                static_cast<off_t>(kSnapshotDataOffset + data_flushed_));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      return make_error(Errc::kIoError,
                        errno_message("writing snapshot data to " + temp_path_, err), err);
    }
    data_flushed_ += static_cast<std::uint64_t>(n);
    consume_iov(next_iov, static_cast<std::uint64_t>(n));
  }
  return {};
}

bool SnapshotWriter::direct_aligned(const iovec& iov) const noexcept {
  return reinterpret_cast<std::uintptr_t>(iov.iov_base) % direct_mem_align_ == 0 &&
         iov.iov_len % kDirectOffsetAlign == 0;
}

// Writes the batch with O_DIRECT: runs of aligned iovecs straight from the caller's memory, the
// others through bounce_. Returns with next_iov short of the end only after falling back.
Status SnapshotWriter::flush_direct(std::size_t& next_iov) {
  const auto pwritev_fn = g_direct_pwritev != nullptr ? g_direct_pwritev : &::pwritev;
  while (next_iov < iov_.size()) {
    const std::uint64_t offset = kSnapshotDataOffset + data_flushed_;
    if (offset % kDirectOffsetAlign != 0) {
      fall_back_to_buffered("a short O_DIRECT write to " + temp_path_ +
                            " left the file offset unaligned (" + std::to_string(offset) + ")");
      return {};
    }
    std::size_t end = next_iov;
    ssize_t n = 0;
    if (direct_aligned(iov_[next_iov])) {
      while (end < iov_.size() && end - next_iov < IOV_MAX && direct_aligned(iov_[end])) ++end;
      n = pwritev_fn(direct_fd_, &iov_[next_iov], static_cast<int>(end - next_iov),
                     static_cast<off_t>(offset));
    } else {
      if (!bounce_) {
        bounce_.reset(static_cast<std::uint8_t*>(
            std::aligned_alloc(std::max<std::uint64_t>(direct_mem_align_, 4096), kBounceBytes)));
        if (!bounce_) {
          fall_back_to_buffered("no memory for the O_DIRECT bounce buffer");
          return {};
        }
      }
      // Copy unaligned iovecs (lengths are whole blocks) until the bounce buffer is full.
      std::uint64_t filled = 0;
      for (end = next_iov; end < iov_.size() && filled < kBounceBytes; ++end) {
        if (direct_aligned(iov_[end])) break;
        const std::uint64_t take = std::min<std::uint64_t>(iov_[end].iov_len, kBounceBytes - filled);
        std::memcpy(bounce_.get() + filled, iov_[end].iov_base, take);
        filled += take;
      }
      const iovec one{bounce_.get(), filled};
      n = pwritev_fn(direct_fd_, &one, 1, static_cast<off_t>(offset));
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EINVAL) {
      fall_back_to_buffered(
          errno_message("O_DIRECT write to " + temp_path_ + " at offset " + std::to_string(offset),
                        EINVAL));
      return {};
    }
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      return make_error(Errc::kIoError,
                        errno_message("writing snapshot data to " + temp_path_, err), err);
    }
    data_flushed_ += static_cast<std::uint64_t>(n);
    consume_iov(next_iov, static_cast<std::uint64_t>(n));
  }
  return {};
}

plugin::Status SnapshotWriter::make_durable() noexcept {
  if (poison_) return sink_error();
  try {
    if (state_ != State::kOpen) {
      return poison(make_error(Errc::kInvalidArgument,
                               "snapshot writer: make_durable() after commit() or abort()"));
    }
    if (params_.sync_on_make_durable && ::fdatasync(fd_) != 0) {
      const int err = errno;
      return poison(make_error(Errc::kIoError, errno_message("fdatasync " + temp_path_, err), err));
    }
    if (auto s = append_recovery_journal(); !s.ok()) return poison(std::move(s).error());
    return plugin::Status::Ok();
  } catch (const std::bad_alloc&) {
    return poison(make_error(Errc::kInternal, "snapshot writer: out of memory", ENOMEM));
  }
}

Status SnapshotWriter::append_recovery_journal() {
  const std::string journal_path = temp_path_ + kRecoveryJournalSuffix;
  std::string text;
  if (journal_fd_ < 0) {
    journal_fd_ = ::open(journal_path.c_str(),
                         O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0640);
    if (journal_fd_ < 0) {
      const int err = errno;
      return make_error(Errc::kIoError, errno_message("creating " + journal_path, err), err);
    }
    text = "memsnap-recovery 1\nsnapshot " + final_path_ + "\nblock_size " +
           std::to_string(params_.block_size) + " guest_size " +
           std::to_string(params_.guest_size) + " generation " +
           std::to_string(params_.generation) + " data_offset " +
           std::to_string(kSnapshotDataOffset) + "\n";
  }
  // The last run recorded may have grown since: record it again (a later line supersedes).
  const std::size_t from = journaled_runs_ > 0 ? journaled_runs_ - 1 : 0;
  for (std::size_t i = from; i < written_.size(); ++i) {
    const MapRun& r = written_[i];
    text += "run " + std::to_string(r.first_block) + " " + std::to_string(r.block_count) +
            (r.kind == RunKind::kZero ? " zero " : " data ") + std::to_string(r.data_offset) +
            "\n";
  }
  journaled_runs_ = written_.size();
  for (std::size_t done = 0; done < text.size();) {
    const ssize_t n = ::write(journal_fd_, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      return make_error(Errc::kIoError, errno_message("writing " + journal_path, err), err);
    }
    done += static_cast<std::size_t>(n);
  }
  if (params_.sync_on_make_durable && ::fdatasync(journal_fd_) != 0) {
    const int err = errno;
    return make_error(Errc::kIoError, errno_message("fdatasync " + journal_path, err), err);
  }
  return {};
}

void SnapshotWriter::released(std::uint64_t guest_offset, std::uint64_t length) noexcept {
  if (length == 0) return;
  if (!released_.empty() && released_.back().offset + released_.back().length == guest_offset) {
    released_.back().length += length;
    return;
  }
  released_.push_back({guest_offset, length});
}

std::optional<std::uint64_t> SnapshotWriter::first_unwritten_dirty_byte() const {
  const std::uint64_t bs = params_.block_size;
  std::size_t j = 0;
  for (const auto& r : dirty_) {
    std::uint64_t pos = r.offset;
    const std::uint64_t end = r.offset + r.length;
    while (pos < end) {
      while (j < written_.size() &&
             (written_[j].first_block + written_[j].block_count) * bs <= pos) {
        ++j;
      }
      if (j == written_.size() || written_[j].first_block * bs > pos) return pos;
      pos = (written_[j].first_block + written_[j].block_count) * bs;
    }
  }
  return std::nullopt;
}

std::vector<MapRun> SnapshotWriter::build_map() const {
  const RunKind gap_kind = is_zero_id(params_.parent_id) ? RunKind::kZero : RunKind::kParent;
  std::vector<MapRun> map;
  map.reserve(2 * written_.size() + 1);
  auto add = [&map](const MapRun& run) {
    if (!map.empty() && run.kind != RunKind::kData && map.back().kind == run.kind &&
        map.back().first_block + map.back().block_count == run.first_block) {
      map.back().block_count += run.block_count;
    } else {
      map.push_back(run);
    }
  };
  std::uint64_t next = 0;
  for (const MapRun& run : written_) {
    if (run.first_block > next) add(MapRun{next, run.first_block - next, gap_kind, 0, 0, 0});
    add(run);
    next = run.first_block + run.block_count;
  }
  const std::uint64_t blocks = params_.guest_size / params_.block_size;
  if (next < blocks) add(MapRun{next, blocks - next, gap_kind, 0, 0, 0});
  return map;
}

Status SnapshotWriter::commit() {
  if (state_ != State::kOpen) {
    return make_error(Errc::kInvalidArgument,
                      "snapshot writer: commit() after commit(), a failed commit or abort()");
  }
  try {
    if (poison_) return fail_commit(*poison_);
    close_data_run();
    if (auto s = execute_batch(); !s.ok()) return fail_commit(std::move(s).error());
    if (auto missing = first_unwritten_dirty_byte()) {
      return fail_commit(make_error(Errc::kSnapshotIncomplete,
                                    "snapshot " + final_path_ + ": only " +
                                        std::to_string(written_bytes_) + " of " +
                                        std::to_string(dirty_bytes_) +
                                        " dirty bytes were written; the first missing byte "
                                        "is at guest offset " +
                                        std::to_string(*missing)));
    }
    Status committed = finish_commit();
    // Committed (the file is in place, even if only its directory's fsync failed): the journal
    // of the temporary file has nothing left to recover.
    if (state_ == State::kCommitted && journal_fd_ >= 0) {
      ::unlink((temp_path_ + kRecoveryJournalSuffix).c_str());
    }
    return committed;
  } catch (const std::bad_alloc&) {
    return fail_commit(make_error(Errc::kInternal, "snapshot writer: out of memory", ENOMEM));
  }
}

Status SnapshotWriter::finish_commit() {
  const std::vector<MapRun> map = build_map();
  const std::string origin = params_.origin.serialize();
  FileHeader h{};
  h.magic = kSnapshotMagic;
  h.version = kSnapshotFormatVersion;
  h.header_size = static_cast<std::uint32_t>(sizeof(FileHeader) + origin.size());
  h.block_size = static_cast<std::uint32_t>(params_.block_size);
  h.flags = 0;
  h.guest_size = params_.guest_size;
  h.generation = params_.generation;
  h.snapshot_id = params_.snapshot_id;
  h.parent_id = params_.parent_id;
  h.created_unix_ns = unix_now_ns();
  h.data_offset = kSnapshotDataOffset;
  h.data_bytes = data_end_;
  h.map_offset = kSnapshotDataOffset + data_end_;
  h.run_count = map.size();
  h.map_checksum = compute_map_checksum(map);
  h.header_checksum = compute_header_checksum(h, origin);

  if (auto s = io::pwrite_all(fd_, map.data(), map.size() * sizeof(MapRun), h.map_offset,
                              "writing the block map to " + temp_path_);
      !s.ok()) {
    return fail_commit(std::move(s).error());
  }
  // Preallocated blocks that zero blocks left unused would follow the map: cut them off.
  const std::uint64_t file_size = h.map_offset + map.size() * sizeof(MapRun);
  if (allocated_end_ > file_size && ::ftruncate(fd_, static_cast<off_t>(file_size)) != 0) {
    const int err = errno;
    return fail_commit(
        make_error(Errc::kIoError, errno_message("truncating " + temp_path_, err), err));
  }
  // The header goes last: until it is written the file has no magic and no reader accepts it.
  // The origin record first, then the FileHeader (one write, the file's first 128 bytes).
  if (!origin.empty()) {
    if (auto s = io::pwrite_all(fd_, origin.data(), origin.size(), sizeof(h),
                                "writing the origin record to " + temp_path_);
        !s.ok()) {
      return fail_commit(std::move(s).error());
    }
  }
  if (auto s = io::pwrite_all(fd_, &h, sizeof(h), 0, "writing the header to " + temp_path_);
      !s.ok()) {
    return fail_commit(std::move(s).error());
  }
  if (params_.sync_on_commit && ::fsync(fd_) != 0) {
    const int err = errno;
    return fail_commit(make_error(Errc::kIoError, errno_message("fsync " + temp_path_, err), err));
  }
  if (auto s = rename_into_place(); !s.ok()) return fail_commit(std::move(s).error());
  temp_exists_ = false;
  state_ = State::kCommitted;
  worker_.reset();

  stats_ = WriterStats{};
  stats_.data_bytes = data_end_;
  stats_.run_count = map.size();
  for (const MapRun& run : map) {
    if (run.kind == RunKind::kData) stats_.data_blocks += run.block_count;
    if (run.kind == RunKind::kZero) stats_.zero_blocks += run.block_count;
    if (run.kind == RunKind::kParent) stats_.parent_blocks += run.block_count;
  }

  if (params_.sync_on_commit) {
    const std::size_t slash = final_path_.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : final_path_.substr(0, slash + 1);
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0 || ::fsync(dfd) != 0) {
      const int err = errno;
      if (dfd >= 0) ::close(dfd);
      return make_error(
          Errc::kIoError,
          errno_message(
              "snapshot " + final_path_ + " is in place, but syncing its directory failed", err),
          err);
    }
    ::close(dfd);
  }
  return {};
}

// Never replaces a file: two pauses naming the same output (or a local pause over an old base)
// would otherwise leave one sandbox with another's memory, or break a chain that builds on it.
Status SnapshotWriter::rename_into_place() {
  int rc = ::renameat2(AT_FDCWD, temp_path_.c_str(), AT_FDCWD, final_path_.c_str(),
                       RENAME_NOREPLACE);
  if (rc != 0 && errno == EINVAL) {
    // The file system cannot rename without replacing: link() refuses an existing name too.
    rc = ::link(temp_path_.c_str(), final_path_.c_str());
    if (rc == 0) ::unlink(temp_path_.c_str());
  }
  if (rc == 0) return {};
  const int err = errno;
  if (err == EEXIST) {
    return make_error(Errc::kAlreadyExists,
                      "snapshot " + final_path_ +
                          " already exists: snapshots are never overwritten (nothing was changed)",
                      err);
  }
  return make_error(Errc::kIoError,
                    errno_message("renaming " + temp_path_ + " to " + final_path_, err), err);
}

Status SnapshotWriter::fail_commit(Error error) {
  state_ = State::kFailed;
  worker_.reset();
  if (released_.empty()) remove_temp_file();
  return error;
}

void SnapshotWriter::remove_temp_file() noexcept {
  if (temp_exists_ && !keep_temp_) {
    ::unlink(temp_path_.c_str());
    if (journal_fd_ >= 0) ::unlink((temp_path_ + kRecoveryJournalSuffix).c_str());
  }
  if (!keep_temp_) temp_exists_ = false;
}

void SnapshotWriter::abort() noexcept {
  if (state_ == State::kCommitted) return;
  worker_.reset();
  remove_temp_file();
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (direct_fd_ >= 0) ::close(direct_fd_);
  direct_fd_ = -1;
  state_ = State::kAborted;
}

std::string SnapshotWriter::keep_temp_file() noexcept {
  if (!temp_exists_) return {};
  keep_temp_ = true;
  return temp_path_;
}

Status SnapshotWriter::read_back(std::uint64_t guest_offset, std::uint64_t length,
                                 void* dst) const {
  if (length == 0) return {};
  if (guest_offset > params_.guest_size || length > params_.guest_size - guest_offset) {
    return make_error(Errc::kInvalidArgument,
                      "read_back " + range_text(guest_offset, length) + " is outside the guest");
  }
  if (fd_ < 0) return make_error(Errc::kInvalidArgument, "read_back after abort()");
  const std::uint64_t bs = params_.block_size;
  auto it = std::upper_bound(
      written_.begin(), written_.end(), guest_offset / bs,
      [](std::uint64_t block, const MapRun& run) { return block < run.first_block; });
  if (it != written_.begin()) --it;
  auto* out = static_cast<std::uint8_t*>(dst);
  std::uint64_t pos = guest_offset;
  const std::uint64_t end = guest_offset + length;
  for (; pos < end; ++it) {
    if (it == written_.end() || it->first_block * bs > pos ||
        (it->first_block + it->block_count) * bs <= pos) {
      return make_error(Errc::kNotFound,
                        "read_back: guest offset " + std::to_string(pos) + " was not written");
    }
    const std::uint64_t run_start = it->first_block * bs;
    const std::uint64_t stop = std::min(end, run_start + it->block_count * bs);
    const std::uint64_t n = stop - pos;
    if (it->kind == RunKind::kData) {
      const std::uint64_t data_pos = it->data_offset + (pos - run_start);
      if (data_pos + n > data_flushed_) {
        return make_error(Errc::kNotFound, "read_back: guest offset " + std::to_string(pos) +
                                               " never reached the file (a write failed)");
      }
      if (auto s = io::pread_exact(fd_, out, n, kSnapshotDataOffset + data_pos,
                                   "reading back " + temp_path_);
          !s.ok()) {
        return s;
      }
    } else {
      std::memset(out, 0, n);
    }
    out += n;
    pos = stop;
  }
  return {};
}

}  // namespace memsnap
