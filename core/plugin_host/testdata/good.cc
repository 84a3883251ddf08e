// A working plugin that counts its live strategies in an exported global, so a test can watch
// construction and destruction through dlsym. Built twice: as fixture_good and, with another
// FIXTURE_VERSION, as fixture_good_dup (same name, for the duplicate-name test).
#include <atomic>
#include <cstdint>
#include <cstring>

#include "plugins/plugin_api/plugin_api.h"

#ifndef FIXTURE_VERSION
#define FIXTURE_VERSION "1.0.0"
#endif

extern "C" {
__attribute__((visibility("default"))) std::atomic<int> memsnap_fixture_live_strategies{0};
}

namespace {

using namespace memsnap::plugin;

constexpr std::uint64_t kBlock = 4096;
const unsigned char kZeros[kBlock] = {};

// Exports every requested block as zeros.
class CountingStrategy final : public Strategy {
 public:
  CountingStrategy() { ++memsnap_fixture_live_strategies; }
  ~CountingStrategy() override { --memsnap_fixture_live_strategies; }

  Status export_ranges(const ExportRequest& request, BlockSink& sink,
                       ExportStats& stats) noexcept override {
    if (request.range_count != 0 && request.block_size != kBlock) {
      return Status::Error(StatusCode::kUnsupported, 0, "fixture only handles 4 KiB blocks");
    }
    for (std::size_t i = 0; i < request.range_count; ++i) {
      const ByteRange& r = request.ranges[i];
      for (std::uint64_t off = r.offset; off < r.offset + r.length; off += kBlock) {
        const Chunk chunk{off, kZeros, kBlock};
        Status s = sink.write(&chunk, 1);
        if (!s.ok()) return s;
        stats.bytes_read += kBlock;
        ++stats.read_calls;
      }
    }
    return Status::Ok();
  }
};

Status create(Strategy** out, const Option* options, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) {
    if (std::strcmp(options[i].key, "tag") != 0) {
      return Status::Error(StatusCode::kInvalidArgument, 0, "unknown option '%s'='%s'",
                           options[i].key, options[i].value);
    }
  }
  *out = new CountingStrategy();
  return Status::Ok();
}

}  // namespace

MEMSNAP_PLUGIN("fixture_good", FIXTURE_VERSION, kCapNeedsPid | kCapExperimental,
               "test fixture that exports zeros", create)
