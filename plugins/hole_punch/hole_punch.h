// The hole_punch strategy (experimental): exports like the memfd strategy, and after each chunk
// of data is written makes it durable (BlockSink::make_durable) and only then frees it from the
// memfd with fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE), reporting each freed extent
// through BlockSink::released. Nothing that was not written and made durable is ever punched: on
// any error the export stops at once. (A hole inside a requested range shorter than 256 KiB is
// read as zeros, written, and "punched" and reported like data: a no-op on the memfd.)
//
// Each punched extent costs one fallocate: 0.9 us a page in the default 2 MiB runs of a full
// export, more in 16 or 64 MiB runs (1.2, 1.7 us), 10 us for a single page (2026-12-07, quiet
// run, docs/performance.md). Extents of a diff cannot be merged across the pages that were not
// written (the parent's bytes, still only in the memfd and the parent snapshot): on a scattered
// diff the punching costs more than the export itself.
//
// Options: those of the memfd strategy (read_method, window_bytes, buffer_bytes; see
// plugins/memfd_io/memfd_exporter.h), plus
//   chunk_bytes   data bytes per make_durable + punch, a multiple of 4096 in [4096, 1 GiB] and
//                 of the request's block size (else the export is kInvalidArgument); default 2 MiB
//
// Stats: as memfd, plus bytes_released = the drop of the memfd's allocated size (st_blocks) over
// the export, so punching what was already a hole counts nothing.
// Errors: as memfd; kSinkError if make_durable fails; kIoError if a punch fails.
#pragma once

#include <cstddef>
#include <cstdint>

#include "plugins/memfd_io/memfd_exporter.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap::plugins {

struct HolePunchOptions {
  MemfdOptions memfd;
  std::uint64_t chunk_bytes = 2u << 20;
};

// Not thread-safe: one export at a time (the ABI never calls it concurrently).
class HolePunchStrategy final : public plugin::Strategy {
 public:
  explicit HolePunchStrategy(const HolePunchOptions& options) noexcept
      : options_(options), exporter_(options.memfd) {}
  plugin::Status export_ranges(const plugin::ExportRequest& request, plugin::BlockSink& sink,
                               plugin::ExportStats& stats) noexcept override;
  const HolePunchOptions& options() const noexcept { return options_; }

 private:
  HolePunchOptions options_;
  MemfdExporter exporter_;
};

// The factory: parses options and on success stores a new HolePunchStrategy in *out (owned by the
// caller). Unknown keys and bad values are kInvalidArgument.
plugin::Status create_hole_punch(plugin::Strategy** out, const plugin::Option* options,
                                 std::size_t count) noexcept;

}  // namespace memsnap::plugins
