#include "tools/memsnapd/sandbox_lifecycle.h"

#include <gtest/gtest.h>

#include <set>
#include <utility>

namespace memsnap::daemon {
namespace {

using S = SandboxState;

TEST(SandboxLifecycleTest, EveryStateHasOneNameThatParsesBack) {
  std::set<std::string> seen;
  for (S s : kSandboxStates) {
    const std::string name(state_name(s));
    EXPECT_TRUE(seen.insert(name).second) << name;
    ASSERT_TRUE(parse_sandbox_state(name).has_value()) << name;
    EXPECT_EQ(*parse_sandbox_state(name), s);
  }
  EXPECT_EQ(sandbox_state_names(),
            (std::vector<std::string>{"running", "pausing", "paused", "resuming", "failed",
                                      "exporting", "export_failed"}));
  for (const char* other : {"", "Running", "resumin", "export-failed", "unknown"}) {
    EXPECT_FALSE(parse_sandbox_state(other).has_value()) << other;
  }
}

// The table, move by move, against the whole square of states: what it allows and nothing else.
TEST(SandboxLifecycleTest, TheTableAllowsExactlyTheDocumentedMoves) {
  const std::set<std::pair<S, S>> allowed = {
      {S::kRunning, S::kPausing},
      {S::kPausing, S::kPaused},
      {S::kPausing, S::kRunning},
      {S::kPausing, S::kFailed},
      {S::kPaused, S::kResuming},
      {S::kResuming, S::kRunning},
      {S::kResuming, S::kPaused},
      {S::kRunning, S::kFailed},
      // handover: answered before the snapshot is durable; the export ends it or fails
      {S::kPausing, S::kExporting},
      {S::kExporting, S::kPaused},
      {S::kExporting, S::kExportFailed},
      {S::kExportFailed, S::kExporting},
      // a resume before durable, and where it parks the sandbox when it does not run
      {S::kExporting, S::kResuming},
      {S::kResuming, S::kExporting},
      {S::kResuming, S::kExportFailed},
  };
  for (S from : kSandboxStates) {
    for (S to : kSandboxStates) {
      EXPECT_EQ(transition_allowed(from, to), allowed.count({from, to}) == 1)
          << state_name(from) << " -> " << state_name(to);
    }
  }
}

// The states a pause with after=stop leads to (and the export states that follow it) are the ones
// whose VMM, if alive, memsnapd stopped.
TEST(SandboxLifecycleTest, AVmmIsLeftStoppedOnlyInTheStatesAStopPauseLeadsTo) {
  for (S s : kSandboxStates) {
    const bool after_stop =
        transition_allowed(S::kPausing, s) && s != S::kRunning && s != S::kFailed;
    const bool export_state = s == S::kExporting || s == S::kExportFailed;
    EXPECT_EQ(vmm_left_stopped(s), after_stop || export_state) << state_name(s);
  }
}

TEST(SandboxLifecycleTest, OnlyPausingAndResumingAreOwned) {
  for (S s : kSandboxStates) {
    EXPECT_EQ(is_owned(s), s == S::kPausing || s == S::kResuming) << state_name(s);
  }
  // An owned state is left only by its owner's outcome, never claimed from.
  for (S owned : {S::kPausing, S::kResuming}) {
    for (S claimed : {S::kPausing, S::kResuming}) EXPECT_FALSE(transition_allowed(owned, claimed));
  }
  // failed is left only by unregistering.
  for (S to : kSandboxStates) EXPECT_FALSE(transition_allowed(S::kFailed, to));
}

TEST(SandboxLifecycleTest, CountsFollowMovesAndListEveryState) {
  StateCounts counts;
  EXPECT_EQ(counts.by_name(), (std::map<std::string, std::int64_t>{
                                  {"running", 0}, {"pausing", 0}, {"paused", 0},
                                  {"resuming", 0}, {"failed", 0}, {"exporting", 0},
                                  {"export_failed", 0}}));
  counts.enter(S::kRunning);
  counts.enter(S::kRunning);
  counts.leave(S::kRunning);
  counts.enter(S::kPausing);
  EXPECT_EQ(counts.count(S::kRunning), 1);
  EXPECT_EQ(counts.count(S::kPausing), 1);
  EXPECT_EQ(counts.by_name().at("pausing"), 1);
  EXPECT_EQ(counts.by_name().at("paused"), 0);
}

}  // namespace
}  // namespace memsnap::daemon
