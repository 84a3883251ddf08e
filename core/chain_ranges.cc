#include "core/chain_ranges.h"

#include <algorithm>

#include "core/snapshot/snapshot_reader.h"

namespace memsnap {

Result<std::vector<plugin::ByteRange>> ranges_recorded_in(const std::vector<std::string>& paths) {
  std::vector<plugin::ByteRange> out;
  for (const std::string& path : paths) {
    MEMSNAP_ASSIGN_OR_RETURN(auto reader, SnapshotReader::open(path, Verify::kHeaderAndMap));
    const std::uint64_t block = reader->block_size();
    for (const MapRun& run : reader->runs()) {
      if (run.kind == RunKind::kParent) continue;
      out.push_back({run.first_block * block, run.block_count * block});
    }
  }
  std::sort(out.begin(), out.end(),
            [](const plugin::ByteRange& a, const plugin::ByteRange& b) { return a.offset < b.offset; });
  std::vector<plugin::ByteRange> merged;
  for (const auto& r : out) {
    if (!merged.empty() && r.offset <= merged.back().offset + merged.back().length) {
      merged.back().length =
          std::max(merged.back().offset + merged.back().length, r.offset + r.length) -
          merged.back().offset;
    } else {
      merged.push_back(r);
    }
  }
  return merged;
}

}  // namespace memsnap
