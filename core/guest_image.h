// A snapshot chain's guest image against a live VMM's memory: write it in (restore), or find the
// blocks where the two differ (a diff pause of a VMM whose writes memsnap cannot track).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <vector>

#include "core/base/result.h"
#include "core/snapshot/snapshot_chain.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap {

// Guest memory of a live VMM, readable or writable by memsnap: through the memfd that backs it
// (guest offset == file offset) when there is one, else through the process's address space
// (process_vm_readv/writev on the regions).
struct GuestMemoryAccess {
  int memfd = -1;  // not owned
  pid_t pid = -1;
  std::vector<plugin::Region> regions;  // sorted by guest_offset, disjoint
  std::uint64_t guest_size = 0;
};

// Copies every DATA extent of the chain into memfd, which must be fresh (zero blocks are left
// as holes). Returns the bytes copied.
Result<std::uint64_t> fill_memfd(const SnapshotChain& chain, int memfd);

// Writes the chain's whole guest image into the VMM: DATA extents with their bytes, ZERO extents
// as zeros (the target may hold anything). Through memory.memfd when set, else with
// process_vm_writev. Returns the bytes written.
Result<std::uint64_t> write_guest_image(const SnapshotChain& chain,
                                        const GuestMemoryAccess& memory);

// The blocks whose content in the VMM differs from the chain's image, as sorted, merged ranges:
// the exact dirty set of a diff whose parent is the chain's newest layer. Reads the whole guest
// and the chain's image once; the VMM must not run meanwhile. kInvalidArgument when the sizes
// disagree; kProcessGone / kBadAddress / I/O errors of the reads.
Result<std::vector<plugin::ByteRange>> changed_ranges(const SnapshotChain& chain,
                                                      const GuestMemoryAccess& memory);

}  // namespace memsnap
