#include "core/snapshot/snapshot_chain.h"

#include <algorithm>

namespace memsnap {
namespace {

Error mismatch(const std::string& message) {
  return make_error(Errc::kSnapshotChainMismatch, "snapshot chain: " + message);
}

}  // namespace

Result<SnapshotChain> SnapshotChain::open(std::vector<std::string> paths_base_to_newest,
                                          Verify verify, const ReaderLimits& limits) {
  if (paths_base_to_newest.empty()) {
    return make_error(Errc::kInvalidArgument, "snapshot chain: no snapshot files given");
  }
  std::vector<std::unique_ptr<SnapshotReader>> layers;
  layers.reserve(paths_base_to_newest.size());
  for (const std::string& path : paths_base_to_newest) {
    MEMSNAP_ASSIGN_OR_RETURN(auto reader, SnapshotReader::open(path, verify, limits));
    const FileHeader& h = reader->header();
    if (layers.empty()) {
      if (!is_zero_id(h.parent_id)) {
        return mismatch(path + " is a diff on top of " + to_hex(h.parent_id) +
                        ", but the first file of a chain must be a base snapshot");
      }
    } else {
      const SnapshotReader& prev = *layers.back();
      const FileHeader& p = prev.header();
      if (h.parent_id != p.snapshot_id) {
        return mismatch(
            path + " (" + to_hex(h.snapshot_id) + ") has parent " +
            (is_zero_id(h.parent_id) ? std::string("none (it is a base)") : to_hex(h.parent_id)) +
            ", but the file before it, " + prev.path() + ", is " + to_hex(p.snapshot_id) +
            " (wrong parent or wrong order)");
      }
      if (h.generation <= p.generation) {
        return mismatch(path + " has generation " + std::to_string(h.generation) +
                        ", not greater than its parent's " + std::to_string(p.generation));
      }
      if (h.block_size != p.block_size || h.guest_size != p.guest_size) {
        return mismatch(path + " has block size " + std::to_string(h.block_size) +
                        " and guest size " + std::to_string(h.guest_size) + ", its parent " +
                        prev.path() + " has " + std::to_string(p.block_size) + " and " +
                        std::to_string(p.guest_size));
      }
    }
    layers.push_back(std::move(reader));
  }
  return SnapshotChain(std::move(layers));
}

Status SnapshotChain::read(std::uint64_t guest_offset, std::uint64_t length, void* dst) const {
  if (length == 0) return {};
  if (guest_offset > guest_size() || length > guest_size() - guest_offset) {
    return make_error(Errc::kInvalidArgument,
                      "snapshot chain: read [" + std::to_string(guest_offset) + ", +" +
                          std::to_string(length) + ") is outside the guest of " +
                          std::to_string(guest_size()) + " bytes");
  }
  return read_layer(layers_.size() - 1, guest_offset, guest_offset + length,
                    static_cast<std::uint8_t*>(dst));
}

// Serves [begin, end) from `layer`: spans of DATA/ZERO runs in one read each, PARENT spans from
// the layers below.
Status SnapshotChain::read_layer(std::size_t layer, std::uint64_t begin, std::uint64_t end,
                                 std::uint8_t* dst) const {
  const SnapshotReader& reader = *layers_[layer];
  const auto runs = reader.runs();
  const std::uint64_t bs = reader.block_size();
  std::size_t i = *reader.find_run(begin / bs);
  std::uint64_t pos = begin;
  while (pos < end) {
    const bool parent = runs[i].kind == RunKind::kParent;
    std::uint64_t stop = (runs[i].first_block + runs[i].block_count) * bs;
    while (stop < end && (runs[i + 1].kind == RunKind::kParent) == parent) {
      ++i;
      stop += runs[i].block_count * bs;
    }
    stop = std::min(stop, end);
    Status s;
    if (!parent) {
      s = reader.read(pos, stop - pos, dst + (pos - begin));
    } else if (layer == 0) {
      s = make_error(Errc::kInternal, "snapshot chain: the base refers to a parent");
    } else {
      s = read_layer(layer - 1, pos, stop, dst + (pos - begin));
    }
    if (!s.ok()) return s;
    pos = stop;
    ++i;
  }
  return {};
}

Result<BlockSource> SnapshotChain::resolve(std::uint64_t block) const {
  if (block >= guest_size() / block_size()) {
    return make_error(Errc::kInvalidArgument,
                      "snapshot chain: block " + std::to_string(block) + " is beyond the guest");
  }
  for (std::size_t layer = layers_.size(); layer-- > 0;) {
    const std::size_t run = *layers_[layer]->find_run(block);
    const RunKind kind = layers_[layer]->runs()[run].kind;
    if (kind != RunKind::kParent) return BlockSource{layer, kind, run};
  }
  return make_error(Errc::kInternal,
                    "snapshot chain: block " + std::to_string(block) + " resolves to no layer");
}

std::vector<ChainExtent> SnapshotChain::flatten() const {
  std::vector<ChainExtent> out;
  flatten_range(layers_.size() - 1, 0, guest_size() / block_size(), out);
  return out;
}

// Appends the extents of guest blocks [begin, end) as `layer` resolves them, descending into
// older layers for PARENT runs (a base snapshot has none, so the recursion ends there).
void SnapshotChain::flatten_range(std::size_t layer, std::uint64_t begin, std::uint64_t end,
                                  std::vector<ChainExtent>& out) const {
  const SnapshotReader& r = *layers_[layer];
  const auto runs = r.runs();
  const std::uint64_t bs = r.block_size();
  for (std::size_t i = *r.find_run(begin); begin < end && i < runs.size(); ++i) {
    const MapRun& run = runs[i];
    const std::uint64_t s = std::max(begin, run.first_block);
    const std::uint64_t e = std::min(end, run.first_block + run.block_count);
    if (run.kind == RunKind::kParent) {
      flatten_range(layer - 1, s, e, out);
    } else if (run.kind == RunKind::kZero && !out.empty() && out.back().kind == RunKind::kZero &&
               out.back().first_block + out.back().block_count == s) {
      out.back().block_count += e - s;
    } else {
      ChainExtent x;
      x.first_block = s;
      x.block_count = e - s;
      x.kind = run.kind;
      x.layer = layer;
      if (run.kind == RunKind::kData) {
        x.file_offset = r.header().data_offset + run.data_offset + (s - run.first_block) * bs;
      }
      out.push_back(x);
    }
    begin = e;
  }
}

}  // namespace memsnap
