#include "plugins/memfd/memfd.h"

#include <cerrno>
#include <new>

namespace memsnap::plugins {
namespace {

using plugin::Status;
using plugin::StatusCode;

}  // namespace

plugin::Status MemfdStrategy::export_ranges(const plugin::ExportRequest& request,
                                            plugin::BlockSink& sink,
                                            plugin::ExportStats& stats) noexcept {
  return exporter_.run(request, sink, stats);
}

plugin::Status create_memfd(plugin::Strategy** out, const plugin::Option* options,
                            std::size_t count) noexcept {
  if (out == nullptr || (count != 0 && options == nullptr)) {
    return Status::Error(StatusCode::kInvalidArgument, 0, "memfd: null argument");
  }
  MemfdOptions parsed;
  for (std::size_t i = 0; i < count; ++i) {
    Status s = apply_memfd_option(options[i], &parsed);
    if (!s.ok()) {
      s.code = StatusCode::kInvalidArgument;
      return s;
    }
  }
  auto* strategy = new (std::nothrow) MemfdStrategy(parsed);
  if (strategy == nullptr)
    return Status::Error(StatusCode::kNoMemory, ENOMEM, "memfd: out of memory");
  *out = strategy;
  return Status::Ok();
}

}  // namespace memsnap::plugins
