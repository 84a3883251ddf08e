// `memsnap flags eval|check` as scripts call it: a real binary, real files, stdin and stdout.
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/memsnap_cli.h"

namespace memsnap {
namespace {

using testing::CommandResult;

// Stdout only unless with_stderr.
CommandResult memsnap(const std::string& args, bool with_stderr = false) {
  return testing::run_memsnap(args, with_stderr);
}

std::vector<nlohmann::json> json_lines(const std::string& out) {
  std::vector<nlohmann::json> lines;
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

class FlagsCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/tmp/memsnap-flags-cli-XXXXXX";
    ASSERT_NE(mkdtemp(templ), nullptr);
    dir_ = templ;
    flags_ = dir_ + "/flags.yaml";
    std::ofstream(flags_) << R"(flags:
  strategy:
    state: ENABLED
    variants: {pvr: process_vm_readv, memfd: memfd}
    defaultVariant: pvr
    targeting:
      if: [{"==": [{var: team}, infra]}, memfd]
  ratio:
    state: ENABLED
    variants: {low: 0.25, high: 0.75}
    defaultVariant: low
  off:
    state: DISABLED
    variants: {on: true}
    defaultVariant: on
  split:
    state: ENABLED
    variants: {a: a, b: b}
    defaultVariant: a
    targeting: {fractional: [[a, 1], [b, 1]]}
)";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
  std::string flags_;
};

TEST_F(FlagsCliTest, EvalPrintsOneObjectWithEveryField) {
  const CommandResult r = memsnap("flags eval --flags " + flags_ +
                                  " --flag strategy --context '{\"team\": \"infra\"}'");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const auto lines = json_lines(r.out);
  ASSERT_EQ(lines.size(), 1U) << r.out;
  const nlohmann::json& j = lines[0];
  EXPECT_EQ(j["flag"], "strategy");
  EXPECT_EQ(j["value"], "memfd");
  EXPECT_EQ(j["variant"], "memfd");
  EXPECT_EQ(j["reason"], "TARGETING_MATCH");
  EXPECT_TRUE(j.contains("errorCode") && j["errorCode"].is_null());
  EXPECT_TRUE(j.contains("errorMessage") && j["errorMessage"].is_null());
}

TEST_F(FlagsCliTest, TypeDefaultsToTheVariantsType) {
  auto j = json_lines(memsnap("flags eval --flags " + flags_ + " --flag ratio").out);
  ASSERT_EQ(j.size(), 1U);
  EXPECT_EQ(j[0]["value"], 0.25);
  EXPECT_EQ(j[0]["reason"], "STATIC");
  j = json_lines(memsnap("flags eval --flags " + flags_ + " --flag ratio --type float").out);
  EXPECT_EQ(j[0]["value"], 0.25);
}

TEST_F(FlagsCliTest, ErrorResultsExitZero) {
  CommandResult r =
      memsnap("flags eval --flags " + flags_ + " --flag ratio --type boolean --default true");
  EXPECT_EQ(r.exit_code, 0);
  auto j = json_lines(r.out);
  ASSERT_EQ(j.size(), 1U);
  EXPECT_EQ(j[0]["reason"], "ERROR");
  EXPECT_EQ(j[0]["errorCode"], "TYPE_MISMATCH");
  EXPECT_EQ(j[0]["value"], true);
  EXPECT_TRUE(j[0]["variant"].is_null());

  r = memsnap("flags eval --flags " + flags_ + " --flag nope --default '\"d\"'");
  EXPECT_EQ(r.exit_code, 0);
  j = json_lines(r.out);
  EXPECT_EQ(j[0]["errorCode"], "FLAG_NOT_FOUND");
  EXPECT_EQ(j[0]["value"], "d");

  r = memsnap("flags eval --flags " + flags_ + " --flag off --type boolean --default false");
  j = json_lines(r.out);
  EXPECT_EQ(j[0]["reason"], "DISABLED");
  EXPECT_EQ(j[0]["value"], false);
}

TEST_F(FlagsCliTest, ExplainShowsTheBucket) {
  const auto j = json_lines(memsnap("flags eval --flags " + flags_ +
                                    " --flag split --context '{\"targetingKey\": \"sb-1\"}' "
                                    "--explain")
                                .out);
  ASSERT_EQ(j.size(), 1U);
  bool found = false;
  for (const auto& step : j[0]["explain"]) {
    if (step["op"] == "fractional") {
      found = true;
      EXPECT_EQ(step["bucketingValue"], "splitsb-1");
      EXPECT_TRUE(step.contains("hash") && step.contains("bucket"));
    }
  }
  EXPECT_TRUE(found) << j[0].dump();
}

TEST_F(FlagsCliTest, BatchAnswersEveryLineInOrder) {
  const std::string input = dir_ + "/in.jsonl";
  std::ofstream(input)
      << R"({"flag": "strategy", "type": "string", "default": "x", "context": {"team": "infra"}})"
      << "\n"
      << R"({"flag": "strategy", "context": {"team": "other"}})"
      << "\n"
      << "this is not json\n"
      << R"({"flag": "ratio", "type": "bogus"})"
      << "\n"
      << R"({"flag": "missing", "default": 5})"
      << "\n"
      << R"({"flag": "off", "type": "boolean", "default": true})"
      << "\n";
  const CommandResult r = memsnap("flags eval --flags " + flags_ + " --batch < " + input);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const auto j = json_lines(r.out);
  ASSERT_EQ(j.size(), 6U) << r.out;
  EXPECT_EQ(j[0]["value"], "memfd");
  EXPECT_EQ(j[1]["value"], "process_vm_readv");
  EXPECT_EQ(j[1]["reason"], "DEFAULT");
  EXPECT_EQ(j[2]["reason"], "ERROR");
  EXPECT_NE(j[2]["errorMessage"].get<std::string>().find("input line 3"), std::string::npos);
  EXPECT_EQ(j[3]["errorCode"], "GENERAL");
  EXPECT_EQ(j[4]["errorCode"], "FLAG_NOT_FOUND");
  EXPECT_EQ(j[4]["value"], 5);
  EXPECT_EQ(j[5]["reason"], "DISABLED");
}

TEST_F(FlagsCliTest, CheckReportsFileLineColumn) {
  CommandResult r = memsnap("flags check " + flags_, true);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("ok, 4 flags"), std::string::npos) << r.out;

  const std::string bad = dir_ + "/bad.json";
  std::ofstream(bad) << "{\"flags\": {\n  \"a\": {\"state\": \"ENABLED\",\n"
                        "        \"variants\": {\"x\": 1}, \"targeting\": {\"nope\": [1]}}}}\n";
  r = memsnap("flags check " + flags_ + " " + bad, true);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find(bad + ":3:44: flag \"a\": targeting: unknown operator \"nope\""),
            std::string::npos)
      << r.out;

  const std::string broken = dir_ + "/broken.yaml";
  std::ofstream(broken) << "flags:\n  a: {state: ENABLED\n";
  r = memsnap("flags check " + broken, true);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.out.find(broken + ":"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("invalid YAML"), std::string::npos) << r.out;
}

// Budgets (flags/budgets.h, issue 26 item 6): a rule that runs past an evaluation budget even
// with an empty context, and a YAML alias bomb, are errors with their file:line:col.
TEST_F(FlagsCliTest, CheckRefusesBudgetBombsWithTheirLocation) {
  std::string list = "[";
  for (int i = 0; i < 64; ++i) list += (i == 0 ? "" : ",") + std::to_string(i);
  list += "]";
  const std::string doubling = dir_ + "/doubling.json";
  std::ofstream(doubling) << "{\"flags\": {\"bomb\": {\"state\": \"ENABLED\",\n"
                             "  \"variants\": {\"a\": \"a\"}, \"defaultVariant\": \"a\",\n"
                             "  \"targeting\": {\"reduce\": [" +
                                 list +
                                 ", {\"merge\": [{\"var\": \"accumulator\"}, "
                                 "{\"var\": \"accumulator\"}]}, [1]]}}}}\n";
  CommandResult r = memsnap("flags check " + doubling, true);
  ASSERT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find(doubling + ":3:16: flag \"bomb\": targeting: targeting exceeded its "
                                  "evaluation budget"),
            std::string::npos)
      << r.out;

  const std::string aliases = dir_ + "/aliases.yaml";
  std::string text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n";
  for (int i = 1; i < 9; ++i) {
    text += "a" + std::to_string(i) + ": &a" + std::to_string(i) + " [";
    for (int k = 0; k < 10; ++k) text += std::string(k == 0 ? "" : ", ") + "*a" + std::to_string(i - 1);
    text += "]\n";
  }
  std::ofstream(aliases) << text << "flags: {}\n";
  r = memsnap("flags check " + aliases, true);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find(aliases + ":1:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("more than 1000000 values"), std::string::npos) << r.out;
}

TEST_F(FlagsCliTest, UnloadableFileAndBadUsage) {
  EXPECT_EQ(memsnap("flags eval --flags " + dir_ + "/absent.yaml --flag a").exit_code, 1);
  EXPECT_EQ(memsnap("flags eval --flags " + flags_).exit_code, 2);
  EXPECT_EQ(memsnap("flags eval --flags " + flags_ + " --flag a --type nope").exit_code, 2);
  EXPECT_EQ(memsnap("flags eval --flags " + flags_ + " --flag a --context '[1]'").exit_code, 2);
  EXPECT_EQ(memsnap("flags check").exit_code, 2);
  EXPECT_EQ(memsnap("flags").exit_code, 2);
}

// A variant of the strategy flag (memory-export-strategy) whose value names no loaded strategy
// plugin, a typo such as "memfdd", was accepted as "ok": every sandbox it picks would fall back
// at its pause. `flags check` warns and lists the loaded plugins; with --plugins DIR (the
// plugins the file is meant for) it is an error.
TEST_F(FlagsCliTest, CheckSaysWhenAStrategyVariantNamesNoLoadedPlugin) {
  const std::string typo = dir_ + "/typo.yaml";
  std::ofstream(typo) << "flags:\n  memory-export-strategy:\n    state: ENABLED\n"
                         "    variants: {process_vm_readv: process_vm_readv, memfd: memfdd}\n"
                         "    defaultVariant: process_vm_readv\n";
  CommandResult r = memsnap("flags check " + typo, true);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("warning"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"memfdd\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("hole_punch, memfd, process_vm_readv"), std::string::npos) << r.out;

  const std::string plugins = testing::plugin_directory();
  r = memsnap("flags check --plugins " + plugins + " " + typo, true);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("\"memfdd\""), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find(": ok,"), std::string::npos) << r.out;

  // Spelled right, or not the strategy flag (flags_ has a "strategy" flag): nothing to say.
  const std::string src = MEMSNAP_SOURCE_DIR;
  r = memsnap("flags check --plugins " + plugins + " " + src + "/config/flags.yaml " + flags_,
              true);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.out.find("warning"), std::string::npos) << r.out;
  // --plugins naming a directory without plugins cannot vouch for anything.
  r = memsnap("flags check --plugins " + dir_ + " " + typo, true);
  EXPECT_EQ(r.exit_code, 1) << r.out;
}

// memsnapd's strategy flag is configurable (flags.strategy_flag): a file keyed otherwise went
// unchecked, whatever its variants named.
TEST_F(FlagsCliTest, CheckHoldsTheConfiguredStrategyFlagAgainstThePlugins) {
  const std::string typo = dir_ + "/custom-key.yaml";
  std::ofstream(typo) << "flags:\n  export-strategy:\n    state: ENABLED\n"
                         "    variants: {a: process_vm_readv, b: memfdd}\n"
                         "    defaultVariant: a\n";
  const std::string plugins = testing::plugin_directory();
  CommandResult r = memsnap("flags check --plugins " + plugins + " " + typo, true);
  EXPECT_EQ(r.exit_code, 0) << r.out;  // not the default key: nothing to hold against
  r = memsnap("flags check --strategy-flag export-strategy --plugins " + plugins + " " + typo,
              true);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("flag \"export-strategy\": variant \"b\""), std::string::npos) << r.out;
}

TEST_F(FlagsCliTest, ShippedFlagsFilesAreValid) {
  const std::string src = MEMSNAP_SOURCE_DIR;
  const CommandResult r = memsnap("flags check " + src + "/config/flags.yaml " + src +
                                      "/docs/experiments/strategy-ab-flag.yaml",
                                  true);
  EXPECT_EQ(r.exit_code, 0) << r.out;
}

}  // namespace
}  // namespace memsnap
