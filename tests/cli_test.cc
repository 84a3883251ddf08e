// The memsnap CLI as an operator runs it: a real binary, a real stand-in VMM, real files.
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "tests/memsnap_cli.h"
#include "tools/guest_client/guest_client.h"

namespace memsnap {
namespace {

using testing::CommandResult;
using testing::memsnap_binary;

// Runs memsnap with args (stderr folded into the output).
CommandResult memsnap(const std::string& args) { return testing::run_memsnap(args, true); }

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/var/tmp/memsnap-cli-XXXXXX";
    ASSERT_NE(mkdtemp(templ), nullptr);
    dir_ = templ;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(CliTest, PluginsListJsonHasOneObjectPerPlugin) {
  const CommandResult r = memsnap("plugins list --json");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  std::istringstream lines(r.out);
  std::string line;
  std::set<std::string> names;
  while (std::getline(lines, line)) {
    const auto j = nlohmann::json::parse(line);
    for (const char* key : {"name", "version", "abi", "status", "reason", "experimental"}) {
      EXPECT_TRUE(j.contains(key)) << key << " missing in " << line;
    }
    EXPECT_EQ(j["status"], "loaded") << line;
    EXPECT_EQ(j["abi"], 1);
    EXPECT_EQ(j["experimental"], j["name"] == "hole_punch");
    names.insert(j["name"].get<std::string>());
  }
  EXPECT_EQ(names, (std::set<std::string>{"hole_punch", "memfd", "process_vm_readv"}));
}

TEST_F(CliTest, PluginsListShowsARefusedPluginWithItsReason) {
  // A plugin directory with one good plugin copied in and one that is not a library.
  const std::string plugins = dir_ + "/plugins";
  std::filesystem::create_directory(plugins);
  const auto real = std::filesystem::path(memsnap_binary()).parent_path().parent_path() / "lib" /
                    "memsnap" / "plugins" / "memsnap_memfd.so";
  std::filesystem::copy_file(real, plugins + "/memsnap_memfd.so");
  std::ofstream(plugins + "/broken.so") << "not an ELF file\n";
  const CommandResult r = memsnap("plugins list --json --plugin-dir " + plugins);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("\"status\":\"refused\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("plugin_cannot_open"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"name\":\"memfd\""), std::string::npos) << r.out;
}

TEST_F(CliTest, PauseByMemfdOfPidThenInspectThenCorruptionIsCaught) {
  GuestOptions o;
  o.size = 16 << 20;
  o.backing = "memfd";
  o.zero_fraction = 0.25;
  auto g = GuestProcess::spawn(o);
  ASSERT_TRUE(g.ok()) << g.error().to_string();
  const std::string snap = dir_ + "/base.snap";
  const CommandResult paused = memsnap("pause --memfd-of-pid " + std::to_string((*g)->pid()) +
                                       " --strategy memfd --freeze --out " + snap + " --json");
  ASSERT_EQ(paused.exit_code, 0) << paused.out;
  const auto report = nlohmann::json::parse(paused.out);
  EXPECT_EQ(report["strategy"], "memfd");
  EXPECT_TRUE(report["fallback"].is_null());
  EXPECT_EQ(
      report.at("zero_blocks").get<std::uint64_t>() + report.at("data_blocks").get<std::uint64_t>(),
      4096u);
  EXPECT_EQ(report.at("data_blocks").get<std::uint64_t>(), 3072u);  // a quarter never written

  const CommandResult inspected = memsnap("inspect " + snap + " --json");
  ASSERT_EQ(inspected.exit_code, 0) << inspected.out;
  const auto info = nlohmann::json::parse(inspected.out);
  EXPECT_EQ(info["checksums"]["status"], "ok");
  EXPECT_EQ(info["data_blocks"], 3072u);
  EXPECT_EQ(info["generation"], 1u);
  // Format 2 records the strategy that wrote it, and what it declared.
  EXPECT_EQ(info["version"], 2u);
  EXPECT_EQ(info["strategy"], "memfd") << inspected.out;
  EXPECT_EQ(info["origin"]["strategy_capabilities"], "needs-memfd") << inspected.out;
  EXPECT_FALSE(info["origin"]["memsnap_version"].get<std::string>().empty()) << inspected.out;
  const CommandResult text = memsnap("inspect " + snap + " --no-verify");
  ASSERT_EQ(text.exit_code, 0) << text.out;
  EXPECT_NE(text.out.find("strategy     memfd "), std::string::npos) << text.out;

  // Flip one byte in the data area: inspect must say which checksum failed and exit 1.
  {
    std::fstream f(snap, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096 + 5 * 4096 + 100);
    f.put('\x5a');
  }
  const CommandResult corrupted = memsnap("inspect " + snap);
  EXPECT_EQ(corrupted.exit_code, 1) << corrupted.out;
  EXPECT_NE(corrupted.out.find("snapshot_checksum_mismatch"), std::string::npos) << corrupted.out;
}

// Issue 16 item 4, as reproduced by hand: `pause --strategy hole_punch --freeze` returned 0 and
// left the stand-in running on punched memory (its verify then saw every page as generation 0).
// Now it is refused with nothing released; --stop pauses it and leaves it stopped.
TEST_F(CliTest, HolePunchPauseNeverLeavesTheVmmRunningOnReleasedMemory) {
  GuestOptions o;
  o.size = 16 << 20;
  o.backing = "memfd";
  auto g = GuestProcess::spawn(o);
  ASSERT_TRUE(g.ok()) << g.error().to_string();
  const std::string pid = std::to_string((*g)->pid());
  const std::string snap = dir_ + "/punched.snap";
  const CommandResult refused =
      memsnap("pause --memfd-of-pid " + pid + " --strategy hole_punch --freeze --out " + snap);
  EXPECT_EQ(refused.exit_code, 1) << refused.out;
  EXPECT_NE(refused.out.find("must stay stopped"), std::string::npos) << refused.out;
  EXPECT_FALSE(std::filesystem::exists(snap));
  auto intact = (*g)->verify();
  ASSERT_TRUE(intact.ok()) << intact.error().to_string();
  EXPECT_EQ(*intact, 0u) << "pages lost although the pause was refused";

  const CommandResult stopped =
      memsnap("pause --memfd-of-pid " + pid + " --strategy hole_punch --stop --out " + snap);
  ASSERT_EQ(stopped.exit_code, 0) << stopped.out;
  std::ifstream stat("/proc/" + pid + "/stat");
  std::string line;
  ASSERT_TRUE(std::getline(stat, line));
  EXPECT_EQ(line[line.rfind(')') + 2], 'T') << "the VMM runs on released memory: " << line;
  const CommandResult inspected = memsnap("inspect " + snap + " --json");
  EXPECT_EQ(inspected.exit_code, 0) << inspected.out;
  (*g)->kill();
}

TEST_F(CliTest, PauseByRegionsWithADiffOnTop) {
  GuestOptions o;
  o.size = 8 << 20;
  o.backing = "anon";
  auto g = GuestProcess::spawn(o);
  ASSERT_TRUE(g.ok());
  std::string regions;
  for (const auto& r : (*g)->regions()) {
    regions +=
        (regions.empty() ? "" : ",") + std::to_string(r.host_addr) + ":" + std::to_string(r.size);
  }
  const std::string pid = std::to_string((*g)->pid());
  const CommandResult base = memsnap("pause --pid " + pid + " --regions " + regions +
                                     " --strategy process_vm_readv --out " + dir_ + "/b.snap");
  ASSERT_EQ(base.exit_code, 0) << base.out;
  const CommandResult diff = memsnap("pause --pid " + pid + " --regions " + regions +
                                     " --strategy process_vm_readv --parent " + dir_ +
                                     "/b.snap --dirty 0:8K,1M:4K --out " + dir_ + "/d.snap --json");
  ASSERT_EQ(diff.exit_code, 0) << diff.out;
  const auto j = nlohmann::json::parse(diff.out);
  EXPECT_EQ(j["generation"], 2u);
  EXPECT_EQ(j["dirty_bytes"], 12288u);
  EXPECT_EQ(j["parent_blocks"], 2048u - 3u);
}

// A local pause naming an existing snapshot (say the base of a chain) must not replace it: the
// chain would only fail at its next resume. Refused before the guest is touched.
TEST_F(CliTest, PauseNeverOverwritesAnExistingSnapshot) {
  GuestOptions o;
  o.size = 4 << 20;
  o.backing = "memfd";
  auto g = GuestProcess::spawn(o);
  ASSERT_TRUE(g.ok()) << g.error().to_string();
  const std::string snap = dir_ + "/base.snap";
  const std::string by_pid = "pause --memfd-of-pid " + std::to_string((*g)->pid());
  ASSERT_EQ(memsnap(by_pid + " --strategy memfd --out " + snap).exit_code, 0);
  std::ifstream before_in(snap, std::ios::binary);
  const std::string before((std::istreambuf_iterator<char>(before_in)),
                           std::istreambuf_iterator<char>());
  const CommandResult again = memsnap(by_pid + " --strategy memfd --out " + snap);
  EXPECT_NE(again.exit_code, 0) << again.out;
  EXPECT_NE(again.out.find("already_exists"), std::string::npos) << again.out;
  std::ifstream after_in(snap, std::ios::binary);
  const std::string after((std::istreambuf_iterator<char>(after_in)),
                          std::istreambuf_iterator<char>());
  EXPECT_EQ(after, before);
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir_)) ++files;
  EXPECT_EQ(files, 1u);  // no temporary file left
}

TEST_F(CliTest, BadInputIsAClearErrorAndNothingIsWritten) {
  CommandResult r = memsnap("pause --strategy memfd --out " + dir_ + "/x.snap");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("nothing to pause"), std::string::npos) << r.out;
  r = memsnap("pause --strategy nosuch --pid 1 --regions 0x1000:4K --out " + dir_ + "/x.snap");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("plugin_not_loaded"), std::string::npos) << r.out;
  r = memsnap("pause --strategy memfd --out " + dir_ + "/x.snap --block-size 3K");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.out.find("--block-size takes 4K, 2M"), std::string::npos) << r.out;
  r = memsnap("pause --strategy memfd --out " + dir_ + "/x.snap --bogus");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.out.find("unknown option '--bogus'"), std::string::npos) << r.out;
  r = memsnap("inspect " + dir_ + "/missing.snap");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(std::filesystem::is_empty(dir_));
}

TEST_F(CliTest, CycleJsonShowsEveryPageBackAfterTwoResumes) {
  const CommandResult r =
      memsnap("cycle --strategy process_vm_readv --size 16M --no-sync --discard-pages 64 --json");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  // Progress lines go to stderr (folded in here); the result is the one line of JSON.
  const auto j = nlohmann::json::parse(r.out.substr(r.out.find("\n{\"") + 1), nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["mismatches"], 0);
  ASSERT_EQ(j["generations"].size(), 2u);
  for (const auto& g : j["generations"]) {
    EXPECT_EQ(g["resume"]["mode"], "lazy");
    EXPECT_EQ(g["pages"], 4096);
    EXPECT_EQ(g["mismatches"], 0);
    EXPECT_GT(g["faults"]["faults"].get<std::uint64_t>(), 0u);
  }
}

TEST_F(CliTest, ResumeServesAVmmThatConnectsThroughTheHandshake) {
  // Pause a filled stand-in with the CLI, then let `memsnap resume` serve a new one.
  GuestOptions go;
  go.size = 8 << 20;
  go.backing = "anon";
  go.seed = 5;
  auto guest = GuestProcess::spawn(go);
  ASSERT_TRUE(guest.ok()) << guest.error().to_string();
  std::string regions;
  for (const auto& reg : (*guest)->regions()) {
    regions += (regions.empty() ? "" : ",") + std::to_string(reg.host_addr) + ":" +
               std::to_string(reg.size);
  }
  const std::string snap = dir_ + "/base.snap";
  const CommandResult paused =
      memsnap("pause --pid " + std::to_string((*guest)->pid()) + " --regions " + regions +
              " --strategy process_vm_readv --freeze --out " + snap);
  ASSERT_EQ(paused.exit_code, 0) << paused.out;
  const std::vector<std::uint32_t> expected = (*guest)->expected_generations();
  (*guest)->kill();

  const std::string sock = dir_ + "/vm.sock";
  // No --strategy: the snapshot records the one that wrote it.
  const std::string cmd = memsnap_binary() + " resume --snapshot " + snap + " --listen " + sock +
                          " --timeout 30 --json 2>&1";
  std::FILE* server = popen(cmd.c_str(), "r");
  ASSERT_NE(server, nullptr);
  for (int i = 0; i < 300 && !std::filesystem::exists(sock); ++i) usleep(10 * 1000);
  ASSERT_TRUE(std::filesystem::exists(sock));
  EXPECT_EQ(std::filesystem::status(sock).permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);

  GuestOptions rgo = go;
  rgo.handshake_socket = sock;
  rgo.no_fill = true;
  rgo.expect = expected;
  auto resumed = GuestProcess::spawn(rgo);
  ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
  ASSERT_TRUE((*resumed)->wait_ready(std::chrono::seconds(30)).ok());
  auto bad = (*resumed)->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u);
  (*resumed)->kill();

  std::string out;
  char buf[4096];
  while (std::fgets(buf, sizeof(buf), server) != nullptr) out += buf;
  const int status = pclose(server);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << out;
  // It says where it listens (it printed "listening on  for a VMM": --listen read twice).
  EXPECT_NE(out.find("listening on " + sock + " for a VMM"), std::string::npos) << out;
  const auto j = nlohmann::json::parse(out.substr(out.find("{\"")), nullptr, false);
  ASSERT_TRUE(j.is_object()) << out;
  EXPECT_EQ(j["mode"], "lazy");
  EXPECT_EQ(j["strategy"], "process_vm_readv") << out;
  EXPECT_EQ(j["faults"]["faults"], 2048) << out;
  EXPECT_TRUE(j["error"].is_null()) << out;
}

TEST_F(CliTest, PauseTakesItsStrategyFromTheFlagAndFallsBackExplicitly) {
  GuestOptions go;
  go.size = 4 << 20;
  go.backing = "anon";
  auto guest = GuestProcess::spawn(go);
  ASSERT_TRUE(guest.ok()) << guest.error().to_string();
  std::string regions;
  for (const auto& reg : (*guest)->regions()) {
    regions += (regions.empty() ? "" : ",") + std::to_string(reg.host_addr) + ":" +
               std::to_string(reg.size);
  }
  const std::string by_pid = " --pid " + std::to_string((*guest)->pid()) + " --regions " + regions +
                             " --no-sync --json --sandbox sb-1 --attr team=infra";

  // The shipped flags file: 0% memfd, so process_vm_readv, chosen by targeting.
  const std::string shipped = std::string(MEMSNAP_SOURCE_DIR) + "/config/flags.yaml";
  CommandResult r = memsnap("pause --flags " + shipped + by_pid + " --out " + dir_ + "/a.snap");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out.substr(r.out.find('{')), nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["strategy"], "process_vm_readv");
  EXPECT_EQ(j["selection"]["selected"], "process_vm_readv");
  EXPECT_EQ(j["selection"]["reason"], "TARGETING_MATCH");
  EXPECT_TRUE(j["selection"]["fallback"].is_null());

  // A flag that puts everyone on memfd: this sandbox has no memfd, so it falls back, and says so.
  {
    std::ofstream f(dir_ + "/all-memfd.yaml");
    f << "flags:\n  memory-export-strategy:\n    state: ENABLED\n    variants:\n"
         "      memfd: memfd\n      process_vm_readv: process_vm_readv\n"
         "    defaultVariant: memfd\n";
  }
  r = memsnap("pause --flags " + dir_ + "/all-memfd.yaml" + by_pid + " --out " + dir_ + "/b.snap");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  j = nlohmann::json::parse(r.out.substr(r.out.find('{')), nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["selection"]["requested"], "memfd");
  EXPECT_EQ(j["strategy"], "process_vm_readv");
  ASSERT_TRUE(j["selection"]["fallback"].is_string()) << r.out;
  EXPECT_NE(j["selection"]["fallback"].get<std::string>().find("memfd"), std::string::npos);

  // Neither --strategy nor --flags: a clear error, nothing written.
  r = memsnap("pause --pid 1 --regions 0x1000:4096 --out " + dir_ + "/c.snap");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/c.snap"));
}

// A base snapshot of a small memfd stand-in, paused with the CLI into dir/name.
std::string pause_small_guest(const std::string& dir, const std::string& name) {
  GuestOptions o;
  o.size = 4 << 20;
  o.backing = "memfd";
  o.zero_fraction = 0.25;
  auto g = GuestProcess::spawn(o);
  if (!g.ok()) return {};
  const std::string snap = dir + "/" + name;
  const CommandResult r = memsnap("pause --memfd-of-pid " + std::to_string((*g)->pid()) +
                                  " --strategy memfd --freeze --no-sync --out " + snap);
  (*g)->kill();
  return r.exit_code == 0 ? snap : std::string();
}

// stdout only (stderr discarded): what a script piping --json into a parser gets.
CommandResult memsnap_stdout(const std::string& args) { return testing::run_memsnap(args, false); }

// `inspect --json` prints one JSON document whatever happens: a file it cannot open is an "error"
// object (a truncated file printed nothing at all), damaged data a structured "checksums" result
// naming the run (it was the error text), with the exit codes of the text form.
TEST_F(CliTest, InspectJsonIsAlwaysOneJsonDocument) {
  const std::string snap = pause_small_guest(dir_, "base.snap");
  ASSERT_FALSE(snap.empty());
  CommandResult r = memsnap_stdout("inspect " + snap + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["checksums"]["status"], "ok") << r.out;
  EXPECT_TRUE(j["checksums"]["failed"].empty()) << r.out;
  EXPECT_TRUE(j["error"].is_null()) << r.out;

  const std::string cut = dir_ + "/cut.snap";
  std::filesystem::copy_file(snap, cut);
  std::filesystem::resize_file(cut, std::filesystem::file_size(snap) / 2);
  r = memsnap_stdout("inspect " + cut + " --json");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << "not one JSON document: '" << r.out << "'";
  EXPECT_EQ(j["path"], cut);
  EXPECT_EQ(j["error"]["code"], "snapshot_truncated") << r.out;
  EXPECT_FALSE(j["error"]["message"].get<std::string>().empty()) << r.out;

  r = memsnap_stdout("inspect " + dir_ + "/missing.snap --json");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_TRUE(j["error"]["code"].is_string()) << r.out;

  {
    std::fstream f(snap, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096 + 5 * 4096 + 100);
    f.put('\x5a');
  }
  r = memsnap_stdout("inspect " + snap + " --json");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  const auto& sums = j["checksums"];
  ASSERT_TRUE(sums.is_object()) << r.out;
  EXPECT_EQ(sums["status"], "mismatch") << r.out;
  ASSERT_EQ(sums["failed"].size(), 1u) << r.out;
  const auto& bad = sums["failed"][0];
  EXPECT_EQ(bad["code"], "snapshot_checksum_mismatch") << r.out;
  EXPECT_TRUE(bad["guest_offset"].is_number_unsigned()) << r.out;
  EXPECT_GT(bad["blocks"].get<std::uint64_t>(), 0u) << r.out;
  EXPECT_GT(sums["runs_checked"].get<std::uint64_t>(), 0u) << r.out;
  EXPECT_EQ(j["error"]["code"], "snapshot_checksum_mismatch") << r.out;

  // A usage error with --json: still JSON on stdout, still exit 2.
  r = memsnap_stdout("inspect --json");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["error"]["code"], "invalid_argument") << r.out;
}

// compare ran memfd alone for `--strategies memfd,bogus`, told --size 0 to be "a multiple of
// 4 KiB" and took --dirty-fraction 2; each is refused now, before anything starts (no work
// directory is created).
TEST_F(CliTest, CompareAndCycleRefuseWhatTheyCannotDoBeforeAnyWork) {
  const std::string work = dir_ + "/work";
  CommandResult r = memsnap("compare --size 4M --strategies memfd,bogus --keep " + work);
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("'bogus'"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("hole_punch, memfd, process_vm_readv"), std::string::npos) << r.out;
  EXPECT_FALSE(std::filesystem::exists(work)) << r.out;

  r = memsnap("compare --size 0 --keep " + work);
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("positive"), std::string::npos) << r.out;
  for (const std::string bad : {"2", "-0.1", "nan", "lots"}) {
    r = memsnap("compare --size 4M --dirty-fraction " + bad + " --keep " + work);
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.out;
    EXPECT_NE(r.out.find("--dirty-fraction"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("between 0 and 1"), std::string::npos) << r.out;
    r = memsnap("cycle --strategy memfd --size 4M --dirty-fraction " + bad + " --keep " + work);
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.out;
    EXPECT_NE(r.out.find("between 0 and 1"), std::string::npos) << r.out;
  }
  EXPECT_FALSE(std::filesystem::exists(work));
  // The same fraction under its other name in demo and experiment run: refused before memsnapd.
  r = memsnap("demo --sandboxes 1 --size 4M --dirty 2 --keep " + work);
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("between 0 and 1"), std::string::npos) << r.out;
  r = memsnap("experiment run --sandboxes 1 --size 4M --dirty 2 --out " + dir_ + "/r.json");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("between 0 and 1"), std::string::npos) << r.out;
  EXPECT_FALSE(std::filesystem::exists(work));
}

// `qemu cycle --strategy bogus` booted a VM before failing, and `--memory 64M --guest-mib 64`
// ran for 90 s before failing. Both are refused up front now. A stand-in QEMU that only leaves a
// mark shows that none started (and, last, that it does start when nothing is refused).
TEST_F(CliTest, QemuCycleRefusesBeforeStartingQemu) {
  const std::string mark = dir_ + "/qemu-was-started";
  const std::string fake = dir_ + "/fake-qemu";
  std::ofstream(fake) << "#!/bin/sh\ntouch " << mark << "\nexit 3\n";
  std::filesystem::permissions(fake, std::filesystem::perms::owner_all);
  std::ofstream(dir_ + "/vmlinux") << "kernel";
  std::ofstream(dir_ + "/initrd") << "initrd";
  const std::string base = "qemu cycle --qemu " + fake + " --keep " + dir_ + "/work ";
  const std::string guest = "--kernel " + dir_ + "/vmlinux --initrd " + dir_ + "/initrd ";
  auto refused = [&](const std::string& args, const std::string& says) {
    const CommandResult r = memsnap(base + args);
    EXPECT_NE(r.exit_code, 0) << args << ": " << r.out;
    EXPECT_NE(r.out.find(says), std::string::npos) << args << ": " << r.out;
    EXPECT_FALSE(std::filesystem::exists(mark)) << args << " started QEMU: " << r.out;
    EXPECT_FALSE(std::filesystem::exists(dir_ + "/work")) << args << ": " << r.out;
    return r;
  };
  refused(guest + "--strategy bogus", "hole_punch, memfd, process_vm_readv");
  refused(guest + "--flags " + dir_ + "/no-such-flags.yaml", "no-such-flags.yaml");
  // The relation is checked up front, with what would fit.
  refused(guest + "--strategy memfd --memory 64M --guest-mib 64", "--guest-mib 64 needs --memory");
  refused(guest + "--strategy memfd --memory 128M --guest-mib 64", "--guest-mib is at most 48");
  refused(guest + "--strategy memfd --guest-mib 0", "--guest-mib");
  refused(guest + "--strategy memfd --dirty-pct 101", "--dirty-pct");
  refused("--initrd " + dir_ + "/initrd --strategy memfd --kernel " + dir_ + "/no-vmlinux",
          "no-vmlinux");

  // Nothing to refuse: the stand-in QEMU is started (and fails, saying what QEMU said).
  const CommandResult started = memsnap(base + guest + "--strategy memfd");
  EXPECT_EQ(started.exit_code, 1) << started.out;
  EXPECT_TRUE(std::filesystem::exists(mark)) << started.out;
}

// Progress is a '\r'-rewritten status line on a terminal only: never in a pipe.
TEST_F(CliTest, CompareShowsNoProgressInAPipe) {
  const CommandResult r = memsnap("compare --size 4M --strategies memfd --no-sync");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.out.find('\r'), std::string::npos) << r.out;
}

// ... and it is there when stderr is a terminal (and gone with --json).
TEST_F(CliTest, CompareShowsProgressOnATerminal) {
  for (const bool json : {false, true}) {
    const std::string out = testing::run_memsnap_on_a_terminal(
        "compare --size 4M --strategies memfd --no-sync" + std::string(json ? " --json" : ""));
    if (json) {
      EXPECT_EQ(out.find('\r'), std::string::npos) << out;
    } else {
      EXPECT_NE(out.find("\rcompare: memfd [1/1]"), std::string::npos) << out;
    }
  }
}

// What the demo prints must stay true: the daemon's curl commands work while the demo runs,
// and a directory it deletes at the end is said to be deleted.
TEST_F(CliTest, DemoSaysWhatLastsOnlyWhileItRuns) {
  CommandResult r = memsnap("demo --sandboxes 1 --rounds 1 --size 4M");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("until the demo ends"), std::string::npos) << r.out;
  const auto at = r.out.find("/var/tmp/memsnap-demo-");
  ASSERT_NE(at, std::string::npos) << r.out;
  const std::string dir = r.out.substr(at, r.out.find_first_of("/ \n", at + 9) - at);
  EXPECT_FALSE(std::filesystem::exists(dir));
  EXPECT_NE(r.out.find("removed " + dir), std::string::npos) << r.out;

  const std::string keep = dir_ + "/demo";
  r = memsnap("demo --sandboxes 1 --rounds 1 --size 4M --keep " + keep);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("kept in " + keep), std::string::npos) << r.out;
  EXPECT_TRUE(std::filesystem::exists(keep + "/flags.yaml"));
}

// The demo splits the pause modes by a flag too and prints both moments of every pause: when it
// was answered and when its snapshot was durable. Of the default sandboxes, memfd runs both
// modes (sb-3, sb-6 copy; sb-5 handover); each handover pause is durable before the resume, and
// every page is verified.
TEST_F(CliTest, DemoPrintsAnsweredAndDurableOfEveryPause) {
  const CommandResult r = memsnap_stdout("demo --rounds 1 --size 4M --json");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["failures"], 0) << r.out;
  ASSERT_EQ(j["operations"].size(), 6u) << r.out;
  std::set<std::string> memfd_modes;
  for (const auto& op : j["operations"]) {
    ASSERT_TRUE(op["answer_ms"].is_number()) << op.dump();
    ASSERT_TRUE(op["durable_ms"].is_number()) << op.dump();
    EXPECT_EQ(op["mismatches"], 0) << op.dump();
    EXPECT_TRUE(op["mode_fallback"].is_null()) << op.dump();
    if (op["pause_mode"] == "handover") {
      EXPECT_GT(op["durable_ms"].get<double>(), op["answer_ms"].get<double>()) << op.dump();
    } else {
      EXPECT_EQ(op["pause_mode"], "copy") << op.dump();
      EXPECT_EQ(op["durable_ms"], op["answer_ms"]) << op.dump();
    }
    if (op["strategy"] == "memfd") memfd_modes.insert(op["pause_mode"].get<std::string>());
  }
  EXPECT_EQ(memfd_modes, (std::set<std::string>{"copy", "handover"}));

  // The text: both moments per pause, and per strategy and mode in the table.
  const CommandResult t = memsnap("demo --sandboxes 5 --rounds 1 --size 4M");
  ASSERT_EQ(t.exit_code, 0) << t.out;
  EXPECT_NE(t.out.find("sb-5   memfd             handover answered "), std::string::npos)
      << t.out;
  EXPECT_NE(t.out.find(" ms, durable "), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("base answered/durable"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("\nmemfd             handover "), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("\nmemfd             copy "), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("memsnap_pause_durable_seconds_count{mode=\"handover\",strategy=\"memfd\"} 1"),
            std::string::npos)
      << t.out;
}

}  // namespace
}  // namespace memsnap
