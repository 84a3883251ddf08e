// The recovery journal of an unfinished snapshot whose source memory was released.
//
// A strategy that releases guest memory as it exports it (hole_punch) makes the snapshot's
// temporary file the only copy of those bytes until the snapshot is committed. The header and
// block map are written only at commit, so without more the temporary file of a pause that died
// (kill -9 of memsnapd) or failed and could not put the memory back would be bytes nobody can
// place. Before the first byte is released (BlockSink::make_durable) the writer therefore starts
// a journal beside its temporary file, `<temp>.recovery`, and appends to it at every later
// make_durable: the snapshot's parameters, then every run written so far (guest blocks and where
// their bytes are in the temporary file). A later line for the same first block supersedes an
// earlier one (the last run may have grown). Text, one record a line:
//
//   memsnap-recovery 1
//   snapshot <final path>
//   block_size <n>  guest_size <n>  generation <n>  data_offset <n>
//   run <first block> <block count> data|zero <data offset>
//
// A journal is removed with its temporary file when the snapshot commits or is given up
// without released memory; memsnapd's start-up never removes a temporary file that has one.
// `memsnap recover` writes the recorded bytes back into the VMM's memfd.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/base/result.h"

namespace memsnap {

constexpr const char* kRecoveryJournalSuffix = ".recovery";

struct RecoveredRun {
  std::uint64_t first_block = 0;
  std::uint64_t block_count = 0;
  bool zero = false;
  std::uint64_t data_offset = 0;  // inside the data area (DATA runs)
};

struct RecoveryJournal {
  std::string snapshot_path;  // what the snapshot would have been called
  std::uint64_t block_size = 0;
  std::uint64_t guest_size = 0;
  std::uint64_t generation = 0;
  std::uint64_t data_area_offset = 0;  // file offset of the data area in the temporary file
  std::vector<RecoveredRun> runs;      // sorted by first block, later records applied
};

// Reads and checks a journal: kSnapshotBadHeader for a malformed one (with the line).
Result<RecoveryJournal> read_recovery_journal(const std::string& journal_path);

// Writes every DATA run the journal records from the temporary file temp_path back into memfd
// (guest offset == memfd offset) and returns the bytes written. ZERO runs are left alone (a
// released zero block reads as zeros). kInvalidArgument when the memfd's size is not the guest's.
Result<std::uint64_t> restore_from_journal(const RecoveryJournal& journal,
                                           const std::string& temp_path, int memfd);

}  // namespace memsnap
