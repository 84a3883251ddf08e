// memsnap experiment run + report, end to end: a real memsnapd, stand-in sandboxes split by a
// flag, interleaved cycles, then the analysis with its Markdown, JSON and SVG.
#include <unistd.h>

#include <chrono>
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

// A fresh directory under /var/tmp ("" if none could be made).
std::string temp_dir() {
  char templ[] = "/var/tmp/memsnap-experiment-test-XXXXXX";
  return ::mkdtemp(templ) ? std::string(templ) : std::string();
}

TEST(ExperimentCli, RunThenReportEveryArm) {
  const std::string dir = temp_dir();
  ASSERT_FALSE(dir.empty());
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

// --split pause-mode: the arms are the pause-mode flag's variants (copy, handover), every sandbox
// on the memfd strategy; each pause records its answer and its durable latency (a handover
// pause is waited for before the resume), and the report compares both per arm.
TEST(ExperimentCli, RunSplitOnPauseModeReportsBothLatencies) {
  const std::string dir = temp_dir();
  ASSERT_FALSE(dir.empty());
  const std::string results = dir + "/results.json";
  const auto run = testing::run_memsnap(
      "experiment run --split pause-mode --sandboxes 4 --cycles 3 --size 16M --keep " + dir +
          "/run --out " + results,
      true);
  ASSERT_EQ(run.exit_code, 0) << run.out;
  // The flag file memsnapd evaluated: the pause-mode split, and one strategy for everyone.
  const std::string flags = slurp(dir + "/run/flags.yaml");
  EXPECT_NE(flags.find("  pause-mode:"), std::string::npos) << flags;
  EXPECT_NE(flags.find("- [handover, 1]"), std::string::npos) << flags;
  EXPECT_NE(flags.find("  memory-export-strategy:"), std::string::npos) << flags;
  const json r = json::parse(slurp(results));
  EXPECT_EQ(r["experiment"]["flag"], "pause-mode");
  EXPECT_EQ(r["experiment"]["strategy"], "memfd");
  ASSERT_EQ(r["operations"].size(), 12u);
  std::set<std::string> modes;
  for (const auto& op : r["operations"]) {
    ASSERT_FALSE(op.contains("error")) << op.dump();
    EXPECT_EQ(op["mismatches"], 0) << op.dump();
    EXPECT_EQ(op["strategy"], "memfd") << op.dump();
    // Chosen by memsnapd from the flag, and run as chosen.
    EXPECT_EQ(op["mode_source"], "flag") << op.dump();
    EXPECT_EQ(op["mode"], op["mode_variant"]) << op.dump();
    modes.insert(op["mode"].get<std::string>());
    const double answer = op["answer_seconds"].get<double>();
    const double durable = op["durable_seconds"].get<double>();
    EXPECT_GT(answer, 0) << op.dump();
    EXPECT_GE(op["answer_wall_seconds"].get<double>(), answer) << op.dump();
    EXPECT_GT(op["export_cpu_seconds"].get<double>(), 0) << op.dump();
    EXPECT_GT(op["bytes"].get<double>(), 0) << op.dump();
    if (op["mode"] == "copy") {
      EXPECT_EQ(durable, answer) << op.dump();
    } else {
      EXPECT_GT(durable, answer) << op.dump();
    }
  }
  // exp-1-1..4 fall in both arms (flagd bucketing is stable: exp-1-4 in handover).
  EXPECT_EQ(modes, (std::set<std::string>{"copy", "handover"}));

  const auto report = testing::run_memsnap("experiment report " + results, true);
  ASSERT_EQ(report.exit_code, 0) << report.out;
  const std::string md = slurp(dir + "/results-report.md");
  const json rj = json::parse(slurp(dir + "/results-report.json"));
  EXPECT_EQ(rj["baseline"], "copy");
  EXPECT_NE(md.find("# memsnap pause-mode experiment"), std::string::npos) << md.substr(0, 300);
  EXPECT_NE(md.find("strategy memfd"), std::string::npos) << md.substr(0, 300);
  // Both latencies of both arms (how they are laid out: experiment_test's
  // PauseModeArmsShowAnswerAndDurableLatencies).
  ASSERT_EQ(rj["arms"].size(), 2u);
  for (const auto& arm : rj["arms"]) {
    for (const char* m : {"answer_seconds", "answer_wall_seconds", "durable_seconds"}) {
      ASSERT_TRUE(arm["metrics"].contains(m)) << m << " " << arm.dump();
      EXPECT_GE(arm["metrics"][m]["n"].get<int>(), 2) << m << " " << arm.dump();
    }
  }
  EXPECT_NE(md.find("### pause durable latency (`durable_seconds`)"), std::string::npos) << md;
  EXPECT_EQ(md.find("(`pause_seconds`)"), std::string::npos) << md;
  const std::string svg = slurp(dir + "/results-report.svg");
  EXPECT_NE(svg.find("pause durable latency: ECDF per pause mode"), std::string::npos);
  fs::remove_all(dir);
}

// A pause-mode split's arms must be pause modes, and --strategy belongs to it: both refused
// before memsnapd starts (a typo would be a flag variant memsnapd falls back from, in every pause).
TEST(ExperimentCli, PauseModeSplitRefusesArmsThatAreNotModes) {
  auto run = testing::run_memsnap(
      "experiment run --split pause-mode --arms copy=1,memfd=1 --out /var/tmp/unused.json", true);
  EXPECT_EQ(run.exit_code, 2) << run.out;
  EXPECT_NE(run.out.find("not memfd"), std::string::npos) << run.out;
  EXPECT_EQ(run.out.find("memsnapd pid"), std::string::npos) << run.out;
  run = testing::run_memsnap("experiment run --strategy memfd --out /var/tmp/unused.json", true);
  EXPECT_EQ(run.exit_code, 2) << run.out;
  EXPECT_NE(run.out.find("--split pause-mode"), std::string::npos) << run.out;
  EXPECT_FALSE(fs::exists("/var/tmp/unused.json"));
}

// The report of a pause-mode split from a results file: the arm is the flag's variant (intention
// to treat), and pauses that ran in another mode are said to have.
TEST(ExperimentCli, PauseModeReportCountsModeFallbacks) {
  const std::string dir = temp_dir();
  ASSERT_FALSE(dir.empty());
  json ops = json::array();
  for (int i = 0; i < 8; ++i) {
    const bool handover = i % 2 == 1;
    json op = {{"cycle", 2},
               {"sandbox", "s" + std::to_string(i)},
               {"strategy", "memfd"},
               {"variant", "memfd"},
               {"mode", handover ? "handover" : "copy"},
               {"requested_mode", handover ? "handover" : "copy"},
               {"mode_source", "flag"},
               {"mode_variant", handover ? "handover" : "copy"},
               {"mode_fallback", nullptr},
               {"pause_seconds", handover ? 0.002 : 0.05},
               {"answer_seconds", handover ? 0.002 + i * 1e-4 : 0.05 + i * 1e-3},
               {"answer_wall_seconds", handover ? 0.004 + i * 1e-4 : 0.052 + i * 1e-3},
               {"durable_seconds", handover ? 0.08 + i * 1e-3 : 0.05 + i * 1e-3},
               {"export_cpu_seconds", 0.01}};
    if (i == 7) {
      op["mode"] = "copy";
      op["mode_fallback"] = {{"from", "handover"}, {"to", "copy"}, {"reason", "no_memfd"},
                             {"detail", "x"}};
    }
    ops.push_back(op);
  }
  const std::string results = dir + "/results.json";
  std::ofstream(results) << json{{"experiment", {{"flag", "pause-mode"},
                                                 {"strategy", "memfd"},
                                                 {"weights", {{"copy", 1}, {"handover", 1}}}}},
                                 {"operations", ops}}
                                .dump();
  const auto report = testing::run_memsnap("experiment report " + results, true);
  ASSERT_EQ(report.exit_code, 0) << report.out;
  const json rj = json::parse(slurp(dir + "/results-report.json"));
  EXPECT_EQ(rj["baseline"], "copy");
  ASSERT_EQ(rj["arms"].size(), 2u);
  EXPECT_EQ(rj["arms"][1]["name"], "handover");
  EXPECT_EQ(rj["arms"][1]["records"], 4);  // the one that ran as copy stays in its arm
  EXPECT_EQ(rj["arms"][1]["metrics"]["durable_seconds"]["n"], 4);
  bool noted = false;
  for (const auto& n : rj["notes"]) {
    noted = noted || n.get<std::string>().find("1 pause(s) of arm handover ran as copy (no_memfd)") !=
                         std::string::npos;
  }
  EXPECT_TRUE(noted) << rj["notes"].dump();
  fs::remove_all(dir);
}

// Output paths are checked before the run starts: an --out that cannot be written fails at
// once, names the path, and no run happens (it used to run for minutes, say "written to" and
// exit 0 with no file).
TEST(ExperimentCli, UnwritableOutputFailsBeforeTheRun) {
  const std::string dir = temp_dir();
  ASSERT_FALSE(dir.empty());
  const std::string bad = dir + "/no-such-dir/x.json";
  const auto start = std::chrono::steady_clock::now();
  const auto run =
      testing::run_memsnap("experiment run --sandboxes 1 --cycles 1 --size 16M --out " + bad, true);
  EXPECT_NE(run.exit_code, 0) << run.out;
  EXPECT_NE(run.out.find(bad), std::string::npos) << run.out;
  EXPECT_EQ(run.out.find("written to"), std::string::npos) << run.out;
  EXPECT_EQ(run.out.find("memsnapd pid"), std::string::npos) << "the run started: " << run.out;
  EXPECT_FALSE(fs::exists(bad));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));

  // A directory given as the output file is refused the same way.
  const auto to_dir =
      testing::run_memsnap("experiment run --sandboxes 1 --cycles 1 --size 16M --out " + dir, true);
  EXPECT_NE(to_dir.exit_code, 0) << to_dir.out;
  EXPECT_NE(to_dir.out.find(dir), std::string::npos) << to_dir.out;
  EXPECT_EQ(to_dir.out.find("memsnapd pid"), std::string::npos) << to_dir.out;

  // experiment report: its --out prefix is checked before anything is written, and nothing
  // claims to be written.
  const std::string results = dir + "/results.json";
  std::ofstream(results)
      << R"({"experiment": {"weights": {"a": 1, "b": 1}}, "operations": [)"
      << R"({"cycle": 2, "sandbox": "s1", "variant": "a", "pause_seconds": 0.1},)"
      << R"({"cycle": 2, "sandbox": "s2", "variant": "b", "pause_seconds": 0.2}]})";
  const std::string bad_prefix = dir + "/no-such-dir/report";
  const auto report = testing::run_memsnap(
      "experiment report " + results + " --baseline a --out " + bad_prefix, true);
  EXPECT_NE(report.exit_code, 0) << report.out;
  EXPECT_NE(report.out.find(bad_prefix), std::string::npos) << report.out;
  EXPECT_FALSE(fs::exists(dir + "/no-such-dir"));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace memsnap
