// Shared by the memfd and hole_punch strategies: the memfd exporter (MemfdExporter), its options
// and their parsing (apply_memfd_option), and the hook hole_punch uses to act after each written
// chunk. A static library linked into both plugins' modules, so neither plugin depends on the
// other; like the plugins, it sees only plugin_api.
//
// The exporter reads guest memory from the memfd that backs it (guest offset == file offset),
// either with pread(2) into a bounded buffer, or through bounded read-only MAP_SHARED
// windows handed straight to the sink.
//
// Exporting never populates a sparse memfd. Requested ranges of 256 KiB or more are first split
// into data and holes (SEEK_DATA / SEEK_HOLE, rounded to whole blocks): holes are not read but go
// to the sink as zeros from a static zero buffer (a read fault on a shmem hole through a shared
// mapping would allocate a page). Shorter ranges -- a scattered diff has tens of thousands --
// are read with pread by either method, holes and all: pread returns zeros for a hole without
// allocating it, and finding holes costs more than that read (SEEK_HOLE walks every page of the
// data extent it lands in). A range past the end of the file is kShortRead; the file is never
// mapped or read past its end.
//
// Options (integers are decimal):
//   read_method   pread | mmap; default pread. On the project's paravirtualized machines pread
//                 exports 1 GiB in a third of mmap's time even with populate (docs/performance.md,
//                 "Export at the machine's limit"); a memfd shrunk under it is kShortRead, not
//                 SIGBUS. Where page tables are cheap, mmap is the one-copy export: compare
//                 memsnap-bench's BM_MemfdToFile/4 with /3 on the host to choose.
//   populate      true | false; default true. With mmap, each data extent of a window gets its
//                 page tables filled in one MADV_POPULATE_READ (0.21 us a page here) instead of
//                 a fault a page (2.3 us); a memfd shrunk under it is then kShortRead too.
//   window_bytes  mmap window, a multiple of 2 MiB in [2 MiB, 1 GiB]; default 64 MiB
//   buffer_bytes  pread buffer (with mmap: for the short ranges), a multiple of 4096 in
//                 [4096, 1 GiB] and at least the block size; default 4 MiB
//
// Stats: bytes_read counts the bytes handed to the sink that were read (not the holes of long
// ranges; holes inside short ranges count); read_calls counts pread calls and, for the mmap
// method, mmap calls; partial_reads short preads that were continued.
//
// Errors: kUnsupported without a memfd; kInvalidArgument for a malformed request; kShortRead for
// a range past EOF; kSinkError when the sink refuses a write; kIoError for a failed system call.
// Memory use: one window (address space only) and/or one buffer, plus a bounded chunk list.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>

#include "plugins/plugin_api/plugin_api.h"

namespace memsnap::plugins {

enum class MemfdReadMethod { kMmap, kPread };

struct MemfdOptions {
  MemfdReadMethod read_method = MemfdReadMethod::kPread;
  std::uint64_t window_bytes = 64u << 20;
  std::uint64_t buffer_bytes = 4u << 20;
  bool populate = true;
};

// Applies one option to *options. Returns kOk if the key is a memfd option with a good value,
// kInvalidArgument for a bad value, and kUnsupported (nothing changed) for a key it does not know,
// so that strategies built on the exporter can add their own keys.
plugin::Status apply_memfd_option(const plugin::Option& option, MemfdOptions* options) noexcept;

// Told by MemfdExporter after each chunk of exported data.
class ChunkHook {
 public:
  // pieces: the extents of the chunk that were read, in whole blocks (a block partly hole counts
  // as data; the holes of ranges of 256 KiB or more are in no piece, those of shorter ranges are
  // read as zeros and may be), ascending and merged. Every byte of them
  // was handed to the sink in write() calls that returned Ok, and none of them is mapped by the
  // exporter any more. A non-Ok return stops the export with that status.
  virtual plugin::Status after_chunk(const plugin::ByteRange* pieces,
                                     std::size_t count) noexcept = 0;

 protected:
  ~ChunkHook() = default;
};

// Walks the requested ranges of a memfd and hands them to a sink. Not thread-safe; holds no
// state between runs besides its options.
class MemfdExporter {
 public:
  explicit MemfdExporter(const MemfdOptions& options) noexcept : options_(options) {}

  // Exports request.ranges from request.memfd into sink, adding to stats. With a hook, the data
  // extents are cut into chunks of chunk_bytes (a multiple of request.block_size) and
  // hook->after_chunk() runs after each chunk is written, and once more for the last, partial
  // one. The file position of request.memfd is changed (lseek SEEK_DATA / SEEK_HOLE).
  plugin::Status run(const plugin::ExportRequest& request, plugin::BlockSink& sink,
                     plugin::ExportStats& stats, ChunkHook* hook = nullptr,
                     std::uint64_t chunk_bytes = 0) const noexcept;

  const MemfdOptions& options() const noexcept { return options_; }

  // Same contract as pread(2): bytes read, 0 at EOF, or -1 with errno set.
  using PreadFn = ssize_t (*)(void* context, int fd, void* buffer, std::size_t count, off_t offset);

  // Replaces pread(2), e.g. to inject short reads or EINTR. context is passed back to fn and
  // must outlive the exporter's runs. nullptr restores the real call.
  void set_pread_for_test(PreadFn fn, void* context) noexcept;

 private:
  static ssize_t real_pread(void* context, int fd, void* buffer, std::size_t count, off_t offset);

  MemfdOptions options_;
  PreadFn pread_ = &MemfdExporter::real_pread;
  void* pread_context_ = nullptr;
};

}  // namespace memsnap::plugins
