#include "core/fault_decision.h"

#include <cerrno>

namespace memsnap {
namespace {

// Zeros for a block: see the header for why write tracking copies them.
FaultDecision zeros(const FaultInput& in, BlockState next) {
  FaultDecision d;
  d.next_state = next;
  if (in.write_protect || in.modes.zero_by_copy) {
    d.action = FaultAction::kCopyZeros;
    d.wp = in.modes.copy_wp;
  } else {
    d.action = FaultAction::kZeroPage;
  }
  return d;
}

FaultDecision map_from_memfd(const FaultInput& in, BlockState next) {
  FaultDecision d;
  d.action = FaultAction::kContinue;
  d.wp = in.modes.continue_wp;
  d.next_state = next;
  return d;
}

}  // namespace

FaultDecision decide_fault(const FaultInput& in) {
  if (in.state == BlockState::kRemoved) {
    // The VMM discarded the block: it reads as zeros (a MINOR fault maps the memfd's page,
    // which the discard emptied). It stays removed.
    return in.minor ? map_from_memfd(in, BlockState::kRemoved) : zeros(in, BlockState::kRemoved);
  }
  if (in.minor || in.state == BlockState::kFilled) {
    // The page is in the memfd's page cache; map it. A MINOR fault on a data block we never
    // filled: its cache page did not come from the snapshot, so put the snapshot's bytes there
    // first.
    FaultDecision d = map_from_memfd(in, BlockState::kServed);
    d.write_memfd_first =
        in.state == BlockState::kUntouched && !in.zero_extent && in.has_fill_memfd;
    return d;
  }
  if (in.state == BlockState::kServed) {
    // Served before and missing again: the VMM dropped the page by a means that raised no
    // UFFD_EVENT_REMOVE (e.g. fallocate(PUNCH_HOLE) on its memfd). Its content is gone, so it
    // reads as zeros, as it would without userfaultfd; never the older snapshot bytes.
    return zeros(in, BlockState::kServed);
  }
  if (in.zero_extent) return zeros(in, BlockState::kServed);
  FaultDecision d;
  d.action = FaultAction::kCopyData;
  d.wp = in.modes.copy_wp;
  d.next_state = BlockState::kServed;
  return d;
}

ModeDowngrade downgrade_for(const FaultDecision& d, int err) {
  switch (d.action) {
    case FaultAction::kCopyData:
    case FaultAction::kCopyZeros:
      // Not registered for WP: copy plainly (the pages then count as written).
      return err == EINVAL && d.wp ? ModeDowngrade::kCopyWithoutWp : ModeDowngrade::kNone;
    case FaultAction::kContinue:
      return err == EINVAL && d.wp ? ModeDowngrade::kContinueWithoutWp : ModeDowngrade::kNone;
    case FaultAction::kZeroPage:
      // Only a write-protect marker there: copy the zeros instead, from now on.
      return err == EEXIST ? ModeDowngrade::kZeroByCopy : ModeDowngrade::kNone;
  }
  return ModeDowngrade::kNone;
}

FaultModes downgraded(FaultModes modes, ModeDowngrade g) {
  switch (g) {
    case ModeDowngrade::kNone:
      break;
    case ModeDowngrade::kCopyWithoutWp:
      modes.copy_wp = false;
      break;
    case ModeDowngrade::kContinueWithoutWp:
      modes.continue_wp = false;
      break;
    case ModeDowngrade::kZeroByCopy:
      modes.zero_by_copy = true;
      break;
  }
  return modes;
}

const char* to_string(BlockState s) {
  switch (s) {
    case BlockState::kUntouched:
      return "untouched";
    case BlockState::kFilled:
      return "filled";
    case BlockState::kServed:
      return "served";
    case BlockState::kRemoved:
      return "removed";
  }
  return "?";
}

const char* to_string(FaultAction a) {
  switch (a) {
    case FaultAction::kCopyData:
      return "copy-data";
    case FaultAction::kCopyZeros:
      return "copy-zeros";
    case FaultAction::kZeroPage:
      return "zeropage";
    case FaultAction::kContinue:
      return "continue";
  }
  return "?";
}

const char* to_string(ModeDowngrade g) {
  switch (g) {
    case ModeDowngrade::kNone:
      return "none";
    case ModeDowngrade::kCopyWithoutWp:
      return "copy-without-wp";
    case ModeDowngrade::kContinueWithoutWp:
      return "continue-without-wp";
    case ModeDowngrade::kZeroByCopy:
      return "zero-by-copy";
  }
  return "?";
}

const char* ioctl_name(FaultAction a) {
  switch (a) {
    case FaultAction::kCopyData:
    case FaultAction::kCopyZeros:
      return "UFFDIO_COPY";
    case FaultAction::kZeroPage:
      return "UFFDIO_ZEROPAGE";
    case FaultAction::kContinue:
      return "UFFDIO_CONTINUE";
  }
  return "?";
}

}  // namespace memsnap
