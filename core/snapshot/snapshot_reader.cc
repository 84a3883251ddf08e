#include "core/snapshot/snapshot_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

#include "core/base/file_io.h"

namespace memsnap {
namespace {

constexpr std::uint64_t kU64Max = std::numeric_limits<std::uint64_t>::max();

std::string num(std::uint64_t v) { return std::to_string(v); }

std::string hex64(std::uint64_t v) {
  char buf[19];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

Result<std::unique_ptr<SnapshotReader>> SnapshotReader::open(const std::string& path,
                                                             Verify verify,
                                                             const ReaderLimits& limits) {
  // The file is hostile input: never follow a symlink in its last component, and never block in
  // open() (a FIFO would wait for a writer forever); what it is gets checked on the descriptor.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    if (err == ELOOP) {
      return make_error(Errc::kPathNotAllowed,
                        "snapshot " + path + " is a symbolic link, which is not followed", err);
    }
    return make_error(err == ENOENT ? Errc::kNotFound : Errc::kIoError,
                      io::errno_message("opening snapshot " + path, err), err);
  }
  std::unique_ptr<SnapshotReader> reader(new SnapshotReader(path, fd));
  MEMSNAP_RETURN_IF_ERROR(reader->load(verify, limits));
  return reader;
}

SnapshotReader::~SnapshotReader() { ::close(fd_); }

Error SnapshotReader::error(Errc code, const std::string& message) const {
  return make_error(code, "snapshot " + path_ + ": " + message);
}

Status SnapshotReader::load(Verify verify, const ReaderLimits& limits) {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("fstat " + path_, err), err);
  }
  if (!S_ISREG(st.st_mode)) {
    return error(Errc::kInvalidArgument, "not a regular file (a FIFO, device, socket or "
                                         "directory is never read as a snapshot)");
  }
  // Reads are plain blocking preads from here on (O_NONBLOCK only kept open() from blocking).
  if (const int fl = ::fcntl(fd_, F_GETFL); fl < 0 || ::fcntl(fd_, F_SETFL, fl & ~O_NONBLOCK) != 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("fcntl " + path_, err), err);
  }
  if (auto s = load_header(static_cast<std::uint64_t>(st.st_size), limits); !s.ok()) return s;
  if (auto s = check_stored(); !s.ok()) return s;
  if (auto s = load_map(); !s.ok()) return s;
  if (verify == Verify::kFull) return verify_data();
  return {};
}

Status SnapshotReader::load_header(std::uint64_t file_size, const ReaderLimits& limits) {
  const std::size_t have =
      static_cast<std::size_t>(std::min<std::uint64_t>(file_size, sizeof(header_)));
  if (auto s = io::pread_exact(fd_, &header_, have, 0, "reading " + path_); !s.ok()) {
    return s;
  }
  const FileHeader& h = header_;
  if (have < sizeof(h.magic)) {
    return error(Errc::kSnapshotTruncated,
                 "the file has " + num(file_size) + " bytes, too few to hold even the magic");
  }
  if (h.magic != kSnapshotMagic) return error(Errc::kSnapshotBadMagic, "not a memsnap snapshot");
  if (have < sizeof(h)) {
    return error(Errc::kSnapshotTruncated, "the file has " + num(file_size) +
                                               " bytes, shorter than the " + num(sizeof(h)) +
                                               "-byte header");
  }
  if (h.version < kOldestSnapshotFormatVersion || h.version > kSnapshotFormatVersion) {
    return error(Errc::kSnapshotBadVersion,
                 "format version " + num(h.version) + "; this build reads versions " +
                     num(kOldestSnapshotFormatVersion) + " to " + num(kSnapshotFormatVersion));
  }
  auto bad = [this](const std::string& why) { return error(Errc::kSnapshotBadHeader, why); };
  if (h.version == 1 && h.header_size != sizeof(h)) {
    return bad("header_size is " + num(h.header_size) + ", version 1 headers have " +
               num(sizeof(h)) + " bytes");
  }
  if (h.header_size < sizeof(h) || h.header_size > kMaxHeaderSize) {
    return bad("header_size is " + num(h.header_size) + ", not between " + num(sizeof(h)) +
               " and " + num(kMaxHeaderSize));
  }
  // Version 2: the origin record fills the header's bytes after the FileHeader.
  std::string origin_text(h.header_size - sizeof(h), '\0');
  if (!origin_text.empty()) {
    if (file_size < h.header_size) {
      return error(Errc::kSnapshotTruncated, "the file has " + num(file_size) +
                                                 " bytes, shorter than its " + num(h.header_size) +
                                                 "-byte header");
    }
    if (auto s = io::pread_exact(fd_, origin_text.data(), origin_text.size(), sizeof(h),
                                 "reading the origin record of " + path_);
        !s.ok()) {
      return s;
    }
  }
  if (const std::uint64_t sum = compute_header_checksum(h, origin_text); sum != h.header_checksum) {
    return bad("header checksum is " + hex64(sum) + ", the header says " +
               hex64(h.header_checksum));
  }
  auto origin = SnapshotOrigin::parse(origin_text);
  if (!origin.ok()) return bad(origin.error().message);
  origin_ = std::move(*origin);
  if (!is_valid_block_size(h.block_size)) return bad("unsupported block size " + num(h.block_size));
  if (h.guest_size == 0 || h.guest_size % h.block_size != 0) {
    return bad("guest size " + num(h.guest_size) +
               " is not a non-zero multiple of the block size " + num(h.block_size));
  }
  if (h.guest_size > limits.max_guest_size) {
    return bad("guest size " + num(h.guest_size) + " is above the limit of " +
               num(limits.max_guest_size) + " bytes (limits.max_guest_size)");
  }
  if (h.flags != 0) return bad("unknown flags " + hex64(h.flags));
  if (h.generation == 0) return bad("generation 0 (generations start at 1)");
  if (is_zero_id(h.snapshot_id)) return bad("the snapshot id is all zero");
  if (h.parent_id == h.snapshot_id) return bad("the snapshot is its own parent");
  if (h.data_offset < h.header_size || h.data_offset % kSmallBlockSize != 0) {
    return bad("data offset " + num(h.data_offset) +
               " is inside the header or not a multiple of 4096");
  }
  if (h.data_bytes % h.block_size != 0 || h.data_bytes > h.guest_size) {
    return bad("data area of " + num(h.data_bytes) +
               " bytes is not a whole number of blocks of the guest");
  }
  if (h.data_offset > kU64Max - h.data_bytes || h.map_offset != h.data_offset + h.data_bytes) {
    return bad("map offset " + num(h.map_offset) + " does not follow the data area [" +
               num(h.data_offset) + ", +" + num(h.data_bytes) + ")");
  }
  if (h.run_count == 0 || h.run_count > h.guest_size / h.block_size) {
    return bad("run count " + num(h.run_count) + " is impossible for " +
               num(h.guest_size / h.block_size) + " blocks");
  }
  if (h.run_count > (kU64Max - h.map_offset) / sizeof(MapRun)) {
    return bad("the map at " + num(h.map_offset) + " would end beyond 2^64");
  }
  const std::uint64_t map_end = h.map_offset + h.run_count * sizeof(MapRun);
  if (file_size < map_end) {
    const char* where = file_size < h.data_offset  ? "before the data area"
                        : file_size < h.map_offset ? "inside the data area"
                                                   : "inside the block map";
    return error(Errc::kSnapshotTruncated, "the file has " + num(file_size) + " bytes, it ends " +
                                               where + "; the header says " + num(map_end));
  }
  if (file_size > map_end) {
    return bad("the file has " + num(file_size - map_end) + " bytes after the block map");
  }
  return {};
}

// The data area and the map must be stored bytes, not holes of a sparse file: a hole reads as
// zeros the file never paid for, so a header could claim gigabytes of DATA in a file of a few
// kilobytes on disk and make a full verify read all of them. With no holes, what opening and
// verifying read is bounded by what the file really stores. One lseek, before anything is read.
Status SnapshotReader::check_stored() const {
  const FileHeader& h = header_;
  const std::uint64_t end = h.map_offset + h.run_count * sizeof(MapRun);
  const off_t hole = ::lseek(fd_, static_cast<off_t>(h.data_offset), SEEK_HOLE);
  if (hole < 0) {
    const int err = errno;
    // File systems without SEEK_HOLE support report the end of the file (no holes); EINVAL
    // here means the call itself is unsupported: nothing to learn, the size checks stand.
    if (err == EINVAL) return {};
    return make_error(Errc::kIoError, io::errno_message("lseek(SEEK_HOLE) " + path_, err), err);
  }
  if (static_cast<std::uint64_t>(hole) < end) {
    const char* where =
        static_cast<std::uint64_t>(hole) < h.map_offset ? "the data area" : "the block map";
    return error(Errc::kSnapshotTruncated,
                 "the file has a hole at offset " + num(static_cast<std::uint64_t>(hole)) +
                     ", inside " + where + ": the header says " + num(end) +
                     " bytes are stored, the file does not store them");
  }
  return {};
}

Status SnapshotReader::load_map() {
  const FileHeader& h = header_;
  runs_.resize(h.run_count);
  if (auto s = io::pread_exact(fd_, runs_.data(), runs_.size() * sizeof(MapRun),
                                        h.map_offset, "reading the block map of " + path_);
      !s.ok()) {
    return s;
  }
  auto bad = [this](const std::string& why) { return error(Errc::kSnapshotBadMap, why); };
  if (const std::uint64_t sum = compute_map_checksum(runs_); sum != h.map_checksum) {
    return bad("map checksum is " + hex64(sum) + ", the header says " + hex64(h.map_checksum));
  }
  const std::uint64_t bs = h.block_size;
  const std::uint64_t blocks = h.guest_size / bs;
  std::uint64_t next_block = 0;
  std::uint64_t next_data = 0;
  summary_ = SnapshotSummary{};
  for (std::size_t i = 0; i < runs_.size(); ++i) {
    const MapRun& r = runs_[i];
    const std::string what = "run " + num(i) + " (blocks " + num(r.first_block) + "+" +
                             num(r.block_count) + ", " + std::string(run_kind_name(r.kind)) + ")";
    if (r.first_block != next_block) {
      return bad(what + " should start at block " + num(next_block) +
                 ": runs are unsorted, overlap or leave a gap");
    }
    if (r.block_count == 0 || r.block_count > blocks - r.first_block) {
      return bad(what + " is empty or extends beyond the guest (" + num(blocks) + " blocks)");
    }
    if (r.reserved != 0) return bad(what + " has a non-zero reserved field");
    switch (r.kind) {
      case RunKind::kData:
        if (r.data_offset != next_data) {
          return bad(what + " has data at " + num(r.data_offset) + ", expected " + num(next_data) +
                     ": DATA must be packed in guest order");
        }
        if (r.block_count * bs > max_run_data_bytes(bs)) {
          return bad(what + " holds more than " + num(max_run_data_bytes(bs)) + " bytes");
        }
        next_data += r.block_count * bs;
        if (next_data > h.data_bytes) {
          return bad(what + " ends beyond the data area of " + num(h.data_bytes) + " bytes");
        }
        summary_.data_blocks += r.block_count;
        ++summary_.data_runs;
        break;
      case RunKind::kZero:
      case RunKind::kParent:
        if (r.data_offset != 0 || r.checksum != 0) {
          return bad(what + " has a data offset or checksum, which only DATA runs have");
        }
        if (r.kind == RunKind::kParent && is_base()) {
          return bad(what + " refers to a parent, but this is a base snapshot");
        }
        if (r.kind == RunKind::kZero) {
          summary_.zero_blocks += r.block_count;
          ++summary_.zero_runs;
        } else {
          summary_.parent_blocks += r.block_count;
          ++summary_.parent_runs;
        }
        break;
      default:
        return bad("run " + num(i) + " has unknown kind " +
                   num(static_cast<std::uint32_t>(r.kind)));
    }
    next_block += r.block_count;
  }
  if (next_block != blocks) {
    return bad("the map covers " + num(next_block) + " of " + num(blocks) + " blocks");
  }
  if (next_data != h.data_bytes) {
    return bad("DATA runs hold " + num(next_data) + " bytes, the data area has " +
               num(h.data_bytes));
  }
  return {};
}

std::optional<std::size_t> SnapshotReader::find_run(std::uint64_t block) const {
  if (block >= block_count()) return std::nullopt;
  auto it = std::upper_bound(runs_.begin(), runs_.end(), block,
                             [](std::uint64_t b, const MapRun& r) { return b < r.first_block; });
  return static_cast<std::size_t>(it - runs_.begin()) - 1;
}

Status SnapshotReader::read(std::uint64_t guest_offset, std::uint64_t length, void* dst) const {
  if (length == 0) return {};
  if (guest_offset > guest_size() || length > guest_size() - guest_offset) {
    return error(Errc::kInvalidArgument, "read [" + num(guest_offset) + ", +" + num(length) +
                                             ") is outside the guest of " + num(guest_size()) +
                                             " bytes");
  }
  const std::uint64_t bs = block_size();
  auto* out = static_cast<std::uint8_t*>(dst);
  std::uint64_t pos = guest_offset;
  const std::uint64_t end = guest_offset + length;
  std::size_t i = *find_run(pos / bs);
  while (pos < end) {
    const MapRun& first = runs_[i];
    std::uint64_t run_end = (first.first_block + first.block_count) * bs;
    if (first.kind == RunKind::kParent) {
      return error(Errc::kSnapshotChainMismatch,
                   "guest offset " + num(pos) + " (block " + num(pos / bs) +
                       ") is inherited from the parent snapshot; read it through SnapshotChain");
    }
    if (first.kind == RunKind::kZero) {
      const std::uint64_t stop = std::min(end, run_end);
      std::memset(out, 0, stop - pos);
      out += stop - pos;
      pos = stop;
      ++i;
      continue;
    }
    // Neighbouring DATA runs are neighbours in the data area too: one pread serves them all.
    while (run_end < end && runs_[i + 1].kind == RunKind::kData) {
      ++i;
      run_end += runs_[i].block_count * bs;
    }
    const std::uint64_t stop = std::min(end, run_end);
    const std::uint64_t file_pos =
        header_.data_offset + first.data_offset + (pos - first.first_block * bs);
    if (auto s = io::pread_exact(fd_, out, stop - pos, file_pos, "reading " + path_);
        !s.ok()) {
      return s;
    }
    out += stop - pos;
    pos = stop;
    ++i;
  }
  return {};
}

Status SnapshotReader::verify_run_with(std::size_t index, std::vector<std::uint8_t>& buffer) const {
  if (index >= runs_.size()) {
    return error(Errc::kInvalidArgument,
                 "no run " + num(index) + " (the map has " + num(runs_.size()) + ")");
  }
  const MapRun& r = runs_[index];
  if (r.kind != RunKind::kData) return {};
  const std::uint64_t bytes = r.block_count * block_size();
  if (buffer.size() < bytes) buffer.resize(bytes);
  if (auto s = io::pread_exact(fd_, buffer.data(), bytes,
                                        header_.data_offset + r.data_offset, "reading " + path_);
      !s.ok()) {
    return s;
  }
  if (const std::uint64_t sum = XXH3_64bits(buffer.data(), bytes); sum != r.checksum) {
    return error(Errc::kSnapshotChecksumMismatch,
                 "data of the run at guest offset " + num(r.first_block * block_size()) + " (" +
                     num(bytes) + " bytes) has checksum " + hex64(sum) + ", the map says " +
                     hex64(r.checksum));
  }
  return {};
}

Status SnapshotReader::verify_run(std::size_t index) const {
  std::vector<std::uint8_t> buffer;
  return verify_run_with(index, buffer);
}

Status SnapshotReader::verify_data() const {
  std::vector<std::uint8_t> buffer;
  for (std::size_t i = 0; i < runs_.size(); ++i) {
    if (auto s = verify_run_with(i, buffer); !s.ok()) return s;
  }
  return {};
}

}  // namespace memsnap
