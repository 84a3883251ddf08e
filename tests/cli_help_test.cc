// Every command explains itself and refuses what it cannot do before doing anything: the real
// memsnap and memsnapd binaries, their --help, --version, argument checks and manual pages.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "plugins/plugin_api/plugin_api.h"
#include "tests/memsnap_cli.h"
#include "tools/guest_client/guest_client.h"

namespace memsnap {
namespace {

using testing::CommandResult;

std::string bin_dir() {
  return std::filesystem::path(testing::memsnap_binary()).parent_path().string();
}

// `program args` (a binary of the build) in a shell; stdout, and stderr folded in when
// with_stderr.
CommandResult run(const std::string& program, const std::string& args, bool with_stderr = true) {
  // Without the caller's $MEMSNAP_SOCKET: a command meant to be local must stay local.
  return testing::run_shell("env -u MEMSNAP_SOCKET " + bin_dir() + "/" + program + " " + args +
                            (with_stderr ? " 2>&1" : " 2>/dev/null") + " </dev/null");
}

CommandResult memsnap(const std::string& args) { return run("memsnap", args); }

// The command names of `memsnap --help` (the lines under "commands:" and "client commands").
std::vector<std::string> listed_commands(const std::string& overview, const std::string& title) {
  std::vector<std::string> out;
  std::istringstream in(overview);
  bool inside = false;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(title, 0) == 0) {
      inside = true;
      continue;
    }
    if (inside && (line.empty() || line[0] != ' ')) break;
    if (inside && line.rfind("  ", 0) == 0 && line[2] != ' ') {
      const auto end = line.find("  ", 2);
      out.push_back(line.substr(2, end - 2));
    }
  }
  return out;
}

TEST(CliHelpTest, EveryCommandHasHelpFromTheTable) {
  const CommandResult overview = memsnap("--help");
  ASSERT_EQ(overview.exit_code, 0) << overview.out;
  const auto local = listed_commands(overview.out, "commands:");
  const auto client = listed_commands(overview.out, "client commands");
  for (const char* expected : {"demo", "experiment run", "experiment report", "compare",
                               "plugins list", "pause", "inspect", "recover", "resume", "cycle",
                               "qemu cycle", "flags eval", "flags check"}) {
    EXPECT_NE(std::find(local.begin(), local.end(), expected), local.end()) << expected;
  }
  EXPECT_EQ(client.size(), 10u) << overview.out;
  for (const auto& name : local) {
    const CommandResult help = memsnap(name + " --help");
    EXPECT_EQ(help.exit_code, 0) << name << ": " << help.out;
    EXPECT_EQ(help.out.rfind("usage: memsnap " + name, 0), 0u) << name << ": " << help.out;
    EXPECT_NE(help.out.find("  -h, --help"), std::string::npos) << name;
  }
  for (const auto& name : client) {
    const CommandResult help = memsnap("--socket /nonexistent/memsnapd.sock " + name + " --help");
    EXPECT_EQ(help.exit_code, 0) << name << ": " << help.out;
    EXPECT_NE(help.out.find("usage: memsnap --socket PATH " + name), std::string::npos)
        << name << ": " << help.out;
  }
  // pause and resume exist in both modes: their help shows both forms.
  const CommandResult pause = memsnap("pause -h");
  EXPECT_NE(pause.out.find("usage: memsnap pause"), std::string::npos) << pause.out;
  EXPECT_NE(pause.out.find("usage: memsnap --socket PATH pause ID"), std::string::npos)
      << pause.out;
}

TEST(CliHelpTest, VersionNamesThePluginAbi) {
  const CommandResult v = memsnap("--version");
  EXPECT_EQ(v.exit_code, 0);
  const std::string abi = " (plugin ABI " + std::to_string(plugin::kAbiVersion) + ")\n";
  EXPECT_EQ(v.out, "memsnap " MEMSNAP_VERSION + abi);
  const CommandResult d = run("memsnapd", "--version");
  EXPECT_EQ(d.exit_code, 0);
  EXPECT_EQ(d.out, "memsnapd " MEMSNAP_VERSION + abi);
}

TEST(CliHelpTest, AnUnknownCommandIsOneLineWithTheClosestName) {
  const CommandResult r = memsnap("compair --size 4M");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_EQ(r.out,
            "memsnap: unknown command 'compair' (did you mean compare?); memsnap --help lists "
            "the commands\n");
}

TEST(CliHelpTest, AGroupNamesItsSubcommands) {
  const CommandResult bare = memsnap("experiment");
  EXPECT_EQ(bare.exit_code, 2);
  EXPECT_EQ(bare.out,
            "memsnap experiment: needs a subcommand: run, report (memsnap experiment run "
            "--help)\n");
  const CommandResult help = memsnap("experiment --help");
  EXPECT_EQ(help.exit_code, 0) << help.out;
  EXPECT_NE(help.out.find("experiment report"), std::string::npos) << help.out;
  const CommandResult wrong = memsnap("experiment rnu");
  EXPECT_EQ(wrong.exit_code, 2);
  EXPECT_NE(wrong.out.find("unknown subcommand 'rnu' (did you mean run?)"), std::string::npos)
      << wrong.out;
}

// Each of these was accepted (or misread) and then did work, or failed late; now the check
// refuses it with exit 2 before anything is done (a client command never reaches the socket:
// exit 3 would say it tried).
TEST(CliHelpTest, BadArgumentsAreRefusedBeforeAnyWork) {
  struct Case {
    std::string args;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"compare --dirty-fraction 2", "--dirty-fraction must be a fraction between 0 and 1"},
      {"compare --size 0", "--size must be positive (at least 4 KiB), not '0'"},
      {"cycle --strategy memfd --dirty-fraction 1.5", "--dirty-fraction must be a fraction"},
      {"cycle --strategy memfd --mode lazzy", "(did you mean lazy?)"},
      {"cycle --mode lazy", "needs --strategy S"},
      {"qemu cycle --strategy memfd --accel kvn", "(did you mean kvm?)"},
      {"experiment run --sandboxes 0", "--sandboxes must be at least 1, not '0'"},
      {"flags eval --flags f.json --flag x --context '{'", "--context takes JSON"},
      {"inspect a.snap b.snap", "takes 1 FILE (got 2: a.snap, b.snap)"},
      {"--socket /nonexistent/s pause sb-42 --aftr continue",
       "unknown option '--aftr' (did you mean --after?)"},
      {"--socket /nonexistent/s sandbox sb-42 --wait-while resumin",
       "--wait-while takes running, pausing, paused, resuming, failed, exporting, export_failed, "
       "not 'resumin' (did you mean resuming?)"},
      {"--socket /nonexistent/s pause sb-42 sb-43", "takes 1 ID (got 2: sb-42, sb-43)"},
      {"health", "talks to memsnapd: give its socket with --socket PATH"},
      {"--socket /nonexistent/s demo", "has no client mode"},
  };
  for (const auto& c : cases) {
    const CommandResult r = memsnap(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << ": " << r.out;
    EXPECT_NE(r.out.find(c.says), std::string::npos) << c.args << ": " << r.out;
  }
}

// Asked for JSON, a refusal is JSON on stdout too, whether the table or the command refused.
TEST(CliHelpTest, RefusalsAreJsonWhenJsonWasAskedFor) {
  for (const std::string args : {"compare --json --size 0", "compare --json --strategies memfd,bogus",
                                  "inspect --json", "cycle --strategy memfd --json --sise 4M"}) {
    const CommandResult r = run("memsnap", args, false);
    EXPECT_EQ(r.exit_code, 2) << args << ": " << r.out;
    const auto j = nlohmann::json::parse(r.out, nullptr, false);
    ASSERT_TRUE(j.is_object()) << args << ": " << r.out;
    EXPECT_EQ(j["error"]["code"], "invalid_argument") << args << ": " << r.out;
  }
}

// Options that mean something only beside another were accepted alone and ignored.
TEST(CliHelpTest, OptionsThatNeedAnotherAreRefusedAlone) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"pause --strategy memfd --sandbox sb-1 --memfd-of-pid 1 --out x.snap",
       "--sandbox and --attr go with --flags"},
      {"pause --strategy memfd --memfd-fd 3 --pid 1 --regions 0x1000:4K --out x.snap",
       "--memfd-fd goes with --memfd-of-pid"},
      {"qemu cycle --strategy memfd --sandbox sb-1", "--sandbox goes with --flags"},
      {"cycle --strategy memfd --generations 0x10", "--generations takes a whole number"},
      {"recover x.tmp --memfd-of-pid 4294967297", "--memfd-of-pid must be at most 4194304"},
      {"experiment run --size 5000", "--size must be a multiple of 4 KiB"},
      {"experiment run --arms memfd=x", "--arms weight of memfd must be a whole number"},
      {"cycle --strategy memfdd --keep /nonexistent-dir/x", "no loaded strategy plugin 'memfdd'"},
  };
  for (const auto& [args, says] : cases) {
    const CommandResult r = memsnap(args);
    EXPECT_EQ(r.exit_code, 2) << args << ": " << r.out;
    EXPECT_NE(r.out.find(says), std::string::npos) << args << ": " << r.out;
  }
}

TEST(CliHelpTest, MemsnapdChecksItsArgumentsFromItsTable) {
  const CommandResult bad = run("memsnapd", "--conifg x.yaml");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_EQ(bad.out, "memsnapd: unknown option '--conifg' (did you mean --config?) (memsnapd "
                     "--help)\n");
  const CommandResult set = run("memsnapd", "--set novalue");
  EXPECT_EQ(set.exit_code, 2);
  EXPECT_NE(set.out.find("--set takes KEY=VALUE, not 'novalue'"), std::string::npos) << set.out;
  const CommandResult help = run("memsnapd", "--help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("--print-config"), std::string::npos) << help.out;
  EXPECT_NE(help.out.find("signals:"), std::string::npos) << help.out;
  const CommandResult printed = run("memsnapd", "--print-config --set=limits.max_concurrent_pauses=3",
                                    false);
  EXPECT_EQ(printed.exit_code, 0) << printed.out;
  EXPECT_NE(printed.out.find("max_concurrent_pauses: 3"), std::string::npos) << printed.out;
}

// The build writes both manual pages from the binaries' tables; man renders them without a
// warning, and they name every command and option the help does.
TEST(CliHelpTest, TheBuildGeneratesManualPagesThatManRenders) {
  const std::filesystem::path share =
      std::filesystem::path(bin_dir()).parent_path() / "share" / "man";
  struct Page {
    std::string program;
    std::filesystem::path file;
  };
  for (const Page& page : {Page{"memsnap", share / "man1" / "memsnap.1"},
                           Page{"memsnapd", share / "man8" / "memsnapd.8"}}) {
    ASSERT_TRUE(std::filesystem::exists(page.file)) << page.file;
    std::ifstream in(page.file);
    const std::string built((std::istreambuf_iterator<char>(in)), {});
    EXPECT_EQ(built, run(page.program, "--man", false).out) << "the build's page is stale";
    // man's warnings go to stderr: keep them, drop the page.
    const CommandResult rendered = testing::run_shell(
        "MANWIDTH=100 man --warnings -E UTF-8 -l " + page.file.string() + " 2>&1 >/dev/null");
    EXPECT_EQ(rendered.exit_code, 0) << rendered.out;
    EXPECT_EQ(rendered.out, "") << "man warned about " << page.file;
  }
  std::ifstream in(share / "man1" / "memsnap.1");
  const std::string man((std::istreambuf_iterator<char>(in)), {});
  for (const char* expected : {".SS \"qemu cycle\"", ".SS \"unregister\"", "\\-\\-dirty\\-fraction",
                               "\\-\\-no\\-freeze", ".SH \"EXIT STATUS\""}) {
    EXPECT_NE(man.find(expected), std::string::npos) << expected;
  }
}

// A local pause stops the VMM for the copy unless told not to: a copy of a running guest is torn.
TEST(CliHelpTest, LocalPauseFreezesTheVmmByDefault) {
  GuestOptions o;
  o.size = 4 << 20;
  o.backing = "memfd";
  auto g = GuestProcess::spawn(o);
  ASSERT_TRUE(g.ok()) << g.error().to_string();
  char dir_template[] = "/var/tmp/cli-help-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  const std::string pid = std::to_string((*g)->pid());
  const CommandResult frozen = run("memsnap", "pause --memfd-of-pid " + pid +
                                                  " --strategy memfd --out " + dir +
                                                  "/a.snap --json",
                                   false);
  ASSERT_EQ(frozen.exit_code, 0) << frozen.out;
  const auto phases = nlohmann::json::parse(frozen.out).at("phases");
  EXPECT_TRUE(phases.contains("freeze")) << phases.dump();
  EXPECT_TRUE(phases.contains("thaw")) << phases.dump();

  const CommandResult running = run("memsnap", "pause --memfd-of-pid " + pid +
                                                   " --strategy memfd --no-freeze --out " + dir +
                                                   "/b.snap --json",
                                    false);
  ASSERT_EQ(running.exit_code, 0) << running.out;
  EXPECT_FALSE(nlohmann::json::parse(running.out).at("phases").contains("freeze"));

  const CommandResult both = memsnap("pause --memfd-of-pid " + pid +
                                     " --strategy memfd --no-freeze --stop --out " + dir +
                                     "/c.snap");
  EXPECT_EQ(both.exit_code, 2) << both.out;
  EXPECT_NE(both.out.find("--no-freeze contradicts --stop"), std::string::npos) << both.out;
  EXPECT_FALSE(std::filesystem::exists(dir + "/c.snap"));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace memsnap
