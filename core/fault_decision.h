// How FaultServer answers one page fault, as pure functions of what it knows about the block:
// no syscalls, nothing mutated. FaultServer asks decide_fault(), issues the ioctl the decision
// names, and when the kernel refuses a mode, asks downgrade_for() which mode to turn off for good
// and decides again. The whole table is tested row by row (core/fault_decision_test.cc).
//
//   block state  fault   extent  ->  action                     block afterwards
//   removed      minor   any         CONTINUE                   removed
//   removed      missing any         zeros                      removed
//   untouched    minor   data        pwrite to memfd (if any),  served
//                                    then CONTINUE
//   other        minor   any         CONTINUE                   served
//   filled       missing any         CONTINUE                   served
//   served       missing any         zeros (dropped without     served
//                                    a REMOVE event)
//   untouched    missing zero        zeros                      served
//   untouched    missing data        COPY of the snapshot bytes served
//
// "zeros" is UFFDIO_ZEROPAGE, or a UFFDIO_COPY of a zero block when write tracking is on
// (UFFDIO_ZEROPAGE cannot write-protect, and refuses with EEXIST an entry that holds only a
// WP_ASYNC marker) or once UFFDIO_ZEROPAGE has refused such an entry (zero_by_copy). Copies are
// write-protected while copy_wp holds, CONTINUE while continue_wp holds.
#pragma once

#include <cstdint>

namespace memsnap {

// What FaultServer knows of one guest block.
enum class BlockState : std::uint8_t {
  kUntouched = 0,  // neither served nor filled
  kFilled = 1,     // in the memfd's page cache (background fill), not yet mapped by a fault
  kServed = 2,     // a fault installed it: never write it again
  kRemoved = 3,    // the VMM discarded it: serve zeros from now on
};

// The ioctl that resolves a fault.
enum class FaultAction : std::uint8_t {
  kCopyData,   // UFFDIO_COPY from the snapshot's mapping
  kCopyZeros,  // UFFDIO_COPY from a zero block
  kZeroPage,   // UFFDIO_ZEROPAGE
  kContinue,   // UFFDIO_CONTINUE: map the page already in the memfd's page cache
};

// Modes that start as asked and that the kernel may make FaultServer turn off, for good.
struct FaultModes {
  bool copy_wp = false;       // UFFDIO_COPY_MODE_WP (starts as write_protect)
  bool continue_wp = false;   // UFFDIO_CONTINUE_MODE_WP (starts as write_protect)
  bool zero_by_copy = false;  // UFFDIO_ZEROPAGE refused a marker entry once: copy zeros instead
};

struct FaultInput {
  BlockState state = BlockState::kUntouched;
  bool minor = false;           // a MINOR fault (the page is in the memfd), else MISSING
  bool zero_extent = false;     // the chain stores the block as zero
  bool has_fill_memfd = false;  // cold memfd resume: FaultServerOptions::fill_memfd is set
  bool write_protect = false;   // FaultServerOptions::write_protect
  FaultModes modes;
};

struct FaultDecision {
  FaultAction action = FaultAction::kZeroPage;
  bool wp = false;                 // with the action's MODE_WP (copy or continue)
  bool write_memfd_first = false;  // pwrite the snapshot's bytes into the fill memfd first
  BlockState next_state = BlockState::kServed;  // once installed (or found there: EEXIST)
};

FaultDecision decide_fault(const FaultInput& in);

// A mode the kernel refused, turned off for good (the install is then tried again).
enum class ModeDowngrade : std::uint8_t {
  kNone,
  kCopyWithoutWp,      // UFFDIO_COPY_MODE_WP: EINVAL (range not registered for WP)
  kContinueWithoutWp,  // UFFDIO_CONTINUE_MODE_WP: EINVAL (kernel older than 6.4, or no WP)
  kZeroByCopy,         // UFFDIO_ZEROPAGE: EEXIST (only a WP marker there)
};

// What an install that failed with err (0: it succeeded) turns off; kNone: nothing to retry.
ModeDowngrade downgrade_for(const FaultDecision& d, int err);
FaultModes downgraded(FaultModes modes, ModeDowngrade g);

const char* to_string(BlockState s);
const char* to_string(FaultAction a);
const char* to_string(ModeDowngrade g);
// The ioctl an action issues: "UFFDIO_COPY", "UFFDIO_ZEROPAGE" or "UFFDIO_CONTINUE".
const char* ioctl_name(FaultAction a);

}  // namespace memsnap
