#include "core/pause_mode/pause_mode.h"

#include <set>
#include <string>

#include <gtest/gtest.h>

namespace memsnap {
namespace {

TEST(PauseModeTest, NamesRoundTripAndAreDistinct) {
  std::set<std::string> names;
  for (const PauseMode mode : kPauseModes) {
    const auto name = pause_mode_name(mode);
    EXPECT_EQ(parse_pause_mode(name), mode);
    names.insert(std::string(name));
  }
  EXPECT_EQ(names.size(), kPauseModes.size());
  EXPECT_FALSE(parse_pause_mode("Copy").has_value());
  EXPECT_FALSE(parse_pause_mode("").has_value());
}

TEST(PauseModeTest, FallbackNamesAreDistinctAndExplained) {
  std::set<std::string> names;
  for (const PauseModeFallback cause : kPauseModeFallbacks) {
    names.insert(std::string(pause_mode_fallback_name(cause)));
    EXPECT_FALSE(pause_mode_fallback_text(cause).empty());
  }
  EXPECT_EQ(names.size(), kPauseModeFallbacks.size());
  EXPECT_EQ(names.count("none"), 0u);
}

PauseModeInputs memfd_sandbox() {
  return {.strategy_needs_memfd = true, .memfd_held = true, .memory_resident = true, .stop = true};
}

TEST(PauseModeTest, HandoverWhenTheMemfdHoldsEverythingAndTheVmmStops) {
  const auto d = decide_pause_mode(PauseMode::kHandover, memfd_sandbox());
  EXPECT_EQ(d.mode, PauseMode::kHandover);
  EXPECT_EQ(d.fallback, PauseModeFallback::kNone);
}

TEST(PauseModeTest, HandoverFallsBackToCopyWithTheCause) {
  auto in = memfd_sandbox();
  in.stop = false;
  EXPECT_EQ(decide_pause_mode(PauseMode::kHandover, in).fallback, PauseModeFallback::kContinues);
  in = memfd_sandbox();
  in.strategy_needs_memfd = false;
  EXPECT_EQ(decide_pause_mode(PauseMode::kHandover, in).fallback,
            PauseModeFallback::kStrategyReadsVmm);
  in = memfd_sandbox();
  in.memfd_held = false;
  EXPECT_EQ(decide_pause_mode(PauseMode::kHandover, in).fallback, PauseModeFallback::kNoMemfd);
  in.memory_resident = false;
  EXPECT_EQ(decide_pause_mode(PauseMode::kHandover, in).fallback,
            PauseModeFallback::kMemoryNotResident);
  in = memfd_sandbox();
  in.memory_resident = false;
  const auto d = decide_pause_mode(PauseMode::kHandover, in);
  EXPECT_EQ(d.mode, PauseMode::kCopy);
  EXPECT_EQ(d.fallback, PauseModeFallback::kMemoryNotResident);
}

TEST(PauseModeTest, CopyIsAlwaysPossible) {
  PauseModeInputs nothing{};
  nothing.stop = false;
  nothing.memory_resident = false;
  const auto d = decide_pause_mode(PauseMode::kCopy, nothing);
  EXPECT_EQ(d.mode, PauseMode::kCopy);
  EXPECT_EQ(d.fallback, PauseModeFallback::kNone);
}

TEST(PauseModeTest, LiveNeedsContinueAndASandboxWhoseWriteFaultsMemsnapResolves) {
  auto in = memfd_sandbox();
  in.live_capable = true;
  EXPECT_EQ(decide_pause_mode(PauseMode::kLive, in).fallback, PauseModeFallback::kStops);
  in.stop = false;
  auto d = decide_pause_mode(PauseMode::kLive, in);
  EXPECT_EQ(d.mode, PauseMode::kLive);
  EXPECT_EQ(d.fallback, PauseModeFallback::kNone);
  in.live_capable = false;
  d = decide_pause_mode(PauseMode::kLive, in);
  EXPECT_EQ(d.mode, PauseMode::kCopy);
  EXPECT_EQ(d.fallback, PauseModeFallback::kNoWriteFaults);
}

}  // namespace
}  // namespace memsnap
