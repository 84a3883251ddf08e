// SnapshotChain: a base snapshot and the diffs taken on top of it, read as one guest image.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/snapshot/snapshot_format.h"
#include "core/snapshot/snapshot_reader.h"

namespace memsnap {

// Where one guest block of a chain comes from.
struct BlockSource {
  std::size_t layer = 0;          // index into the chain, 0 = base
  RunKind kind = RunKind::kZero;  // kData or kZero, never kParent
  std::size_t run = 0;            // index into layer(layer).runs()
};

// A stretch of guest blocks that one layer provides, as DATA or ZERO.
struct ChainExtent {
  std::uint64_t first_block = 0;
  std::uint64_t block_count = 0;
  RunKind kind = RunKind::kZero;  // kData or kZero
  std::size_t layer = 0;
  std::uint64_t file_offset = 0;  // kData: where first_block's bytes are in the layer's file
};

// Owns one SnapshotReader per layer. Immutable after open(); const methods may be called from
// several threads at once. Movable, not copyable.
class SnapshotChain {
 public:
  // Opens every file (base first, newest last) with `verify` and checks that they form one
  // chain: the first is a base (all-zero parent id), each later one names the previous as its
  // parent, generations strictly increase, and all have the same block size and guest size.
  // kInvalidArgument for an empty list; kSnapshotChainMismatch when the files do not form a
  // chain; any SnapshotReader::open() error of a layer.
  static Result<SnapshotChain> open(std::vector<std::string> paths_base_to_newest,
                                    Verify verify = Verify::kFull,
                                    const ReaderLimits& limits = {});

  std::size_t size() const { return layers_.size(); }
  const SnapshotReader& layer(std::size_t index) const { return *layers_[index]; }
  const SnapshotReader& newest() const { return *layers_.back(); }
  std::uint64_t block_size() const { return layers_.front()->block_size(); }
  std::uint64_t guest_size() const { return layers_.front()->guest_size(); }

  // Copies guest bytes [guest_offset, guest_offset+length) into dst, each block from the newest
  // layer that holds it as DATA or ZERO. Works a run at a time; neighbouring DATA runs of one
  // layer are read with one pread. kInvalidArgument outside the guest; read errors of layers.
  Status read(std::uint64_t guest_offset, std::uint64_t length, void* dst) const;

  // The whole guest resolved: sorted extents covering every block exactly once, each from the
  // newest layer that holds it (neighbouring ZERO extents merged).
  std::vector<ChainExtent> flatten() const;

  // Which layer and run provide `block`. kInvalidArgument beyond the guest.
  Result<BlockSource> resolve(std::uint64_t block) const;

 private:
  explicit SnapshotChain(std::vector<std::unique_ptr<SnapshotReader>> layers)
      : layers_(std::move(layers)) {}
  void flatten_range(std::size_t layer, std::uint64_t begin, std::uint64_t end,
                     std::vector<ChainExtent>& out) const;
  Status read_layer(std::size_t layer, std::uint64_t begin, std::uint64_t end,
                    std::uint8_t* dst) const;

  std::vector<std::unique_ptr<SnapshotReader>> layers_;
};

}  // namespace memsnap
