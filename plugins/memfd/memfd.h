// The memfd strategy: reads guest memory from the memfd that backs it (guest offset == file
// offset) with the shared memfd exporter, plugins/memfd_io/memfd_exporter.h, which documents the
// read methods, the handling of holes, the options, stats and errors.
#pragma once

#include <cstddef>

#include "plugins/memfd_io/memfd_exporter.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap::plugins {

// Not thread-safe: one export at a time (the ABI never calls it concurrently).
class MemfdStrategy final : public plugin::Strategy {
 public:
  explicit MemfdStrategy(const MemfdOptions& options) noexcept : exporter_(options) {}
  plugin::Status export_ranges(const plugin::ExportRequest& request, plugin::BlockSink& sink,
                               plugin::ExportStats& stats) noexcept override;
  const MemfdOptions& options() const noexcept { return exporter_.options(); }

 private:
  MemfdExporter exporter_;
};

// The factory: parses options and on success stores a new MemfdStrategy in *out (owned by the
// caller). Unknown keys and bad values are kInvalidArgument.
plugin::Status create_memfd(plugin::Strategy** out, const plugin::Option* options,
                            std::size_t count) noexcept;

}  // namespace memsnap::plugins
