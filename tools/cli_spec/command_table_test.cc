#include "tools/cli_spec/command_table.h"

#include <gtest/gtest.h>

namespace memsnap::cli_spec {
namespace {

Command sample() {
  Command c;
  c.name = "cycle";
  c.summary = "one stand-in VMM round and round";
  c.description = "First paragraph.\n\nSecond paragraph.";
  c.options = {
      {.name = "--strategy", .kind = ValueKind::kText, .placeholder = "S", .help = "which",
       .required = true},
      {.name = "--size", .kind = ValueKind::kSize, .placeholder = "BYTES", .help = "guest size",
       .default_text = "256M", .min = 4096},
      {.name = "--mode", .kind = ValueKind::kChoice, .help = "how",
       .choices = {"lazy", "background", "eager"}},
      {.name = "--dirty-fraction", .kind = ValueKind::kFraction, .placeholder = "F", .help = "d"},
      {.name = "--generations", .kind = ValueKind::kInteger, .placeholder = "N", .help = "g",
       .min = 1, .max = 1000},
      {.name = "--context", .kind = ValueKind::kJson, .placeholder = "JSON", .help = "c"},
      {.name = "--attr", .kind = ValueKind::kKeyValue, .placeholder = "K=V", .help = "a",
       .repeatable = true},
      {.name = "--json", .help = "JSON output"},
  };
  c.positional = {.name = "FILE", .min = 0, .max = 1, .help = "a file"};
  return c;
}

std::string error_of(std::vector<std::string> words) {
  return check(sample(), words).error;
}

TEST(CommandTableTest, AcceptsWhatTheTableDescribes) {
  EXPECT_EQ(error_of({"--strategy", "memfd", "--size", "64M", "--mode", "eager", "--json",
                      "--dirty-fraction", "0.5", "--generations", "3", "--context", "{}",
                      "--attr", "a=1", "--attr", "b=2", "file.snap"}),
            "");
  EXPECT_EQ(error_of({"--strategy=memfd", "--size=2M"}), "");
}

TEST(CommandTableTest, AnUnknownOptionIsRefusedWithTheClosestName) {
  EXPECT_EQ(error_of({"--strategy", "m", "--sise", "4K"}),
            "unknown option '--sise' (did you mean --size?)");
  EXPECT_EQ(error_of({"--strategy", "m", "--frobnicate"}), "unknown option '--frobnicate'");
}

TEST(CommandTableTest, ValuesOfTheWrongKindAreRefusedNamingTheOption) {
  EXPECT_EQ(error_of({"--strategy", "m", "--size", "0"}),
            "--size must be positive (at least 4 KiB), not '0'");
  EXPECT_EQ(error_of({"--strategy", "m", "--size", "lots"}),
            "--size takes a size like 4096, 64K, 2M or 1G, not 'lots'");
  EXPECT_EQ(error_of({"--strategy", "m", "--dirty-fraction", "2"}),
            "--dirty-fraction must be a fraction between 0 and 1 (0.1 = 10%), not '2'");
  EXPECT_EQ(error_of({"--strategy", "m", "--mode", "lazzy"}),
            "--mode takes lazy, background, eager, not 'lazzy' (did you mean lazy?)");
  EXPECT_EQ(error_of({"--strategy", "m", "--generations", "0"}),
            "--generations must be at least 1, not '0'");
  EXPECT_EQ(error_of({"--strategy", "m", "--generations", "1.5"}),
            "--generations takes a whole number, not '1.5'");
  EXPECT_EQ(error_of({"--strategy", "m", "--context", "{"}),
            "--context takes JSON (e.g. '{\"key\": \"value\"}'), not '{'");
  EXPECT_EQ(error_of({"--strategy", "m", "--attr", "novalue"}),
            "--attr takes KEY=VALUE, not 'novalue'");
}

TEST(CommandTableTest, MissingRepeatedAndSurplusWordsAreRefused) {
  EXPECT_EQ(error_of({}), "needs --strategy S");
  EXPECT_EQ(error_of({"--strategy"}), "--strategy needs a value (S)");
  EXPECT_EQ(error_of({"--strategy", "--json"}), "--strategy needs a value (S)");
  EXPECT_EQ(error_of({"--strategy", "a", "--strategy", "b"}), "--strategy given more than once");
  EXPECT_EQ(error_of({"--strategy", "a", "--json=yes"}), "--json takes no value");
  EXPECT_EQ(error_of({"--strategy", "a", "x", "y"}), "takes at most 1 FILE (got 2: x, y)");
}

TEST(CommandTableTest, HelpWinsOverEverythingElse) {
  EXPECT_TRUE(check(sample(), {"--bogus", "--help"}).help);
  EXPECT_TRUE(check(sample(), {"--help", "--bogus"}).help);
  EXPECT_TRUE(check(sample(), {"--strategy", "-h"}).help);
}

// strtod read 0x10 as 16 and the commands' stoi then read it as 0; a number past what the
// command's int holds threw out_of_range (an abort) or wrapped (a pid of 4294967297 is 1).
TEST(CommandTableTest, IntegersAreDecimalAndBounded) {
  EXPECT_EQ(error_of({"--strategy", "m", "--generations", "0x10"}),
            "--generations takes a whole number, not '0x10'");
  EXPECT_EQ(error_of({"--strategy", "m", "--generations", "1e2"}),
            "--generations takes a whole number, not '1e2'");
  Command c = sample();
  c.options.push_back({.name = "--seed", .kind = ValueKind::kInteger, .placeholder = "N"});
  EXPECT_EQ(check(c, {"--strategy", "m", "--seed", "99999999999"}).error,
            "--seed must be at most 2147483647, not '99999999999'");
  EXPECT_EQ(check(c, {"--strategy", "m", "--seed", "99999999999999999999999"}).error,
            "--seed takes a whole number, not '99999999999999999999999'");
  EXPECT_EQ(check(c, {"--strategy", "m", "--seed", "+7"}).error, "");
}

TEST(CommandTableTest, SizesCanBeRequiredToBeAMultiple) {
  Command c = sample();
  c.options[1].multiple_of = 4096;
  EXPECT_EQ(check(c, {"--strategy", "m", "--size", "5000"}).error,
            "--size must be a multiple of 4 KiB, not '5000'");
  EXPECT_EQ(check(c, {"--strategy", "m", "--size", "8K"}).error, "");
}

TEST(CommandTableTest, ClosestOnlySuggestsPlausibleMisspellings) {
  EXPECT_EQ(closest("memfdd", {"memfd", "process_vm_readv", "hole_punch"}), "memfd");
  EXPECT_EQ(closest("exp", {"experiment run", "compare"}), "experiment run");
  EXPECT_EQ(closest("zzzzzz", {"memfd", "compare"}), "");
  EXPECT_EQ(closest("rnu", {"run", "report"}), "run");  // two letters swapped: one edit
}

TEST(CommandTableTest, HelpAndManPageComeFromTheTable) {
  Program p;
  p.name = "memsnap";
  p.summary = "guest memory snapshots";
  p.synopsis = "COMMAND [options]";
  p.description = "Moves memory.";
  p.commands = {sample()};
  p.sections = {{"exit status", "0 done."}};
  const Command* c = &p.commands.front();
  const std::string help = help_text(p, {c});
  EXPECT_NE(help.find("usage: memsnap cycle --strategy S [FILE] [options]"), std::string::npos)
      << help;
  EXPECT_NE(help.find("  --size BYTES              guest size (default: 256M)"),
            std::string::npos)
      << help;
  EXPECT_NE(help.find("--mode lazy|background|eager"), std::string::npos) << help;
  EXPECT_NE(help.find("--attr K=V"), std::string::npos) << help;
  EXPECT_NE(help.find("(repeatable)"), std::string::npos) << help;
  const std::string man = man_page(p, "0.1.0");
  EXPECT_EQ(man.rfind(".TH MEMSNAP 1 \"\" \"memsnap 0.1.0\"", 0), 0u) << man;
  EXPECT_NE(man.find(".BI \"\\-\\-size \" \"BYTES\""), std::string::npos) << man;
  EXPECT_NE(man.find(".SH \"EXIT STATUS\""), std::string::npos) << man;
  EXPECT_NE(overview(p).find("  cycle               one stand-in VMM round and round"),
            std::string::npos)
      << overview(p);
}

TEST(CommandTableTest, SizesParseWithSuffixesAndRefuseOverflow) {
  EXPECT_EQ(parse_size("4096"), 4096u);
  EXPECT_EQ(parse_size("0x1000"), 4096u);
  EXPECT_EQ(parse_size("64K"), 65536u);
  EXPECT_EQ(parse_size("2MiB"), 2u << 20);
  EXPECT_EQ(parse_size("1G"), 1u << 30);
  EXPECT_FALSE(parse_size("-1").has_value());
  EXPECT_FALSE(parse_size("1T").has_value());
  EXPECT_FALSE(parse_size("99999999999999G").has_value());
}

}  // namespace
}  // namespace memsnap::cli_spec
