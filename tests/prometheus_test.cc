// The shipped dashboard and rules against a real Prometheus: memsnapd (child process) pauses and
// resumes stand-in VMMs with every strategy (split by a flag file, plus one sandbox that falls
// back), a Prometheus started by this test (Debian's package, loopback only, its own config and
// storage in a temp dir) scrapes it every second with docs/prometheus/memsnap-rules.yml loaded,
// and every expression of docs/prometheus/expressions.txt is queried through Prometheus' HTTP
// API and checked against its `#@ expect:` directive. promtool checks the shipped rules, the
// generated config and a live scrape.
//
// Skipped (never failed) when prometheus or promtool is not installed: tools/setup.sh installs
// them. MEMSNAP_PROMETHEUS / MEMSNAP_PROMTOOL pick other binaries; MEMSNAP_EXPRESSIONS another
// expression list (e.g. a copy with a bogus line, to see the test fail).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tools/fleet/fleet.h"

namespace memsnap::fleet {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

const std::string kSource = MEMSNAP_SOURCE_DIR;
const std::string kRules = kSource + "/docs/prometheus/memsnap-rules.yml";
constexpr std::uint64_t kGuest = 64ULL << 20;
const std::string kJob = "memsnap";
// Scrapes (1 s apart) to have before querying: every [5m] window then holds at least a dozen
// samples, far more than the two rate() and increase() need.
constexpr int kMinScrapes = 12;

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}
std::string prometheus_binary() { return env_or("MEMSNAP_PROMETHEUS", "/usr/bin/prometheus"); }
std::string promtool_binary() { return env_or("MEMSNAP_PROMTOOL", "/usr/bin/promtool"); }
std::string expressions_file() {
  return env_or("MEMSNAP_EXPRESSIONS", kSource + "/docs/prometheus/expressions.txt");
}
bool executable(const std::string& path) { return ::access(path.c_str(), X_OK) == 0; }

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// Percent-encodes everything but RFC 3986's unreserved characters.
std::string url_encode(const std::string& s) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (const unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

// ---- Expressions and their directives (the format of expressions.txt's header) ------------

std::string collapse_whitespace(const std::string& s) {
  std::string out;
  bool space = false;
  for (const char c : s) {
    if (std::isspace(static_cast<unsigned char>(c))) {
      space = !out.empty();
      continue;
    }
    if (space) out += ' ';
    space = false;
    out += c;
  }
  return out;
}

struct Expression {
  std::string expr;
  std::string expect;  // per_strategy, nonempty, may_be_empty ("" before any directive)
  int line = 0;
};

std::vector<Expression> read_expressions(const std::string& path) {
  std::vector<Expression> out;
  std::istringstream in(read_file(path));
  std::string line, expect;
  for (int n = 1; std::getline(in, line); ++n) {
    const std::string l = collapse_whitespace(line);
    if (l.rfind("#@ expect:", 0) == 0) {
      expect = collapse_whitespace(l.substr(10));
    } else if (!l.empty() && l[0] != '#') {
      out.push_back({l, expect, n});
    }
  }
  return out;
}

// ---- Child processes ------------------------------------------------------------------------

struct CommandResult {
  int status = -1;  // exit status, 128+n for a signal, -1 if it could not run or timed out
  std::string output;  // stdout and stderr together
};

// Runs argv with stdin from stdin_path (empty: /dev/null), capturing its output.
CommandResult run_command(const std::vector<std::string>& args, const std::string& stdin_path = "",
                          std::chrono::seconds timeout = std::chrono::seconds(60)) {
  CommandResult r;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    r.output = std::string("pipe: ") + std::strerror(errno);
    return r;
  }
  const std::string in_path = stdin_path.empty() ? "/dev/null" : stdin_path;
  std::vector<std::string> argv_storage = args;
  std::vector<char*> argv;
  for (auto& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int in = ::open(in_path.c_str(), O_RDONLY);
    if (in < 0) ::_exit(126);
    ::dup2(in, 0);
    ::dup2(fds[1], 1);
    ::dup2(fds[1], 2);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  if (pid < 0) {
    ::close(fds[0]);
    r.output = std::string("fork: ") + std::strerror(errno);
    return r;
  }
  const auto deadline = Clock::now() + timeout;
  bool timed_out = false;
  char buf[4096];
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) < 0 && errno != EINTR) break;
    if (p.revents == 0) continue;
    const ssize_t n = ::read(fds[0], buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    r.output.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  if (timed_out) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out) {
    r.output += "\n[timed out after " + std::to_string(timeout.count()) + " s]";
    return r;
  }
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

// A Prometheus server, stopped (SIGTERM, then SIGKILL) and reaped when this goes away. It also
// dies with the test process (PR_SET_PDEATHSIG), should the test be killed.
class PrometheusServer {
 public:
  PrometheusServer(const std::string& binary, const std::string& config,
                   const std::string& data_dir, std::uint16_t port, const std::string& log)
      : port_(port), log_(log) {
    std::vector<std::string> args = {binary,
                                     "--config.file=" + config,
                                     "--storage.tsdb.path=" + data_dir,
                                     "--web.listen-address=127.0.0.1:" + std::to_string(port),
                                     "--log.level=info"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) return;
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(1);
      const int in = ::open("/dev/null", O_RDONLY);
      ::dup2(in, 0);
      ::dup2(log_fd, 1);
      ::dup2(log_fd, 2);
      ::execv(argv[0], argv.data());
      std::fprintf(stderr, "exec %s: %s\n", argv[0], std::strerror(errno));
      ::_exit(127);
    }
    ::close(log_fd);
    pid_ = pid;
  }
  ~PrometheusServer() { stop(); }
  PrometheusServer(const PrometheusServer&) = delete;
  PrometheusServer& operator=(const PrometheusServer&) = delete;

  bool running() {
    if (pid_ <= 0) return false;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    return true;
  }

  // SIGTERM, up to 15 s to exit, then SIGKILL; always reaps.
  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    const auto deadline = Clock::now() + std::chrono::seconds(15);
    int status = 0;
    while (Clock::now() < deadline) {
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ::kill(pid_, SIGKILL);
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }

  pid_t pid() const { return pid_; }
  std::uint16_t port() const { return port_; }
  const std::string& log_path() const { return log_; }

  Result<std::string> get(const std::string& target) const {
    return http_get_loopback(port_, target, std::chrono::seconds(10));
  }

  // An instant query; the parsed API answer (status "success" or an error from the API).
  Result<json> query(const std::string& expr) const {
    MEMSNAP_ASSIGN_OR_RETURN(auto body, get("/api/v1/query?query=" + url_encode(expr)));
    json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return make_error(Errc::kInternal, "not JSON: " + body.substr(0, 500));
    return j;
  }

  // The value of the first series of a query, NaN if none.
  double scalar_query(const std::string& expr) const {
    auto r = query(expr);
    if (!r.ok() || (*r)["status"] != "success" || (*r)["data"]["result"].empty()) return NAN;
    return std::stod((*r)["data"]["result"][0]["value"][1].get<std::string>());
  }

 private:
  pid_t pid_ = -1;
  std::uint16_t port_;
  std::string log_;
};

// Team a -> process_vm_readv, b -> memfd, c -> hole_punch, d -> memfd (its sandbox has anonymous
// memory, so memfd cannot run it: a fallback to process_vm_readv, reason missing_memfd).
constexpr const char* kFlagFile = R"({"flags": {"memory-export-strategy": {
    "state": "ENABLED",
    "variants": {"process_vm_readv": "process_vm_readv", "memfd": "memfd",
                 "hole_punch": "hole_punch"},
    "defaultVariant": "process_vm_readv",
    "targeting": {"if": [
      {"==": [{"var": "team"}, "a"]}, "process_vm_readv",
      {"==": [{"var": "team"}, "b"]}, "memfd",
      {"==": [{"var": "team"}, "c"]}, "hole_punch",
      {"==": [{"var": "team"}, "d"]}, "memfd",
      null]}}}})";

struct Planned {
  std::string id, team, backing, strategy;  // strategy: the one that must run
  bool fallback = false;
};
const std::vector<Planned> kSandboxes = {
    {"sb-a", "a", "anon", "process_vm_readv", false},
    {"sb-b", "b", "memfd", "memfd", false},
    {"sb-c", "c", "memfd", "hole_punch", false},
    {"sb-d", "d", "anon", "process_vm_readv", true},
};

bool is_nan_value(const json& series) {
  const std::string v = series["value"][1].get<std::string>();
  return v == "NaN";
}

class PrometheusTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!executable(prometheus_binary()) || !executable(promtool_binary())) {
      GTEST_SKIP() << prometheus_binary() << " or " << promtool_binary()
                   << " missing (Debian package prometheus; tools/setup.sh installs it)";
    }
    char templ[] = "/var/tmp/memsnap-prometheus-test-XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
    std::ofstream(dir_ + "/flags.json") << kFlagFile;
    DaemonOptions o;
    o.dir = dir_;
    o.flags_file = dir_ + "/flags.json";
    auto d = Daemon::start(o);
    ASSERT_TRUE(d.ok()) << d.error().to_string();
    daemon_ = std::move(*d);
    ASSERT_NE(daemon_->metrics_port(), 0);

    config_ = dir_ + "/prometheus.yml";
    std::ofstream(config_) << "global:\n"
                           << "  scrape_interval: 1s\n"
                           << "  scrape_timeout: 1s\n"
                           << "  evaluation_interval: 1s\n"
                           << "rule_files:\n"
                           << "  - " << kRules << "\n"
                           << "scrape_configs:\n"
                           << "  - job_name: " << kJob << "\n"
                           << "    static_configs:\n"
                           << "      - targets: ['127.0.0.1:" << daemon_->metrics_port() << "']\n";
    auto port = free_loopback_port();
    ASSERT_TRUE(port.ok()) << port.error().to_string();
    prometheus_ = std::make_unique<PrometheusServer>(prometheus_binary(), config_,
                                                     dir_ + "/data", *port, dir_ + "/prometheus.log");
    ASSERT_GT(prometheus_->pid(), 0) << "could not start " << prometheus_binary();
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    std::string last;
    for (;;) {
      ASSERT_TRUE(prometheus_->running()) << "prometheus exited at start";
      auto ready = prometheus_->get("/-/ready");
      if (ready.ok()) break;
      last = ready.error().to_string();
      ASSERT_LT(Clock::now(), deadline) << "prometheus not ready within 30 s: " << last;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  void TearDown() override {
    sandboxes_.clear();
    if (prometheus_) {
      prometheus_->stop();
      if (HasFailure()) {
        std::cerr << "---- prometheus log ----\n" << read_file(prometheus_->log_path()) << "\n";
      }
      prometheus_.reset();
    }
    if (daemon_) {
      if (HasFailure()) {
        std::cerr << "---- memsnapd log ----\n" << read_file(daemon_->log_path()) << "\n";
      }
      daemon_.reset();
    }
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  // One pause (checking the strategy that ran), resume, verify, dirty `fraction` of the guest.
  void cycle(const Planned& p, double fraction, std::uint64_t seed) {
    Sandbox& sb = *sandboxes_.at(p.id);
    SCOPED_TRACE(p.id + " seed " + std::to_string(seed));
    auto paused = sb.pause();
    ASSERT_TRUE(paused.ok()) << paused.error().to_string();
    ASSERT_EQ((*paused)["strategy"], p.strategy) << paused->dump();
    if (p.fallback) {
      ASSERT_EQ((*paused)["fallback"]["reason"], "missing_memfd") << paused->dump();
    } else {
      ASSERT_TRUE((*paused)["fallback"].is_null()) << paused->dump();
    }
    ran_.insert((*paused)["strategy"].get<std::string>());
    ++pauses_;
    auto resumed = sb.resume();
    ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
    auto bad = sb.verify();
    ASSERT_TRUE(bad.ok()) << bad.error().to_string();
    ASSERT_EQ(*bad, 0u) << "pages lost on the way out and back";
    ASSERT_TRUE(sb.dirty(fraction, seed).ok());
  }

  // Scrapes of memsnapd Prometheus has stored (0 before the first).
  double scrapes() const {
    const double n = prometheus_->scalar_query("count_over_time(up{job=\"" + kJob + "\"}[10m])");
    return std::isnan(n) ? 0 : n;
  }

  std::string dir_, config_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<PrometheusServer> prometheus_;
  std::map<std::string, std::unique_ptr<Sandbox>> sandboxes_;
  std::set<std::string> ran_;  // strategies that paused and resumed, as the daemon said
  int pauses_ = 0;
};

// A Prometheus scraping 127.0.0.1:metrics_port every second, ready; its files under dir.
std::unique_ptr<PrometheusServer> scraping_prometheus(const std::string& dir, int metrics_port,
                                                      int prom_port) {
  std::ofstream(dir + "/prometheus.yml")
      << "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
      << "scrape_configs:\n  - job_name: memsnap\n    static_configs:\n"
      << "      - targets: ['127.0.0.1:" << metrics_port << "']\n";
  auto prometheus =
      std::make_unique<PrometheusServer>(prometheus_binary(), dir + "/prometheus.yml",
                                         dir + "/data", prom_port, dir + "/prometheus.log");
  EXPECT_GT(prometheus->pid(), 0);
  for (int i = 0; !prometheus->get("/-/ready").ok(); ++i) {
    if (i >= 300) {
      ADD_FAILURE() << "prometheus not ready: " << read_file(prometheus->log_path());
      return nullptr;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return prometheus;
}

// `memsnap experiment run` (args after "run") against a Prometheus scraping its memsnapd, then
// `experiment report` of its JSON results and of Prometheus (report_args after the URL): both
// reports, parsed. Empty objects (and a failure) if anything did not run.
std::pair<json, json> json_and_prometheus_reports(const std::vector<std::string>& run_args,
                                                  const std::vector<std::string>& report_args) {
  char templ[] = "/var/tmp/memsnap-experiment-prom-XXXXXX";
  if (::mkdtemp(templ) == nullptr) {
    ADD_FAILURE() << "mkdtemp";
    return {};
  }
  const std::string dir = templ;
  // Removed on every way out (after the Prometheus below, declared later, has stopped).
  struct RemoveDir {
    std::string path;
    ~RemoveDir() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  } remove_dir{dir};
  auto metrics_port = free_loopback_port();
  auto prom_port = free_loopback_port();
  EXPECT_TRUE(metrics_port.ok() && prom_port.ok());
  if (!metrics_port.ok() || !prom_port.ok()) return {};
  auto prometheus = scraping_prometheus(dir, *metrics_port, *prom_port);
  if (prometheus == nullptr) return {};
  const std::string memsnap =
      std::string(std::getenv("MEMSNAP_BIN_DIR") ? std::getenv("MEMSNAP_BIN_DIR") : "") +
      "/memsnap";
  std::vector<std::string> run = {memsnap, "experiment", "run"};
  run.insert(run.end(), run_args.begin(), run_args.end());
  run.insert(run.end(),
             {"--metrics-port", std::to_string(*metrics_port), "--out", dir + "/results.json"});
  const auto ran = run_command(run);
  EXPECT_EQ(ran.status, 0) << ran.output;
  const auto from_json = run_command({memsnap, "experiment", "report", dir + "/results.json",
                                      "--warmup", "0", "--out", dir + "/json-report", "--json"});
  EXPECT_EQ(from_json.status, 0) << from_json.output;
  std::vector<std::string> report = {memsnap,
                                     "experiment",
                                     "report",
                                     "--prometheus",
                                     "http://127.0.0.1:" + std::to_string(*prom_port),
                                     "--window",
                                     "10m",
                                     "--out",
                                     dir + "/prom-report",
                                     "--json"};
  report.insert(report.end(), report_args.begin(), report_args.end());
  const auto from_prom = run_command(report);
  EXPECT_EQ(from_prom.status, 0) << from_prom.output;
  prometheus->stop();
  std::pair<json, json> out;
  if (ran.status == 0 && from_json.status == 0 && from_prom.status == 0) {
    out = {json::parse(read_file(dir + "/json-report.json")),
           json::parse(read_file(dir + "/prom-report.json"))};
  }
  return out;
}

// For each arm both reports have and each metric: the same number of operations (up to
// increase()'s extrapolation at the window's edges) and medians within one bucket of each other
// (interpolation between two order statistics may straddle a bound). How many were compared.
std::size_t compare_within_a_bucket(const json& a, const json& b,
                                    const std::vector<const char*>& metrics) {
  // memsnapd's latency histograms' bounds (docs/metrics.md) from 1 ms to 10 s, 1-2-5 a decade,
  // where these operations fall; outside that range the real ones differ (pause_duration starts
  // at 1 ms; all go on 20, 30, 60 s), and this list's finer or other bounds are not used.
  std::vector<double> bounds = {0};
  for (double decade = 1e-4; decade < 100; decade *= 10) {
    for (double m : {1.0, 2.0, 5.0}) bounds.push_back(m * decade);
  }
  auto bucket_of = [&](double v) {
    std::size_t i = 1;
    while (i < bounds.size() && bounds[i] < v) ++i;
    return i;  // v in (bounds[i-1], bounds[i]]
  };
  std::size_t compared = 0;
  if (!a.contains("arms") || !b.contains("arms")) return 0;
  for (const auto& arm_a : a["arms"]) {
    for (const auto& arm_b : b["arms"]) {
      if (arm_a["name"] != arm_b["name"]) continue;
      for (const char* metric : metrics) {
        SCOPED_TRACE(arm_a["name"].get<std::string>() + " " + metric);
        if (!arm_a["metrics"].contains(metric) || !arm_b["metrics"].contains(metric)) {
          ADD_FAILURE() << "missing from a report";
          continue;
        }
        const double n_a = arm_a["metrics"][metric]["n"];
        const double n_b = arm_b["metrics"][metric]["n"];
        EXPECT_NEAR(n_b, n_a, 0.25 * n_a);
        const double exact = arm_a["metrics"][metric]["p50"]["estimate"];
        const double rebuilt = arm_b["metrics"][metric]["p50"]["estimate"];
        const std::size_t k = bucket_of(exact);
        const double lo = bounds[k >= 2 ? k - 2 : 0];
        const double hi = bounds[std::min(k + 1, bounds.size() - 1)];
        EXPECT_GE(rebuilt, lo) << "json p50 " << exact << ", prometheus p50 " << rebuilt;
        EXPECT_LE(rebuilt, hi) << "json p50 " << exact << ", prometheus p50 " << rebuilt;
        ++compared;
      }
    }
  }
  return compared;
}

// Issue 6: the report built from Prometheus' histograms agrees with the report built from the
// same run's JSON results, within the histogram's bucket resolution.
TEST(ExperimentReportTest, PrometheusAndJsonReportsAgreeWithinABucket) {
  if (!executable(prometheus_binary())) GTEST_SKIP() << prometheus_binary() << " missing";
  const auto [a, b] =
      json_and_prometheus_reports({"--sandboxes", "6", "--cycles", "4", "--size", "32M"}, {});
  EXPECT_EQ(compare_within_a_bucket(a, b, {"pause_seconds", "resume_seconds"}), 6u)
      << "every strategy, pause and resume";
}

// Issue 19: a pause-mode experiment read back from Prometheus (--split pause-mode) has the same
// arms, and each arm's answered and durable latency agrees with the JSON report's within a
// bucket -- copy's answer a whole pause, handover's the handover alone.
TEST(ExperimentReportTest, APauseModeSplitFromPrometheusAgreesWithJsonWithinABucket) {
  if (!executable(prometheus_binary())) GTEST_SKIP() << prometheus_binary() << " missing";
  const auto [a, b] = json_and_prometheus_reports(
      {"--split", "pause-mode", "--sandboxes", "6", "--cycles", "4", "--size", "32M"},
      {"--split", "pause-mode"});
  ASSERT_TRUE(b.contains("arms"));
  EXPECT_EQ(b.value("baseline", ""), "copy") << b.dump();
  EXPECT_EQ(compare_within_a_bucket(a, b, {"answer_seconds", "durable_seconds"}), 4u)
      << "copy and handover, answered and durable";
}

TEST(PromtoolTest, ShippedRulesPassCheckRules) {
  if (!executable(promtool_binary())) GTEST_SKIP() << promtool_binary() << " missing";
  const CommandResult r = run_command({promtool_binary(), "check", "rules", kRules});
  EXPECT_EQ(r.status, 0) << r.output;
  std::cout << "promtool check rules " << kRules << ":\n" << r.output;
}

TEST_F(PrometheusTest, EveryDashboardAndRuleExpressionHasSeriesForEveryStrategyThatRan) {
  const auto started = Clock::now();
  // The generated config, rule file included, is what promtool accepts.
  const CommandResult config_check = run_command({promtool_binary(), "check", "config", config_});
  EXPECT_EQ(config_check.status, 0) << config_check.output;

  for (std::size_t i = 0; i < kSandboxes.size(); ++i) {
    const Planned& p = kSandboxes[i];
    SandboxSpec spec;
    spec.id = p.id;
    spec.size = kGuest;
    spec.backing = p.backing;
    spec.attributes = {{"team", p.team}};
    spec.seed = i + 11;
    auto sb = Sandbox::launch(*daemon_, spec);
    ASSERT_TRUE(sb.ok()) << sb.error().to_string();
    sandboxes_[p.id] = std::move(*sb);
  }

  // Two rounds of pause / resume / verify / dirty 10% for every sandbox, every strategy.
  for (int round = 1; round <= 2; ++round) {
    for (const Planned& p : kSandboxes) {
      ASSERT_NO_FATAL_FAILURE(cycle(p, 0.10, static_cast<std::uint64_t>(round)));
    }
  }
  ASSERT_EQ(ran_, (std::set<std::string>{"process_vm_readv", "memfd", "hole_punch"}));
  const auto rounds_done = Clock::now();

  // A little more work while Prometheus keeps scraping, until the windows hold enough samples,
  // so rates see increases at several points rather than one step.
  std::uint64_t seed = 3;
  for (std::size_t i = 0; scrapes() < kMinScrapes || prometheus_->scalar_query(
                                                         "up{job=\"" + kJob + "\"}") != 1;
       ++i) {
    ASSERT_LT(Clock::now() - started, std::chrono::seconds(90))
        << "Prometheus did not collect " << kMinScrapes << " scrapes; have " << scrapes();
    ASSERT_TRUE(prometheus_->running()) << "prometheus exited";
    ASSERT_NO_FATAL_FAILURE(cycle(kSandboxes[i % kSandboxes.size()], 0.01, ++seed));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  // The last of that work scraped, and the rules evaluated on it.
  const double target = scrapes() + 2;
  while (scrapes() < target) {
    ASSERT_LT(Clock::now() - started, std::chrono::seconds(100));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  const auto scraping_done = Clock::now();
  EXPECT_EQ(prometheus_->scalar_query("min_over_time(up{job=\"" + kJob + "\"}[10m])"), 1)
      << "a scrape of memsnapd failed";

  // Every rule evaluates without error (an expression can parse and still fail at evaluation,
  // e.g. many-to-many matching).
  {
    auto rules = prometheus_->get("/api/v1/rules");
    ASSERT_TRUE(rules.ok()) << rules.error().to_string();
    const json j = json::parse(*rules);
    ASSERT_EQ(j["status"], "success") << *rules;
    int count = 0;
    for (const auto& g : j["data"]["groups"]) {
      for (const auto& r : g["rules"]) {
        ++count;
        EXPECT_EQ(r.value("health", ""), "ok")
            << g["name"] << "/" << r["name"] << ": " << r.value("lastError", "") << "\n"
            << r["query"];
      }
    }
    EXPECT_GE(count, 10) << "rules not loaded: " << *rules;
  }

  // Prometheus saw the work itself, not only the series memsnapd declares at 0 up front: every
  // strategy that ran has a positive pause rate (through the recording rule) and resume rate,
  // and the fallback is there with its reason.
  {
    const auto by_strategy = [&](const std::string& expr) {
      std::map<std::string, double> out;
      auto r = prometheus_->query(expr);
      EXPECT_TRUE(r.ok() && (*r)["status"] == "success") << expr;
      if (!r.ok()) return out;
      for (const auto& s : (*r)["data"]["result"]) {
        out[s["metric"].value("strategy", "")] = std::stod(s["value"][1].get<std::string>());
      }
      return out;
    };
    const auto pauses = by_strategy("memsnap:pauses:rate5m");
    const auto resumes = by_strategy(
        "sum by (strategy) (rate(memsnap_resume_duration_seconds_count{outcome=\"ok\"}[5m]))");
    for (const std::string& s : ran_) {
      EXPECT_GT(pauses.count(s) ? pauses.at(s) : 0.0, 0) << s << ": no pauses seen";
      EXPECT_GT(resumes.count(s) ? resumes.at(s) : 0.0, 0) << s << ": no resumes seen";
    }
    EXPECT_GT(prometheus_->scalar_query(
                  "sum(memsnap_strategy_fallbacks_total{from=\"memfd\",to=\"process_vm_readv\","
                  "reason=\"missing_memfd\"})"),
              0)
        << "sb-d's fallback not seen";
  }

  // Every expression, against its directive.
  const std::vector<Expression> exprs = read_expressions(expressions_file());
  ASSERT_GE(exprs.size(), 20u) << "expression list " << expressions_file() << " not read";
  const std::regex fallback_counter(R"(\bmemsnap_strategy_fallbacks_total\b)");
  std::vector<std::string> failures;
  std::ostringstream summary;
  int per_strategy = 0, nonempty = 0, may_be_empty = 0, empty_may_be_empty = 0;
  for (const Expression& e : exprs) {
    const std::string where = expressions_file() + ":" + std::to_string(e.line) + " [" +
                              e.expect + "]\n  " + e.expr + "\n  ";
    auto answer = prometheus_->query(e.expr);
    if (!answer.ok()) {
      failures.push_back(where + "query failed: " + answer.error().to_string());
      continue;
    }
    const json& a = *answer;
    if (a.value("status", "") != "success") {
      failures.push_back(where + "API error: " + a.dump());
      continue;
    }
    const json& result = a["data"]["result"];
    std::string result_text = result.dump();
    if (result_text.size() > 3000) result_text = result_text.substr(0, 3000) + "...";
    std::set<std::string> strategies;
    int without_strategy = 0, nan = 0;
    for (const auto& s : result) {
      if (s["metric"].contains("strategy")) {
        strategies.insert(s["metric"]["strategy"].get<std::string>());
      } else {
        ++without_strategy;
      }
      if (s.contains("value") && is_nan_value(s)) ++nan;
    }
    summary << "  " << e.expect << " series=" << result.size() << " nan=" << nan
            << " strategies=" << json(strategies).dump() << "\n    " << e.expr << "\n";
    for (const auto& s : result) {
      summary << "      " << s["metric"].dump() << " = " << s["value"][1].get<std::string>()
              << "\n";
    }

    if (e.expect == "per_strategy") {
      ++per_strategy;
      std::vector<std::string> missing;
      for (const std::string& s : ran_) {
        if (!strategies.count(s)) missing.push_back(s);
      }
      if (!missing.empty() || without_strategy > 0) {
        failures.push_back(where + "no series for strategies " + json(missing).dump() + " (" +
                           std::to_string(without_strategy) +
                           " series without a strategy label); result: " + result_text);
      }
    } else if (e.expect == "nonempty") {
      ++nonempty;
      if (result.empty()) failures.push_back(where + "no series; result: " + result_text);
    } else if (e.expect == "may_be_empty") {
      ++may_be_empty;
      if (result.empty()) ++empty_may_be_empty;
      // This test provokes fallbacks (sb-d), so what reads the fallback counter has series.
      if (std::regex_search(e.expr, fallback_counter) && result.empty()) {
        failures.push_back(where + "no series although sb-d fell back; result: " + result_text);
      }
    } else {
      failures.push_back(where + "unknown or missing #@ expect: directive");
    }
  }
  std::cout << "strategies that ran: " << json(ran_).dump() << ", pauses: " << pauses_
            << ", scrapes: " << scrapes() << "\nexpressions: " << exprs.size()
            << " (per_strategy " << per_strategy << ", nonempty " << nonempty
            << ", may_be_empty " << may_be_empty << " of which empty now " << empty_may_be_empty
            << ")\n"
            << summary.str();
  std::string all;
  for (const auto& f : failures) all += f + "\n\n";
  EXPECT_TRUE(failures.empty()) << failures.size() << " of " << exprs.size()
                                << " expressions do not give what their directive says:\n\n"
                                << all;

  // promtool's linter on what memsnapd really serves: no errors, no lint problems at all.
  auto text = daemon_->scrape();
  ASSERT_TRUE(text.ok()) << text.error().to_string();
  const std::string scrape_file = dir_ + "/scrape.txt";
  std::ofstream(scrape_file) << *text;
  const CommandResult lint = run_command({promtool_binary(), "check", "metrics"}, scrape_file);
  EXPECT_EQ(lint.status, 0) << lint.output;
  EXPECT_EQ(lint.output, "") << "promtool check metrics reports problems";

  using std::chrono::duration;
  std::cout << "timings: rounds " << duration<double>(rounds_done - started).count()
            << " s, scraping done " << duration<double>(scraping_done - started).count()
            << " s, total " << duration<double>(Clock::now() - started).count() << " s\n";
}

}  // namespace
}  // namespace memsnap::fleet
