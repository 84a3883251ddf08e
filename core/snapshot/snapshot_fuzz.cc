// libFuzzer target: snapshot files (header and block map, then the data they point at) through
// SnapshotReader::open and SnapshotChain::open, and, when a file opens, reads of its guest.
// Whatever the bytes, opening must fail cleanly or give a reader whose map covers the guest, and
// no read may go past what the file holds (ASan watches every buffer).
//
// Input: [control byte] [file bytes...]
//   bit 0  fix the checksums up before opening (every DATA run's, the map's, then the header's),
//          so that the fuzzer gets past them to the map and data validation
//   bit 1  two files, a chain: two little-endian bytes give the first (base) file's length, the
//          rest is the second
//   bit 2  open with Verify::kHeaderAndMap instead of Verify::kFull
//   bit 3  raw: the file is exactly the bytes. Otherwise compact: the first 128 bytes are the
//          header, then its origin record (header_size - 128 bytes, when header_size is below
//          4096), the writer's zero padding up to 4096 is inserted, then the rest follows (the
//          data area and the map), so inputs stay small.
// Files live in a directory on tmpfs (/dev/shm when it exists): nothing is written to disk. (Not
// memfds through /proc/self/fd: the reader never follows a symlink, and those are magic links.)
#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/snapshot/snapshot_chain.h"
#include "core/snapshot/snapshot_format.h"
#include "core/snapshot/snapshot_reader.h"

namespace {

using memsnap::FileHeader;
using memsnap::MapRun;
using memsnap::RunKind;
using Bytes = std::vector<std::uint8_t>;

void check(bool ok) {
  if (!ok) std::abort();
}

Bytes expand(const std::uint8_t* data, std::size_t size, bool raw) {
  if (raw || size < sizeof(FileHeader)) return Bytes(data, data + size);
  FileHeader h;
  std::memcpy(&h, data, sizeof(h));
  std::size_t head = sizeof(FileHeader);  // header and origin record, as the input gives them
  if (h.header_size > sizeof(FileHeader) && h.header_size < memsnap::kSnapshotDataOffset) {
    head = std::min<std::size_t>(h.header_size, size);
  }
  Bytes file(memsnap::kSnapshotDataOffset, 0);
  std::memcpy(file.data(), data, head);
  file.insert(file.end(), data + head, data + size);
  return file;
}

// Recomputes what a writer would have: each DATA run's checksum (when its bytes are in the
// file), the map checksum and the header checksum. Leaves everything else as the fuzzer made it.
void fix_checksums(Bytes& file) {
  if (file.size() < sizeof(FileHeader)) return;
  FileHeader h;
  std::memcpy(&h, file.data(), sizeof(h));
  const std::uint64_t size = file.size();
  if (h.map_offset <= size && h.run_count <= (size - h.map_offset) / sizeof(MapRun)) {
    for (std::uint64_t i = 0; i < h.run_count; ++i) {
      const std::uint64_t at = h.map_offset + i * sizeof(MapRun);
      MapRun r;
      std::memcpy(&r, file.data() + at, sizeof(r));
      if (r.kind == RunKind::kData && memsnap::is_valid_block_size(h.block_size) &&
          r.block_count <= (std::uint64_t{1} << 20) / h.block_size + 1) {
        const std::uint64_t bytes = r.block_count * h.block_size;
        if (h.data_offset <= size && r.data_offset <= size - h.data_offset &&
            bytes <= size - h.data_offset - r.data_offset) {
          r.checksum = XXH3_64bits(file.data() + h.data_offset + r.data_offset, bytes);
          std::memcpy(file.data() + at, &r, sizeof(r));
        }
      }
    }
    h.map_checksum = XXH3_64bits(file.data() + h.map_offset, h.run_count * sizeof(MapRun));
  }
  std::string origin;
  if (h.header_size > sizeof(FileHeader) && h.header_size <= size) {
    origin.assign(file.begin() + sizeof(FileHeader), file.begin() + h.header_size);
  }
  h.header_checksum = memsnap::compute_header_checksum(h, origin);
  std::memcpy(file.data(), &h, sizeof(h));
}

// This process's directory for the files, made once and removed at exit (kept alive for that).
const std::string& file_dir() {
  static const std::string* dir = [] {
    auto* d = new std::string(std::string(::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp") +
                              "/snapshot-fuzz-XXXXXX");
    check(::mkdtemp(d->data()) != nullptr);
    std::atexit([] { ::rmdir(file_dir().c_str()); });
    return d;
  }();
  return *dir;
}

// A file holding bytes, removed with the object.
struct MemFile {
  std::string path;
  explicit MemFile(const Bytes& bytes) {
    static std::uint64_t counter = 0;
    path = file_dir() + "/" + std::to_string(counter++) + ".snap";
    const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
    check(fd >= 0);
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
      check(n > 0);
      done += static_cast<std::size_t>(n);
    }
    ::close(fd);
  }
  ~MemFile() { ::unlink(path.c_str()); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
};

constexpr std::uint64_t kReadCap = 1 << 20;

// Reads a few ranges of the guest through read_fn (at most kReadCap bytes each).
template <typename ReadFn>
void read_some(std::uint64_t guest_size, std::uint64_t block_size, ReadFn read_fn) {
  Bytes buf;
  const std::uint64_t whole = std::min(guest_size, kReadCap);
  const std::uint64_t starts[] = {0, guest_size / 2, guest_size - std::min(guest_size, block_size),
                                  block_size - 1};
  for (std::uint64_t start : starts) {
    if (start >= guest_size) continue;
    const std::uint64_t len = std::min(whole, guest_size - start);
    buf.assign(len, 0xAA);
    (void)read_fn(start, len, buf.data());
  }
  // Outside the guest: must be refused, not read.
  buf.assign(16, 0);
  check(!read_fn(guest_size, 1, buf.data()).ok());
  check(!read_fn(guest_size - 1, std::numeric_limits<std::uint64_t>::max(), buf.data()).ok());
}

void exercise(const memsnap::SnapshotReader& r) {
  const std::uint64_t blocks = r.block_count();
  check(blocks > 0);
  // The origin record was parsed whole: written back, it is exactly the header's bytes after the
  // FileHeader.
  check(r.origin().serialize().size() == r.header().header_size - sizeof(FileHeader));
  const auto& s = r.summary();
  check(s.data_blocks + s.zero_blocks + s.parent_blocks == blocks);
  check(s.data_runs + s.zero_runs + s.parent_runs == r.runs().size());
  std::uint64_t next = 0;
  for (const MapRun& run : r.runs()) {
    check(run.first_block == next);
    next += run.block_count;
  }
  check(next == blocks);
  for (std::uint64_t b : {std::uint64_t{0}, blocks / 2, blocks - 1}) {
    const auto i = r.find_run(b);
    check(i.has_value() && *i < r.runs().size());
    const MapRun& run = r.runs()[*i];
    check(run.first_block <= b && b - run.first_block < run.block_count);
  }
  check(!r.find_run(blocks).has_value());
  (void)r.verify_data();
  read_some(r.guest_size(), r.block_size(),
            [&](std::uint64_t o, std::uint64_t l, void* d) { return r.read(o, l, d); });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1 || size > 1 << 20) return 0;
  const std::uint8_t control = data[0];
  const bool fix = (control & 1) != 0;
  const bool chain = (control & 2) != 0;
  const auto verify = (control & 4) != 0 ? memsnap::Verify::kHeaderAndMap : memsnap::Verify::kFull;
  const bool raw = (control & 8) != 0;
  ++data;
  --size;

  std::vector<Bytes> files;
  if (chain) {
    if (size < 2) return 0;
    const std::size_t first = std::min<std::size_t>(data[0] | (std::size_t{data[1]} << 8), size - 2);
    files.push_back(expand(data + 2, first, raw));
    files.push_back(expand(data + 2 + first, size - 2 - first, raw));
  } else {
    files.push_back(expand(data, size, raw));
  }
  if (fix) {
    for (Bytes& f : files) fix_checksums(f);
  }

  std::vector<std::unique_ptr<MemFile>> mem;
  std::vector<std::string> paths;
  for (const Bytes& f : files) {
    mem.push_back(std::make_unique<MemFile>(f));
    paths.push_back(mem.back()->path);
  }

  for (const std::string& p : paths) {
    auto reader = memsnap::SnapshotReader::open(p, verify);
    if (!reader.ok()) {
      check(!reader.error().message.empty());
      continue;
    }
    exercise(*reader.value());
  }

  auto opened = memsnap::SnapshotChain::open(paths, verify);
  if (!opened.ok()) return 0;
  const memsnap::SnapshotChain& c = opened.value();
  check(c.size() == paths.size());
  const std::uint64_t blocks = c.guest_size() / c.block_size();
  std::uint64_t next = 0;
  for (const auto& e : c.flatten()) {
    check(e.first_block == next && e.block_count > 0 && e.layer < c.size());
    check(e.kind == RunKind::kData || e.kind == RunKind::kZero);
    next += e.block_count;
  }
  check(next == blocks);
  for (std::uint64_t b : {std::uint64_t{0}, blocks / 2, blocks - 1}) {
    auto src = c.resolve(b);
    check(src.ok() && src.value().layer < c.size() && src.value().kind != RunKind::kParent);
  }
  check(!c.resolve(blocks).ok());
  read_some(c.guest_size(), c.block_size(),
            [&](std::uint64_t o, std::uint64_t l, void* d) { return c.read(o, l, d); });
  return 0;
}
