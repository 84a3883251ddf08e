// memsnap's client mode end to end: a real memsnapd (fleet::Daemon), real stand-in VMMs, and
// every step driven only through the memsnap binary (`memsnap --socket ... COMMAND`), the way an
// operator's script drives it: register, strategy, pause, sandbox, resume (a new VMM connecting
// to the handshake socket), --wait, unregister; API errors, usage errors and an unreachable
// daemon with their exit codes; and docs/openapi.yaml checked against the daemon's routes.
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/memsnap_cli.h"
#include "tools/fleet/fleet.h"
#include "tools/guest_client/guest_client.h"

extern char** environ;

namespace memsnap {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::uint64_t kGuest = 32ULL << 20;

struct CliRun {
  int exit_code = -1;
  std::string out;
  std::string err;
};

std::ostream& operator<<(std::ostream& os, const CliRun& r) {
  return os << "exit " << r.exit_code << "\n--- stdout ---\n"
            << r.out << "--- stderr ---\n"
            << r.err;
}

// Runs $MEMSNAP_BIN_DIR/memsnap (testing::memsnap_binary) with args, stdout and stderr captured
// apart. MEMSNAP_SOCKET is removed from its environment unless given in env ("K=V" entries).
CliRun run_cli(const std::vector<std::string>& args, const std::vector<std::string>& env = {}) {
  CliRun r;
  std::vector<std::string> argv_s = {testing::memsnap_binary()};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<std::string> env_s;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, "MEMSNAP_SOCKET=", 15) != 0) env_s.emplace_back(*e);
  }
  env_s.insert(env_s.end(), env.begin(), env.end());
  std::vector<char*> argv, envp;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);

  // O_CLOEXEC: no other child (a guest spawned meanwhile) may hold a write end open.
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return r;
  if (::pipe2(err, O_CLOEXEC) != 0) {
    ::close(out[0]);
    ::close(out[1]);
    return r;
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  ::close(out[1]);
  ::close(err[1]);
  if (rc == 0) {
    pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
    std::string* sinks[2] = {&r.out, &r.err};
    int open = 2;
    while (open > 0) {
      if (::poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        break;
      }
      for (int i = 0; i < 2; ++i) {
        if (fds[i].fd < 0 || fds[i].revents == 0) continue;
        char buf[4096];
        const ssize_t n = ::read(fds[i].fd, buf, sizeof(buf));
        if (n > 0) {
          sinks[i]->append(buf, static_cast<std::size_t>(n));
        } else if (n == 0 || errno != EINTR) {
          fds[i].fd = -1;
          --open;
        }
      }
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  } else {
    r.err = std::string("posix_spawn: ") + std::strerror(rc);
  }
  ::close(out[0]);
  ::close(err[0]);
  return r;
}

json parse(const CliRun& r) {
  json j = json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << "not one JSON document:\n" << r;
  return j;
}

bool is_socket(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

class CliClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/var/tmp/memsnap-cli-client-XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
    fleet::DaemonOptions o;
    o.dir = dir_;
    o.metrics = false;
    auto d = fleet::Daemon::start(o);
    ASSERT_TRUE(d.ok()) << d.error().to_string();
    daemon_ = std::move(*d);
  }
  void TearDown() override {
    guest_.reset();
    if (daemon_) {
      if (HasFailure()) {
        std::ifstream log(daemon_->log_path());
        std::cerr << "---- memsnapd log ----\n" << log.rdbuf() << "\n";
      }
      daemon_.reset();
    }
    fs::remove_all(dir_);
  }

  // memsnap --socket <the daemon's socket> args...
  CliRun cli(std::vector<std::string> args) {
    args.insert(args.begin(), {"--socket", daemon_->socket()});
    return run_cli(args);
  }

  // A stand-in VMM with its guest memory in a memfd, filled with the pattern.
  void spawn_guest(std::uint64_t seed) {
    GuestOptions go;
    go.size = kGuest;
    go.backing = "memfd";
    go.seed = seed;
    go.zero_fraction = 0.05;
    auto g = GuestProcess::spawn(go);
    ASSERT_TRUE(g.ok()) << g.error().to_string();
    guest_ = std::move(*g);
  }

  // `register` for the running guest.
  CliRun register_guest(const std::string& id, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"register", "--id", id, "--pid",
                                     std::to_string(guest_->pid())};
    for (const auto& r : guest_->regions()) {
      args.push_back("--region");
      args.push_back(std::to_string(r.guest_offset) + ":" + std::to_string(r.host_addr) + ":" +
                     std::to_string(r.size));
    }
    args.push_back("--memfd-fd");
    args.push_back(std::to_string(guest_->memfd_number()));
    args.insert(args.end(), extra.begin(), extra.end());
    return cli(args);
  }

  // After a pause with after=stop: what the next VMM must hold; the frozen VMM goes, as an
  // orchestrator would make it go.
  void retire_guest() {
    expected_ = guest_->expected_generations();
    guest_->kill();
    guest_.reset();
  }

  // The new VMM of a resume: connects to the handshake socket memsnapd listens on.
  void spawn_resumed_guest(const std::string& socket, std::uint64_t seed) {
    GuestOptions go;
    go.size = kGuest;
    go.backing = "memfd";
    go.seed = seed;
    go.handshake_socket = socket;
    go.no_fill = true;
    go.expect = expected_;
    go.accept_memfd = true;
    auto g = GuestProcess::spawn(go);
    ASSERT_TRUE(g.ok()) << g.error().to_string();
    guest_ = std::move(*g);
  }

  std::string dir_;
  std::unique_ptr<fleet::Daemon> daemon_;
  std::unique_ptr<GuestProcess> guest_;
  std::vector<std::uint32_t> expected_;
};

TEST_F(CliClientTest, RegisterPauseResumeWaitAndUnregisterThroughTheCli) {
  const std::string id = "sb-cli";
  const std::uint64_t seed = 11;

  CliRun health = cli({"health"});
  ASSERT_EQ(health.exit_code, 0) << health;
  EXPECT_NE(health.out.find("memsnapd ok"), std::string::npos) << health;
  health = cli({"health", "--json"});
  ASSERT_EQ(health.exit_code, 0) << health;
  EXPECT_EQ(parse(health)["status"], "ok");
  EXPECT_EQ(parse(health)["snapshot_dir"], fs::canonical(daemon_->snapshot_dir()).string());

  // register
  ASSERT_NO_FATAL_FAILURE(spawn_guest(seed));
  CliRun reg = register_guest(id, {"--attr", "team=a", "--attr", "memory_mib=32", "--json"});
  ASSERT_EQ(reg.exit_code, 0) << reg;
  const json registered = parse(reg);
  EXPECT_EQ(registered["id"], id);
  EXPECT_EQ(registered["state"], "running");
  EXPECT_EQ(registered["vmm_pid"], guest_->pid());
  EXPECT_EQ(registered["guest_size"], kGuest);
  EXPECT_EQ(registered["memfd"], true);
  EXPECT_EQ(registered["attributes"]["team"], "a");
  EXPECT_EQ(registered["attributes"]["memory_mib"], 32);
  EXPECT_TRUE(registered["last_pause"].is_null());

  CliRun list = cli({"sandboxes"});
  ASSERT_EQ(list.exit_code, 0) << list;
  EXPECT_NE(list.out.find(id), std::string::npos) << list;
  EXPECT_NE(list.out.find("running"), std::string::npos) << list;

  // strategy: no flag file, so the configured fallback, not counted as a fallback.
  CliRun strategy = cli({"strategy", id, "--json"});
  ASSERT_EQ(strategy.exit_code, 0) << strategy;
  const json explained = parse(strategy);
  EXPECT_EQ(explained["strategy"], "process_vm_readv");
  EXPECT_EQ(explained["reason"], "no_flags");
  EXPECT_TRUE(explained["fallback"].is_null());
  EXPECT_EQ(explained["context"]["has_memfd"], true);
  strategy = cli({"strategy", id});
  ASSERT_EQ(strategy.exit_code, 0) << strategy;
  EXPECT_NE(strategy.out.find("the next pause uses process_vm_readv"), std::string::npos)
      << strategy;

  // pause, forcing memfd (which keeps the memory: the resume can be warm)
  CliRun pause = cli({"pause", id, "--strategy", "memfd", "--json"});
  ASSERT_EQ(pause.exit_code, 0) << pause;
  const json paused = parse(pause);
  EXPECT_EQ(paused["id"], id);
  EXPECT_EQ(paused["strategy"], "memfd");
  EXPECT_EQ(paused["requested_strategy"], "memfd");
  EXPECT_EQ(paused["reason"], "forced");
  EXPECT_TRUE(paused["variant"].is_null());
  EXPECT_TRUE(paused["fallback"].is_null());
  EXPECT_TRUE(paused["parent"].is_null());
  EXPECT_EQ(paused["generation"], 1);
  EXPECT_EQ(paused["after"], "stop");
  // Every page the guest wrote (its never-written pages are holes in the memfd).
  EXPECT_GT(paused["bytes"].get<std::uint64_t>(), kGuest / 2);
  EXPECT_LE(paused["bytes"].get<std::uint64_t>(), kGuest);
  EXPECT_LE(paused["data_bytes"].get<std::uint64_t>(), paused["bytes"].get<std::uint64_t>());
  EXPECT_TRUE(paused["zero_blocks"].is_number_unsigned());
  EXPECT_EQ(paused["memory_released"], 0);
  for (const char* phase : {"freeze", "dirty_set", "export", "commit"}) {
    EXPECT_TRUE(paused["phases"].contains(phase)) << phase;
  }
  EXPECT_TRUE(paused["report"].is_object());
  const std::string snapshot = paused["snapshot"].get<std::string>();
  EXPECT_EQ(snapshot,
            fs::canonical(daemon_->snapshot_dir()).string() + "/" + id + "/generation-1.snap");
  EXPECT_TRUE(fs::is_regular_file(snapshot));
  retire_guest();

  CliRun get = cli({"sandbox", id, "--json"});
  ASSERT_EQ(get.exit_code, 0) << get;
  json described = parse(get);
  EXPECT_EQ(described["state"], "paused");
  EXPECT_EQ(described["snapshots"], json::array({snapshot}));
  EXPECT_EQ(described["strategy"], "memfd");
  EXPECT_EQ(described["warm_memory_kept"], true);
  // The whole guest was written by the stand-in: the kept memfd holds (nearly) all of it.
  EXPECT_GT(described["warm_memory_bytes"].get<std::uint64_t>(),
            described["guest_size"].get<std::uint64_t>() / 2);
  EXPECT_EQ(described["last_pause"]["generation"], 1);
  get = cli({"sandbox", id});
  ASSERT_EQ(get.exit_code, 0) << get;
  EXPECT_NE(get.out.find(id + ": paused"), std::string::npos) << get;

  // resume without --wait: memsnapd answers once it listens; the VMM is started after that.
  const std::string socket1 = dir_ + "/resume-1.uffd";
  CliRun resume = cli({"resume", id, "--handshake-socket", socket1});
  ASSERT_EQ(resume.exit_code, 0) << resume;
  EXPECT_NE(resume.out.find("resuming " + id), std::string::npos) << resume;
  EXPECT_NE(resume.out.find("mode warm"), std::string::npos) << resume;
  ASSERT_TRUE(is_socket(socket1));
  ASSERT_NO_FATAL_FAILURE(spawn_resumed_guest(socket1, seed));
  get = cli({"sandbox", id, "--wait-while", "resuming", "--timeout-ms", "60000", "--json"});
  ASSERT_EQ(get.exit_code, 0) << get;
  described = parse(get);
  ASSERT_EQ(described["state"], "running") << described.dump(2);
  EXPECT_EQ(described["last_resume"]["mode"], "warm");
  EXPECT_EQ(described["last_resume"]["vmm_pid"], guest_->pid());
  ASSERT_TRUE(guest_->wait_ready(std::chrono::seconds(30)).ok());
  auto bad = guest_->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u) << "pages lost on the way out and back";

  // A second generation: a diff of what the guest wrote since the resume (human summary).
  ASSERT_TRUE(guest_->dirty(0.10, false, 5).ok());
  pause = cli({"pause", id, "--strategy", "memfd"});
  ASSERT_EQ(pause.exit_code, 0) << pause;
  for (const char* text :
       {"paused sb-cli: generation 2", "strategy   memfd (requested memfd", "fallback   none",
        "parent     /", "zero blocks", "phases     ", "export ", "after      stop"}) {
    EXPECT_NE(pause.out.find(text), std::string::npos) << text << "\n" << pause;
  }
  retire_guest();

  // resume --wait: the CLI waits until the VMM (started meanwhile) is running.
  const std::string socket2 = dir_ + "/resume-2.uffd";
  CliRun waited;
  std::thread t([&] {
    waited = cli(
        {"resume", id, "--handshake-socket", socket2, "--wait", "--timeout-ms", "60000", "--json"});
  });
  for (int i = 0; i < 3000 && !is_socket(socket2); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const bool listening = is_socket(socket2);
  if (listening) spawn_resumed_guest(socket2, seed);
  t.join();
  ASSERT_TRUE(listening) << "memsnapd never listened on " << socket2 << "\n" << waited;
  ASSERT_TRUE(guest_) << "the resumed VMM did not start";
  ASSERT_EQ(waited.exit_code, 0) << waited;
  described = parse(waited);  // one JSON document: the final state, not the 202 as well
  EXPECT_EQ(described["state"], "running");
  EXPECT_EQ(described["snapshots"].size(), 2u);
  EXPECT_EQ(described["last_resume"]["vmm_pid"], guest_->pid());
  ASSERT_TRUE(guest_->wait_ready(std::chrono::seconds(30)).ok());
  bad = guest_->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0u) << "pages lost on the way out and back";

  // unregister: a sandbox that runs on memory memsnapd serves is refused (its VMM would end);
  // with --force the sandbox goes, its VMM ends, its snapshots stay.
  CliRun refused = cli({"unregister", id});
  EXPECT_EQ(refused.exit_code, 1) << refused;
  EXPECT_NE(refused.err.find("memsnap: invalid_state: "), std::string::npos) << refused;
  EXPECT_NE(refused.err.find("--force"), std::string::npos)
      << "the refusal does not tell a CLI user how to force it\n" << refused;
  CliRun gone = cli({"unregister", id, "--force"});
  ASSERT_EQ(gone.exit_code, 0) << gone;
  EXPECT_NE(gone.out.find("unregistered " + id), std::string::npos) << gone;
  EXPECT_NE(gone.out.find("its VMM was ended"), std::string::npos) << gone;
  EXPECT_TRUE(fs::is_regular_file(snapshot));
  CliRun after = cli({"sandbox", id});
  EXPECT_EQ(after.exit_code, 1) << after;
  EXPECT_NE(after.err.find("memsnap: sandbox_not_found: "), std::string::npos) << after;
}

TEST_F(CliClientTest, ErrorsHaveTheirCodeOnStderrAndTheirExitCode) {
  // An API error: exit 1, "memsnap: <code>: <message>" on stderr, nothing on stdout...
  CliRun r = cli({"sandbox", "nope"});
  EXPECT_EQ(r.exit_code, 1) << r;
  EXPECT_EQ(r.err.rfind("memsnap: sandbox_not_found: ", 0), 0u) << r;
  EXPECT_EQ(r.out, "") << r;
  // ... and with --json the server's error answer on stdout as well.
  r = cli({"pause", "nope", "--json"});
  EXPECT_EQ(r.exit_code, 1) << r;
  EXPECT_EQ(parse(r)["error"]["code"], "sandbox_not_found") << r;
  EXPECT_NE(r.err.find("memsnap: sandbox_not_found: "), std::string::npos) << r;

  // Refused by memsnapd: a bad id, a path outside the snapshot directory, a resume of a running
  // sandbox.
  ASSERT_NO_FATAL_FAILURE(spawn_guest(3));
  r = register_guest("../evil");
  EXPECT_EQ(r.exit_code, 1) << r;
  EXPECT_NE(r.err.find("memsnap: invalid_argument: "), std::string::npos) << r;
  r = register_guest("sb-err");
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_NE(r.out.find("registered sb-err: running"), std::string::npos) << r;
  r = register_guest("sb-err");
  EXPECT_EQ(r.exit_code, 1) << r;
  EXPECT_NE(r.err.find("memsnap: already_exists: "), std::string::npos) << r;
  r = cli({"pause", "sb-err", "--output", "/tmp/outside.snap"});
  EXPECT_EQ(r.exit_code, 1) << r;
  EXPECT_NE(r.err.find("memsnap: path_not_allowed: "), std::string::npos) << r;
  EXPECT_FALSE(fs::exists("/tmp/outside.snap"));
  r = cli({"resume", "sb-err", "--handshake-socket", dir_ + "/x.uffd"});
  EXPECT_EQ(r.exit_code, 1) << r;
  EXPECT_NE(r.err.find("memsnap: invalid_state: "), std::string::npos) << r;
  r = cli({"register", "--id", "sb-attr", "--pid", std::to_string(guest_->pid()), "--region",
           "0:" + std::to_string(guest_->regions()[0].host_addr) + ":" + std::to_string(kGuest),
           "--attr", "colour=blue"});
  EXPECT_EQ(r.exit_code, 1) << r;
  EXPECT_NE(r.err.find("unknown field \"colour\""), std::string::npos) << r;

  // Usage errors: exit 2, nothing sent.
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"pause"},
                                             {"pause", "a", "b"},
                                             {"pause", "sb-err", "--after", "sideways"},
                                             {"register", "--id", "x", "--pid", "1"},
                                             {"register", "--id", "x"},
                                             {"sandbox", "sb-err", "--timeout-ms", "5"},
                                             {"health", "--bogus"},
                                             {"compare"}}) {
    r = cli(args);
    EXPECT_EQ(r.exit_code, 2) << args[0] << "\n" << r;
  }
  r = run_cli({"sandboxes"});  // no --socket, no $MEMSNAP_SOCKET
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_NE(r.err.find("--socket"), std::string::npos) << r;

  // $MEMSNAP_SOCKET instead of --socket; --socket '' forces local mode.
  r = run_cli({"health", "--json"}, {"MEMSNAP_SOCKET=" + daemon_->socket()});
  EXPECT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(parse(r)["status"], "ok");
  r = run_cli({"--socket", "", "health"}, {"MEMSNAP_SOCKET=" + daemon_->socket()});
  EXPECT_EQ(r.exit_code, 2) << r;

  // memsnapd unreachable: exit 3 and a message that says so.
  const std::string missing = dir_ + "/no-such.sock";
  r = run_cli({"--socket", missing, "sandboxes"});
  EXPECT_EQ(r.exit_code, 3) << r;
  EXPECT_EQ(r.err.rfind("memsnap: io_error: cannot connect to " + missing, 0), 0u) << r;
  EXPECT_NE(r.err.find("is memsnapd running?"), std::string::npos) << r;
  EXPECT_EQ(r.out, "") << r;

  // The usage text shows the client mode (through the shared runner).
  const testing::CommandResult help = testing::run_memsnap("--help", false);
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("memsnap --socket PATH COMMAND"), std::string::npos) << help.out;
}

// docs/openapi.yaml and docs/api.md describe exactly the routes memsnapd registers.
TEST(CliClientDocs, OpenApiAndApiMdCoverEveryRoute) {
  const fs::path src(MEMSNAP_SOURCE_DIR);
  std::ifstream routes_file(src / "tools/memsnapd/control_routes.cc");
  std::stringstream routes_text;
  routes_text << routes_file.rdbuf();
  const std::string code = routes_text.str();
  std::set<std::string> routes;
  const std::regex route_re(R"re(server\.route\(\s*"([A-Z]+)",\s*"([^"]+)")re");
  for (auto it = std::sregex_iterator(code.begin(), code.end(), route_re);
       it != std::sregex_iterator(); ++it) {
    std::string method = (*it)[1];
    for (auto& ch : method) ch = static_cast<char>(std::tolower(ch));
    routes.insert(method + " " + (*it)[2].str());
  }
  ASSERT_GE(routes.size(), 9u) << "routes not found in control_routes.cc";

  std::ifstream md_file(src / "docs/api.md");
  ASSERT_TRUE(md_file) << "docs/api.md is missing";
  std::stringstream md;
  md << md_file.rdbuf();
  for (const auto& r : routes) {
    std::string upper = r;
    for (std::size_t i = 0; i < upper.find(' '); ++i) {
      upper[i] = static_cast<char>(std::toupper(upper[i]));
    }
    EXPECT_NE(md.str().find(upper), std::string::npos) << "docs/api.md does not document " << upper;
  }

  const fs::path yaml = src / "docs/openapi.yaml";
  ASSERT_TRUE(fs::exists(yaml));
  if (std::system("python3 -c 'import yaml' >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "python3 with PyYAML is not available to load docs/openapi.yaml";
  }
  // Loads the YAML and prints "method path" for every operation.
  const std::string cmd =
      "python3 -c 'import sys, yaml\n"
      "d = yaml.safe_load(open(sys.argv[1]))\n"
      "assert str(d[\"openapi\"]).startswith(\"3.0\"), d[\"openapi\"]\n"
      "for p, ops in d[\"paths\"].items():\n"
      "    for m in ops:\n"
      "        if m in (\"get\", \"post\", \"put\", \"delete\", \"patch\", \"head\"): print(m, p)\n"
      "' " +
      yaml.string() + " 2>&1";
  std::FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[512];
  while (std::fgets(buf, sizeof(buf), p) != nullptr) out += buf;
  const int status = ::pclose(p);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "docs/openapi.yaml: " << out;
  std::set<std::string> documented;
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) documented.insert(line);
  EXPECT_EQ(documented, routes);
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The status of every error code of the control API, read from the code: errc_status()'s switch
// in control_routes.cc (its default is 500) over every name errc_name() gives (result.cc), and
// the transport's codes (http_server.h).
std::map<std::string, int> error_statuses(const fs::path& src) {
  std::map<std::string, int> out;
  const std::string names = read_text(src / "core/base/result.cc");
  const std::regex name_re(R"re(return "([a-z_]+)";)re");
  for (auto it = std::sregex_iterator(names.begin(), names.end(), name_re);
       it != std::sregex_iterator(); ++it) {
    out[(*it)[1]] = 500;
  }
  const std::string routes = read_text(src / "tools/memsnapd/control_routes.cc");
  const auto begin = routes.find("int errc_status(");
  const auto end = routes.find("default:", begin);
  std::istringstream lines(routes.substr(begin, end - begin));
  std::vector<std::string> pending;
  std::smatch m;
  for (std::string line; std::getline(lines, line);) {
    if (std::regex_search(line, m, std::regex(R"(case Errc::k([A-Za-z]+):)"))) {
      std::string snake;  // kSnapshotBadMap -> snapshot_bad_map
      for (const char ch : m[1].str()) {
        if (std::isupper(static_cast<unsigned char>(ch)) && !snake.empty()) snake += '_';
        snake += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      }
      pending.push_back(snake);
    } else if (std::regex_search(line, m, std::regex(R"(return ([0-9]{3});)"))) {
      for (const auto& code : pending) out[code] = std::stoi(m[1]);
      pending.clear();
    }
  }
  for (const auto& [code, status] :
       std::map<std::string, int>{{"bad_request", 400}, {"method_not_allowed", 405},
                                  {"request_timeout", 408}, {"body_too_large", 413},
                                  {"headers_too_large", 431}, {"too_many_connections", 503}}) {
    out[code] = status;
  }
  return out;
}

// Every status the docs give an error code is the one memsnapd answers with: "409 busy" in prose
// and tables of every doc, docs/api.md's status table (complete: every code that is not 500 is in
// its row), and the summary in docs/openapi.yaml.
TEST(CliClientDocs, DocumentedErrorStatusesAreTheOnesMemsnapdAnswers) {
  const fs::path src(MEMSNAP_SOURCE_DIR);
  const std::map<std::string, int> status = error_statuses(src);
  ASSERT_GT(status.size(), 40u);
  ASSERT_EQ(status.at("generation_mismatch"), 409);
  auto check = [&](const std::string& where, const std::string& code, int documented) {
    const auto it = status.find(code);
    if (it == status.end()) return;  // a word, not a code
    EXPECT_EQ(documented, it->second) << where << " documents " << code << " as " << documented;
  };
  std::vector<fs::path> docs = {src / "docs/openapi.yaml", src / "config/memsnapd.yaml"};
  for (const auto& e : fs::directory_iterator(src / "docs")) {
    if (e.path().extension() == ".md") docs.push_back(e.path());
  }
  for (const auto& path : docs) {
    const std::string text = read_text(path);
    // "409 busy", "`409 generation_mismatch`", "| `busy` | 409 |".
    const std::regex inline_re(R"(\b([1-5][0-9][0-9])\s+([a-z]+(?:_[a-z]+)*)\b)");
    for (auto it = std::sregex_iterator(text.begin(), text.end(), inline_re);
         it != std::sregex_iterator(); ++it) {
      check(path.filename().string(), (*it)[2], std::stoi((*it)[1]));
    }
    const std::regex row_re(R"(\| `([a-z_]+)` \| ([1-5][0-9][0-9]) \|)");
    for (auto it = std::sregex_iterator(text.begin(), text.end(), row_re);
         it != std::sregex_iterator(); ++it) {
      check(path.filename().string() + " (table)", (*it)[1], std::stoi((*it)[2]));
    }
  }

  // docs/api.md's table of statuses: "| 409 | `already_exists`, `invalid_state`, ... |".
  const std::string md = read_text(src / "docs/api.md");
  std::map<std::string, int> tabled;
  const std::regex status_row_re(R"(\n\| ([1-5][0-9][0-9]) \| ([^\n]*) \|)");
  for (auto it = std::sregex_iterator(md.begin(), md.end(), status_row_re);
       it != std::sregex_iterator(); ++it) {
    const std::string row = (*it)[2];
    const std::regex code_re("`([a-z_]+)`");
    for (auto c = std::sregex_iterator(row.begin(), row.end(), code_re);
         c != std::sregex_iterator(); ++c) {
      check("api.md status table", (*c)[1], std::stoi((*it)[1]));
      tabled[(*c)[1]] = std::stoi((*it)[1]);
    }
  }
  // openapi.yaml: "... invalid_argument, path_not_allowed, ... and snapshot_* 400; ...; ... 500."
  std::string yaml = read_text(src / "docs/openapi.yaml");
  const auto from = yaml.find("Error codes of the endpoints and their statuses:");
  ASSERT_NE(from, std::string::npos);
  yaml = yaml.substr(from, yaml.find("servers:", from) - from);
  std::map<std::string, int> summarised;
  std::istringstream parts(yaml);
  for (std::string part; std::getline(parts, part, ';');) {
    std::smatch m;
    std::string last;
    for (auto s = part; std::regex_search(s, m, std::regex(R"(\b([1-5][0-9][0-9])\b)"));
         s = m.suffix()) {
      last = m[1];
    }
    if (last.empty()) continue;
    const std::regex word_re(R"(\b([a-z]+(?:_[a-z]+)+|[a-z]+)\b)");
    for (auto w = std::sregex_iterator(part.begin(), part.end(), word_re);
         w != std::sregex_iterator(); ++w) {
      if (!status.count((*w)[1])) continue;
      check("openapi.yaml summary", (*w)[1], std::stoi(last));
      summarised[(*w)[1]] = std::stoi(last);
    }
  }
  for (const auto& [code, s] : status) {
    if (s == 500 || code.rfind("snapshot_", 0) == 0) continue;
    if (code == "bad_request" || code == "method_not_allowed" || code == "request_timeout" ||
        code == "body_too_large" || code == "headers_too_large" || code == "too_many_connections") {
      continue;  // the transport's: their own tables
    }
    EXPECT_EQ(tabled.count(code), 1u) << code << " (" << s << ") is not in api.md's status table";
    EXPECT_EQ(summarised.count(code), 1u) << code << " (" << s << ") is not in openapi.yaml's summary";
  }
}

}  // namespace
}  // namespace memsnap
