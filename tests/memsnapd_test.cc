// memsnapd end to end: the real daemon (child process, built-in defaults plus the paths of this
// test), real stand-in VMMs registered with it, pauses and resumes through the control API whose
// strategies are split by a flag file, the flag file changed while it runs, /metrics checked,
// and bad input refused without changing anything.
#include <poll.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "core/pattern/pattern.h"
#include "core/snapshot/snapshot_chain.h"
#include "core/snapshot/snapshot_reader.h"
#include "tests/memsnap_cli.h"
#include "tools/fleet/fleet.h"

namespace memsnap::fleet {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::uint64_t kGuest = 64ULL << 20;

// Team a -> process_vm_readv, b -> memfd, c -> hole_punch; everyone else the default.
std::string flag_file(const std::string& team_a_strategy) {
  return R"({"flags": {"memory-export-strategy": {
      "state": "ENABLED",
      "variants": {"process_vm_readv": "process_vm_readv", "memfd": "memfd",
                   "hole_punch": "hole_punch"},
      "defaultVariant": "process_vm_readv",
      "targeting": {"if": [
        {"==": [{"var": "team"}, "a"]}, ")" +
         team_a_strategy + R"(",
        {"==": [{"var": "team"}, "b"]}, "memfd",
        {"==": [{"var": "team"}, "c"]}, "hole_punch",
        null]}}}})";
}

void write_file(const std::string& path, const std::string& text) {
  // Write then rename, as an operator's tooling (or a config management agent) would.
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp) << text;
  fs::rename(tmp, path);
}

// The value of one sample of the exposition text (-1 if absent).
double sample(const std::string& text, const std::string& name_and_labels) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name_and_labels + " ", 0) == 0) {
      return std::stod(line.substr(name_and_labels.size() + 1));
    }
  }
  return -1;
}

// Polls cond every 25 ms until it holds or `limit` passes; whether it held.
bool eventually(const std::function<bool()>& cond,
                std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    if (cond()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
}

// The generation a default snapshot name claims ("generation-<n>.snap" or
// "generation-<n>.<k>.snap"), 0 if the name is not one of those.
std::uint64_t generation_in_name(const std::string& path) {
  std::smatch m;
  const std::string name = fs::path(path).filename().string();
  if (!std::regex_match(name, m, std::regex(R"(generation-([0-9]+)(\.[0-9]+)?\.snap)"))) return 0;
  return std::stoull(m[1].str());
}

class MemsnapdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/var/tmp/memsnapd-test-XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
    flags_ = dir_ + "/flags.json";
    write_file(flags_, flag_file("process_vm_readv"));
    ASSERT_NO_FATAL_FAILURE(start_daemon());
  }
  // (Re)starts memsnapd on the test's directory and flags, as SetUp does; the old one, if any,
  // must be gone (daemon_.reset()).
  void start_daemon() {
    DaemonOptions o;
    o.dir = dir_;
    o.flags_file = flags_;
    auto d = Daemon::start(o);
    ASSERT_TRUE(d.ok()) << d.error().to_string();
    daemon_ = std::move(*d);
  }
  void TearDown() override {
    sandboxes_.clear();
    if (daemon_) {
      if (HasFailure()) {
        std::ifstream log(daemon_->log_path());
        std::cerr << "---- memsnapd log ----\n" << log.rdbuf() << "\n";
      }
      daemon_.reset();
    }
    fs::remove_all(dir_);
  }

  Sandbox& launch(const std::string& id, const std::string& team, const std::string& backing) {
    SandboxSpec spec;
    spec.id = id;
    spec.size = kGuest;
    spec.backing = backing;
    spec.attributes = {{"team", team}};
    spec.seed = sandboxes_.size() + 7;
    auto sb = Sandbox::launch(*daemon_, spec);
    EXPECT_TRUE(sb.ok()) << sb.error().to_string();
    if (!sb.ok()) throw std::runtime_error("launch failed");
    sandboxes_[id] = std::move(*sb);
    return *sandboxes_[id];
  }

  // Runs memsnapd again, on the same directory, with the gated test plugins beside the real ones
  // (tests/gated_plugin): a pause forced to strategy "gated" (or "gated_punch", which releases
  // what it wrote first) stops half way through its export until open_gate(), so a test sees a
  // pause in flight every time. Call before launching.
  void restart_with_gate() {
    daemon_.reset();
    const fs::path plugins = fs::path(dir_) / "plugins";
    fs::create_directories(plugins);
    for (const auto& e : fs::directory_iterator(std::getenv("MEMSNAP_PLUGIN_DIR"))) {
      fs::create_symlink(e.path(), plugins / e.path().filename());
    }
    for (const char* gated :
         {"memsnap_gated.so", "memsnap_gated_punch.so", "memsnap_gated_memfd.so"}) {
      fs::create_symlink(fs::path(MEMSNAP_GATED_PLUGIN_DIR) / gated, plugins / gated);
    }
    gate_ = dir_ + "/gate";
    fs::create_directories(gate_);
    ::setenv("MEMSNAP_GATE_DIR", gate_.c_str(), 1);  // inherited by memsnapd, read by the plugin
    DaemonOptions o;
    o.dir = dir_;
    o.flags_file = flags_;
    o.overrides = {"plugins.directory=" + plugins.string()};
    auto d = Daemon::start(o);
    ::unsetenv("MEMSNAP_GATE_DIR");
    ASSERT_TRUE(d.ok()) << d.error().to_string();
    daemon_ = std::move(*d);
  }
  // Whether a gated export reached its gate (half its bytes written) within a minute.
  bool reached_gate() {
    return eventually([&] { return fs::exists(gate_ + "/waiting"); }, std::chrono::seconds(60));
  }
  void open_gate() { write_file(gate_ + "/open", ""); }
  // A stand-in with memfd-backed memory, owned by the test (which may end it, or outlive it).
  // write_faults: its VMM sends its write-protect faults to memsnap (what a live pause needs).
  std::unique_ptr<Sandbox> launch_memfd(const std::string& id, std::uint64_t size,
                                        const std::string& team, std::uint64_t seed,
                                        bool write_faults = false) {
    SandboxSpec spec;
    spec.id = id;
    spec.size = size;
    spec.backing = "memfd";
    spec.attributes = {{"team", team}};
    spec.seed = seed;
    spec.write_faults = write_faults;
    auto launched = Sandbox::launch(*daemon_, spec);
    EXPECT_TRUE(launched.ok()) << launched.error().to_string();
    return launched.ok() ? std::move(*launched) : nullptr;
  }
  // Resumes the registered paused sandbox `id` into a new stand-in of spec's size and seed that
  // expects these page generations, and waits until memsnapd says it runs and the guest is
  // ready. *running (if given): the sandbox then. Null, with the failure recorded, if a step
  // failed.
  std::unique_ptr<GuestProcess> resume_into_new_guest(const std::string& id,
                                                      const SandboxSpec& spec,
                                                      const std::vector<std::uint32_t>& expect,
                                                      json* running = nullptr) {
    const std::string socket = dir_ + "/" + id + ".uffd";
    const Answer resume =
        call("POST", "/v1/sandboxes/" + id + "/resume", {{"handshake_socket", socket}});
    EXPECT_EQ(resume.status, 202) << resume.error_text();
    if (resume.status != 202) return nullptr;
    GuestOptions go;
    go.size = spec.size;
    go.seed = spec.seed;
    go.handshake_socket = socket;
    go.no_fill = true;
    go.accept_memfd = true;
    go.expect = expect;
    auto guest = GuestProcess::spawn(go);
    EXPECT_TRUE(guest.ok()) << guest.error().to_string();
    if (!guest.ok()) return nullptr;
    const Answer state =
        call("GET", "/v1/sandboxes/" + id + "?wait_while=resuming&timeout_ms=60000");
    EXPECT_EQ(state.body["state"], "running") << state.body.dump();
    if (state.body["state"] != "running") return nullptr;
    const Status ready = (*guest)->wait_ready(std::chrono::seconds(30));
    EXPECT_TRUE(ready.ok()) << ready.error().to_string();
    if (!ready.ok()) return nullptr;
    if (running != nullptr) *running = state.body;
    return std::move(*guest);
  }
  // Closes the gate again for the next gated export.
  void close_gate() {
    fs::remove(gate_ + "/open");
    fs::remove(gate_ + "/waiting");
  }

  Answer call(const std::string& method, const std::string& target, const json& body = nullptr) {
    auto a = daemon_->call(method, target, body);
    EXPECT_TRUE(a.ok()) << a.error().to_string();
    return a.ok() ? *a : Answer{};
  }

  std::string dir_, flags_, gate_;
  std::unique_ptr<Daemon> daemon_;
  std::map<std::string, std::unique_ptr<Sandbox>> sandboxes_;
};

TEST_F(MemsnapdTest, FlagSplitPausesAndResumesEveryStrategyAndTheSplitFollowsTheFlagFile) {
  Sandbox& a = launch("sb-a", "a", "anon");
  Sandbox& b = launch("sb-b", "b", "memfd");
  Sandbox& c = launch("sb-c", "c", "memfd");
  const std::map<std::string, std::string> expected = {
      {"sb-a", "process_vm_readv"}, {"sb-b", "memfd"}, {"sb-c", "hole_punch"}};

  for (int generation = 1; generation <= 2; ++generation) {
    for (Sandbox* sb : {&a, &b, &c}) {
      SCOPED_TRACE(sb->spec().id + " generation " + std::to_string(generation));
      auto paused = sb->pause();
      ASSERT_TRUE(paused.ok()) << paused.error().to_string();
      EXPECT_EQ((*paused)["strategy"], expected.at(sb->spec().id));
      EXPECT_EQ((*paused)["variant"], expected.at(sb->spec().id));
      EXPECT_EQ((*paused)["reason"], "TARGETING_MATCH");
      EXPECT_TRUE((*paused)["fallback"].is_null());
      EXPECT_EQ((*paused)["generation"], generation);
      for (const char* phase : {"freeze", "dirty_set", "export", "commit"}) {
        EXPECT_TRUE((*paused)["phases"].contains(phase)) << phase;
      }
      if (generation == 1) {
        EXPECT_GT((*paused)["bytes"].get<std::uint64_t>(), kGuest / 2);
      } else {
        // Written since the resume: the 10% dirtied below, not the guest.
        EXPECT_LT((*paused)["bytes"].get<std::uint64_t>(), kGuest / 4)
            << (*paused)["dirty_set_source"];
        EXPECT_GT((*paused)["bytes"].get<std::uint64_t>(), kGuest / 20);
      }
      if (sb->spec().id == "sb-c") {
        EXPECT_GT((*paused)["memory_released"].get<std::uint64_t>(), 0u);
      }
      auto resumed = sb->resume();
      ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
      auto bad = sb->verify();
      ASSERT_TRUE(bad.ok()) << bad.error().to_string();
      EXPECT_EQ(*bad, 0u) << "pages lost on the way out and back";
      ASSERT_TRUE(sb->dirty(0.10, generation).ok());
    }
  }

  // The split changes with the flag file, without a restart: team a moves to memfd. Its VMM is
  // anonymous memory, so memfd cannot run it and the selection falls back, saying why.
  const auto generation_before = call("GET", "/v1/health").body["flags"]["generation"];
  write_file(flags_, flag_file("memfd"));
  json health;
  for (int i = 0; i < 200; ++i) {
    health = call("GET", "/v1/health").body;
    if (health["flags"]["generation"] != generation_before) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_NE(health["flags"]["generation"], generation_before) << "the flag file was not reloaded";
  const json explained = call("GET", "/v1/sandboxes/sb-a/strategy").body;
  EXPECT_EQ(explained["requested_strategy"], "memfd");
  EXPECT_EQ(explained["strategy"], "process_vm_readv");
  EXPECT_EQ(explained["fallback"]["reason"], "missing_memfd");
  auto paused = a.pause();
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();
  EXPECT_EQ((*paused)["strategy"], "process_vm_readv");
  EXPECT_EQ((*paused)["variant"], "memfd");
  EXPECT_EQ((*paused)["fallback"]["reason"], "missing_memfd");
  // A memfd-backed sandbox of team a now gets memfd.
  Sandbox& a2 = launch("sb-a2", "a", "memfd");
  auto paused2 = a2.pause();
  ASSERT_TRUE(paused2.ok()) << paused2.error().to_string();
  EXPECT_EQ((*paused2)["strategy"], "memfd");

  // The metrics saw all of it, by strategy, never by sandbox.
  auto text = daemon_->scrape();
  ASSERT_TRUE(text.ok()) << text.error().to_string();
  EXPECT_EQ(
      sample(*text,
             R"(memsnap_pause_duration_seconds_count{outcome="ok",strategy="process_vm_readv"})"),
      3);
  EXPECT_EQ(sample(*text, R"(memsnap_pause_duration_seconds_count{outcome="ok",strategy="memfd"})"),
            3);
  EXPECT_EQ(
      sample(*text, R"(memsnap_pause_duration_seconds_count{outcome="ok",strategy="hole_punch"})"),
      2);
  EXPECT_EQ(
      sample(*text, R"(memsnap_resume_duration_seconds_count{outcome="ok",strategy="hole_punch"})"),
      2);
  EXPECT_EQ(
      sample(
          *text,
          R"(memsnap_strategy_fallbacks_total{from="memfd",reason="missing_memfd",to="process_vm_readv"})"),
      1);
  // memsnapd counts reloads in its once-a-second poll: the one above may not be counted yet.
  EXPECT_TRUE(eventually([&] {
    auto now = daemon_->scrape();
    return now.ok() && sample(*now, R"(memsnap_flag_reloads_total{result="success"})") >= 1;
  })) << "the flag reload was never counted";
  EXPECT_EQ(sample(*text, R"(memsnap_sandboxes{state="paused"})"), 2);
  EXPECT_EQ(sample(*text, R"(memsnap_sandboxes{state="running"})"), 2);
  EXPECT_GT(sample(*text, R"(memsnap_pause_released_bytes_total{strategy="hole_punch"})"), 0);
  // Lazy resumes of sb-a served every page the verify touched, one fault each, into the
  // histogram (not only the totals): the dashboards' fault p99 needs the buckets.
  EXPECT_GE(
      sample(*text,
             R"(memsnap_page_fault_service_duration_seconds_count{strategy="process_vm_readv"})"),
      static_cast<double>(kGuest / 4096));
  // Host memory held for warm resumes: only sb-a2's memfd is kept now (every other memfd sandbox
  // was resumed, which hands it back; hole_punch and process_vm_readv never keep one). The gauge
  // says what the API says of that sandbox.
  const json a2_state = call("GET", "/v1/sandboxes/sb-a2").body;
  ASSERT_TRUE(a2_state.contains("warm_memory_bytes")) << a2_state.dump();
  const auto a2_held = a2_state["warm_memory_bytes"].get<std::uint64_t>();
  EXPECT_GT(a2_held, kGuest / 2);
  EXPECT_EQ(sample(*text, R"(memsnap_warm_memory_bytes{strategy="memfd"})"),
            static_cast<double>(a2_held));
  EXPECT_EQ(sample(*text, R"(memsnap_warm_memory_bytes{strategy="hole_punch"})"), 0);
  EXPECT_EQ(sample(*text, R"(memsnap_warm_memory_bytes{strategy="process_vm_readv"})"), 0);
  EXPECT_EQ(text->find("sb-a"), std::string::npos) << "a sandbox id in the metrics";
}

// Issue 16 item 1: a diff against an older parent than the newest snapshot. The session tracks
// writes since the newest snapshot only; what changed between the named parent and the newest
// (here the first dirtying) must be in the diff too, or the resumed guest gets it reverted.
TEST_F(MemsnapdTest, ADiffAgainstAnOlderParentKeepsWhatChangedSinceThatParent) {
  for (const std::string backing : {"anon", "memfd"}) {
    SCOPED_TRACE(backing);
    // team a: process_vm_readv, resumed lazily from the chain (not from a kept memfd).
    Sandbox& sb = launch("sb-older-" + backing, "a", backing);
    auto base = sb.pause();
    ASSERT_TRUE(base.ok()) << base.error().to_string();
    ASSERT_TRUE(sb.resume().ok());
    ASSERT_TRUE(sb.dirty(0.10, 1).ok());
    auto second = sb.pause();
    ASSERT_TRUE(second.ok()) << second.error().to_string();
    ASSERT_TRUE(sb.resume().ok());
    ASSERT_TRUE(sb.dirty(0.10, 2).ok());
    auto third = sb.pause({{"parent", (*base)["snapshot"]}});
    ASSERT_TRUE(third.ok()) << third.error().to_string();
    EXPECT_EQ((*third)["generation"], 2);
    EXPECT_NE((*third)["dirty_set_source"].get<std::string>().find("after the parent"),
              std::string::npos)
        << (*third)["dirty_set_source"];
    ASSERT_TRUE(sb.resume().ok());
    auto bad = sb.verify();
    ASSERT_TRUE(bad.ok()) << bad.error().to_string();
    EXPECT_EQ(*bad, 0u) << "pages of the cut-off generation were reverted";
  }
}

// Issue 16 item 2: a new base (parent "none") of a resumed VMM whose memory is not all resident
// yet. The pages the guest has not touched since a lazy resume exist only in the chain: they
// must be in the new base, not recorded as zeros.
TEST_F(MemsnapdTest, ANewBaseOfALazilyResumedVmmHoldsTheWholeGuest) {
  int pipeline_fallbacks = 0;
  for (const auto& [team, backing] : std::vector<std::pair<std::string, std::string>>{
           {"a", "anon"}, {"a", "memfd"}, {"b", "memfd"}}) {
    SCOPED_TRACE(team + " " + backing);
    Sandbox& sb = launch("sb-base-" + team + "-" + backing, team, backing);
    ASSERT_TRUE(sb.pause().ok());
    ASSERT_TRUE(sb.resume({{"mode", "lazy"}}).ok());
    ASSERT_TRUE(sb.dirty(0.05, 3).ok());  // touches a few pages; most stay unserved
    auto rebased = sb.pause({{"parent", "none"}});
    ASSERT_TRUE(rebased.ok()) << rebased.error().to_string();
    EXPECT_EQ((*rebased)["generation"], 1);
    EXPECT_TRUE((*rebased)["parent"].is_null());
    ASSERT_TRUE(sb.resume().ok());
    auto bad = sb.verify();
    ASSERT_TRUE(bad.ok()) << bad.error().to_string();
    EXPECT_EQ(*bad, 0u) << "pages never served before the new base were lost";
    if (!(*rebased)["fallback"].is_null()) {
      // The memfd was set aside (it lacks what was never served): the pipeline fell back.
      EXPECT_EQ((*rebased)["fallback"]["reason"], "strategy_cannot_run") << rebased->dump();
      ++pipeline_fallbacks;
    }
  }
  // Each is counted under its cause, the memfd the strategy needed and could not have, never as
  // "other" (issue 25: the pipeline's fallbacks were all counted as other).
  EXPECT_GT(pipeline_fallbacks, 0);
  auto text = daemon_->scrape();
  ASSERT_TRUE(text.ok());
  std::istringstream in(*text);
  double missing_memfd = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("memsnap_strategy_fallbacks_total{", 0) != 0) continue;
    EXPECT_EQ(line.find("reason=\"other\""), std::string::npos) << line;
    if (line.find("reason=\"missing_memfd\"") != std::string::npos) {
      missing_memfd += std::stod(line.substr(line.rfind(' ') + 1));
    }
  }
  EXPECT_EQ(missing_memfd, pipeline_fallbacks);
}

TEST_F(MemsnapdTest, BadInputGetsAClearErrorAndChangesNothing) {
  Sandbox& sb = launch("sb-1", "b", "memfd");
  const json before = call("GET", "/v1/sandboxes").body;
  auto expect_error = [&](const Answer& a, int status, const std::string& code) {
    EXPECT_EQ(a.status, status) << a.body.dump();
    ASSERT_TRUE(a.body.is_object() && a.body.contains("error")) << a.body.dump();
    EXPECT_EQ(a.body["error"]["code"], code) << a.body.dump();
    EXPECT_FALSE(a.body["error"]["message"].get<std::string>().empty());
  };

  // Malformed JSON, through the raw client (the fleet helper only sends valid JSON).
  control_api::UnixHttpClient raw(daemon_->socket());
  auto malformed = raw.call("POST", "/v1/sandboxes/sb-1/pause", "{\"output\": ");
  ASSERT_TRUE(malformed.ok());
  EXPECT_EQ(malformed->status, 400);
  EXPECT_EQ(control_api::parse_api_error(malformed->body)->code, "invalid_argument");

  expect_error(call("POST", "/v1/sandboxes/nope/pause", json::object()), 404, "sandbox_not_found");
  expect_error(call("GET", "/v1/sandboxes/nope"), 404, "sandbox_not_found");
  json dup = {{"id", "sb-1"}, {"snapshots", json::array({"x"})}, {"strategy", "memfd"}};
  expect_error(call("POST", "/v1/sandboxes",
                    {{"id", "sb-1"},
                     {"vmm_pid", sb.vmm()->pid()},
                     {"regions", json::array({{{"guest_offset", 0},
                                               {"host_addr", sb.vmm()->regions()[0].host_addr},
                                               {"size", kGuest}}})}}),
               409, "already_exists");
  expect_error(call("POST", "/v1/sandboxes", {{"id", "../evil"}, {"vmm_pid", 1}}), 400,
               "invalid_argument");
  expect_error(call("POST", "/v1/sandboxes/sb-1/pause", {{"outptu", "x.snap"}}), 400,
               "invalid_argument");
  expect_error(call("POST", "/v1/sandboxes/sb-1/pause", {{"strategy", "no_such"}}), 400,
               "invalid_argument");

  // Paths outside the snapshot directory: relative escape, absolute, through a symlink.
  fs::create_directory_symlink("/tmp", daemon_->snapshot_dir() + "/escape");
  for (const std::string out : {"../../outside.snap", "/tmp/outside.snap", "escape/outside.snap"}) {
    SCOPED_TRACE(out);
    expect_error(call("POST", "/v1/sandboxes/sb-1/pause", {{"output", out}}), 400,
                 "path_not_allowed");
  }
  EXPECT_FALSE(fs::exists("/tmp/outside.snap"));
  EXPECT_FALSE(fs::exists(fs::path(dir_) / "outside.snap"));
  // A strategy that gives the guest's memory back cannot leave the VMM running.
  expect_error(
      call("POST", "/v1/sandboxes/sb-1/pause", {{"strategy", "hole_punch"}, {"after", "continue"}}),
      400, "invalid_argument");
  expect_error(call("GET", "/v1/sandboxes/sb-1?wait_while=running&timeout_ms=12abc"), 400,
               "invalid_argument");
  // A resume of a running sandbox.
  expect_error(call("POST", "/v1/sandboxes/sb-1/resume", {{"handshake_socket", dir_ + "/x.sock"}}),
               409, "invalid_state");

  // Nothing changed: same list, the sandbox still running and pausable.
  EXPECT_EQ(call("GET", "/v1/sandboxes").body, before);
  auto paused = sb.pause();
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();
  EXPECT_EQ((*paused)["generation"], 1);
  // A new chain (parent none) after a resume never reuses an existing file name.
  ASSERT_TRUE(sb.resume().ok());
  auto fresh = sb.pause({{"parent", "none"}});
  ASSERT_TRUE(fresh.ok()) << fresh.error().to_string();
  ASSERT_TRUE(sb.resume().ok());
  auto next = sb.pause();
  ASSERT_TRUE(next.ok()) << next.error().to_string();
  EXPECT_NE((*next)["snapshot"], (*fresh)["snapshot"]);
  EXPECT_NE((*next)["snapshot"], (*paused)["snapshot"]);
}

// While a warm resume hands the kept memfd back (on the sandbox's resume thread, without the
// service lock), state queries and scrapes go on: they must see the memory as handed back, never
// read it half moved (the TSan stage runs this too).
TEST_F(MemsnapdTest, QueriesDuringAWarmResumeSeeTheKeptMemoryHandedBack) {
  Sandbox& sb = launch("sb-w", "b", "memfd");
  auto paused = sb.pause();
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();
  const json before = call("GET", "/v1/sandboxes/sb-w").body;
  ASSERT_EQ(before["warm_memory_kept"], true) << before.dump();
  EXPECT_GT(before["warm_memory_bytes"].get<std::uint64_t>(), kGuest / 2);

  std::atomic<bool> done{false};
  std::vector<json> seen;
  std::vector<std::string> scrapes;
  std::thread poller([&] {
    while (!done) {
      auto a = daemon_->call("GET", "/v1/sandboxes/sb-w");
      if (a.ok() && a->ok()) seen.push_back(a->body);
      auto m = daemon_->scrape();
      if (m.ok()) scrapes.push_back(*m);
    }
  });
  for (int round = 0; round < 3; ++round) {
    auto resumed = sb.resume();
    if (!resumed.ok()) {
      ADD_FAILURE() << resumed.error().to_string();
      break;
    }
    EXPECT_EQ((*resumed)["mode"], "warm") << resumed->dump();
    if (round == 2) break;
    if (auto again = sb.pause(); !again.ok()) {
      ADD_FAILURE() << again.error().to_string();
      break;
    }
  }
  done = true;
  poller.join();
  if (HasFailure()) return;

  std::size_t resuming = 0;
  for (const json& s : seen) {
    if (s["state"] != "resuming") continue;
    ++resuming;
    EXPECT_EQ(s["warm_memory_kept"], false) << s.dump();
    EXPECT_EQ(s["warm_memory_bytes"], 0) << s.dump();
  }
  std::printf("note: %zu state answers, %zu while resuming; %zu scrapes\n", seen.size(),
              resuming, scrapes.size());
  EXPECT_FALSE(scrapes.empty());
  const json after = call("GET", "/v1/sandboxes/sb-w").body;
  EXPECT_EQ(after["state"], "running");
  EXPECT_EQ(after["warm_memory_bytes"], 0) << "the memfd went back to the VMM";
  auto text = daemon_->scrape();
  ASSERT_TRUE(text.ok()) << text.error().to_string();
  EXPECT_EQ(sample(*text, R"(memsnap_warm_memory_bytes{strategy="memfd"})"), 0);
}

TEST_F(MemsnapdTest, APauseOfASandboxAlreadyPausingIsRefused) {
  // 256 MiB with fsync: the first pause takes long enough to be seen in progress.
  SandboxSpec spec;
  spec.id = "sb-big";
  spec.size = 256ULL << 20;
  spec.attributes = {{"team", "a"}};
  auto launched = Sandbox::launch(*daemon_, spec);
  ASSERT_TRUE(launched.ok()) << launched.error().to_string();
  std::unique_ptr<Sandbox> sb = std::move(*launched);
  bool refused = false;
  for (int attempt = 0; attempt < 5 && !refused; ++attempt) {
    std::atomic<bool> done{false};
    Result<json> first = json();
    std::thread t([&] {
      first = sb->pause({{"sync", true}});
      done = true;
    });
    while (!done) {
      const Answer s = call("GET", "/v1/sandboxes/sb-big");
      if (s.body.value("state", "") == "pausing") {
        const Answer second = call("POST", "/v1/sandboxes/sb-big/pause", json::object());
        EXPECT_EQ(second.status, 409) << second.body.dump();
        EXPECT_EQ(second.body["error"]["code"], "busy") << second.body.dump();
        refused = true;
        break;
      }
    }
    t.join();
    ASSERT_TRUE(first.ok()) << first.error().to_string();
    // The refused request changed nothing: the first one committed generation attempt+1.
    EXPECT_EQ((*first)["generation"], attempt + 1);
    if (!refused) {
      auto resumed = sb->resume();
      ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
    }
  }
  EXPECT_TRUE(refused) << "never saw the pause in progress";
}

// Two sandboxes pausing to the same output at the same time: both pass the "output exists"
// check before either commits; the later commit must be refused (409 already_exists) instead of
// replacing the first one's snapshot, which would leave sandbox A with B's memory.
TEST_F(MemsnapdTest, TwoPausesToTheSameOutputNeverOverwriteEachOther) {
  SandboxSpec spec;
  spec.id = "sb-slow";
  spec.size = 256ULL << 20;  // with fsync: long enough to be seen pausing
  spec.attributes = {{"team", "a"}};
  auto launched = Sandbox::launch(*daemon_, spec);
  ASSERT_TRUE(launched.ok()) << launched.error().to_string();
  std::unique_ptr<Sandbox> slow = std::move(*launched);
  launch("sb-fast", "b", "memfd");

  bool raced = false;
  for (int attempt = 0; attempt < 5 && !raced; ++attempt) {
    const std::string out = "shared-" + std::to_string(attempt) + ".snap";
    std::atomic<bool> done{false};
    Answer first;
    std::thread t([&] {
      first = call("POST", "/v1/sandboxes/sb-slow/pause", {{"output", out}, {"sync", true}});
      done = true;
    });
    Answer second;
    while (!done) {
      if (call("GET", "/v1/sandboxes/sb-slow").body.value("state", "") == "pausing") {
        second = call("POST", "/v1/sandboxes/sb-fast/pause", {{"output", out}});
        raced = true;
        break;
      }
    }
    t.join();
    if (!raced) {
      ASSERT_EQ(first.status, 200) << first.body.dump();
      auto resumed = slow->resume();
      ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
      continue;
    }
    // Exactly one of them owns the file; the other was refused and changed nothing.
    ASSERT_TRUE(first.status == 200 || second.status == 200)
        << first.body.dump() << "\n" << second.body.dump();
    const bool second_won = second.status == 200;
    const Answer& winner = second_won ? second : first;
    const Answer& loser = second_won ? first : second;
    EXPECT_EQ(loser.status, 409) << loser.body.dump();
    ASSERT_TRUE(loser.body.contains("error")) << loser.body.dump();
    EXPECT_EQ(loser.body["error"]["code"], "already_exists") << loser.body.dump();
    const std::string file = daemon_->snapshot_dir() + "/" + out;
    auto chain = SnapshotChain::open({file}, Verify::kFull);
    ASSERT_TRUE(chain.ok()) << chain.error().to_string();
    EXPECT_EQ(to_hex(chain->newest().header().snapshot_id), winner.body["snapshot_id"]);
    // No temporary file is left next to it.
    for (const auto& e : fs::directory_iterator(daemon_->snapshot_dir())) {
      EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
    }
    // The refused sandbox is not paused and can pause again, to a name of its own.
    const std::string loser_id = second_won ? "sb-slow" : "sb-fast";
    const Answer state = call("GET", "/v1/sandboxes/" + loser_id);
    EXPECT_EQ(state.body.value("state", ""), "running") << state.body.dump();
    EXPECT_EQ(call("POST", "/v1/sandboxes/" + loser_id + "/pause", {{"output", "own.snap"}}).status,
              200);
  }
  EXPECT_TRUE(raced) << "never saw the first pause in progress";
}

TEST_F(MemsnapdTest, SigtermLetsAPauseInFlightFinishAndRefusesNewOnes) {
  restart_with_gate();
  Sandbox& big = launch("sb-big", "a", "anon");
  Sandbox& other = launch("sb-small", "a", "anon");
  Result<json> first = json();
  // In flight for sure: the gated strategy holds the export half way until the gate opens.
  std::thread t([&] { first = big.pause({{"sync", true}, {"strategy", "gated"}}); });
  ASSERT_TRUE(reached_gate()) << "the pause never got half way";
  ASSERT_EQ(::kill(daemon_->pid(), SIGTERM), 0);
  // While draining (health says so), a new pause is refused with a stable code.
  EXPECT_TRUE(eventually([&] {
    auto h = daemon_->call("GET", "/v1/health", nullptr, std::chrono::seconds(5));
    return h.ok() && h->body.value("status", "") == "draining";
  })) << "memsnapd never said it was draining";
  auto refused = daemon_->call("POST", "/v1/sandboxes/sb-small/pause", json::object());
  ASSERT_TRUE(refused.ok()) << refused.error().to_string();
  EXPECT_EQ(refused->status, 503) << refused->body.dump();
  EXPECT_EQ(refused->body["error"]["code"], "shutting_down") << refused->body.dump();
  open_gate();
  t.join();
  ASSERT_TRUE(first.ok()) << "the pause in flight did not finish: " << first.error().to_string();
  EXPECT_EQ((*first)["generation"], 1);
  EXPECT_EQ((*first)["strategy"], "gated");
  EXPECT_EQ(daemon_->stop(SIGTERM, std::chrono::seconds(30)), 0);
  EXPECT_TRUE(fs::exists(daemon_->snapshot_dir() + "/sb-big/generation-1.snap"));
  EXPECT_FALSE(fs::exists(daemon_->snapshot_dir() + "/sb-small/generation-1.snap"));
  for (const auto& e : fs::recursive_directory_iterator(daemon_->snapshot_dir())) {
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos)
        << "a temporary file was left: " << e.path();
  }
  (void)other;
}

TEST_F(MemsnapdTest, SigtermDrainsAndRemovesTheSocket) {
  Sandbox& sb = launch("sb-1", "a", "anon");
  ASSERT_TRUE(sb.pause().ok());
  EXPECT_EQ(daemon_->stop(SIGTERM, std::chrono::seconds(30)), 0);
  struct stat st {};
  EXPECT_NE(::stat(daemon_->socket().c_str(), &st), 0) << "the control socket was left behind";
  EXPECT_TRUE(fs::exists(daemon_->snapshot_dir() + "/sb-1/generation-1.snap"));
}

// Whether process pid has ended (gone, or a zombie nobody reaped yet).
bool ended(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  if (!std::getline(stat, text)) return true;
  const auto close = text.rfind(')');
  return close == std::string::npos || close + 2 >= text.size() || text[close + 2] == 'Z' ||
         text[close + 2] == 'X';
}

bool ends_within(pid_t pid, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!ended(pid)) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

// A VMM resumed lazily cannot run without memsnapd: its next fault would block forever. When
// memsnapd is killed (-9: it can do nothing itself), its guardian ends the VMM.
TEST_F(MemsnapdTest, KillNineOfMemsnapdEndsTheVmmsItServesInsteadOfLeavingThemHanging) {
  Sandbox& sb = launch("sb-1", "a", "anon");  // team a: process_vm_readv, resumed lazily
  ASSERT_TRUE(sb.pause().ok());
  auto resumed = sb.resume();
  ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
  ASSERT_EQ((*resumed)["mode"], "lazy") << resumed->dump();
  const pid_t vmm = sb.vmm()->pid();
  ASSERT_FALSE(ended(vmm));
  ASSERT_EQ(::kill(daemon_->pid(), SIGKILL), 0);
  EXPECT_TRUE(ends_within(vmm, std::chrono::seconds(10)))
      << "the VMM outlived the memsnapd that served its memory";
}

// Unregistering a sandbox that runs on memory memsnapd serves would end its VMM (and lose what
// the guest did since its last pause): refused unless asked for with force=true.
TEST_F(MemsnapdTest, RemovingARunningLazilyServedSandboxNeedsForceAndThenEndsItsVmm) {
  Sandbox& sb = launch("sb-1", "a", "anon");
  ASSERT_TRUE(sb.pause().ok());
  auto resumed = sb.resume();
  ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
  const pid_t vmm = sb.vmm()->pid();
  Answer refused = call("DELETE", "/v1/sandboxes/sb-1");
  EXPECT_EQ(refused.status, 409) << refused.body.dump();
  EXPECT_EQ(refused.body["error"]["code"], "invalid_state") << refused.body.dump();
  // The way to force it, for API users and for CLI users.
  const std::string message = refused.body["error"].value("message", "");
  EXPECT_NE(message.find("force=true"), std::string::npos) << message;
  EXPECT_NE(message.find("memsnap unregister --force"), std::string::npos) << message;
  EXPECT_FALSE(ended(vmm));
  auto still = sb.verify();  // it still runs, served
  ASSERT_TRUE(still.ok()) << still.error().to_string();
  EXPECT_EQ(*still, 0u);
  Answer forced = call("DELETE", "/v1/sandboxes/sb-1?force=true");
  EXPECT_EQ(forced.status, 200) << forced.body.dump();
  EXPECT_EQ(forced.body["vmm_ended"], true) << forced.body.dump();
  EXPECT_TRUE(ends_within(vmm, std::chrono::seconds(5)));
}

// The state letter of process pid in /proc (R, S, T, Z, ...), or 0 when it is gone.
char process_state(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  if (!std::getline(stat, text)) return 0;
  const auto close = text.rfind(')');
  return close == std::string::npos || close + 2 >= text.size() ? 0 : text[close + 2];
}

// A sandbox paused with its VMM left stopped, never resumed by memsnapd: removing it ends that
// VMM (its memory is in the snapshot), as it does for a VMM memsnapd resumed, instead of leaving
// a stopped process behind that nobody will continue.
TEST_F(MemsnapdTest, RemovingAPausedSandboxEndsItsStoppedVmmEvenIfMemsnapdNeverResumedIt) {
  Sandbox& sb = launch("sb-1", "a", "anon");
  const pid_t vmm = sb.vmm()->pid();
  // Through the API itself: the fleet's pause() ends a stopped VMM, as an orchestrator may.
  const Answer paused = call("POST", "/v1/sandboxes/sb-1/pause", json::object());
  ASSERT_EQ(paused.status, 200) << paused.error_text();
  ASSERT_EQ(call("GET", "/v1/sandboxes/sb-1").body["state"], "paused");
  ASSERT_EQ(process_state(vmm), 'T') << "the paused VMM is not stopped";
  const Answer removed = call("DELETE", "/v1/sandboxes/sb-1");
  ASSERT_EQ(removed.status, 200) << removed.body.dump();
  EXPECT_EQ(removed.body["vmm_ended"], true) << removed.body.dump();
  EXPECT_TRUE(ends_within(vmm, std::chrono::seconds(5)))
      << "the stopped VMM of a removed sandbox was left behind";
}

// A graceful stop of memsnapd (SIGTERM) ends only the VMMs that cannot run without it. A warm
// resumed guest whose writes fault to memsnapd (synchronous write-protect) runs on, writing
// through the stop: its memory is unregistered from its userfaultfd and its waiting faults
// woken, so it reads every page and writes without waiting for anyone. A lazily served guest is
// ended (its next fault would hang), and so is a VMM a pause left stopped.
TEST_F(MemsnapdTest, SigtermLeavesAWarmResumedVmmRunningAndEndsOnlyTheLazyAndTheStoppedOnes) {
  std::unique_ptr<Sandbox> warm = launch_memfd("sb-warm", 64ULL << 20, "b", 96, true);
  ASSERT_NE(warm, nullptr);
  ASSERT_TRUE(warm->pause({{"strategy", "memfd"}}).ok());
  auto resumed = warm->resume({{"mode", "warm"}});
  ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
  ASSERT_EQ((*resumed)["report"]["write_faults"], true) << resumed->dump();
  ASSERT_TRUE(warm->dirty(0.2, 97).ok());  // pages written, then protected again by a pause
  ASSERT_TRUE(warm->pause({{"mode", "live"}, {"after", "continue"}, {"strategy", "memfd"}}).ok());
  Sandbox& lazy = launch("sb-lazy", "a", "anon");
  ASSERT_TRUE(lazy.pause().ok());
  auto lazily = lazy.resume();
  ASSERT_TRUE(lazily.ok()) << lazily.error().to_string();
  ASSERT_EQ((*lazily)["mode"], "lazy") << lazily->dump();
  // A warm-resumed VMM that a pause left stopped: nobody would continue it.
  std::unique_ptr<Sandbox> stopped = launch_memfd("sb-stopped", 32ULL << 20, "b", 99);
  ASSERT_NE(stopped, nullptr);
  ASSERT_TRUE(stopped->pause({{"strategy", "memfd"}}).ok());
  ASSERT_TRUE(stopped->resume({{"mode", "warm"}}).ok());
  const pid_t stopped_pid = stopped->vmm()->pid();
  ASSERT_EQ(call("POST", "/v1/sandboxes/sb-stopped/pause", json::object()).status, 200);
  ASSERT_EQ(process_state(stopped_pid), 'T');
  // A VMM a pause left stopped, never resumed by memsnapd (no session): ended too, as a DELETE
  // would end it.
  Sandbox& never = launch("sb-never", "a", "anon");
  const pid_t never_pid = never.vmm()->pid();
  ASSERT_EQ(call("POST", "/v1/sandboxes/sb-never/pause", json::object()).status, 200);
  ASSERT_EQ(process_state(never_pid), 'T');
  const pid_t warm_pid = warm->vmm()->pid();
  const pid_t lazy_pid = lazy.vmm()->pid();
  // The warm guest writes throughout the stop, its first write to each page a fault to
  // memsnapd until then.
  GuestProcess& guest = *warm->vmm();
  const std::uint64_t pages = (64ULL << 20) / 4096;
  ASSERT_TRUE(guest.write_loop(pages - 2048, 2048).ok());

  EXPECT_EQ(daemon_->stop(SIGTERM, std::chrono::seconds(30)), 0);
  EXPECT_TRUE(ends_within(lazy_pid, std::chrono::seconds(10)))
      << "the lazily served VMM outlived memsnapd";
  EXPECT_TRUE(ends_within(stopped_pid, std::chrono::seconds(10)))
      << "a VMM a pause left stopped was left behind";
  EXPECT_TRUE(ends_within(never_pid, std::chrono::seconds(10)))
      << "a stopped VMM memsnapd never resumed was left behind";
  ASSERT_FALSE(ended(warm_pid)) << "memsnapd ended a VMM that can run without it";
  auto rounds = guest.write_rounds();
  ASSERT_TRUE(rounds.ok()) << rounds.error().to_string();
  EXPECT_TRUE(eventually(
      [&] {
        auto now = guest.write_rounds();
        return now.ok() && *now > *rounds + 1;
      },
      std::chrono::seconds(30)))
      << "the guest's writes wait for the memsnapd that stopped";
  ASSERT_TRUE(guest.write_stop().ok());
  auto bad = guest.verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u);
  // Its pages were write-protected for memsnapd: writes go through without it now.
  ASSERT_TRUE(guest.dirty(0.3, false, 98).ok());
  bad = guest.verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u);
  EXPECT_FALSE(ended(warm_pid));
}

// A refused request changes nothing: a warm resume of a sandbox that kept no memfd is refused
// (409 generation_mismatch) before memsnapd touches anything, so the old VMM, stopped by the
// pause and still served by memsnapd's session, is not ended, and the sandbox stays as it was.
TEST_F(MemsnapdTest, ARefusedWarmResumeLeavesTheStoppedVmmAndTheSandboxAsTheyWere) {
  Sandbox& sb = launch("sb-1", "a", "anon");  // process_vm_readv: never keeps a memfd
  ASSERT_TRUE(sb.pause().ok());
  ASSERT_TRUE(sb.resume().ok());  // its VMM now runs on memory memsnapd serves
  const pid_t vmm = sb.vmm()->pid();
  Answer paused = call("POST", "/v1/sandboxes/sb-1/pause", json::object());  // after: stop
  ASSERT_TRUE(paused.ok()) << paused.body.dump();
  ASSERT_EQ(process_state(vmm), 'T');
  const json before = call("GET", "/v1/sandboxes/sb-1").body;
  ASSERT_EQ(before["state"], "paused") << before.dump();
  ASSERT_EQ(before["warm_memory_kept"], false) << before.dump();

  const std::string socket = dir_ + "/refused.sock";
  Answer refused =
      call("POST", "/v1/sandboxes/sb-1/resume", {{"handshake_socket", socket}, {"mode", "warm"}});
  EXPECT_EQ(refused.status, 409) << refused.body.dump();
  EXPECT_EQ(refused.body["error"]["code"], "generation_mismatch") << refused.body.dump();
  EXPECT_EQ(process_state(vmm), 'T') << "the refused resume ended the old VMM";
  const json after = call("GET", "/v1/sandboxes/sb-1").body;
  for (const char* key : {"state", "vmm_pid", "snapshots", "strategy", "warm_memory_kept",
                          "last_pause", "last_resume"}) {
    EXPECT_EQ(after[key], before[key]) << key;
  }
  EXPECT_FALSE(fs::exists(socket)) << "the refused resume left its handshake socket";

  // The orchestrator ends the stopped VMM; a resume in the strategy's own mode then works.
  sb.vmm()->kill();
  auto resumed = sb.resume();
  ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
  auto bad = sb.verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u);
}

// Resumes sandbox `sb` (paused, its VMM gone) into a misbehaving stand-in: the resume request,
// then a memsnap-guest with `ack` / `stray_page` that connects to the handshake socket.
std::unique_ptr<GuestProcess> resume_into_misbehaving_vmm(
    Daemon& daemon, Sandbox& sb, const std::vector<std::uint32_t>& expected, const std::string& ack,
    bool stray_page, const json& extra = json::object()) {
  const std::string socket = daemon.dir() + "/" + sb.spec().id + "-misbehaving.uffd";
  json body = extra;
  body["handshake_socket"] = socket;
  auto answer = daemon.call("POST", "/v1/sandboxes/" + sb.spec().id + "/resume", body);
  EXPECT_TRUE(answer.ok() && answer->ok()) << (answer.ok() ? answer->body.dump() : "");
  GuestOptions go;
  go.size = sb.spec().size;
  go.backing = sb.spec().backing;
  go.seed = sb.spec().seed;
  go.handshake_socket = socket;
  go.no_fill = true;
  go.expect = expected;
  go.accept_memfd = true;
  go.ack = ack;
  go.stray_page = stray_page;
  auto vmm = GuestProcess::spawn(go);
  EXPECT_TRUE(vmm.ok()) << vmm.error().to_string();
  return vmm.ok() ? std::move(*vmm) : nullptr;
}

// A warm resume whose VMM sends a wrong ack for the memfd handed to it: the resume fails, the
// sandbox is paused again, that VMM is ended (nothing will serve it), and the memfd it was handed
// (and may have written) is no longer kept as the snapshot: a warm resume is refused and the
// next resume is cold, from the chain, and whole.
TEST_F(MemsnapdTest, AWarmResumeWhoseVmmFailsTheHandOverEndsItAndKeepsNoWarmMemory) {
  Sandbox& sb = launch("sb-w", "b", "memfd");
  const std::vector<std::uint32_t> expected = sb.vmm()->expected_generations();
  ASSERT_TRUE(sb.pause().ok());
  ASSERT_EQ(call("GET", "/v1/sandboxes/sb-w").body["warm_memory_kept"], true);
  auto bad = resume_into_misbehaving_vmm(*daemon_, sb, expected, "bad", false);
  ASSERT_NE(bad, nullptr);
  Answer state = call("GET", "/v1/sandboxes/sb-w?wait_while=resuming&timeout_ms=60000");
  ASSERT_TRUE(state.ok()) << state.body.dump();
  EXPECT_EQ(state.body["state"], "paused") << state.body.dump();
  EXPECT_NE(state.body["last_error"].dump().find("ended"), std::string::npos) << state.body.dump();
  EXPECT_EQ(state.body["warm_memory_kept"], false) << state.body.dump();
  EXPECT_TRUE(ends_within(bad->pid(), std::chrono::seconds(5)))
      << "the VMM whose hand-over failed still runs";

  Answer warm = call("POST", "/v1/sandboxes/sb-w/resume",
                     {{"handshake_socket", dir_ + "/warm.sock"}, {"mode", "warm"}});
  EXPECT_EQ(warm.status, 409) << warm.body.dump();
  EXPECT_EQ(warm.body["error"]["code"], "generation_mismatch") << warm.body.dump();
  auto resumed = sb.resume();
  ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
  EXPECT_EQ((*resumed)["mode"], "background") << resumed->dump();
  auto mismatches = sb.verify();
  ASSERT_TRUE(mismatches.ok()) << mismatches.error().to_string();
  EXPECT_EQ(*mismatches, 0u);
}

// The fault server stops on an error while the sandbox runs (a fault outside every region its
// VMM announced): the VMM, which could only hang, is ended, and the sandbox leaves `running` for
// `failed`, saying why, instead of staying `running` on a hung VMM.
TEST_F(MemsnapdTest, AFaultServerErrorEndsTheVmmAndTheSandboxBecomesFailed) {
  Sandbox& sb = launch("sb-s", "a", "anon");  // process_vm_readv: resumed lazily
  const std::vector<std::uint32_t> expected = sb.vmm()->expected_generations();
  ASSERT_TRUE(sb.pause().ok());
  auto vmm = resume_into_misbehaving_vmm(*daemon_, sb, expected, "ok", true);
  ASSERT_NE(vmm, nullptr);
  Answer state = call("GET", "/v1/sandboxes/sb-s?wait_while=resuming&timeout_ms=60000");
  ASSERT_EQ(state.body["state"], "running") << state.body.dump();
  ASSERT_TRUE(vmm->wait_ready(std::chrono::seconds(30)).ok());
  auto touching = vmm->command("touch-stray");
  ASSERT_TRUE(touching.ok()) << touching.error().to_string();
  const bool gone = ends_within(vmm->pid(), std::chrono::seconds(10));
  EXPECT_TRUE(gone) << "the VMM hangs on a fault nobody serves";
  if (!gone) vmm->kill();  // else it would never read the exit command
  state = call("GET", "/v1/sandboxes/sb-s?wait_while=running&timeout_ms=10000");
  EXPECT_EQ(state.status, 200) << state.body.dump();
  EXPECT_EQ(state.body["state"], "failed") << state.body.dump();
  EXPECT_NE(state.body["last_error"].dump().find("outside every guest region"), std::string::npos)
      << state.body.dump();
  auto text = daemon_->scrape();
  ASSERT_TRUE(text.ok()) << text.error().to_string();
  EXPECT_EQ(sample(*text, R"(memsnap_sandboxes{state="failed"})"), 1);
  EXPECT_EQ(sample(*text, R"(memsnap_sandboxes{state="running"})"), 0);
}

// kill -9 of memsnapd in the middle of a diff pause: nothing of that pause becomes visible, the
// previous generation still restores every page, and a restarted memsnapd removes the
// temporary file the dead one left.
TEST_F(MemsnapdTest, KillNineInTheMiddleOfAPauseLeavesThePreviousGenerationWholeAndNoPartialFile) {
  restart_with_gate();
  SandboxSpec spec;
  spec.id = "sb-big";
  spec.size = 256ULL << 20;
  spec.attributes = {{"team", "a"}};
  spec.seed = 77;
  auto launched = Sandbox::launch(*daemon_, spec);
  ASSERT_TRUE(launched.ok()) << launched.error().to_string();
  std::unique_ptr<Sandbox> sb = std::move(*launched);
  // Generation 1, committed; the guest goes on running and dirties half its pages.
  auto first = sb->pause({{"after", "continue"}});
  ASSERT_TRUE(first.ok()) << first.error().to_string();
  const std::string gen1 = (*first)["snapshot"];
  const std::vector<std::uint32_t> expected = sb->vmm()->expected_generations();
  ASSERT_TRUE(sb->dirty(0.5, 99).ok());
  const fs::path big_dir = fs::path(daemon_->snapshot_dir()) / "sb-big";
  auto temporaries = [&] {
    std::vector<std::string> out;
    std::error_code ec;
    for (fs::directory_iterator it(big_dir, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if (name.find(".tmp.") != std::string::npos) out.push_back(name);
    }
    return out;
  };
  Result<json> second = json();
  // Half way for sure: the gated strategy holds the export until the gate opens, which it never
  // does here.
  std::thread t(
      [&] { second = sb->pause({{"sync", true}, {"parent", "none"}, {"strategy", "gated"}}); });
  const bool half_way = reached_gate();
  EXPECT_TRUE(half_way) << "the pause never got half way";
  EXPECT_FALSE(temporaries().empty()) << "half way through, the pause has no temporary file";
  ASSERT_EQ(::kill(daemon_->pid(), SIGKILL), 0);
  t.join();
  ASSERT_TRUE(half_way);
  EXPECT_FALSE(second.ok()) << "a pause answered although memsnapd was killed in its middle";
  // Only generation 1 is visible; the dead daemon's temporary file is still there.
  std::vector<std::string> snaps;
  for (const auto& e : fs::directory_iterator(big_dir)) {
    const std::string name = e.path().filename().string();
    if (name.find(".tmp.") == std::string::npos) snaps.push_back(name);
  }
  EXPECT_EQ(snaps, std::vector<std::string>{"generation-1.snap"});
  EXPECT_FALSE(temporaries().empty());
  // Generation 1 restores every page as it was when it was taken.
  auto chain = SnapshotChain::open({gen1}, Verify::kFull);
  ASSERT_TRUE(chain.ok()) << chain.error().to_string();
  std::vector<std::uint8_t> page(4096);
  std::uint64_t bad = 0;
  for (std::uint64_t p = 0; p < expected.size(); ++p) {
    ASSERT_TRUE(chain->read(p * 4096, 4096, page.data()).ok());
    if (!pattern::check_page(page.data(), 4096, spec.seed, p, expected[p]).ok) ++bad;
  }
  EXPECT_EQ(bad, 0u) << "generation 1 lost pages";
  // A new memsnapd on the same directory cleans up what the dead one left.
  sb.reset();
  daemon_.reset();
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  EXPECT_TRUE(temporaries().empty()) << "the restarted memsnapd left " << temporaries().front();
  EXPECT_TRUE(fs::exists(gen1));
}

// Issue 16 item 5: kill -9 of memsnapd while a hole-punching pause has already released part of
// the guest's memory. The temporary snapshot file is then the only copy of those bytes: a
// restarted memsnapd keeps it (it used to remove it), its recovery journal says where each run
// belongs, and `memsnap recover` writes them back into the still-stopped VMM's memfd.
TEST_F(MemsnapdTest, KillNineInTheMiddleOfAHolePunchPauseLeavesTheMemoryRecoverable) {
  restart_with_gate();
  SandboxSpec spec;
  spec.id = "sb-punch";
  spec.size = 512ULL << 20;
  spec.backing = "memfd";
  spec.attributes = {{"team", "c"}};  // hole_punch
  spec.seed = 78;
  auto launched = Sandbox::launch(*daemon_, spec);
  ASSERT_TRUE(launched.ok()) << launched.error().to_string();
  std::unique_ptr<Sandbox> sb = std::move(*launched);
  const pid_t vmm = sb->vmm()->pid();
  const std::string memfd_link =
      "/proc/" + std::to_string(vmm) + "/fd/" + std::to_string(sb->vmm()->memfd_number());
  auto allocated = [&] {
    struct stat st {};
    return ::stat(memfd_link.c_str(), &st) == 0 ? std::uint64_t(st.st_blocks) * 512 : 0;
  };
  const std::uint64_t before = allocated();
  ASSERT_GT(before, spec.size / 2);
  Result<json> paused = json();
  // gated_punch releases what it wrote, as hole_punch does, then stops half way: the pause is
  // killed with half of the guest's memory only in its unfinished snapshot, every time.
  std::thread t([&] { paused = sb->pause({{"sync", true}, {"strategy", "gated_punch"}}); });
  const bool half_way = reached_gate();
  EXPECT_TRUE(half_way) << "the pause never got half way";
  EXPECT_LT(allocated(), before) << "half way through, the pause has released nothing";
  ASSERT_EQ(::kill(daemon_->pid(), SIGKILL), 0);
  t.join();
  ASSERT_TRUE(half_way);
  EXPECT_FALSE(paused.ok()) << "a pause answered although memsnapd was killed in its middle";
  ASSERT_LT(allocated(), before);

  const fs::path sb_dir = fs::path(daemon_->snapshot_dir()) / "sb-punch";
  auto files = [&] {
    std::vector<std::string> out;
    std::error_code ec;
    for (fs::directory_iterator it(sb_dir, ec), end; !ec && it != end; it.increment(ec)) {
      out.push_back(it->path().string());
    }
    std::sort(out.begin(), out.end());
    return out;
  };
  daemon_.reset();
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  const std::vector<std::string> left = files();
  ASSERT_EQ(left.size(), 2u) << "the temporary file and its journal must survive the restart";
  EXPECT_NE(left[1].find(".recovery"), std::string::npos) << left[1];
  {
    std::ifstream log(daemon_->log_path());
    const std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
    EXPECT_NE(text.find("memsnap recover"), std::string::npos) << text;
  }
  // The registry says `running` (or `pausing`, if a poll wrote it since the claim) with the VMM
  // stopped by the freeze: the restart does not take the half-punched VMM back as running (its
  // next pause would export the holes as zeros, as if durable); it says why and keeps the entry.
  EXPECT_EQ(call("GET", "/v1/sandboxes/sb-punch").status, 404);
  const json health = call("GET", "/v1/health").body;
  ASSERT_EQ(health["registry"]["not_recovered"].size(), 1u) << health.dump();
  const json& lost = health["registry"]["not_recovered"][0];
  EXPECT_TRUE(lost["was"] == "pausing" ||
              lost["reason"].get<std::string>().find("is stopped") != std::string::npos)
      << health.dump();

  const auto recovered = testing::run_memsnap(
      "recover " + left[0] + " --memfd-of-pid " + std::to_string(vmm) + " --remove", true);
  ASSERT_EQ(recovered.exit_code, 0) << recovered.out;
  EXPECT_NE(recovered.out.find("restored"), std::string::npos) << recovered.out;
  EXPECT_TRUE(files().empty());
  ASSERT_EQ(::kill(vmm, SIGCONT), 0);
  auto bad = sb->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u) << "guest memory lost although the released bytes were recoverable";
}

// ---- handover pauses (issue 19): the answer comes at handover, the export in the background ----

// Pages of the snapshot chain that do not hold the pattern the guest held at its pause.
std::uint64_t bad_pages_in(const std::vector<std::string>& chain_files, std::uint64_t seed,
                           const std::vector<std::uint32_t>& expected) {
  auto chain = SnapshotChain::open(chain_files, Verify::kFull);
  EXPECT_TRUE(chain.ok()) << chain.error().to_string();
  if (!chain.ok()) return expected.size();
  std::vector<std::uint8_t> page(4096);
  std::uint64_t bad = 0;
  for (std::uint64_t p = 0; p < expected.size(); ++p) {
    if (!chain->read(p * 4096, 4096, page.data()).ok() ||
        !pattern::check_page(page.data(), 4096, seed, p, expected[p]).ok) {
      ++bad;
    }
  }
  return bad;
}

TEST_F(MemsnapdTest, AHandoverPauseAnswersBeforeItIsDurableAndLosesNoPageWhenTheVmmIsEnded) {
  Sandbox& sb = launch("sb-hand", "b", "memfd");  // team b: memfd
  // The fleet ends the stopped VMM right after the answer, as an orchestrator may: from then on
  // the export's reference is the only one to the guest's memory.
  auto paused = sb.pause({{"mode", "handover"}});
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();
  EXPECT_EQ((*paused)["mode"], "handover");
  EXPECT_EQ((*paused)["durable"], false);
  EXPECT_EQ((*paused)["strategy"], "memfd");
  const std::string snapshot = (*paused)["snapshot"];
  const Answer done =
      call("GET", "/v1/sandboxes/sb-hand?wait_while=exporting&timeout_ms=60000");
  ASSERT_EQ(done.status, 200) << done.error_text();
  EXPECT_EQ(done.body["state"], "paused") << done.body.dump();
  EXPECT_EQ(done.body["durable"], true);
  EXPECT_EQ(done.body["snapshots"], json::array({snapshot}));
  EXPECT_EQ(done.body["last_pause"]["export"]["state"], "durable");
  EXPECT_GT(done.body["last_pause"]["export"]["cpu_seconds"].get<double>(), 0);
  EXPECT_GE(done.body["last_pause"]["durable_seconds"].get<double>(),
            (*paused)["handover_seconds"].get<double>());
  EXPECT_EQ(done.body["warm_memory_kept"], true);
  // The snapshot is the pause-instant memory, and a warm resume from the kept memfd is too.
  auto resumed = sb.resume({{"mode", "warm"}});
  ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
  auto bad = sb.verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u);
  auto metrics = daemon_->scrape();
  ASSERT_TRUE(metrics.ok());
  EXPECT_EQ(sample(*metrics, R"(memsnap_pause_durable_seconds_count{mode="handover",strategy="memfd"})"), 1)
      << *metrics;
}

// Item 5: kill -9 of memsnapd while a handover's export runs. The exporter is a process of its
// own: it finishes and commits the snapshot, which then holds exactly the paused memory, although
// the VMM was ended at handover and memsnapd is gone.
TEST_F(MemsnapdTest, KillNineOfMemsnapdDuringABackgroundExportLosesNothingAcknowledged) {
  restart_with_gate();
  std::unique_ptr<Sandbox> sb = launch_memfd("sb-bg", 128ULL << 20, "c", 79);
  ASSERT_NE(sb, nullptr);
  const SandboxSpec spec = sb->spec();
  // A first pause by another strategy: the chain the handover extends.
  auto first = sb->pause({{"strategy", "memfd"}});
  ASSERT_TRUE(first.ok()) << first.error().to_string();
  const std::string first_snapshot = (*first)["snapshot"];
  ASSERT_TRUE(sb->resume().ok());
  ASSERT_TRUE(sb->dirty(0.5, 80).ok());  // what the handover's diff holds
  // gated_punch releases what it wrote, as hole_punch does, and stops half way until the gate
  // opens: the export is in flight, with half the memory only in its unfinished file, for sure.
  // The guest does not write after this: this is its memory at the pause.
  const std::vector<std::uint32_t> expected = sb->vmm()->expected_generations();
  auto paused = sb->pause({{"mode", "handover"}, {"sync", true}, {"strategy", "gated_punch"}});
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();
  ASSERT_EQ((*paused)["mode"], "handover");
  const std::string snapshot = (*paused)["snapshot"];
  EXPECT_EQ(sb->vmm(), nullptr) << "the fleet ends the VMM after a stop";
  ASSERT_TRUE(reached_gate()) << "the background export never got half way";
  ASSERT_EQ(::kill(daemon_->pid(), SIGKILL), 0);
  sb.reset();
  daemon_.reset();
  EXPECT_FALSE(fs::exists(snapshot));
  open_gate();
  EXPECT_TRUE(eventually([&] { return fs::exists(snapshot); }, std::chrono::seconds(60)))
      << "the exporter did not commit the snapshot after memsnapd died";
  const std::vector<std::string> chain = {first_snapshot, snapshot};
  EXPECT_EQ(bad_pages_in(chain, spec.seed, expected), 0u)
      << "the committed snapshot is not the memory the pause acknowledged";

  // A restarted memsnapd takes the sandbox back (its registry recorded the export in flight),
  // paused at that snapshot, by the strategy that wrote it; a resume from it holds that memory.
  DaemonOptions o;
  o.dir = dir_;
  o.flags_file = flags_;
  o.overrides = {"plugins.directory=" + dir_ + "/plugins"};
  auto restarted = Daemon::start(o);
  ASSERT_TRUE(restarted.ok()) << restarted.error().to_string();
  daemon_ = std::move(*restarted);
  const json back = call("GET", "/v1/sandboxes/sb-bg").body;
  EXPECT_EQ(back["state"], "paused") << back.dump();
  ASSERT_EQ(back["snapshots"].size(), 2u) << back.dump();
  EXPECT_EQ(back["snapshots"][1], snapshot) << back.dump();
  EXPECT_EQ(back["strategy"], "gated_punch") << back.dump();
  auto guest = resume_into_new_guest("sb-bg", spec, expected);
  ASSERT_NE(guest, nullptr);
  auto bad = guest->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u);
}

// kill -9 of memsnapd while a live pause exports, the guest writing throughout: the pause was
// never answered and nothing of it becomes visible; the VMM, whose writes fault to the dead
// memsnapd, is ended by the guardian instead of hanging; the last committed snapshot still holds
// every page it was given, and a restarted memsnapd removes the dead one's temporary file.
TEST_F(MemsnapdTest, KillNineOfMemsnapdDuringALiveExportEndsTheVmmAndCommitsNothingOfThatPause) {
  restart_with_gate();
  std::unique_ptr<Sandbox> sb = launch_memfd("sb-live-kill", 64ULL << 20, "b", 94, true);
  ASSERT_NE(sb, nullptr);
  const SandboxSpec spec = sb->spec();
  auto first = sb->pause({{"strategy", "memfd"}});
  ASSERT_TRUE(first.ok()) << first.error().to_string();
  const std::string gen1 = (*first)["snapshot"];
  ASSERT_TRUE(sb->resume().ok());
  GuestProcess& vmm = *sb->vmm();
  ASSERT_TRUE(vmm.write_faults());
  const std::vector<std::uint32_t> at_gen1 = vmm.expected_generations();
  ASSERT_TRUE(sb->dirty(0.5, 95).ok());
  const std::uint64_t pages = spec.size / 4096;
  ASSERT_TRUE(vmm.write_loop(pages - 1024, 1024).ok());
  const fs::path dir = fs::path(daemon_->snapshot_dir()) / "sb-live-kill";
  auto names = [&](bool temporary) {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir)) {
      const std::string name = e.path().filename().string();
      if ((name.find(".tmp.") != std::string::npos) == temporary) out.push_back(name);
    }
    return out;
  };
  // gated_memfd stops half way until the gate opens, which it never does here.
  Result<json> live = json();
  std::thread t([&] {
    live = sb->pause({{"mode", "live"}, {"after", "continue"}, {"strategy", "gated_memfd"}});
  });
  const bool half_way = reached_gate();
  const pid_t vmm_pid = vmm.pid();
  // The guest runs during the export: its loop finishes rounds, its writes copied out first.
  // (No assertion may return before the join below: the thread waits for the pause.)
  auto rounds = vmm.write_rounds();
  const bool ran = rounds.ok() && eventually(
                                      [&] {
                                        auto now = vmm.write_rounds();
                                        return now.ok() && *now > *rounds;
                                      },
                                      std::chrono::seconds(60));
  const bool killed = ::kill(daemon_->pid(), SIGKILL) == 0;
  if (!killed) open_gate();  // let the pause end, so that the join below does
  t.join();
  ASSERT_TRUE(killed) << std::strerror(errno);
  ASSERT_TRUE(half_way) << "the live export never got half way";
  EXPECT_TRUE(ran) << "the guest did not run during the live export";
  EXPECT_FALSE(live.ok()) << "a live pause answered although memsnapd was killed in its middle";
  EXPECT_TRUE(ends_within(vmm_pid, std::chrono::seconds(10)))
      << "the VMM outlived the memsnapd that took its write faults";
  EXPECT_EQ(names(false), std::vector<std::string>{fs::path(gen1).filename().string()});
  EXPECT_FALSE(names(true).empty()) << "half way through, the live pause had no temporary file";
  EXPECT_EQ(bad_pages_in({gen1}, spec.seed, at_gen1), 0u) << "generation 1 lost pages";
  sb.reset();
  daemon_.reset();
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  EXPECT_TRUE(names(true).empty()) << "the restarted memsnapd left " << names(true).front();
  EXPECT_TRUE(fs::exists(gen1));
}

// Item 3: a resume asked while the export runs is served at once from the memory held for the
// export; the guest reads its paused memory and writes on, and the snapshot still commits the
// memory as it was at the pause. Twice: a base snapshot (nothing under the held memory), then a
// diff (the held memory's dirty blocks over the parent). Then an ordinary pause and resume.
TEST_F(MemsnapdTest, AResumeBeforeDurableRunsAtOnceAndTheSnapshotKeepsThePauseInstantImage) {
  restart_with_gate();
  std::unique_ptr<Sandbox> sb = launch_memfd("sb-early", 64ULL << 20, "b", 80);
  ASSERT_NE(sb, nullptr);
  const SandboxSpec spec = sb->spec();
  std::vector<std::string> chain;
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    close_gate();
    const std::vector<std::uint32_t> expected = sb->vmm()->expected_generations();
    // gated_memfd reads the memfd and keeps it whole, as memfd does, and stops half way until
    // the gate opens: the export is in flight for sure when the resume comes.
    auto paused = sb->pause({{"mode", "handover"}, {"strategy", "gated_memfd"}});
    ASSERT_TRUE(paused.ok()) << paused.error().to_string();
    ASSERT_EQ((*paused)["mode"], "handover") << paused->dump();
    const std::string snapshot = (*paused)["snapshot"];
    ASSERT_TRUE(reached_gate()) << "the background export never got half way";
    // Round 0 as by default (background: a fill that maps every page it writes into the VMM),
    // round 1 lazy (every page on its first touch, from the held memory or the parent).
    auto resumed = sb->resume(round == 0 ? json::object() : json{{"mode", "lazy"}});
    ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
    EXPECT_EQ((*resumed)["before_durable"], true) << resumed->dump();
    EXPECT_EQ((*resumed)["report"]["before_durable"], true) << resumed->dump();
    EXPECT_EQ((*resumed)["mode"], round == 0 ? "background" : "lazy") << resumed->dump();
    Answer running = call("GET", "/v1/sandboxes/sb-early");
    EXPECT_EQ(running.body["state"], "running") << running.body.dump();
    EXPECT_EQ(running.body["durable"], false) << running.body.dump();
    EXPECT_FALSE(fs::exists(snapshot)) << "the export finished before the gate opened";
    auto bad = sb->verify();
    ASSERT_TRUE(bad.ok()) << bad.error().to_string();
    EXPECT_EQ(*bad, 0u) << "the guest resumed before durable does not see its paused memory";
    // The guest writes while the export still reads the held memory.
    ASSERT_TRUE(sb->dirty(0.3, 100 + round).ok());
    open_gate();
    const Answer done = call("GET", "/v1/sandboxes/sb-early?wait_while=exporting&timeout_ms=60000");
    ASSERT_EQ(done.status, 200) << done.error_text();
    EXPECT_EQ(done.body["state"], "running") << done.body.dump();
    EXPECT_EQ(done.body["durable"], true) << done.body.dump();
    chain.push_back(snapshot);
    EXPECT_EQ(done.body["snapshots"], json(chain));
    EXPECT_EQ(bad_pages_in(chain, spec.seed, expected), 0u)
        << "the snapshot took writes made after the pause";
    const std::uint64_t mapped_ahead = done.body["faults"].value("mapped_ahead_bytes", 0ULL);
    if (round == 0) {
      EXPECT_GT(mapped_ahead, 0u) << done.body.dump();
    } else {
      EXPECT_EQ(mapped_ahead, 0u) << done.body.dump();
    }
    bad = sb->verify();
    ASSERT_TRUE(bad.ok()) << bad.error().to_string();
    EXPECT_EQ(*bad, 0u);
  }
  // The next pause names the committed snapshot as its parent; its resume sees every write.
  auto last = sb->pause();
  ASSERT_TRUE(last.ok()) << last.error().to_string();
  EXPECT_EQ((*last)["parent"], chain.back()) << last->dump();
  EXPECT_EQ((*last)["strategy"], "memfd") << last->dump();
  EXPECT_EQ((*last)["fallback"], nullptr) << last->dump();
  ASSERT_TRUE(sb->resume().ok());
  auto bad = sb->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u);
}

// ---- live pauses (issue 19 item 4): the guest runs during the export ----

// What each page of the chain holds: its generation of seed's pattern, or 0 for a page that
// holds no whole generation (torn by a write the pause cut through, or not the pattern at all).
std::vector<std::uint32_t> generations_in(const std::vector<std::string>& chain_files,
                                          std::uint64_t seed, std::uint64_t pages) {
  std::vector<std::uint32_t> out(pages, 0);
  auto chain = SnapshotChain::open(chain_files, Verify::kFull);
  EXPECT_TRUE(chain.ok()) << chain.error().to_string();
  if (!chain.ok()) return out;
  std::vector<std::uint8_t> page(4096);
  for (std::uint64_t p = 0; p < pages; ++p) {
    if (!chain->read(p * 4096, 4096, page.data()).ok()) continue;
    const auto found = pattern::check_page(page.data(), 4096, seed, p, 0).found_generation;
    if (pattern::check_page(page.data(), 4096, seed, p, found).ok) {
      out[p] = static_cast<std::uint32_t>(found);
    }
  }
  return out;
}

TEST_F(MemsnapdTest, ALivePauseLetsTheGuestRunDuringTheExportAndItsSnapshotIsThePauseInstantImage) {
  std::unique_ptr<Sandbox> launched = launch_memfd("sb-live", 128ULL << 20, "b", 90, true);
  ASSERT_NE(launched, nullptr);
  Sandbox& sb = *launched;
  const SandboxSpec spec = sb.spec();
  const json live_body = {{"mode", "live"}, {"after", "continue"}, {"strategy", "memfd"}};

  // memsnapd does not serve the first VMM's faults: live falls back to copy and says why.
  auto copied = sb.pause(live_body);
  ASSERT_TRUE(copied.ok()) << copied.error().to_string();
  EXPECT_EQ((*copied)["mode"], "copy") << copied->dump();
  EXPECT_EQ((*copied)["mode_fallback"]["reason"], "no_write_faults") << copied->dump();

  // Paused and resumed, memsnapd serves the VMM, whose writes to protected pages fault to it.
  ASSERT_TRUE(sb.pause({{"strategy", "memfd"}}).ok());
  auto resumed = sb.resume();
  ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
  EXPECT_EQ((*resumed)["report"]["write_faults"], true) << resumed->dump();
  GuestProcess& vmm = *sb.vmm();
  ASSERT_TRUE(vmm.write_faults());
  // A large dirty set, so that the export takes a while; then a thread of the guest writes the
  // last 2048 pages round after round, in a scattered order, through the pause and after it.
  ASSERT_TRUE(sb.dirty(0.6, 91, /*sequential=*/true).ok());
  const std::vector<std::uint32_t> before = vmm.expected_generations();
  const std::uint64_t pages = spec.size / 4096;
  constexpr std::uint64_t kLoopPages = 2048;
  const std::uint64_t loop_first = pages - kLoopPages;
  ASSERT_TRUE(vmm.write_loop(loop_first, kLoopPages).ok());
  ASSERT_TRUE(eventually(
      [&] {
        auto rounds = vmm.write_rounds();
        return rounds.ok() && *rounds >= 2;
      },
      std::chrono::seconds(60)));

  auto live = sb.pause(live_body);
  ASSERT_TRUE(live.ok()) << live.error().to_string();
  auto stopped = vmm.write_stop();
  ASSERT_TRUE(stopped.ok()) << stopped.error().to_string();
  ASSERT_EQ((*live)["mode"], "live") << live->dump();
  ASSERT_TRUE((*live)["live"].is_object()) << live->dump();
  EXPECT_EQ((*live)["mode_fallback"], nullptr) << live->dump();
  EXPECT_EQ((*live)["durable"], true) << live->dump();
  EXPECT_LT((*live)["stopped_seconds"].get<double>(), (*live)["seconds"].get<double>())
      << live->dump();
  // The guest ran during the export and wrote pages it still needed: each was copied out
  // before the write went through.
  EXPECT_GT((*live)["live"]["copies"].get<std::uint64_t>(), 0u) << live->dump();

  // The snapshot, page by page: outside the loop's pages, what the guest held at the pause; in
  // them, one cut through the loop's writes: the round's first k pages (in the loop's order)
  // hold generation G and the rest G - 1, but for at most one torn page at the cut (the one
  // being written when the VMM stopped). A page exported after a later write breaks it: the
  // loop's order is not the export's.
  const Answer state = call("GET", "/v1/sandboxes/sb-live");
  const std::vector<std::string> chain = state.body["snapshots"];
  ASSERT_EQ(chain.back(), (*live)["snapshot"]);
  std::vector<std::uint32_t> at_pause = generations_in(chain, spec.seed, pages);
  std::uint64_t wrong_outside = 0;
  for (std::uint64_t p = 0; p < loop_first; ++p) wrong_outside += at_pause[p] != before[p];
  EXPECT_EQ(wrong_outside, 0u) << "pages the loop never wrote differ from the pause";
  const std::uint32_t g = at_pause[vmm.write_loop_page(0)];
  ASSERT_GT(g, before[vmm.write_loop_page(0)]) << "the loop's first page holds no loop generation";
  std::uint64_t k = 0;
  while (k < kLoopPages && at_pause[vmm.write_loop_page(k)] == g) ++k;
  std::uint64_t torn = 0;
  if (k < kLoopPages && at_pause[vmm.write_loop_page(k)] == 0) {
    torn = 1;
    at_pause[vmm.write_loop_page(k)] = g;  // what the guest was writing there
  }
  std::uint64_t off_cut = 0;
  for (std::uint64_t i = k + torn; i < kLoopPages; ++i) {
    off_cut += at_pause[vmm.write_loop_page(i)] != g - 1;
  }
  if (off_cut != 0) {
    std::map<std::uint32_t, int> hist;
    std::string seq;
    for (std::uint64_t i = 0; i < kLoopPages; ++i) {
      ++hist[at_pause[vmm.write_loop_page(i)]];
      if (i < 40) seq += std::to_string(at_pause[vmm.write_loop_page(i)]) + " ";
    }
    for (auto& [gen, n] : hist) std::cerr << "gen " << gen << ": " << n << "\n";
    std::cerr << "first 40 in loop order: " << seq << "\n";
  }
  EXPECT_EQ(off_cut, 0u) << "the loop's pages are not one cut through its writes (generation " << g
                         << " for its first " << k << " writes)";
  EXPECT_LE(g, (*stopped)["generation"].get<std::uint64_t>()) << stopped->dump();

  // Resumed from those files alone, as another sandbox, a guest sees that image.
  const Answer registered = call("POST", "/v1/sandboxes",
                                 {{"id", "sb-live-copy"},
                                  {"snapshots", chain},
                                  {"strategy", "memfd"},
                                  {"attributes", {{"team", "b"}}}});
  ASSERT_EQ(registered.status, 201) << registered.error_text();
  std::unique_ptr<GuestProcess> copy = resume_into_new_guest("sb-live-copy", spec, at_pause);
  ASSERT_NE(copy, nullptr);
  auto bad = copy->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, torn) << "the resumed copy does not hold the pause-instant image";

  // The guest itself lost nothing, and its next pause keeps what it wrote during the export.
  bad = sb.verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u);
  auto next = sb.pause({{"strategy", "memfd"}});
  ASSERT_TRUE(next.ok()) << next.error().to_string();
  EXPECT_EQ((*next)["parent"], chain.back()) << next->dump();
  ASSERT_TRUE(sb.resume().ok());
  bad = sb.verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u) << "writes made during the live export are missing from the next diff";
}

// ---- what a snapshot records (issue 20 item 2) ----

// A copy of a snapshot file as format version 1 wrote it: no origin record, so no strategy.
void write_as_version_1(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), kSnapshotDataOffset);
  FileHeader h;
  std::memcpy(&h, bytes.data(), sizeof(h));
  ASSERT_EQ(h.version, 2u);
  std::fill(bytes.begin() + sizeof(h), bytes.begin() + h.header_size, 0);
  h.version = 1;
  h.header_size = sizeof(h);
  h.header_checksum = compute_header_checksum(h);
  std::memcpy(bytes.data(), &h, sizeof(h));
  std::ofstream out(to, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good());
}

// A snapshot records the strategy that wrote it, so a paused sandbox registers from its snapshot
// files alone, and that strategy decides how the resume serves its memory (hole_punch released
// the memory it paused: background fill).
TEST_F(MemsnapdTest, AChainRegistersFromItsSnapshotsAloneAndResumesAsItsStrategyCallsFor) {
  std::unique_ptr<Sandbox> sb = launch_memfd("sb-origin", 64ULL << 20, "c", 31);
  ASSERT_NE(sb, nullptr);
  const SandboxSpec spec = sb->spec();
  const std::uint64_t pages = spec.size / 4096;
  ASSERT_TRUE(sb->dirty(0.2, 5).ok());
  auto paused = sb->pause({{"strategy", "hole_punch"}});
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();
  ASSERT_EQ((*paused)["strategy"], "hole_punch") << paused->dump();
  const std::vector<std::string> chain = call("GET", "/v1/sandboxes/sb-origin").body["snapshots"];
  ASSERT_EQ(chain.size(), 1u);
  const std::vector<std::uint32_t> at_pause = generations_in(chain, spec.seed, pages);

  // Another strategy than the one recorded: refused, naming both; nothing is registered.
  const Answer wrong =
      call("POST", "/v1/sandboxes",
           {{"id", "sb-origin-copy"}, {"snapshots", chain}, {"strategy", "memfd"}});
  EXPECT_EQ(wrong.status, 400) << wrong.body.dump();
  EXPECT_NE(wrong.error_text().find("written by strategy \"hole_punch\", not \"memfd\""),
            std::string::npos)
      << wrong.error_text();
  EXPECT_EQ(call("GET", "/v1/sandboxes/sb-origin-copy").status, 404);

  // A format 1 copy records none: it needs the strategy named, as before.
  const std::string v1 = fs::path(chain.back()).parent_path() / "origin-v1.snap";
  ASSERT_NO_FATAL_FAILURE(write_as_version_1(chain.back(), v1));
  const Answer unnamed = call("POST", "/v1/sandboxes", {{"id", "sb-v1"}, {"snapshots", {v1}}});
  EXPECT_EQ(unnamed.status, 400) << unnamed.body.dump();
  EXPECT_NE(unnamed.error_text().find("does not record the strategy"), std::string::npos)
      << unnamed.error_text();
  const Answer named = call("POST", "/v1/sandboxes",
                            {{"id", "sb-v1"}, {"snapshots", {v1}}, {"strategy", "hole_punch"}});
  EXPECT_EQ(named.status, 201) << named.body.dump();

  // The files alone.
  const Answer registered =
      call("POST", "/v1/sandboxes", {{"id", "sb-origin-copy"}, {"snapshots", chain}});
  ASSERT_EQ(registered.status, 201) << registered.error_text();
  EXPECT_EQ(registered.body["strategy"], "hole_punch") << registered.body.dump();
  json running;
  std::unique_ptr<GuestProcess> copy =
      resume_into_new_guest("sb-origin-copy", spec, at_pause, &running);
  ASSERT_NE(copy, nullptr);
  EXPECT_EQ(running["last_resume"]["mode"], "background") << running.dump();
  EXPECT_NE(running["last_resume"]["mode_reason"].get<std::string>().find("hole_punch"),
            std::string::npos)
      << running.dump();
  auto bad = copy->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u) << "the copy registered from the files does not hold the paused memory";
}

// ---- restarts (issue 20 item 1): the registry ----

// memsnapd keeps a registry of its sandboxes on disk (state.directory). After a graceful stop
// and after kill -9, the restarted memsnapd takes every paused sandbox back (its health and a
// metric say so), and each resumes from it with its memory, page by page; then its guest writes
// and pauses again for the next round.
TEST_F(MemsnapdTest, PausedSandboxesResumeFromTheRecoveredRegistryAfterSigtermAndKillNine) {
  std::unique_ptr<Sandbox> a = launch_memfd("sb-reg-a", 32ULL << 20, "c", 41);
  std::unique_ptr<Sandbox> b = launch_memfd("sb-reg-b", 32ULL << 20, "a", 42);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(a->dirty(0.3, 3).ok());
  ASSERT_TRUE(b->dirty(0.3, 4).ok());
  ASSERT_TRUE(a->pause({{"strategy", "memfd"}}).ok());
  ASSERT_TRUE(b->pause({{"strategy", "process_vm_readv"}}).ok());
  const std::map<std::string, SandboxSpec> specs = {{"sb-reg-a", a->spec()},
                                                    {"sb-reg-b", b->spec()}};
  std::map<std::string, std::unique_ptr<GuestProcess>> guests;
  for (const int sig : {SIGTERM, SIGKILL}) {
    SCOPED_TRACE(sig == SIGTERM ? "after SIGTERM" : "after kill -9");
    // The VMMs the last round's pauses left stopped (none in the first: the fleet ended them).
    std::map<std::string, std::unique_ptr<GuestProcess>> stopped = std::move(guests);
    std::map<std::string, json> before;
    std::map<std::string, std::vector<std::uint32_t>> expect;
    for (const auto& [id, spec] : specs) {
      before[id] = call("GET", "/v1/sandboxes/" + id).body;
      ASSERT_EQ(before[id]["state"], "paused") << before[id].dump();
      expect[id] = generations_in(before[id]["snapshots"].get<std::vector<std::string>>(),
                                  spec.seed, spec.size / 4096);
    }
    if (sig == SIGTERM) {
      EXPECT_EQ(daemon_->stop(SIGTERM, std::chrono::seconds(30)), 0);
    } else {
      ASSERT_EQ(::kill(daemon_->pid(), SIGKILL), 0);
    }
    daemon_.reset();
    ASSERT_NO_FATAL_FAILURE(start_daemon());

    const json health = call("GET", "/v1/health").body;
    ASSERT_TRUE(health["registry"].is_object()) << health.dump();
    EXPECT_EQ(health["registry"]["recovered"].size(), 2u) << health.dump();
    EXPECT_TRUE(health["registry"]["not_recovered"].empty()) << health.dump();
    auto metrics = daemon_->scrape();
    ASSERT_TRUE(metrics.ok());
    EXPECT_EQ(sample(*metrics, R"(memsnap_registry_recovered_sandboxes{outcome="recovered"})"), 2);
    for (const auto& [id, spec] : specs) {
      const json now = call("GET", "/v1/sandboxes/" + id).body;
      EXPECT_EQ(now["state"], "paused") << now.dump();
      EXPECT_EQ(now["snapshots"], before[id]["snapshots"]) << now.dump();
      EXPECT_EQ(now["strategy"], before[id]["strategy"]) << now.dump();
      guests[id] = resume_into_new_guest(id, spec, expect[id]);
      ASSERT_NE(guests[id], nullptr);
      // The VMM its pause left stopped is ended by now (by the stop, or once the resume was
      // accepted), never left stopped for good.
      if (stopped.count(id)) {
        EXPECT_TRUE(ends_within(stopped[id]->pid(), std::chrono::seconds(10)))
            << "the stopped VMM of " << id << " was left behind";
      }
      auto bad = guests[id]->verify();
      ASSERT_TRUE(bad.ok()) << bad.error().to_string();
      EXPECT_EQ(*bad, 0u) << id << " does not hold its paused memory";
      // The next round's pause: the guest writes, and the VMM stays stopped.
      ASSERT_TRUE(guests[id]->dirty(0.2, false, spec.seed + 100).ok());
      const Answer paused = call("POST", "/v1/sandboxes/" + id + "/pause", json::object());
      ASSERT_EQ(paused.status, 200) << paused.error_text();
    }
  }
}

// A VMM a pause left stopped that memsnapd never resumed (so no guardian ends it) outlives a
// kill -9 of memsnapd: the next memsnapd pins it again with the paused sandbox, and ends it once
// a resume of that sandbox is accepted, instead of leaving it stopped for good.
TEST_F(MemsnapdTest, AStoppedVmmOutlivingACrashIsPinnedAgainAndEndedByTheNextResume) {
  Sandbox& sb = launch("sb-reg-stopped", "a", "anon");
  const pid_t old_vmm = sb.vmm()->pid();
  ASSERT_EQ(call("POST", "/v1/sandboxes/sb-reg-stopped/pause", json::object()).status, 200);
  ASSERT_EQ(process_state(old_vmm), 'T');
  const std::vector<std::string> chain =
      call("GET", "/v1/sandboxes/sb-reg-stopped").body["snapshots"];
  ASSERT_EQ(::kill(daemon_->pid(), SIGKILL), 0);
  daemon_.reset();
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  const json health = call("GET", "/v1/health").body;
  ASSERT_EQ(health["registry"]["recovered"].size(), 1u) << health.dump();
  EXPECT_NE(health["registry"]["recovered"][0]["detail"].get<std::string>().find("pinned again"),
            std::string::npos)
      << health.dump();
  ASSERT_FALSE(ended(old_vmm));
  const SandboxSpec spec = sb.spec();
  auto guest = resume_into_new_guest("sb-reg-stopped", spec,
                                     generations_in(chain, spec.seed, spec.size / 4096));
  ASSERT_NE(guest, nullptr);
  auto bad = guest->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u);
  EXPECT_TRUE(ends_within(old_vmm, std::chrono::seconds(10)))
      << "the stopped VMM of the paused sandbox was left behind by its resume";
}

// A warm VMM that a graceful stop left running is running again after the restart: memsnapd
// recognises it (same boot, pid and start time), and its next pause, a full one (its writes
// were no longer tracked), holds what it wrote while memsnapd was away.
TEST_F(MemsnapdTest, AVmmThatRanOnThroughARestartIsRunningAgainAndItsNextPauseHoldsItsMemory) {
  std::unique_ptr<Sandbox> warm = launch_memfd("sb-reg-warm", 32ULL << 20, "b", 51);
  ASSERT_NE(warm, nullptr);
  ASSERT_TRUE(warm->pause({{"strategy", "memfd"}}).ok());
  auto resumed = warm->resume({{"mode", "warm"}});
  ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
  GuestProcess& guest = *warm->vmm();
  const pid_t pid = guest.pid();
  EXPECT_EQ(daemon_->stop(SIGTERM, std::chrono::seconds(30)), 0);
  daemon_.reset();
  ASSERT_TRUE(guest.dirty(0.3, false, 52).ok());  // while no memsnapd runs
  ASSERT_NO_FATAL_FAILURE(start_daemon());

  const json now = call("GET", "/v1/sandboxes/sb-reg-warm").body;
  EXPECT_EQ(now["state"], "running") << now.dump();
  EXPECT_EQ(now["vmm_pid"], pid) << now.dump();
  const json health = call("GET", "/v1/health").body;
  ASSERT_EQ(health["registry"]["recovered"].size(), 1u) << health.dump();
  EXPECT_NE(health["registry"]["recovered"][0]["detail"].get<std::string>().find("ran on"),
            std::string::npos)
      << health.dump();
  ASSERT_TRUE(guest.dirty(0.1, false, 53).ok());  // and after it came back
  const Answer paused = call("POST", "/v1/sandboxes/sb-reg-warm/pause", json::object());
  ASSERT_EQ(paused.status, 200) << paused.error_text();
  // Its memfd was taken back from its mappings: the flag's memfd strategy runs, from SEEK_DATA
  // (a scan of its page tables would miss the memfd's pages they do not map).
  EXPECT_EQ(paused.body["strategy"], "memfd") << paused.body.dump();
  const std::vector<std::string> chain = call("GET", "/v1/sandboxes/sb-reg-warm").body["snapshots"];
  const SandboxSpec spec = warm->spec();
  EXPECT_EQ(generations_in(chain, spec.seed, spec.size / 4096), guest.expected_generations())
      << "the pause after the restart does not hold the guest's memory";
}

// A registry that cannot be read stops memsnapd from starting, naming the file, and is left as
// it was: a start that took it for empty would forget every sandbox it records.
TEST_F(MemsnapdTest, ADamagedRegistryKeepsMemsnapdFromStartingAndIsLeftAsItWas) {
  Sandbox& sb = launch("sb-1", "a", "anon");
  ASSERT_TRUE(sb.pause().ok());
  daemon_.reset();
  const std::string file = dir_ + "/state/registry.json";
  ASSERT_TRUE(fs::exists(file));
  write_file(file, "{\"memsnapd_registry\": 1, \"boot_id\": ");
  DaemonOptions o;
  o.dir = dir_;
  o.flags_file = flags_;
  auto refused = Daemon::start(o);
  ASSERT_FALSE(refused.ok());
  std::ifstream log(dir_ + "/memsnapd.log");
  const std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find(file + " is not valid JSON"), std::string::npos) << text;
  std::ifstream kept(file);
  const std::string left((std::istreambuf_iterator<char>(kept)), std::istreambuf_iterator<char>());
  EXPECT_EQ(left, "{\"memsnapd_registry\": 1, \"boot_id\": ");

  // Nor does it start on a registry others could have written: it decides which processes
  // memsnapd takes back, and for whom.
  fs::remove(file);
  ASSERT_EQ(::chmod((dir_ + "/state").c_str(), 0777), 0);
  refused = Daemon::start(o);
  ASSERT_FALSE(refused.ok());
  std::ifstream log2(dir_ + "/memsnapd.log");
  const std::string text2((std::istreambuf_iterator<char>(log2)), std::istreambuf_iterator<char>());
  EXPECT_NE(text2.find("the state directory " + dir_ +
                       "/state must belong to memsnapd's uid and "
                       "be writable by nobody else"),
            std::string::npos)
      << text2;
}

// A tmpfs of its own at `dir` (created), unmounted when it goes: a file system that fills up.
class SmallTmpfs {
 public:
  SmallTmpfs(const fs::path& dir, const std::string& options) : dir_(dir) {
    if (::geteuid() != 0) {
      why_not_ = "mounting a small tmpfs needs root";
      return;
    }
    fs::create_directories(dir);
    if (::mount("memsnap-test", dir.c_str(), "tmpfs", 0, options.c_str()) != 0) {
      why_not_ = std::string("cannot mount a tmpfs here: ") + std::strerror(errno);
      return;
    }
    mounted_ = true;
  }
  ~SmallTmpfs() {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  SmallTmpfs(const SmallTmpfs&) = delete;
  SmallTmpfs& operator=(const SmallTmpfs&) = delete;
  bool mounted() const { return mounted_; }
  const std::string& why_not() const { return why_not_; }

 private:
  fs::path dir_;
  bool mounted_ = false;
  std::string why_not_;
};

TEST_F(MemsnapdTest, AFullDiskFailsTheExportWithTheMemoryHeldAndARetryMakesItDurable) {
  // The sandbox's snapshot directory is a tmpfs far smaller than its guest.
  const fs::path small = fs::path(daemon_->snapshot_dir()) / "sb-full";
  SmallTmpfs tmpfs(small, "size=4m");
  if (!tmpfs.mounted()) GTEST_SKIP() << tmpfs.why_not();
  Sandbox& sb = launch("sb-full", "b", "memfd");
  auto paused = sb.pause({{"mode", "handover"}});
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();
  const std::string snapshot = (*paused)["snapshot"];
  Answer failed = call("GET", "/v1/sandboxes/sb-full?wait_while=exporting&timeout_ms=60000");
  ASSERT_EQ(failed.status, 200) << failed.error_text();
  EXPECT_EQ(failed.body["state"], "export_failed") << failed.body.dump();
  EXPECT_EQ(failed.body["durable"], false);
  EXPECT_NE(failed.body["export"]["error"].get<std::string>().find("No space"), std::string::npos)
      << failed.body.dump();
  EXPECT_FALSE(fs::exists(snapshot)) << "a failed export left a snapshot";
  // Nothing lets the memory go by accident, and a resume says why it cannot run.
  EXPECT_EQ(call("DELETE", "/v1/sandboxes/sb-full").status, 409);
  EXPECT_EQ(call("POST", "/v1/sandboxes/sb-full/resume", {{"handshake_socket", "full.uffd"}}).status,
            409);
  // Room again; a retry commits the memory as it was at the pause.
  ASSERT_EQ(::mount(nullptr, small.c_str(), nullptr, MS_REMOUNT, "size=256m"), 0)
      << std::strerror(errno);
  const Answer retried = call("POST", "/v1/sandboxes/sb-full/export/retry");
  ASSERT_EQ(retried.status, 200) << retried.error_text();
  const Answer done = call("GET", "/v1/sandboxes/sb-full?wait_while=exporting&timeout_ms=60000");
  ASSERT_EQ(done.status, 200) << done.error_text();
  EXPECT_EQ(done.body["state"], "paused") << done.body.dump();
  EXPECT_EQ(done.body["last_pause"]["export"]["attempts"], 2);
  auto resumed = sb.resume({{"mode", "warm"}});
  ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
  auto bad = sb.verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u);
  sandboxes_.clear();  // the VMM goes before the file system under its snapshot
  call("DELETE", "/v1/sandboxes/sb-full?force=true");
}

std::set<std::string> files_in(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

// A live pause that runs out of disk fails with nothing committed, the guest running on
// throughout; what it wrote before and during the failed pause is in the next one.
TEST_F(MemsnapdTest, ALivePauseOnAFullDiskFailsWithNothingCommittedAndTheNextPauseKeepsEveryWrite) {
  const fs::path small = fs::path(daemon_->snapshot_dir()) / "sb-live-full";
  SmallTmpfs tmpfs(small, "size=160m");
  if (!tmpfs.mounted()) GTEST_SKIP() << tmpfs.why_not();
  std::unique_ptr<Sandbox> launched = launch_memfd("sb-live-full", 64ULL << 20, "b", 92, true);
  ASSERT_NE(launched, nullptr);
  Sandbox& sb = *launched;
  const SandboxSpec spec = sb.spec();
  ASSERT_TRUE(sb.pause({{"strategy", "memfd"}}).ok());
  ASSERT_TRUE(sb.resume().ok());
  GuestProcess& vmm = *sb.vmm();
  ASSERT_TRUE(vmm.write_faults());
  ASSERT_TRUE(sb.dirty(0.5, 93).ok());
  const std::vector<std::string> chain_before =
      call("GET", "/v1/sandboxes/sb-live-full").body["snapshots"];
  // All but 2 MiB of the file system taken: the diff (about 32 MiB) cannot be written.
  {
    struct statvfs st {};
    ASSERT_EQ(::statvfs(small.c_str(), &st), 0);
    const std::uint64_t room = std::uint64_t{st.f_bavail} * st.f_frsize;
    ASSERT_GT(room, 4ULL << 20);
    std::vector<char> block(1 << 20, 'x');
    std::ofstream filler(small / "filler", std::ios::binary);
    for (std::uint64_t left = room - (2ULL << 20); left > 0;) {
      const std::uint64_t n = std::min<std::uint64_t>(left, block.size());
      filler.write(block.data(), static_cast<std::streamsize>(n));
      left -= n;
    }
    filler.close();
    ASSERT_TRUE(filler.good());
  }
  const std::set<std::string> files_before = files_in(small);
  constexpr std::uint64_t kLoopPages = 1024;
  const std::uint64_t pages = spec.size / 4096;
  ASSERT_TRUE(vmm.write_loop(pages - kLoopPages, kLoopPages).ok());
  auto failed = sb.pause({{"mode", "live"}, {"after", "continue"}, {"strategy", "memfd"}});
  ASSERT_FALSE(failed.ok()) << failed->dump();
  EXPECT_NE(failed.error().to_string().find("No space"), std::string::npos)
      << failed.error().to_string();
  const Answer after = call("GET", "/v1/sandboxes/sb-live-full");
  EXPECT_EQ(after.body["state"], "running") << after.body.dump();
  EXPECT_EQ(after.body["snapshots"], json(chain_before)) << after.body.dump();
  EXPECT_EQ(files_in(small), files_before) << "the failed pause left files behind";
  // The guest ran on through the failure: its loop still finishes rounds.
  auto rounds = vmm.write_rounds();
  ASSERT_TRUE(rounds.ok()) << rounds.error().to_string();
  EXPECT_TRUE(eventually(
      [&] {
        auto now = vmm.write_rounds();
        return now.ok() && *now > *rounds;
      },
      std::chrono::seconds(60)))
      << "the guest's loop stopped after the failed live pause";
  ASSERT_TRUE(vmm.write_stop().ok());
  // Room again: the next pause holds every write, from before the failed pause and after it.
  fs::remove(small / "filler");
  auto next = sb.pause({{"mode", "live"}, {"after", "continue"}, {"strategy", "memfd"}});
  ASSERT_TRUE(next.ok()) << next.error().to_string();
  EXPECT_EQ((*next)["mode"], "live") << next->dump();
  ASSERT_TRUE(sb.pause({{"strategy", "memfd"}}).ok());
  ASSERT_TRUE(sb.resume().ok());
  auto bad = sb.verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u) << "writes made around the failed live pause are missing";
  launched.reset();  // the VMM goes before the file system under its snapshot
  call("DELETE", "/v1/sandboxes/sb-live-full?force=true");
}

TEST(MemsnapdConfigTest, ABadConfigFileIsRefusedWithFileLineAndColumn) {
  char templ[] = "/var/tmp/memsnapd-config-XXXXXX";
  ASSERT_NE(::mkdtemp(templ), nullptr);
  const std::string dir = templ;
  const std::string config = dir + "/memsnapd.yaml";
  std::ofstream(config) << "limits:\n  max_concurrent_pauses: four\nlogging:\n  levle: debug\n";
  DaemonOptions o;
  o.dir = dir;
  o.config_file = config;
  o.start_timeout = std::chrono::seconds(5);
  auto d = Daemon::start(o);
  ASSERT_FALSE(d.ok()) << "memsnapd started with a broken config";
  std::ifstream log(dir + "/memsnapd.log");
  const std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find(config + ":2:26"), std::string::npos) << text;
  EXPECT_NE(text.find(config + ":4:3"), std::string::npos) << text;
  EXPECT_NE(text.find("levle"), std::string::npos) << text;
  fs::remove_all(dir);
}

TEST_F(MemsnapdTest, SighupAppliesWhatItCanAndKeepsTheRest) {
  // Restart the fixture's daemon with a config file, then change it and send SIGHUP.
  daemon_.reset();
  const std::string config = dir_ + "/memsnapd.yaml";
  std::ofstream(config)
      << "limits:\n  max_concurrent_pauses: 4\nstrategy:\n  fallback: process_vm_readv\n";
  DaemonOptions o;
  o.dir = dir_;
  o.config_file = config;
  auto d = Daemon::start(o);
  ASSERT_TRUE(d.ok()) << d.error().to_string();
  daemon_ = std::move(*d);
  Sandbox& sb = launch("sb-1", "x", "memfd");
  // No flag file: every sandbox gets the fallback strategy, and that is no fallback.
  auto first = sb.pause();
  ASSERT_TRUE(first.ok()) << first.error().to_string();
  EXPECT_EQ((*first)["strategy"], "process_vm_readv");
  EXPECT_EQ((*first)["reason"], "no_flags");
  ASSERT_TRUE(sb.resume().ok());

  write_file(flags_, flag_file("process_vm_readv"));
  std::ofstream(config) << "limits:\n  max_concurrent_pauses: 2\nstrategy:\n  fallback: memfd\n"
                        << "flags:\n  file: " << flags_ << "\n"
                        << "plugins:\n  directory: " << dir_ << "/elsewhere\n";
  ASSERT_EQ(::kill(daemon_->pid(), SIGHUP), 0);
  json yaml;
  for (int i = 0; i < 200; ++i) {
    yaml = call("GET", "/v1/config").body;
    if (yaml.value("yaml", "").find("max_concurrent_pauses: 2") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  const std::string text = yaml.value("yaml", "");
  EXPECT_NE(text.find("max_concurrent_pauses: 2"), std::string::npos) << text;
  EXPECT_TRUE(std::regex_search(text, std::regex("fallback: \"?memfd"))) << text;
  // Plugins are not reloaded without a restart: the running set stays, and the log says so.
  EXPECT_EQ(text.find("elsewhere"), std::string::npos) << text;
  std::ifstream log(daemon_->log_path());
  const std::string logged((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  EXPECT_NE(logged.find("plugins.directory changed; it takes effect only after a restart"),
            std::string::npos);
  // The flag file named in the reloaded config is in force: team x gets the flag's default.
  auto second = sb.pause();
  ASSERT_TRUE(second.ok()) << second.error().to_string();
  EXPECT_EQ((*second)["reason"], "DEFAULT");
  EXPECT_EQ((*second)["variant"], "process_vm_readv");
}

// Health after a bad flag file and then a good one: the good file is in force, so the health
// shows no error; and a re-read of content already loaded is no reload (neither in the health nor
// in memsnap_flag_reloads_total{result="success"}).
TEST_F(MemsnapdTest, FlagHealthIsCleanAfterABadThenAGoodFileAndUnchangedReReadsAreNoReloads) {
  auto flags = [&] { return call("GET", "/v1/health").body["flags"]; };
  const json before = flags();
  ASSERT_TRUE(before.is_object()) << before.dump();
  EXPECT_EQ(before["last_error"], "");
  const auto generation0 = before["generation"].get<std::uint64_t>();
  const auto failed0 = before["reloads_failed"].get<std::uint64_t>();
  auto text = daemon_->scrape();
  ASSERT_TRUE(text.ok()) << text.error().to_string();
  const double success0 = std::max(0.0, sample(*text, R"(memsnap_flag_reloads_total{result="success"})"));
  const double failure0 = std::max(0.0, sample(*text, R"(memsnap_flag_reloads_total{result="failure"})"));

  // Bad, then the same good content back.
  write_file(flags_, "{\"flags\": {");
  ASSERT_TRUE(eventually([&] { return flags()["reloads_failed"] > failed0; })) << flags().dump();
  EXPECT_NE(flags()["last_error"], "");
  // (A save is a write and a rename: the watcher may re-read in between, too. Every re-read
  // after the rename sees the final content, so waiting for one more of its kind is enough.)
  const auto unchanged0 = flags().value("reloads_unchanged", 0);
  write_file(flags_, flag_file("process_vm_readv"));
  ASSERT_TRUE(eventually([&] { return flags().value("reloads_unchanged", 0) > unchanged0; }))
      << flags().dump();
  json now = flags();
  EXPECT_EQ(now["last_error"], "") << now.dump();
  EXPECT_EQ(now["generation"], generation0) << now.dump();
  EXPECT_EQ(now["reloads"], 0) << now.dump();

  // Bad, then new good content: one reload, and healthy again.
  write_file(flags_, "{\"flags\": {");
  const auto failed1 = now["reloads_failed"].get<std::uint64_t>();
  ASSERT_TRUE(eventually([&] { return flags()["reloads_failed"] > failed1; })) << flags().dump();
  write_file(flags_, flag_file("memfd"));
  ASSERT_TRUE(eventually([&] { return flags()["generation"] == generation0 + 1; }))
      << flags().dump();
  now = flags();
  EXPECT_EQ(now["last_error"], "") << now.dump();
  EXPECT_EQ(now["reloads"], 1) << now.dump();

  // The metrics: once memsnapd has counted every failure so far (its poll records failures and
  // successes from one reading of the counters), successes are the reloads, nothing more.
  const auto failed = now["reloads_failed"].get<std::uint64_t>();
  double success = -1;
  ASSERT_TRUE(eventually([&] {
    auto t = daemon_->scrape();
    if (!t.ok()) return false;
    success = sample(*t, R"(memsnap_flag_reloads_total{result="success"})");
    return sample(*t, R"(memsnap_flag_reloads_total{result="failure"})") - failure0 ==
           static_cast<double>(failed - failed0);
  }));
  EXPECT_EQ(success - success0, 1) << "a re-read of unchanged content counted as a reload";
}

// A query parameter a route does not know is refused, as an unknown body field is: a typo
// (wait_for for wait_while) must not silently turn a wait into an immediate answer.
// `wait_while=resumin` returned at once (the sandbox is never in a state of that name), as if
// the wait were over: a typo looked like success.
TEST_F(MemsnapdTest, WaitingWhileAStateThatDoesNotExistIsRefused) {
  launch("sb-1", "b", "memfd");
  const Answer a = call("GET", "/v1/sandboxes/sb-1?wait_while=resumin&timeout_ms=10");
  EXPECT_EQ(a.status, 400) << a.body.dump();
  ASSERT_TRUE(a.body.contains("error")) << a.body.dump();
  EXPECT_EQ(a.body["error"]["code"], "invalid_argument") << a.body.dump();
  EXPECT_NE(a.body["error"]["message"].get<std::string>().find(
                "wait_while takes running, pausing, paused, resuming, failed, exporting, "
                "export_failed, not 'resumin'"),
            std::string::npos)
      << a.body.dump();
}

TEST_F(MemsnapdTest, UnknownQueryParametersAreRefusedOnEveryRoute) {
  launch("sb-1", "b", "memfd");
  struct Case {
    std::string method, target;
    json body;
    std::string parameter, known;  // known: what the message lists ("" = the route takes none)
  };
  const std::vector<Case> cases = {
      {"GET", "/v1/health?verbose=1", nullptr, "verbose", ""},
      {"GET", "/v1/config?format=json", nullptr, "format", ""},
      {"GET", "/v1/sandboxes?state=running", nullptr, "state", ""},
      {"POST", "/v1/sandboxes?dry_run=true", json::object(), "dry_run", ""},
      {"GET", "/v1/sandboxes/sb-1?wait_for=running", nullptr, "wait_for", "wait_while, timeout_ms"},
      {"GET", "/v1/sandboxes/sb-1?wait_while=paused&timeout=5", nullptr, "timeout",
       "wait_while, timeout_ms"},
      {"DELETE", "/v1/sandboxes/sb-1?forced=true", nullptr, "forced", "force"},
      {"POST", "/v1/sandboxes/sb-1/pause?parent=none", json::object(), "parent", ""},
      {"POST", "/v1/sandboxes/sb-1/resume?mode=warm", json{{"handshake_socket", "x.uffd"}},
       "mode", ""},
      {"GET", "/v1/sandboxes/sb-1/strategy?explain=1", nullptr, "explain", ""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.method + " " + c.target);
    const Answer a = call(c.method, c.target, c.body);
    EXPECT_EQ(a.status, 400) << a.body.dump();
    ASSERT_TRUE(a.body.contains("error")) << a.body.dump();
    EXPECT_EQ(a.body["error"]["code"], "invalid_argument") << a.body.dump();
    const std::string message = a.body["error"]["message"];
    EXPECT_NE(message.find("\"" + c.parameter + "\""), std::string::npos) << message;
    EXPECT_NE(message.find(c.known.empty() ? "takes none" : "known: " + c.known),
              std::string::npos)
        << message;
  }
  // Nothing happened: still registered, running, no snapshot.
  const json sb = call("GET", "/v1/sandboxes/sb-1").body;
  EXPECT_EQ(sb["state"], "running") << sb.dump();
  EXPECT_TRUE(sb["snapshots"].empty()) << sb.dump();
  // The known ones still work.
  EXPECT_EQ(call("GET", "/v1/sandboxes/sb-1?wait_while=paused&timeout_ms=10").status, 200);
}

// The handshake directory removed while memsnapd runs (a /run cleanup): a resume cannot listen
// there. That is the request's environment, not a memsnapd failure: 400, naming the directory,
// and the sandbox stays paused.
TEST_F(MemsnapdTest, AResumeIntoAMissingHandshakeDirectoryIsRefusedNamingIt) {
  daemon_.reset();
  const std::string handshake = dir_ + "/handshake";
  DaemonOptions o;
  o.dir = dir_;
  o.flags_file = flags_;
  o.overrides = {"control.handshake_directory=" + handshake};
  auto d = Daemon::start(o);
  ASSERT_TRUE(d.ok()) << d.error().to_string();
  daemon_ = std::move(*d);
  Sandbox& sb = launch("sb-1", "b", "memfd");
  ASSERT_TRUE(sb.pause().ok());
  ASSERT_TRUE(fs::remove(handshake));
  const Answer a = call("POST", "/v1/sandboxes/sb-1/resume", {{"handshake_socket", "sb-1.uffd"}});
  EXPECT_EQ(a.status, 400) << a.body.dump();
  EXPECT_EQ(a.body["error"]["code"], "invalid_argument") << a.body.dump();
  EXPECT_NE(a.body.dump().find(handshake), std::string::npos) << a.body.dump();
  EXPECT_NE(a.body.dump().find("does not exist"), std::string::npos) << a.body.dump();
  const json after = call("GET", "/v1/sandboxes/sb-1").body;
  EXPECT_EQ(after["state"], "paused") << after.dump();
}

// Default snapshot names say the generation their header has, and never reuse a file: a new base
// (parent "none") after generation 1 is a generation 1 again, and a diff against an older parent
// a generation 2 again, beside the files they do not replace.
TEST_F(MemsnapdTest, DefaultSnapshotNamesSayTheGenerationInTheirHeader) {
  Sandbox& sb = launch("sb-1", "a", "anon");
  std::map<std::string, std::string> ids;  // every snapshot written: path -> snapshot_id
  auto pause = [&](const json& body) {
    auto paused = sb.pause(body);
    EXPECT_TRUE(paused.ok()) << paused.error().to_string();
    if (!paused.ok()) return json();
    const std::string path = (*paused)["snapshot"];
    EXPECT_EQ(ids.count(path), 0u) << path << " written twice";
    ids[path] = (*paused)["snapshot_id"];
    auto reader = SnapshotReader::open(path, Verify::kHeaderAndMap);
    EXPECT_TRUE(reader.ok()) << reader.error().to_string();
    if (reader.ok()) {
      EXPECT_EQ((*reader)->header().generation, (*paused)["generation"].get<std::uint64_t>());
    }
    EXPECT_EQ(generation_in_name(path), (*paused)["generation"].get<std::uint64_t>()) << path;
    return *paused;
  };
  const json base = pause(json::object());
  ASSERT_FALSE(base.is_null());
  ASSERT_TRUE(sb.resume().ok());
  ASSERT_TRUE(sb.dirty(0.05, 1).ok());
  ASSERT_FALSE(pause(json::object()).is_null());  // generation 2
  ASSERT_TRUE(sb.resume().ok());
  const json fresh = pause({{"parent", "none"}});  // a new base: generation 1
  ASSERT_FALSE(fresh.is_null());
  EXPECT_EQ(fresh["generation"], 1);
  ASSERT_TRUE(sb.resume().ok());
  ASSERT_TRUE(sb.dirty(0.05, 2).ok());
  ASSERT_FALSE(pause(json::object()).is_null());  // generation 2 of the new chain
  ASSERT_TRUE(sb.resume().ok());
  const json older = pause({{"parent", fresh["snapshot"]}});  // generation 2 once more
  ASSERT_FALSE(older.is_null());
  EXPECT_EQ(older["generation"], 2);
  // Every file is still there, as it was written.
  for (const auto& [path, id] : ids) {
    auto reader = SnapshotReader::open(path, Verify::kFull);
    ASSERT_TRUE(reader.ok()) << path << ": " << reader.error().to_string();
    EXPECT_EQ(to_hex((*reader)->header().snapshot_id), id) << path;
  }
}

// ---- long polls (GET ?wait_while=) ----

// Opens a connection to the control socket and sends a 10-minute wait for sb's state to leave
// `state`, without reading the answer; -1 on failure.
int open_long_poll(const std::string& socket, const std::string& id, const std::string& state) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket.c_str(), sizeof(addr.sun_path) - 1);
  const std::string request = "GET /v1/sandboxes/" + id + "?wait_while=" + state +
                              "&timeout_ms=600000 HTTP/1.1\r\nHost: x\r\n\r\n";
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
          static_cast<ssize_t>(request.size())) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Everything the server sends on fd until it closes (or `limit` passes).
std::string read_until_closed(int fd, std::chrono::milliseconds limit) {
  std::string out;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  char buf[4096];
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

// 64 long polls (memsnapd serves 64 connections at once) from a client that then goes away
// must give their slots back at once, not after their 10 minutes: the waits notice that their
// connection was closed.
TEST_F(MemsnapdTest, LongPollsOfAClientThatLeftGiveTheirConnectionSlotsBack) {
  launch("sb-1", "a", "anon");
  std::vector<int> polls;
  for (int i = 0; i < 64; ++i) {
    const int fd = open_long_poll(daemon_->socket(), "sb-1", "running");
    ASSERT_GE(fd, 0) << std::strerror(errno);
    polls.push_back(fd);
  }
  // Every slot is taken once a new request is refused with 503.
  bool full = false;
  for (const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
       !full && std::chrono::steady_clock::now() < until;) {
    auto a = daemon_->call("GET", "/v1/health", nullptr, std::chrono::seconds(5));
    full = a.ok() && a->status == 503;
    if (!full) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(full) << "64 long polls did not fill memsnapd's connection slots";

  for (const int fd : polls) ::close(fd);  // the client goes away
  const auto left = std::chrono::steady_clock::now();
  // 10 s is a correctness bound (the polls would hold their slots for 600 s), not a speed target.
  int status = 0;
  for (const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
       status != 200 && std::chrono::steady_clock::now() < until;) {
    auto a = daemon_->call("GET", "/v1/health", nullptr, std::chrono::seconds(5));
    status = a.ok() ? a->status : -1;
    if (status != 200) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(status, 200) << "the slots of the closed long polls were not given back";
  std::printf("note: a slot was free %lld ms after the client left\n",
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                         std::chrono::steady_clock::now() - left)
                                         .count()));
  // The sandbox is untouched and still answers.
  EXPECT_EQ(call("GET", "/v1/sandboxes/sb-1").body.value("state", ""), "running");
}

// SIGTERM ends the waits at once (503 shutting_down) and memsnapd exits promptly, rather than
// after the longest poll's 10 minutes.
TEST_F(MemsnapdTest, SigtermEndsLongPollsAndExitsPromptly) {
  launch("sb-1", "a", "anon");
  std::vector<int> polls;
  for (int i = 0; i < 8; ++i) {
    const int fd = open_long_poll(daemon_->socket(), "sb-1", "running");
    ASSERT_GE(fd, 0) << std::strerror(errno);
    polls.push_back(fd);
  }
  auto health = daemon_->call("GET", "/v1/health", nullptr, std::chrono::seconds(5));
  ASSERT_TRUE(health.ok() && health->status == 200);
  // 10 s: a correctness bound against the polls' 600 s, not a speed target.
  const int exit_status = daemon_->stop(SIGTERM, std::chrono::seconds(10));
  EXPECT_EQ(exit_status, 0) << "memsnapd did not exit within 10 s of SIGTERM with long polls open";
  if (exit_status != 0) {
    for (const int fd : polls) ::close(fd);
    return;
  }
  for (const int fd : polls) {
    // Answered 503 shutting_down, or (a request the server had not read yet when it stopped)
    // closed without an answer; never a hang or another answer.
    const std::string answer = read_until_closed(fd, std::chrono::seconds(5));
    if (!answer.empty()) {
      EXPECT_EQ(answer.rfind("HTTP/1.1 503 ", 0), 0u) << answer;
      EXPECT_NE(answer.find("\"shutting_down\""), std::string::npos) << answer;
    }
    ::close(fd);
  }
}

}  // namespace
}  // namespace memsnap::fleet
