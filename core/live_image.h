// The pause-instant image of a live export (pause mode "live", docs/resume.md "Live pauses").
//
// A live pause stops the VMM only to write-protect the blocks it will export (its dirty set),
// then lets the guest run while the strategy exports them. A block the guest writes during the
// export reaches the fault server first as a synchronous write-protect fault; before the server
// makes the page writable again, it copies the block out of the guest's memfd into this image
// (copy-before-write). The export reads the memfd, and every block it hands to the snapshot is
// then patched from the image where the image has it: a block read after the guest's write
// went through was preserved before that write, so the snapshot holds the memory as it was at
// the pause, whenever the export read each block.
//
// Ordering: preserve() copies, then publishes the block (release); the fault server makes the
// page writable only after preserve() returns. patch() is called after the bytes were read, and
// loads each block's mark (acquire) after an acquire fence: a read that saw a write made after the
// pause sees that block's mark. Preserved copies live in a memfd of their own (copy_file_range,
// no page tables touched), at most the dirty set's size.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "core/base/file_io.h"
#include "core/base/result.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap {

class LiveImage {
 public:
  // memfd: the guest's memory (guest offset == file offset), borrowed only for this call (it is
  // reopened read-only). ranges: what the export writes (block-aligned, sorted, disjoint).
  static Result<std::shared_ptr<LiveImage>> create(int memfd, std::uint64_t guest_size,
                                                   std::uint64_t block_size,
                                                   std::vector<plugin::ByteRange> ranges);
  LiveImage(const LiveImage&) = delete;
  LiveImage& operator=(const LiveImage&) = delete;

  // The fault thread, before a page of guest block `block` may change (a write-protect fault, or
  // a fault that installs it): copies the block out if the export still needs it. Idempotent;
  // does nothing once the export is over (close()) or outside the ranges. Fails only when the
  // copy fails; the image is then broken (the caller lets the write through anyway: the guest
  // must not hang) and the pause fails.
  Status preserve(std::uint64_t block);
  // A discard of [offset, offset + length) reached the fault server: content the export still
  // needs may already be gone, so the image is broken unless every block there was preserved.
  void discarded(std::uint64_t offset, std::uint64_t length);

  // The export, after reading [guest_offset, guest_offset + length) into buf: puts the
  // preserved blocks back. Block-aligned.
  Status patch(std::uint64_t guest_offset, std::uint8_t* buf, std::uint64_t length) const;

  // The export has read everything: later preserve() calls do nothing.
  void close();
  // Why the snapshot cannot be the pause-instant image, or ok.
  Status broken() const;

  std::uint64_t copies() const { return copies_.load(std::memory_order_relaxed); }
  std::uint64_t block_size() const { return block_size_; }

 private:
  enum Mark : std::uint8_t { kOutside = 0, kNeeded = 1, kPreserved = 2 };
  LiveImage() = default;
  bool needed(std::uint64_t block) const;

  io::UniqueFd source_;     // the guest's memfd, read-only
  io::UniqueFd copies_fd_;  // preserved blocks, at their guest offsets
  std::uint64_t guest_size_ = 0;
  std::uint64_t block_size_ = 0;
  std::unique_ptr<std::atomic<std::uint8_t>[]> marks_;  // per guest block
  std::uint64_t blocks_ = 0;
  std::atomic<bool> closed_{false};
  std::atomic<std::uint64_t> copies_{0};
  mutable std::mutex mu_;
  Status broken_;  // guarded by mu_
};

}  // namespace memsnap
