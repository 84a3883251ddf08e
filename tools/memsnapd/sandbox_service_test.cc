// SandboxService against a fake pipeline: the lifecycle, the slots, the drain and the answers,
// with every in-between state reached on purpose (the fake holds a pause until it is released)
// rather than by timing. The VMM is real: a forked child that shares a memfd-backed guest
// mapping with the test, so registration runs its real checks (pidfd, ownership, mappings,
// memfd). The pipelines themselves are tested in core/ and end to end in tests/.
#include "tools/memsnapd/sandbox_service.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "core/metrics/host_metrics.h"
#include "core/plugin_host/plugin_registry.h"
#include "tools/memsnapd/pipeline.h"
#include "tools/memsnapd/sandbox_lifecycle.h"

namespace memsnap::daemon {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::uint64_t kGuestSize = 4ULL << 20;

class FakeExport;

// Records every request, answers as scripted, and holds pauses while closed.
class FakePipeline final : public Pipeline {
 public:
  Result<PauseReport> pause(const PluginRegistry&, const PauseRequest& request) override {
    std::unique_lock lock(mu_);
    pauses_.push_back(request);
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_; });
    if (on_pause_) on_pause_();
    if (!pause_errors_.empty()) {
      Error e = pause_errors_.front();
      pause_errors_.pop_front();
      return e;
    }
    // What the real pipeline leaves behind: a committed file at the output.
    std::ofstream(request.out_path) << "fake snapshot";
    PauseReport r;
    r.requested_strategy = request.strategy;
    r.strategy = request.strategy;
    r.snapshot_path = request.out_path;
    r.snapshot_id = std::string(32, 'a');
    r.generation = request.parent_path.empty() ? 1 : 2;
    r.guest_size = request.guest_size;
    r.block_size = request.block_size;
    r.dirty_bytes = request.guest_size;
    r.data_bytes = request.guest_size;
    r.wall_seconds = 0.001;
    return r;
  }

  Result<std::unique_ptr<BackgroundExport>> start_export(
      const PluginRegistry&, const PauseRequest& request,
      std::function<void(const ExportStatus&)> on_change) override;

  Result<std::unique_ptr<ResumeSession>> prepare_resume(const PluginRegistry&,
                                                        ResumeRequest request) override {
    std::lock_guard lock(mu_);
    resumes_.push_back(std::move(request));
    return make_error(Errc::kResumeFailed, "the fake pipeline does not resume");
  }

  void close() {
    std::lock_guard lock(mu_);
    open_ = false;
  }
  void open() {
    {
      std::lock_guard lock(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }
  // Waits until n pauses have reached the pipeline.
  void wait_for_pauses(std::size_t n) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return pauses_.size() >= n; });
  }
  void fail_next_pause(Error e) {
    std::lock_guard lock(mu_);
    pause_errors_.push_back(std::move(e));
  }
  void on_pause(std::function<void()> f) {
    std::lock_guard lock(mu_);
    on_pause_ = std::move(f);
  }
  std::vector<PauseRequest> pauses() const {
    std::lock_guard lock(mu_);
    return pauses_;
  }
  std::vector<ResumeRequest> resumes() const {
    std::lock_guard lock(mu_);
    return resumes_;
  }
  // The background exports started so far (owned by the service; valid while it keeps them).
  std::vector<FakeExport*> exports() const {
    std::lock_guard lock(mu_);
    return exports_;
  }
  // How many background exports let their memory go (release()).
  int releases() const { return releases_.load(); }
  void fail_next_export_start(Error e) {
    std::lock_guard lock(mu_);
    export_start_errors_.push_back(std::move(e));
  }

 private:
  std::atomic<int> releases_{0};
  std::vector<FakeExport*> exports_;
  std::deque<Error> export_start_errors_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
  std::deque<Error> pause_errors_;
  std::function<void()> on_pause_;
  std::vector<PauseRequest> pauses_;
  std::vector<ResumeRequest> resumes_;
};

// A background export the test drives: it holds its own reference to the memfd, as the real one
// does, and ends (durable or failed) when the test says so.
class FakeExport final : public BackgroundExport {
 public:
  FakeExport(PauseRequest request, std::function<void(const ExportStatus&)> on_change,
             std::atomic<int>* releases)
      : request_(std::move(request)), on_change_(std::move(on_change)), releases_(releases) {
    memfd_ = ::fcntl(request_.memfd, F_DUPFD_CLOEXEC, 0);
    request_.memfd = memfd_;
    status_.bytes_total = request_.guest_size;
  }
  ~FakeExport() override {
    if (memfd_ >= 0) ::close(memfd_);
  }
  ExportStatus status() const override {
    std::lock_guard lock(mu_);
    return status_;
  }
  ExportStatus wait(std::chrono::milliseconds timeout) const override {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, timeout, [&] { return status_.state != ExportState::kRunning; });
    return status_;
  }
  Status retry() override {
    std::lock_guard lock(mu_);
    if (status_.state != ExportState::kFailed) return make_error(Errc::kInvalidState, "not failed");
    if (dead_) return make_error(Errc::kInvalidState, "the exporter process is gone");
    status_.state = ExportState::kRunning;
    status_.error.reset();
    ++status_.attempts;
    return {};
  }
  Status release() override {
    std::lock_guard lock(mu_);
    if (status_.state == ExportState::kRunning) return make_error(Errc::kInvalidState, "running");
    released_ = true;
    ++*releases_;
    if (memfd_ >= 0) ::close(memfd_);
    memfd_ = -1;
    return {};
  }

  // The test's side: the export commits (a file at the output, as the real one leaves) or fails.
  void finish() {
    std::ofstream(request_.out_path) << "fake snapshot";
    PauseReport r;
    r.requested_strategy = r.strategy = request_.strategy;
    r.snapshot_path = request_.out_path;
    r.snapshot_id = std::string(32, 'b');
    r.generation = request_.parent_path.empty() ? 1 : 2;
    r.guest_size = request_.guest_size;
    r.dirty_bytes = r.data_bytes = request_.guest_size;
    r.wall_seconds = 0.002;
    end(ExportState::kDurable, r, std::nullopt);
  }
  void fail(Error e) { end(ExportState::kFailed, std::nullopt, std::move(e)); }
  // The exporter process died: it can no longer be retried.
  void die() {
    {
      std::lock_guard lock(mu_);
      dead_ = true;
    }
    fail(make_error(Errc::kExportFailed, "memsnap-exporter was killed by signal 9"));
  }
  void progress(std::uint64_t done) {
    std::lock_guard lock(mu_);
    status_.bytes_done = done;
  }
  const PauseRequest& request() const { return request_; }
  bool released() const {
    std::lock_guard lock(mu_);
    return released_;
  }
  int memfd() const { return memfd_; }

 private:
  void end(ExportState state, std::optional<PauseReport> report, std::optional<Error> error) {
    ExportStatus st;
    {
      std::lock_guard lock(mu_);
      status_.state = state;
      status_.report = std::move(report);
      status_.error = std::move(error);
      if (state == ExportState::kDurable) status_.bytes_done = status_.bytes_total;
      st = status_;
    }
    cv_.notify_all();
    on_change_(st);  // without the export's lock, as the contract says
  }

  PauseRequest request_;
  std::function<void(const ExportStatus&)> on_change_;
  std::atomic<int>* releases_;
  int memfd_ = -1;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  ExportStatus status_;
  bool released_ = false;
  bool dead_ = false;
};

Result<std::unique_ptr<BackgroundExport>> FakePipeline::start_export(
    const PluginRegistry&, const PauseRequest& request,
    std::function<void(const ExportStatus&)> on_change) {
  std::lock_guard lock(mu_);
  if (!export_start_errors_.empty()) {
    Error e = export_start_errors_.front();
    export_start_errors_.pop_front();
    return e;
  }
  auto job = std::make_unique<FakeExport>(request, std::move(on_change), &releases_);
  exports_.push_back(job.get());
  return std::unique_ptr<BackgroundExport>(std::move(job));
}

// A VMM stand-in: a child sharing the test's memfd-backed guest mapping (and the memfd's number).
struct Vmm {
  pid_t pid = -1;
  int memfd = -1;
  void* addr = nullptr;

  static Vmm start() {
    Vmm v;
    v.memfd = ::memfd_create("guest", 0);
    EXPECT_GE(v.memfd, 0);
    EXPECT_EQ(::ftruncate(v.memfd, kGuestSize), 0);
    v.addr = ::mmap(nullptr, kGuestSize, PROT_READ | PROT_WRITE, MAP_SHARED, v.memfd, 0);
    EXPECT_NE(v.addr, MAP_FAILED);
    v.pid = ::fork();
    if (v.pid == 0) {
      for (;;) ::pause();
    }
    return v;
  }
  void end() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      pid = -1;
    }
    if (addr != nullptr) ::munmap(addr, kGuestSize);
    addr = nullptr;
    if (memfd >= 0) ::close(memfd);
    memfd = -1;
  }
  json registration(const std::string& id) const {
    return {{"id", id},
            {"vmm_pid", static_cast<std::uint64_t>(pid)},
            {"regions", json::array({{{"guest_offset", std::uint64_t{0}},
                                      {"host_addr", reinterpret_cast<std::uintptr_t>(addr)},
                                      {"size", kGuestSize}}})},
            {"memfd_fd", static_cast<std::uint64_t>(memfd)}};
  }
};

class SandboxServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/memsnap-service-test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    const char* plugins = std::getenv("MEMSNAP_PLUGIN_DIR");
    ASSERT_NE(plugins, nullptr) << "MEMSNAP_PLUGIN_DIR names the built plugins";
    ASSERT_TRUE(registry_.load_directory(plugins).ok());
    // Forked before any thread of the test starts.
    vmms_.push_back(Vmm::start());
    vmms_.push_back(Vmm::start());
  }
  void TearDown() override {
    pipeline_.open();
    service_.reset();
    for (Vmm& v : vmms_) v.end();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // settings: changed before the service is made.
  void make_service(const std::function<void(ServiceSettings&)>& settings = nullptr) {
    ServiceOptions options;
    options.snapshot_dir = dir_ + "/snapshots";
    options.sync = false;
    options.pipeline = &pipeline_;
    options.settings.queue_timeout = std::chrono::milliseconds(20);
    if (settings) settings(options.settings);
    auto created = SandboxService::create(registry_, metrics_, options);
    ASSERT_TRUE(created.ok()) << created.error().to_string();
    service_ = std::move(*created);
  }
  void register_vmm(std::size_t i, const std::string& id) {
    auto r = service_->register_sandbox(root_, vmms_[i].registration(id));
    ASSERT_TRUE(r.ok()) << r.error().to_string();
  }
  json get(const std::string& id) {
    auto r = service_->get(root_, id, "", std::chrono::milliseconds(0));
    EXPECT_TRUE(r.ok()) << r.error().to_string();
    return r.ok() ? *r : json();
  }
  std::string state(const std::string& id) { return get(id).value("state", ""); }
  // The value of the series `name` whose labels include every one of `labels` (-1: none).
  double series(const std::string& name, const std::vector<std::string>& labels) const {
    std::istringstream text(metrics_.serialize());
    for (std::string line; std::getline(text, line);) {
      if (line.rfind(name + "{", 0) != 0 && !(labels.empty() && line.rfind(name + " ", 0) == 0)) {
        continue;
      }
      bool all = true;
      for (const auto& l : labels) all = all && line.find(l) != std::string::npos;
      if (all) return std::stod(line.substr(line.rfind(' ') + 1));
    }
    return -1;
  }

  std::string dir_;
  PluginRegistry registry_;
  metrics::HostMetrics metrics_{[] {
    metrics::HostMetricsOptions o;
    o.sandbox_states = sandbox_state_names();
    return o;
  }()};
  FakePipeline pipeline_;
  std::unique_ptr<SandboxService> service_;
  std::vector<Vmm> vmms_;
  const Caller root_{::geteuid(), ::getegid(), ::getpid()};
};

TEST_F(SandboxServiceTest, APauseStopsTheSandboxAndCommitsItsSnapshot) {
  make_service();
  register_vmm(0, "sb");
  EXPECT_EQ(series("memsnap_sandboxes", {"state=\"running\""}), 1);

  auto paused = service_->pause(root_, "sb", json::object());
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();
  // No flags: the fallback strategy, not counted as a fallback.
  EXPECT_EQ((*paused)["strategy"], "process_vm_readv");
  EXPECT_EQ((*paused)["fallback"], nullptr);
  EXPECT_EQ((*paused)["after"], "stop");
  const std::string snapshot = (*paused)["snapshot"];
  EXPECT_EQ(fs::path(snapshot).filename(), "generation-1.snap");

  // What the pipeline was asked: the pinned VMM, its memfd, frozen and left stopped.
  const auto requests = pipeline_.pauses();
  ASSERT_EQ(requests.size(), 1u);
  EXPECT_EQ(requests[0].pid, vmms_[0].pid);
  EXPECT_GE(requests[0].pidfd, 0);
  EXPECT_GE(requests[0].memfd, 0);
  EXPECT_EQ(requests[0].guest_size, kGuestSize);
  EXPECT_TRUE(requests[0].freeze);
  EXPECT_TRUE(requests[0].stay_frozen);
  EXPECT_FALSE(requests[0].sync);
  EXPECT_TRUE(requests[0].parent_path.empty());
  EXPECT_EQ(requests[0].out_path, snapshot);

  const json sb = get("sb");
  EXPECT_EQ(sb["state"], "paused");
  EXPECT_EQ(sb["snapshots"], json::array({snapshot}));
  EXPECT_EQ(sb["strategy"], "process_vm_readv");
  EXPECT_EQ(sb["last_error"], nullptr);
  EXPECT_EQ(series("memsnap_pause_duration_seconds_count",
                   {"outcome=\"ok\"", "strategy=\"process_vm_readv\""}),
            1);
  EXPECT_EQ(series("memsnap_sandboxes", {"state=\"paused\""}), 1);
  EXPECT_EQ(series("memsnap_sandboxes", {"state=\"running\""}), 0);
}

TEST_F(SandboxServiceTest, AFailedPauseLeavesTheSandboxRunningAndUsable) {
  make_service();
  register_vmm(0, "sb");
  pipeline_.fail_next_pause(make_error(Errc::kIoError, "disk full"));
  auto failed = service_->pause(root_, "sb", json::object());
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.error().code, Errc::kIoError);

  json sb = get("sb");
  EXPECT_EQ(sb["state"], "running");
  EXPECT_TRUE(sb["snapshots"].empty());
  EXPECT_NE(sb["last_error"].get<std::string>().find("disk full"), std::string::npos);
  EXPECT_EQ(series("memsnap_pause_duration_seconds_count",
                   {"outcome=\"error\"", "strategy=\"process_vm_readv\""}),
            1);

  auto again = service_->pause(root_, "sb", json::object());
  ASSERT_TRUE(again.ok()) << again.error().to_string();
  EXPECT_EQ(state("sb"), "paused");
  EXPECT_EQ(get("sb")["last_error"], nullptr);
}

TEST_F(SandboxServiceTest, DataAtRiskFailsTheSandboxForGood) {
  make_service();
  register_vmm(0, "sb");
  pipeline_.fail_next_pause(make_error(Errc::kDataAtRisk, "kept at /x.partial"));
  auto failed = service_->pause(root_, "sb", json::object());
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.error().code, Errc::kDataAtRisk);
  // The VMM still runs, but its memory's only copy is the kept file: never runnable again here.
  EXPECT_EQ(state("sb"), "failed");
  auto refused = service_->pause(root_, "sb", json::object());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, Errc::kInvalidState);
  EXPECT_EQ(pipeline_.pauses().size(), 1u);
  EXPECT_EQ(series("memsnap_sandboxes", {"state=\"failed\""}), 1);
}

TEST_F(SandboxServiceTest, APauseWhoseVmmDiedOnTheWayFailsTheSandbox) {
  make_service();
  register_vmm(0, "sb");
  const pid_t vmm = vmms_[0].pid;
  pipeline_.on_pause([vmm] {
    ::kill(vmm, SIGKILL);
    ::waitpid(vmm, nullptr, 0);
  });
  pipeline_.fail_next_pause(make_error(Errc::kProcessGone, "the VMM exited"));
  auto failed = service_->pause(root_, "sb", json::object());
  ASSERT_FALSE(failed.ok());
  vmms_[0].pid = -1;  // reaped above
  EXPECT_EQ(state("sb"), "failed");
}

TEST_F(SandboxServiceTest, ASandboxBeingPausedIsBusyForEveryOtherOperation) {
  make_service();
  register_vmm(0, "sb");
  pipeline_.close();
  Result<json> first = make_error(Errc::kInternal, "not run");
  std::thread pausing([&] { first = service_->pause(root_, "sb", json::object()); });
  pipeline_.wait_for_pauses(1);

  EXPECT_EQ(state("sb"), "pausing");
  EXPECT_EQ(series("memsnap_operations_in_flight", {"kind=\"pause\""}), 1);
  auto second = service_->pause(root_, "sb", json::object());
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code, Errc::kBusy);
  auto resume = service_->resume(root_, "sb", {{"handshake_socket", "sb.sock"}});
  ASSERT_FALSE(resume.ok());
  EXPECT_EQ(resume.error().code, Errc::kBusy);
  auto removed = service_->remove(root_, "sb", /*force=*/true);
  ASSERT_FALSE(removed.ok());
  EXPECT_EQ(removed.error().code, Errc::kBusy);

  pipeline_.open();
  pausing.join();
  ASSERT_TRUE(first.ok()) << first.error().to_string();
  EXPECT_EQ(state("sb"), "paused");
  EXPECT_EQ(pipeline_.pauses().size(), 1u);
  EXPECT_EQ(series("memsnap_operations_in_flight", {"kind=\"pause\""}), 0);
}

TEST_F(SandboxServiceTest, APauseFindingNoFreeSlotIsRefusedAndChangesNothing) {
  make_service([](ServiceSettings& s) { s.max_concurrent_pauses = 1; });
  register_vmm(0, "a");
  register_vmm(1, "b");
  pipeline_.close();
  Result<json> first = make_error(Errc::kInternal, "not run");
  std::thread pausing([&] { first = service_->pause(root_, "a", json::object()); });
  pipeline_.wait_for_pauses(1);

  auto refused = service_->pause(root_, "b", json::object());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, Errc::kBusy);
  EXPECT_EQ(state("b"), "running");
  EXPECT_EQ(pipeline_.pauses().size(), 1u);

  pipeline_.open();
  pausing.join();
  ASSERT_TRUE(first.ok()) << first.error().to_string();
  // The slot is free again.
  auto second = service_->pause(root_, "b", json::object());
  ASSERT_TRUE(second.ok()) << second.error().to_string();
  EXPECT_EQ(state("b"), "paused");
}

TEST_F(SandboxServiceTest, DrainWaitsForThePauseInFlightAndRefusesNewOnes) {
  make_service();
  register_vmm(0, "a");
  register_vmm(1, "b");
  pipeline_.close();
  Result<json> first = make_error(Errc::kInternal, "not run");
  std::thread pausing([&] { first = service_->pause(root_, "a", json::object()); });
  pipeline_.wait_for_pauses(1);

  EXPECT_FALSE(service_->drain(std::chrono::milliseconds(0)));
  auto refused = service_->pause(root_, "b", json::object());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, Errc::kShuttingDown);
  EXPECT_EQ(state("b"), "running");

  pipeline_.open();
  pausing.join();
  EXPECT_TRUE(service_->drain(std::chrono::seconds(30)));
  // The pause in flight was never aborted.
  ASSERT_TRUE(first.ok()) << first.error().to_string();
  EXPECT_EQ(state("a"), "paused");
  EXPECT_EQ(pipeline_.pauses().size(), 1u);
}

TEST_F(SandboxServiceTest, RefusalsBeforeThePipelineChangeNothing) {
  make_service();
  register_vmm(0, "sb");
  fs::create_directories(dir_ + "/snapshots/sb");
  std::ofstream(dir_ + "/snapshots/sb/taken.snap") << "x";
  const std::vector<std::pair<json, Errc>> cases = {
      {{{"output", "sb/taken.snap"}}, Errc::kAlreadyExists},
      {{{"output", "../outside.snap"}}, Errc::kPathNotAllowed},
      {{{"parent", "latest"}}, Errc::kInvalidArgument},
      {{{"strategy", "no_such_plugin"}}, Errc::kInvalidArgument},
      {{{"after", "later"}}, Errc::kInvalidArgument},
      {{{"strategy", "hole_punch"}, {"after", "continue"}}, Errc::kInvalidArgument},
      {{{"unknown", 1}}, Errc::kInvalidArgument},
  };
  for (const auto& [body, code] : cases) {
    auto r = service_->pause(root_, "sb", body);
    ASSERT_FALSE(r.ok()) << body.dump();
    EXPECT_EQ(r.error().code, code) << body.dump() << ": " << r.error().to_string();
    EXPECT_EQ(state("sb"), "running") << body.dump();
  }
  EXPECT_TRUE(pipeline_.pauses().empty());
  EXPECT_EQ(series("memsnap_pause_duration_seconds_count", {"outcome=\"error\""}), -1);
}

TEST_F(SandboxServiceTest, AGivenDirtySetMakesTheNextPauseADiffOfTheLast) {
  make_service();
  register_vmm(0, "sb");
  auto base = service_->pause(root_, "sb", {{"after", "continue"}});
  ASSERT_TRUE(base.ok()) << base.error().to_string();
  EXPECT_EQ(state("sb"), "running");
  const std::string base_path = (*base)["snapshot"];

  auto diff = service_->pause(
      root_, "sb",
      {{"dirty", json::array({{{"offset", 4096u}, {"length", 8192u}}})}, {"output", "sb/diff.snap"}});
  ASSERT_TRUE(diff.ok()) << diff.error().to_string();
  const auto requests = pipeline_.pauses();
  ASSERT_EQ(requests.size(), 2u);
  EXPECT_FALSE(requests[0].stay_frozen);
  EXPECT_EQ(requests[1].parent_path, base_path);
  ASSERT_TRUE(requests[1].dirty.has_value());
  ASSERT_EQ(requests[1].dirty->size(), 1u);
  EXPECT_EQ((*requests[1].dirty)[0].offset, 4096u);
  EXPECT_EQ((*requests[1].dirty)[0].length, 8192u);
  EXPECT_EQ((*diff)["parent"], base_path);
  EXPECT_EQ(get("sb")["snapshots"], json::array({base_path, (*diff)["snapshot"]}));
}

TEST_F(SandboxServiceTest, AResumeThatCannotBePreparedLeavesTheSandboxPaused) {
  make_service([](ServiceSettings& s) { s.max_concurrent_resumes = 1; });
  register_vmm(0, "sb");
  auto paused = service_->pause(root_, "sb", json::object());
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();

  auto resumed = service_->resume(root_, "sb", {{"handshake_socket", "sb.sock"}});
  ASSERT_FALSE(resumed.ok());
  EXPECT_EQ(resumed.error().code, Errc::kResumeFailed);
  const json sb = get("sb");
  EXPECT_EQ(sb["state"], "paused");
  EXPECT_NE(sb["last_error"].get<std::string>().find("does not resume"), std::string::npos);
  EXPECT_EQ(series("memsnap_resume_duration_seconds_count",
                   {"outcome=\"error\"", "strategy=\"process_vm_readv\""}),
            1);

  const auto requests = pipeline_.resumes();
  ASSERT_EQ(requests.size(), 1u);
  EXPECT_EQ(requests[0].chain, std::vector<std::string>{(*paused)["snapshot"]});
  EXPECT_EQ(requests[0].strategy, "process_vm_readv");
  EXPECT_TRUE(requests[0].verify_checksums);
  EXPECT_EQ(fs::path(requests[0].socket_path).filename(), "sb.sock");
  // The only slot was given back: the next resume reaches the pipeline too.
  auto again = service_->resume(root_, "sb", {{"handshake_socket", "sb.sock"}});
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, Errc::kResumeFailed);
  EXPECT_EQ(pipeline_.resumes().size(), 2u);
}

TEST_F(SandboxServiceTest, ResumeRefusalsBeforeThePipelineChangeNothing) {
  make_service();
  register_vmm(0, "sb");
  ASSERT_TRUE(service_->pause(root_, "sb", json::object()).ok());
  const std::vector<std::pair<json, Errc>> cases = {
      {json::object(), Errc::kInvalidArgument},
      {{{"handshake_socket", "sb.sock"}, {"mode", "sideways"}}, Errc::kInvalidArgument},
      {{{"handshake_socket", "sb.sock"}, {"track_writes", "yes"}}, Errc::kInvalidArgument},
      {{{"handshake_socket", "../sb.sock"}}, Errc::kPathNotAllowed},
      {{{"handshake_socket", "sb.sock"}, {"unknown", 1}}, Errc::kInvalidArgument},
  };
  for (const auto& [body, code] : cases) {
    auto r = service_->resume(root_, "sb", body);
    ASSERT_FALSE(r.ok()) << body.dump();
    EXPECT_EQ(r.error().code, code) << body.dump() << ": " << r.error().to_string();
    EXPECT_EQ(state("sb"), "paused") << body.dump();
  }
  EXPECT_TRUE(pipeline_.resumes().empty());
}

TEST_F(SandboxServiceTest, AnotherUserNeitherSeesNorTouchesTheSandbox) {
  make_service();
  register_vmm(0, "sb");
  const Caller stranger{4242, 4242, 1};
  auto seen = service_->get(stranger, "sb", "", std::chrono::milliseconds(0));
  ASSERT_FALSE(seen.ok());
  EXPECT_EQ(seen.error().code, Errc::kForbidden);
  auto paused = service_->pause(stranger, "sb", json::object());
  ASSERT_FALSE(paused.ok());
  EXPECT_EQ(paused.error().code, Errc::kForbidden);
  EXPECT_TRUE(service_->list(stranger)["sandboxes"].empty());
  EXPECT_TRUE(pipeline_.pauses().empty());
  EXPECT_EQ(state("sb"), "running");
}

// ---- handover pauses (issue 19) ----

// The VMM's scheduler state letter (/proc/PID/stat's third field): T when stopped.
char proc_state(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string all((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const auto close = all.rfind(')');
  return close == std::string::npos || close + 2 >= all.size() ? '?' : all[close + 2];
}

json handover_body() { return {{"mode", "handover"}, {"strategy", "memfd"}}; }

TEST_F(SandboxServiceTest, AHandoverAnswersBeforeTheSnapshotIsDurableAndCommitsItAfter) {
  make_service();
  register_vmm(0, "sb");
  std::memset(vmms_[0].addr, 0x5a, kGuestSize);

  auto paused = service_->pause(root_, "sb", handover_body());
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();
  EXPECT_EQ((*paused)["mode"], "handover");
  EXPECT_EQ((*paused)["requested_mode"], "handover");
  EXPECT_EQ((*paused)["mode_source"], "body");
  EXPECT_EQ((*paused)["mode_fallback"], nullptr);
  EXPECT_EQ((*paused)["durable"], false);
  EXPECT_EQ((*paused)["export"]["state"], "running");
  EXPECT_EQ((*paused)["snapshot_id"], nullptr);
  EXPECT_GT((*paused)["handover_seconds"].get<double>(), 0);
  const std::string snapshot = (*paused)["snapshot"];
  EXPECT_FALSE(fs::exists(snapshot));

  // The VMM is stopped, and the export got memory nobody changes: no pid, no freeze, its own
  // reference to the memfd, the given output.
  EXPECT_EQ(proc_state(vmms_[0].pid), 'T');
  ASSERT_EQ(pipeline_.pauses().size(), 0u);
  ASSERT_EQ(pipeline_.exports().size(), 1u);
  FakeExport& job = *pipeline_.exports()[0];
  EXPECT_EQ(job.request().pid, -1);
  EXPECT_FALSE(job.request().freeze);
  EXPECT_FALSE(job.request().allow_fallback);
  EXPECT_EQ(job.request().strategy, "memfd");
  EXPECT_EQ(job.request().out_path, snapshot);
  EXPECT_GE(job.memfd(), 0);

  // The orchestrator ends the VMM: the memory is still there for the export.
  vmms_[0].end();
  unsigned char byte = 0;
  EXPECT_EQ(::pread(job.memfd(), &byte, 1, kGuestSize / 2), 1);
  EXPECT_EQ(byte, 0x5a);

  json sb = get("sb");
  EXPECT_EQ(sb["state"], "exporting");
  EXPECT_EQ(sb["durable"], false);
  EXPECT_EQ(sb["snapshots"], json::array());
  job.progress(kGuestSize / 4);
  EXPECT_EQ(get("sb")["export"]["bytes_done"], kGuestSize / 4);
  EXPECT_EQ(series("memsnap_sandboxes", {"state=\"exporting\""}), 1);
  EXPECT_EQ(series("memsnap_background_exports_pending", {"state=\"running\""}), 1);
  EXPECT_EQ(series("memsnap_pause_handover_seconds_count", {"mode=\"handover\""}), 1);

  // A pause of it now: it is paused already. A warm resume hands memory over: it waits, then
  // gives up. Any other resume does not wait: it is served from the held memory (the fake
  // pipeline refuses it after it is asked), and the sandbox stays exporting.
  EXPECT_EQ(service_->pause(root_, "sb", json::object()).error().code, Errc::kInvalidState);
  EXPECT_EQ(service_->resume(root_, "sb", {{"handshake_socket", "x.sock"}, {"mode", "warm"}})
                .error()
                .code,
            Errc::kBusy);
  EXPECT_EQ(service_->resume(root_, "sb", {{"handshake_socket", "x.sock"}}).error().code,
            Errc::kResumeFailed);
  {
    const std::vector<ResumeRequest> asked = pipeline_.resumes();
    ASSERT_EQ(asked.size(), 1u);
    ASSERT_NE(asked[0].pending, nullptr) << "the resume was not asked from the held memory";
    EXPECT_TRUE(asked[0].chain.empty());  // a base snapshot: no parents
  }
  EXPECT_EQ(get("sb")["state"], "exporting");

  // A wait for durable ends when the export commits.
  std::thread commit([&] { job.finish(); });
  auto waited = service_->get(root_, "sb", "exporting", std::chrono::seconds(10));
  commit.join();
  ASSERT_TRUE(waited.ok()) << waited.error().to_string();
  EXPECT_EQ((*waited)["state"], "paused");
  EXPECT_EQ((*waited)["durable"], true);
  EXPECT_EQ((*waited)["snapshots"], json::array({snapshot}));
  EXPECT_EQ((*waited)["warm_memory_kept"], true);  // memfd keeps the memory: a warm resume
  EXPECT_EQ((*waited)["last_pause"]["durable"], true);
  EXPECT_EQ((*waited)["last_pause"]["export"]["state"], "durable");
  EXPECT_EQ((*waited)["last_pause"]["snapshot_id"], std::string(32, 'b'));
  EXPECT_EQ(series("memsnap_background_exports_pending", {"state=\"running\""}), 0);
  EXPECT_EQ(series("memsnap_pause_durable_seconds_count", {"mode=\"handover\""}), 1);
  EXPECT_EQ(series("memsnap_sandboxes", {"state=\"paused\""}), 1);
}

// hole_punch releases the held memory as it writes it: a resume must wait until it is durable,
// and is never asked from that memory.
TEST_F(SandboxServiceTest, AResumeOfAHolePunchExportWaitsUntilItIsDurable) {
  make_service();
  register_vmm(0, "sb");
  auto paused = service_->pause(root_, "sb", {{"mode", "handover"}, {"strategy", "hole_punch"}});
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();
  ASSERT_EQ((*paused)["mode"], "handover") << paused->dump();
  EXPECT_EQ(service_->resume(root_, "sb", {{"handshake_socket", "x.sock"}}).error().code,
            Errc::kBusy);
  EXPECT_TRUE(pipeline_.resumes().empty());
  EXPECT_EQ(get("sb")["state"], "exporting");
  pipeline_.exports()[0]->finish();
}

TEST_F(SandboxServiceTest, AFailedExportKeepsTheMemoryUntilARetryMakesItDurable) {
  make_service();
  register_vmm(0, "sb");
  ASSERT_TRUE(service_->pause(root_, "sb", handover_body()).ok());
  FakeExport& job = *pipeline_.exports()[0];
  job.fail(make_error(Errc::kIoError, "writing the snapshot: No space left on device", ENOSPC));

  json sb = get("sb");
  EXPECT_EQ(sb["state"], "export_failed");
  EXPECT_EQ(sb["durable"], false);
  EXPECT_EQ(sb["export"]["state"], "failed");
  EXPECT_NE(sb["export"]["error"].get<std::string>().find("No space left"), std::string::npos);
  EXPECT_EQ(series("memsnap_background_exports_pending", {"state=\"failed\""}), 1);
  // Nothing says durable, and nothing lets the memory go without force.
  EXPECT_EQ(sb["snapshots"], json::array());
  auto removed = service_->remove(root_, "sb");
  ASSERT_FALSE(removed.ok());
  EXPECT_EQ(removed.error().code, Errc::kInvalidState);
  EXPECT_FALSE(job.released());
  EXPECT_EQ(service_->resume(root_, "sb", {{"handshake_socket", "x.sock"}}).error().code,
            Errc::kInvalidState);

  auto retried = service_->retry_export(root_, "sb");
  ASSERT_TRUE(retried.ok()) << retried.error().to_string();
  EXPECT_EQ(state("sb"), "exporting");
  EXPECT_EQ(job.status().attempts, 2);
  EXPECT_EQ(series("memsnap_background_export_retries_total", {"strategy=\"memfd\""}), 1);
  // Only a failed export can be retried.
  EXPECT_EQ(service_->retry_export(root_, "sb").error().code, Errc::kInvalidState);
  job.finish();
  EXPECT_EQ(state("sb"), "paused");
  EXPECT_EQ(get("sb")["snapshots"].size(), 1u);
}

TEST_F(SandboxServiceTest, RemovingAFailedExportNeedsForceAndThenLetsTheMemoryGo) {
  make_service();
  register_vmm(0, "sb");
  ASSERT_TRUE(service_->pause(root_, "sb", handover_body()).ok());
  FakeExport* job = pipeline_.exports()[0];
  job->fail(make_error(Errc::kIoError, "disk gone"));
  EXPECT_EQ(pipeline_.releases(), 0);
  ASSERT_TRUE(service_->remove(root_, "sb", /*force=*/true).ok());
  EXPECT_EQ(pipeline_.releases(), 1);
  EXPECT_EQ(series("memsnap_background_exports_pending", {"state=\"failed\""}), 0);
  EXPECT_EQ(series("memsnap_export_held_bytes", {}), 0);
}

TEST_F(SandboxServiceTest, HandoverFallsBackToCopyWhenTheStrategyReadsTheVmm) {
  make_service();
  register_vmm(0, "sb");
  auto paused =
      service_->pause(root_, "sb", {{"mode", "handover"}, {"strategy", "process_vm_readv"}});
  ASSERT_TRUE(paused.ok()) << paused.error().to_string();
  EXPECT_EQ((*paused)["mode"], "copy");
  EXPECT_EQ((*paused)["requested_mode"], "handover");
  EXPECT_EQ((*paused)["mode_fallback"]["reason"], "strategy_reads_vmm");
  EXPECT_EQ((*paused)["durable"], true);
  EXPECT_EQ((*paused)["export"]["state"], "durable");
  EXPECT_EQ(pipeline_.exports().size(), 0u);
  EXPECT_EQ(pipeline_.pauses().size(), 1u);
  EXPECT_EQ(state("sb"), "paused");
  EXPECT_EQ(series("memsnap_pause_mode_fallbacks_total",
                   {"requested=\"handover\"", "mode=\"copy\"", "reason=\"strategy_reads_vmm\""}),
            1);
  // after "continue" cannot hand over either.
  register_vmm(1, "sb2");
  auto continued = service_->pause(
      root_, "sb2", {{"mode", "handover"}, {"strategy", "memfd"}, {"after", "continue"}});
  ASSERT_TRUE(continued.ok()) << continued.error().to_string();
  EXPECT_EQ((*continued)["mode_fallback"]["reason"], "continues");
  EXPECT_EQ(state("sb2"), "running");
  EXPECT_EQ(service_->pause(root_, "sb2", {{"mode", "sideways"}}).error().code,
            Errc::kInvalidArgument);
}

TEST_F(SandboxServiceTest, TheFlagPicksThePauseModePerSandbox) {
  make_service();
  const fs::path flags = fs::path(dir_) / "flags.json";
  std::ofstream(flags) << R"({"flags": {"pause-mode": {"state": "ENABLED",
      "variants": {"copy": "copy", "handover": "handover", "odd": "sideways"},
      "defaultVariant": "copy",
      "targeting": {"if": [{"==": [{"var": "targetingKey"}, "sb"]}, "handover",
                           {"if": [{"==": [{"var": "targetingKey"}, "sb2"]}, "odd", "copy"]}]}}}})";
  std::string error;
  std::shared_ptr<flags::FlagStore> store = flags::FlagStore::open(flags.string(), {}, &error);
  ASSERT_TRUE(store) << error;
  service_->set_flags(store);
  register_vmm(0, "sb");
  register_vmm(1, "sb2");
  auto handed = service_->pause(root_, "sb", {{"strategy", "memfd"}});
  ASSERT_TRUE(handed.ok()) << handed.error().to_string();
  EXPECT_EQ((*handed)["mode"], "handover");
  EXPECT_EQ((*handed)["mode_source"], "flag");
  // A variant that names no mode: copy, and said so.
  auto odd = service_->pause(root_, "sb2", {{"strategy", "memfd"}});
  ASSERT_TRUE(odd.ok()) << odd.error().to_string();
  EXPECT_EQ((*odd)["mode"], "copy");
  EXPECT_EQ((*odd)["mode_fallback"]["reason"], "flag_error");
  EXPECT_EQ(series("memsnap_pause_modes_total", {"mode=\"handover\"", "source=\"flag\""}), 1);
  pipeline_.exports()[0]->finish();
}

TEST_F(SandboxServiceTest, HandoversBeyondTheExportLimitWaitThenAreRefusedWithNothingChanged) {
  make_service([](ServiceSettings& s) { s.max_background_exports = 1; });
  register_vmm(0, "sb");
  register_vmm(1, "sb2");
  ASSERT_TRUE(service_->pause(root_, "sb", handover_body()).ok());
  auto refused = service_->pause(root_, "sb2", handover_body());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, Errc::kBusy);
  EXPECT_NE(refused.error().message.find("max_background_exports"), std::string::npos);
  EXPECT_EQ(state("sb2"), "running");
  EXPECT_NE(proc_state(vmms_[1].pid), 'T');
  // Once the first is durable there is room again.
  pipeline_.exports()[0]->finish();
  ASSERT_TRUE(service_->pause(root_, "sb2", handover_body()).ok());
  EXPECT_EQ(state("sb2"), "exporting");
  pipeline_.exports()[1]->finish();
}

TEST_F(SandboxServiceTest, AnExportThatCannotStartLeavesTheSandboxRunning) {
  make_service();
  register_vmm(0, "sb");
  pipeline_.fail_next_export_start(make_error(Errc::kNotFound, "no memsnap-exporter"));
  auto paused = service_->pause(root_, "sb", handover_body());
  ASSERT_FALSE(paused.ok());
  EXPECT_NE(paused.error().message.find("memsnap-exporter"), std::string::npos);
  EXPECT_EQ(state("sb"), "running");
  EXPECT_NE(proc_state(vmms_[0].pid), 'T');  // continued
  EXPECT_EQ(series("memsnap_background_exports_pending", {"state=\"running\""}), 0);
}

TEST_F(SandboxServiceTest, ADeadExporterIsStartedAgainFromTheMemoryMemsnapdHolds) {
  make_service();
  register_vmm(0, "sb");
  std::memset(vmms_[0].addr, 0x33, kGuestSize);
  ASSERT_TRUE(service_->pause(root_, "sb", handover_body()).ok());
  vmms_[0].end();  // only memsnapd's and the export's references are left
  pipeline_.exports()[0]->die();
  ASSERT_EQ(state("sb"), "export_failed");
  auto retried = service_->retry_export(root_, "sb");
  ASSERT_TRUE(retried.ok()) << retried.error().to_string();
  ASSERT_EQ(pipeline_.exports().size(), 2u);
  FakeExport& again = *pipeline_.exports()[1];
  EXPECT_EQ(again.request().out_path, pipeline_.exports()[0]->request().out_path);
  unsigned char byte = 0;
  ASSERT_EQ(::pread(again.memfd(), &byte, 1, kGuestSize - 1), 1);
  EXPECT_EQ(byte, 0x33) << "the new export does not see the paused memory";
  again.finish();
  EXPECT_EQ(state("sb"), "paused");
}

TEST_F(SandboxServiceTest, ADeadExporterOfAReleasingStrategyIsNotStartedAgainOnHoles) {
  make_service();
  register_vmm(0, "sb");
  ASSERT_TRUE(service_->pause(root_, "sb", {{"mode", "handover"}, {"strategy", "hole_punch"}}).ok());
  pipeline_.exports()[0]->die();
  auto retried = service_->retry_export(root_, "sb");
  ASSERT_FALSE(retried.ok());
  EXPECT_NE(retried.error().message.find("releases memory"), std::string::npos)
      << retried.error().message;
  EXPECT_EQ(pipeline_.exports().size(), 1u);
  EXPECT_EQ(state("sb"), "export_failed");
}

}  // namespace
}  // namespace memsnap::daemon
