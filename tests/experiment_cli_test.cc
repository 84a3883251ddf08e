// memsnap experiment run + report, end to end: a real memsnapd, stand-in sandboxes split by a
// flag, interleaved cycles, then the analysis with its Markdown, JSON and SVG.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/memsnap_cli.h"

namespace memsnap {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

TEST(ExperimentCli, RunThenReportEveryArm) {
  char templ[] = "/var/tmp/memsnap-experiment-test-XXXXXX";
  ASSERT_NE(::mkdtemp(templ), nullptr);
  const std::string dir = templ;
  const std::string results = dir + "/results.json";
  const auto run = testing::run_memsnap(
      "experiment run --sandboxes 6 --cycles 3 --size 32M --out " + results, true);
  ASSERT_EQ(run.exit_code, 0) << run.out;
  const json r = json::parse(slurp(results));
  ASSERT_EQ(r["operations"].size(), 18u);
  EXPECT_EQ(r["experiment"]["thp"], false);
  EXPECT_TRUE(r["experiment"]["thp_shmem_enabled"].is_string());
  std::set<std::string> strategies;
  for (const auto& op : r["operations"]) {
    ASSERT_FALSE(op.contains("error")) << op.dump();
    EXPECT_EQ(op["mismatches"], 0) << op.dump();
    EXPECT_GT(op["peak_memory_bytes"].get<double>(), 0) << op.dump();
    // Recorded for every operation (0 here: no THP asked, and pages are 4 KiB).
    ASSERT_TRUE(op["guest_huge_bytes"].is_number_unsigned()) << op.dump();
    strategies.insert(op["strategy"].get<std::string>());
    // Only memfd keeps the guest's memfd for a warm resume; the stand-in wrote all of it.
    ASSERT_TRUE(op["held_memory_bytes"].is_number_unsigned()) << op.dump();
    if (op["strategy"] == "memfd") {
      EXPECT_GE(op["held_memory_bytes"].get<std::uint64_t>(), (32u << 20) * 9 / 10) << op.dump();
    } else {
      EXPECT_EQ(op["held_memory_bytes"], 0) << op.dump();
    }
  }
  // sb ids exp-1-1..6 fall in all three arms of the even split (flagd bucketing is stable).
  EXPECT_EQ(strategies.size(), 3u);

  const auto report = testing::run_memsnap("experiment report " + results + " --json", true);
  ASSERT_EQ(report.exit_code, 0) << report.out;
  const std::string md = slurp(dir + "/results-report.md");
  const std::string svg = slurp(dir + "/results-report.svg");
  const json rj = json::parse(slurp(dir + "/results-report.json"));
  for (const auto& s : strategies) {
    EXPECT_NE(md.find(s), std::string::npos) << s;
    EXPECT_NE(svg.find(s), std::string::npos) << s;
  }
  EXPECT_NE(md.find("## Verdicts"), std::string::npos);
  // The title says what was run, from the results' settings.
  EXPECT_NE(md.find("32.0 MiB memfd guests, 10% of pages dirtied (random)"), std::string::npos)
      << md.substr(0, 400);
  EXPECT_NE(md.find("Sample ratio"), std::string::npos);
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  EXPECT_EQ(rj["baseline"], "process_vm_readv");
  // hole_punch releases memory and the others do not: the one verdict that must come out.
  EXPECT_NE(md.find("hole_punch releases"), std::string::npos) << md;
  EXPECT_NE(md.find("### memory held while paused (`held_memory_bytes`)"), std::string::npos)
      << md;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace memsnap
