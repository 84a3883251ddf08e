// The strategy policy as a table: every combination of the capabilities that matter (needs pid,
// needs memfd, releases memory) against every sandbox (memfd or not, pid and regions or not),
// and every fallback cause's names at both stages.
#include "core/strategy_policy/strategy_policy.h"

#include <gtest/gtest.h>

#include <string>

namespace memsnap {
namespace {

constexpr std::uint32_t kPid = plugin::kCapNeedsPid;
constexpr std::uint32_t kMemfd = plugin::kCapNeedsMemfd;
constexpr std::uint32_t kReleases = plugin::kCapReleasesMemory;
constexpr FallbackCause kOk = FallbackCause::kNone;
constexpr FallbackCause kNoMemfd = FallbackCause::kMissingMemfd;
constexpr FallbackCause kNoPid = FallbackCause::kMissingPid;

struct PolicyRow {
  std::uint32_t capabilities;
  // cannot_serve() for a sandbox with: neither, memfd only, pid only, both.
  FallbackCause neither, memfd_only, pid_only, both;
  bool stays_stopped;  // vmm_must_stay_stopped()
  bool keeps_memory;
  ResumeStart cold;  // resume_start(false)
  ResumeStart kept;  // resume_start(true)
};

// The shipped plugins: process_vm_readv = kPid, memfd = kMemfd, hole_punch = kMemfd|kReleases.
constexpr PolicyRow kPolicyTable[] = {
    {0, kOk, kOk, kOk, kOk, false, false, ResumeStart::kLazy, ResumeStart::kLazy},
    {kPid, kNoPid, kNoPid, kOk, kOk, false, false, ResumeStart::kLazy, ResumeStart::kLazy},
    {kMemfd, kNoMemfd, kOk, kNoMemfd, kOk, false, true, ResumeStart::kBackground,
     ResumeStart::kWarm},
    {kPid | kMemfd, kNoMemfd, kNoPid, kNoMemfd, kOk, false, true, ResumeStart::kBackground,
     ResumeStart::kWarm},
    {kReleases, kOk, kOk, kOk, kOk, true, false, ResumeStart::kBackground,
     ResumeStart::kBackground},
    {kPid | kReleases, kNoPid, kNoPid, kOk, kOk, true, false, ResumeStart::kBackground,
     ResumeStart::kBackground},
    {kMemfd | kReleases, kNoMemfd, kOk, kNoMemfd, kOk, true, false, ResumeStart::kBackground,
     ResumeStart::kBackground},
    {kPid | kMemfd | kReleases, kNoMemfd, kNoPid, kNoMemfd, kOk, true, false,
     ResumeStart::kBackground, ResumeStart::kBackground},
};

TEST(StrategyPolicyTest, EveryCapabilityCombinationAgainstEverySandbox) {
  for (const PolicyRow& row : kPolicyTable) {
    SCOPED_TRACE("capabilities " + std::to_string(row.capabilities));
    const StrategyPolicy policy(row.capabilities);
    EXPECT_EQ(policy.cannot_serve({.has_memfd = false, .has_pid = false}), row.neither);
    EXPECT_EQ(policy.cannot_serve({.has_memfd = true, .has_pid = false}), row.memfd_only);
    EXPECT_EQ(policy.cannot_serve({.has_memfd = false, .has_pid = true}), row.pid_only);
    EXPECT_EQ(policy.cannot_serve({.has_memfd = true, .has_pid = true}), row.both);
    EXPECT_EQ(policy.vmm_must_stay_stopped(), row.stays_stopped);
    EXPECT_EQ(policy.keeps_memory(), row.keeps_memory);
    EXPECT_EQ(policy.resume_start(false), row.cold);
    EXPECT_EQ(policy.resume_start(true), row.kept);
  }
}

TEST(StrategyPolicyTest, TheTableCoversEveryCombinationOnce) {
  bool seen[8] = {};
  for (const PolicyRow& row : kPolicyTable) {
    ASSERT_LT(row.capabilities, 8u);
    EXPECT_FALSE(seen[row.capabilities]) << row.capabilities;
    seen[row.capabilities] = true;
  }
  for (bool s : seen) EXPECT_TRUE(s);
}

TEST(StrategyPolicyTest, ExperimentalChangesNothing) {
  for (const PolicyRow& row : kPolicyTable) {
    const StrategyPolicy plain(row.capabilities);
    const StrategyPolicy experimental(row.capabilities | plugin::kCapExperimental);
    for (const bool memfd : {false, true}) {
      for (const bool pid : {false, true}) {
        EXPECT_EQ(experimental.cannot_serve({memfd, pid}), plain.cannot_serve({memfd, pid}));
      }
    }
    EXPECT_EQ(experimental.keeps_memory(), plain.keeps_memory());
    EXPECT_EQ(experimental.resume_start(true), plain.resume_start(true));
  }
}

struct NamesRow {
  FallbackCause cause;
  const char* metric_label;    // docs/metrics.md, reason label
  const char* selection_code;  // docs/api.md, fallback.reason from the selector
  const char* pipeline_code;   // ... from the pause pipeline
};

constexpr NamesRow kNamesTable[] = {
    {FallbackCause::kFlagError, "flag_error", "flag_error", "strategy_cannot_run"},
    {FallbackCause::kPluginNotLoaded, "plugin_not_loaded", "plugin_not_loaded",
     "strategy_cannot_run"},
    {FallbackCause::kPluginRefused, "plugin_refused", "plugin_refused", "strategy_cannot_run"},
    {FallbackCause::kMissingMemfd, "missing_memfd", "missing_memfd", "strategy_cannot_run"},
    {FallbackCause::kMissingPid, "missing_pid", "missing_pid", "strategy_cannot_run"},
    {FallbackCause::kVmmVersion, "vmm_version", "vmm_version", "strategy_cannot_run"},
    {FallbackCause::kStrategyFailed, "strategy_failed", "strategy_failed", "strategy_failed"},
    {FallbackCause::kNone, "other", "", ""},
};

TEST(FallbackCauseTest, EveryCauseHasItsMetricLabelApiCodeAndText) {
  for (const NamesRow& row : kNamesTable) {
    const FallbackNames selection = fallback_names(row.cause, FallbackStage::kSelection);
    const FallbackNames pipeline = fallback_names(row.cause, FallbackStage::kPipeline);
    SCOPED_TRACE(row.metric_label);
    EXPECT_EQ(selection.metric_label, row.metric_label);
    EXPECT_EQ(pipeline.metric_label, row.metric_label);  // the label never depends on the stage
    EXPECT_EQ(fallback_metric_label(row.cause), row.metric_label);
    EXPECT_EQ(selection.api_code, row.selection_code);
    EXPECT_EQ(pipeline.api_code, row.pipeline_code);
    EXPECT_FALSE(selection.text.empty());
  }
}

}  // namespace
}  // namespace memsnap
