// decide_fault() and downgrade_for() over every combination of their inputs. The expected
// results come from the rule lists below (first matching rule wins), written from the fault
// server's documented behaviour, not from the implementation.
#include "core/fault_decision.h"

#include <cerrno>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace memsnap {
namespace {

using S = BlockState;
using A = FaultAction;

// A condition on a boolean input: must be true, false, or either.
enum class B { kYes, kNo, kAny };
bool matches(B b, bool v) { return b == B::kAny || (b == B::kYes) == v; }

// Which ioctl family and block state, from the block state and the kind of fault.
enum class Kind { kContinue, kZeros, kCopyData };
struct StateRule {
  std::optional<S> state;  // nullopt: any
  B minor;
  B zero_extent;
  B has_fill_memfd;
  Kind kind;
  bool write_memfd_first;
  std::optional<S> next;  // nullopt: unchanged
};

// clang-format off
const std::vector<StateRule> kStateRules = {
    // state          minor    zero     memfd    -> kind             pwrite next
    {S::kRemoved,    B::kYes, B::kAny, B::kAny, Kind::kContinue,  false, std::nullopt},
    {S::kRemoved,    B::kNo,  B::kAny, B::kAny, Kind::kZeros,     false, std::nullopt},
    {S::kUntouched,  B::kYes, B::kNo,  B::kYes, Kind::kContinue,  true,  S::kServed},
    {std::nullopt,   B::kYes, B::kAny, B::kAny, Kind::kContinue,  false, S::kServed},
    {S::kFilled,     B::kNo,  B::kAny, B::kAny, Kind::kContinue,  false, S::kServed},
    {S::kServed,     B::kNo,  B::kAny, B::kAny, Kind::kZeros,     false, S::kServed},
    {S::kUntouched,  B::kNo,  B::kYes, B::kAny, Kind::kZeros,     false, S::kServed},
    {S::kUntouched,  B::kNo,  B::kNo,  B::kAny, Kind::kCopyData,  false, S::kServed},
};

// How each kind is installed, from the write-protect option and the current modes.
struct ModeRule {
  Kind kind;
  B write_protect;
  B copy_wp;
  B continue_wp;
  B zero_by_copy;
  A action;
  bool wp;
};
const std::vector<ModeRule> kModeRules = {
    // kind            wp opt   copy_wp  cont_wp  0-by-copy -> action        MODE_WP
    {Kind::kContinue, B::kAny, B::kAny, B::kYes, B::kAny,  A::kContinue,  true},
    {Kind::kContinue, B::kAny, B::kAny, B::kNo,  B::kAny,  A::kContinue,  false},
    {Kind::kCopyData, B::kAny, B::kYes, B::kAny, B::kAny,  A::kCopyData,  true},
    {Kind::kCopyData, B::kAny, B::kNo,  B::kAny, B::kAny,  A::kCopyData,  false},
    // Write tracking copies zeros in (UFFDIO_ZEROPAGE cannot write-protect and refuses a marker
    // entry), and so does a server whose UFFDIO_ZEROPAGE once refused a marker entry.
    {Kind::kZeros,    B::kYes, B::kYes, B::kAny, B::kAny,  A::kCopyZeros, true},
    {Kind::kZeros,    B::kYes, B::kNo,  B::kAny, B::kAny,  A::kCopyZeros, false},
    {Kind::kZeros,    B::kNo,  B::kYes, B::kAny, B::kYes,  A::kCopyZeros, true},
    {Kind::kZeros,    B::kNo,  B::kNo,  B::kAny, B::kYes,  A::kCopyZeros, false},
    {Kind::kZeros,    B::kNo,  B::kAny, B::kAny, B::kNo,   A::kZeroPage,  false},
};
// clang-format on

std::string describe(const FaultInput& in) {
  return std::string("state=") + to_string(in.state) + " minor=" + std::to_string(in.minor) +
         " zero=" + std::to_string(in.zero_extent) + " memfd=" + std::to_string(in.has_fill_memfd) +
         " write_protect=" + std::to_string(in.write_protect) +
         " copy_wp=" + std::to_string(in.modes.copy_wp) +
         " continue_wp=" + std::to_string(in.modes.continue_wp) +
         " zero_by_copy=" + std::to_string(in.modes.zero_by_copy);
}

TEST(FaultDecisionTest, EveryCombinationFollowsTheRules) {
  const S states[] = {S::kUntouched, S::kFilled, S::kServed, S::kRemoved};
  std::vector<int> state_rule_uses(kStateRules.size(), 0);
  std::vector<int> mode_rule_uses(kModeRules.size(), 0);
  int rows = 0;
  for (S state : states) {
    for (int bits = 0; bits < (1 << 7); ++bits) {
      FaultInput in;
      in.state = state;
      in.minor = bits & 1;
      in.zero_extent = bits & 2;
      in.has_fill_memfd = bits & 4;
      in.write_protect = bits & 8;
      in.modes.copy_wp = bits & 16;
      in.modes.continue_wp = bits & 32;
      in.modes.zero_by_copy = bits & 64;
      SCOPED_TRACE(describe(in));
      ++rows;

      std::size_t sr = 0;
      while (sr < kStateRules.size() &&
             !((!kStateRules[sr].state || *kStateRules[sr].state == in.state) &&
               matches(kStateRules[sr].minor, in.minor) &&
               matches(kStateRules[sr].zero_extent, in.zero_extent) &&
               matches(kStateRules[sr].has_fill_memfd, in.has_fill_memfd))) {
        ++sr;
      }
      ASSERT_LT(sr, kStateRules.size()) << "no state rule covers this input";
      const StateRule& s = kStateRules[sr];
      ++state_rule_uses[sr];

      std::size_t mr = 0;
      while (mr < kModeRules.size() &&
             !(kModeRules[mr].kind == s.kind &&
               matches(kModeRules[mr].write_protect, in.write_protect) &&
               matches(kModeRules[mr].copy_wp, in.modes.copy_wp) &&
               matches(kModeRules[mr].continue_wp, in.modes.continue_wp) &&
               matches(kModeRules[mr].zero_by_copy, in.modes.zero_by_copy))) {
        ++mr;
      }
      ASSERT_LT(mr, kModeRules.size()) << "no mode rule covers this input";
      const ModeRule& m = kModeRules[mr];
      ++mode_rule_uses[mr];

      const FaultDecision d = decide_fault(in);
      EXPECT_EQ(to_string(d.action), std::string(to_string(m.action)));
      EXPECT_EQ(d.wp, m.wp);
      EXPECT_EQ(d.write_memfd_first, s.write_memfd_first);
      EXPECT_EQ(to_string(d.next_state), std::string(to_string(s.next.value_or(in.state))));
    }
  }
  EXPECT_EQ(rows, 4 * 128);
  for (std::size_t i = 0; i < state_rule_uses.size(); ++i) {
    EXPECT_GT(state_rule_uses[i], 0) << "state rule " << i << " is never the first match";
  }
  for (std::size_t i = 0; i < mode_rule_uses.size(); ++i) {
    EXPECT_GT(mode_rule_uses[i], 0) << "mode rule " << i << " is never the first match";
  }
}

// A few rows spelled out in full: the cases the fault server's header names.
TEST(FaultDecisionTest, NamedCases) {
  FaultInput in;
  in.zero_extent = false;
  FaultDecision d = decide_fault(in);  // MISSING fault, DATA block
  EXPECT_EQ(d.action, A::kCopyData);
  EXPECT_FALSE(d.wp);
  EXPECT_EQ(d.next_state, S::kServed);

  in.zero_extent = true;  // MISSING fault, ZERO block
  EXPECT_EQ(decide_fault(in).action, A::kZeroPage);
  in.write_protect = true;  // ... while tracking writes: zeros copied, write-protected
  in.modes = {.copy_wp = true, .continue_wp = true, .zero_by_copy = false};
  d = decide_fault(in);
  EXPECT_EQ(d.action, A::kCopyZeros);
  EXPECT_TRUE(d.wp);

  in = {};
  in.minor = true;  // MINOR fault on a block the background fill has not reached
  in.has_fill_memfd = true;
  d = decide_fault(in);
  EXPECT_EQ(d.action, A::kContinue);
  EXPECT_TRUE(d.write_memfd_first);
  in.state = S::kFilled;  // ... and on one it has: no write
  EXPECT_FALSE(decide_fault(in).write_memfd_first);

  in = {};
  in.state = S::kRemoved;  // after UFFD_EVENT_REMOVE: zeros, and the block stays removed
  d = decide_fault(in);
  EXPECT_EQ(d.action, A::kZeroPage);
  EXPECT_EQ(d.next_state, S::kRemoved);
}

// Which failures turn a mode off: EINVAL for a write-protecting install, EEXIST for
// UFFDIO_ZEROPAGE; nothing else.
TEST(FaultDecisionTest, DowngradesForEveryActionModeAndErrno) {
  struct Row {
    A action;
    bool wp;
    int err;
    ModeDowngrade expected;
  };
  const int errs[] = {0, EINVAL, EEXIST, EAGAIN, ESRCH, EIO, ENOMEM};
  const A actions[] = {A::kCopyData, A::kCopyZeros, A::kZeroPage, A::kContinue};
  int rows = 0;
  for (A action : actions) {
    for (bool wp : {false, true}) {
      for (int err : errs) {
        ModeDowngrade expected = ModeDowngrade::kNone;
        if (err == EINVAL && wp && (action == A::kCopyData || action == A::kCopyZeros)) {
          expected = ModeDowngrade::kCopyWithoutWp;
        } else if (err == EINVAL && wp && action == A::kContinue) {
          expected = ModeDowngrade::kContinueWithoutWp;
        } else if (err == EEXIST && action == A::kZeroPage) {
          expected = ModeDowngrade::kZeroByCopy;
        }
        FaultDecision d;
        d.action = action;
        d.wp = wp;
        EXPECT_EQ(to_string(downgrade_for(d, err)), std::string(to_string(expected)))
            << to_string(action) << " wp=" << wp << " errno=" << err;
        ++rows;
      }
    }
  }
  EXPECT_EQ(rows, 4 * 2 * 7);
}

TEST(FaultDecisionTest, ADowngradeTurnsOffOnlyItsMode) {
  const FaultModes on{.copy_wp = true, .continue_wp = true, .zero_by_copy = false};
  FaultModes m = downgraded(on, ModeDowngrade::kCopyWithoutWp);
  EXPECT_FALSE(m.copy_wp);
  EXPECT_TRUE(m.continue_wp);
  EXPECT_FALSE(m.zero_by_copy);
  m = downgraded(on, ModeDowngrade::kContinueWithoutWp);
  EXPECT_TRUE(m.copy_wp);
  EXPECT_FALSE(m.continue_wp);
  EXPECT_FALSE(m.zero_by_copy);
  m = downgraded(on, ModeDowngrade::kZeroByCopy);
  EXPECT_TRUE(m.copy_wp);
  EXPECT_TRUE(m.continue_wp);
  EXPECT_TRUE(m.zero_by_copy);
  m = downgraded(on, ModeDowngrade::kNone);
  EXPECT_TRUE(m.copy_wp && m.continue_wp && !m.zero_by_copy);
  // A downgraded decision no longer asks for what was refused: the retry cannot loop.
  FaultInput in;
  in.zero_extent = false;
  in.write_protect = true;
  in.modes = on;
  FaultDecision d = decide_fault(in);
  ASSERT_EQ(downgrade_for(d, EINVAL), ModeDowngrade::kCopyWithoutWp);
  in.modes = downgraded(in.modes, ModeDowngrade::kCopyWithoutWp);
  d = decide_fault(in);
  EXPECT_FALSE(d.wp);
  EXPECT_EQ(downgrade_for(d, EINVAL), ModeDowngrade::kNone);
  in = {};
  in.zero_extent = true;
  d = decide_fault(in);
  ASSERT_EQ(downgrade_for(d, EEXIST), ModeDowngrade::kZeroByCopy);
  in.modes = downgraded(in.modes, ModeDowngrade::kZeroByCopy);
  d = decide_fault(in);
  EXPECT_EQ(d.action, A::kCopyZeros);
  EXPECT_EQ(downgrade_for(d, EEXIST), ModeDowngrade::kNone);
}

}  // namespace
}  // namespace memsnap
