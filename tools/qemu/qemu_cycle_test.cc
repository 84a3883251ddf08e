// The parts of the QEMU cycle that need no QEMU: what a failed wait for the guest says, and the
// guest's memory rule.
#include "tools/qemu/qemu_cycle.h"

#include <gtest/gtest.h>

namespace memsnap::qemu {
namespace {

// `qemu cycle --memory 64M` used to fail after 90 s with `console ends with ""`.
TEST(CheckFailureText, SaysWhenTheGuestPrintedNothing) {
  const std::string t = check_failure_text({}, "running (pid 12)", "(nothing)");
  EXPECT_NE(t.find("the guest printed nothing on its console"), std::string::npos) << t;
  EXPECT_NE(t.find("QEMU running (pid 12), its output: (nothing)"), std::string::npos) << t;
  EXPECT_EQ(t.find("\"\""), std::string::npos) << t;
}

TEST(CheckFailureText, QuotesTheLastLineAndAPanic) {
  const std::string t = check_failure_text(
      {"[ 1.0] Kernel panic - not syncing: System is deadlocked on memory", "[ 1.1] </TASK>"},
      "exited with status 0", "qemu: warning");
  EXPECT_NE(t.find("its console ends with \"[ 1.1] </TASK>\""), std::string::npos) << t;
  EXPECT_NE(t.find("panicked: \"[ 1.0] Kernel panic"), std::string::npos) << t;
  EXPECT_NE(t.find("QEMU exited with status 0, its output: qemu: warning"), std::string::npos);
}

TEST(LargestGuestMib, FollowsWhatWasMeasured) {
  EXPECT_EQ(largest_guest_mib(64), 0u);   // hangs with an empty console
  EXPECT_EQ(largest_guest_mib(80), 0u);   // panics: deadlocked on memory
  EXPECT_GE(largest_guest_mib(96), 16u);  // 96/16 and 96/18 boot
  EXPECT_GE(largest_guest_mib(128), 40u);
  EXPECT_LT(largest_guest_mib(128), 52u);  // 52 is OOM-killed
  EXPECT_GE(largest_guest_mib(256), 64u);  // the defaults
  EXPECT_LT(largest_guest_mib(256), 176u);
  EXPECT_GE(largest_guest_mib(1024), 256u);  // docs/qemu.md's example
}

TEST(ProgressSteps, CountsEveryLineOfACompleteRun) {
  CycleOptions o;
  o.generations = 2;
  EXPECT_EQ(progress_steps(o), 8);
  o.reference = true;
  EXPECT_EQ(progress_steps(o), 9);
}

}  // namespace
}  // namespace memsnap::qemu
