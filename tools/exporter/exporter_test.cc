// memsnap-exporter through memsnapd's client (core_pipeline().start_export, issue 19): a memfd
// filled with the verifiable pattern is exported in the background after the test has closed its
// own reference, so the exporter's is the only one left, and the snapshot is read back page by
// page. A full disk fails the export with the memory still held, and a retry makes it durable;
// memsnapd (a forked child of the test) killed with SIGKILL mid-export does not stop the exporter
// from committing.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/pattern/pattern.h"
#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/snapshot/snapshot_reader.h"
#include "tools/memsnapd/exporter_client.h"
#include "tools/memsnapd/pipeline.h"

namespace memsnap::daemon {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kSeed = 77;
constexpr auto kDeadline = 60s;

std::string plugin_dir() {
  if (const char* dir = std::getenv("MEMSNAP_PLUGIN_DIR")) return dir;
  const auto self = fs::read_symlink("/proc/self/exe");
  return (self.parent_path().parent_path() / "lib" / "memsnap" / "plugins").string();
}

// Every 8th page is never written (a hole: not in the SEEK_DATA dirty set, zeros in the
// snapshot); the others hold generation 1 of the pattern.
std::uint64_t generation_of(std::uint64_t page) { return page % 8 == 7 ? 0 : 1; }

// The name of this test process's guest memfds, so that its exporters can be told apart.
std::string memfd_name() { return "exporter-test-guest-" + std::to_string(::getpid()); }

// A memfd of size bytes filled as above.
int pattern_memfd(std::uint64_t size) {
  const int fd = ::memfd_create(memfd_name().c_str(), MFD_CLOEXEC);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) return -1;
  std::vector<char> page(kPage);
  for (std::uint64_t p = 0; p < size / kPage; ++p) {
    if (generation_of(p) == 0) continue;
    pattern::fill_page(page.data(), kPage, kSeed, p, 1);
    if (::pwrite(fd, page.data(), kPage, static_cast<off_t>(p * kPage)) != ssize_t(kPage)) {
      ::close(fd);
      return -1;
    }
  }
  return fd;
}

std::uint64_t written_bytes(std::uint64_t size) {
  std::uint64_t n = 0;
  for (std::uint64_t p = 0; p < size / kPage; ++p) n += generation_of(p) == 0 ? 0 : kPage;
  return n;
}

// Pages of the snapshot at path that differ from the memfd as pattern_memfd wrote it; -1 if the
// snapshot does not open with every checksum right.
std::int64_t mismatches_in(const std::string& path, std::uint64_t size) {
  auto reader = SnapshotReader::open(path, Verify::kFull);
  if (!reader.ok()) {
    ADD_FAILURE() << reader.error().to_string();
    return -1;
  }
  EXPECT_EQ((*reader)->guest_size(), size);
  std::vector<char> page(kPage);
  std::int64_t bad = 0;
  for (std::uint64_t p = 0; p < size / kPage; ++p) {
    if (!(*reader)->read(p * kPage, kPage, page.data()).ok() ||
        !pattern::check_page(page.data(), kPage, kSeed, p, generation_of(p)).ok) {
      ++bad;
    }
  }
  return bad;
}

bool eventually(const std::function<bool()>& condition,
                std::chrono::milliseconds deadline = kDeadline) {
  const auto end = std::chrono::steady_clock::now() + deadline;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

// The memsnap-exporter processes that are children of this process (zombies included: a child
// leaves /proc only once reaped), from /proc/<pid>/stat: "pid (comm) state ppid ...". With
// any_parent, also those whose parent is gone (started by a killed "memsnapd").
std::vector<pid_t> exporter_children(bool any_parent = false) {
  std::vector<pid_t> out;
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(e.path() / "stat");
    std::string stat;
    std::getline(in, stat);
    const auto close = stat.rfind(')');
    if (close == std::string::npos || stat.find("(memsnap-exporte") == std::string::npos) continue;
    char state = 0;
    long ppid = 0;
    if (std::sscanf(stat.c_str() + close + 1, " %c %ld", &state, &ppid) != 2) continue;
    if (any_parent || ppid == ::getpid()) out.push_back(static_cast<pid_t>(std::stol(name)));
  }
  return out;
}

// Whether pid is alive (not a zombie) and holds this test's guest memfd as its fd 3.
bool holds_the_guest_memory(pid_t pid) {
  std::error_code ec;
  const auto target = fs::read_symlink("/proc/" + std::to_string(pid) + "/fd/3", ec);
  return !ec && target.string().starts_with("/memfd:" + memfd_name() + " ");
}

// The exporters (children or orphans) holding this process's guest memory.
std::vector<pid_t> exporters_holding_the_memory() {
  std::vector<pid_t> out;
  for (pid_t pid : exporter_children(true)) {
    if (holds_the_guest_memory(pid)) out.push_back(pid);
  }
  return out;
}

// What on_change was told, in order.
struct Changes {
  std::mutex mutex;
  std::vector<ExportStatus> seen;
  std::function<void(const ExportStatus&)> callback() {
    return [this](const ExportStatus& s) {
      std::lock_guard lock(mutex);
      seen.push_back(s);
    };
  }
  std::vector<ExportState> states() {
    std::lock_guard lock(mutex);
    std::vector<ExportState> out;
    for (const auto& s : seen) out.push_back(s.state);
    return out;
  }
};

class ExporterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(registry_.load_directory(plugin_dir()).ok());
    ASSERT_NE(registry_.find("memfd"), nullptr);
    char templ[] = "/var/tmp/memsnap-exporter-XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
  }
  void TearDown() override {
    // A test that failed may leave an exporter holding its memory (waiting for a command, or
    // retrying on its own): it would keep the test's output open and outlive it. Ended here,
    // by pid, only those holding this process's guest memfds.
    for (pid_t pid : exporters_holding_the_memory()) {
      ADD_FAILURE() << "memsnap-exporter " << pid << " is still holding the guest memory";
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
    // The others let go of the memory and are exiting (durable or released), but a test that
    // destroyed its BackgroundExport first left them to memsnapd's lazy reaping: reaped here, so
    // that the next test starts with no exporter child (an exit may take a while: a sanitizer's
    // leak check runs in it).
    for (pid_t pid : exporter_children()) {
      if (!eventually([pid] { return ::waitpid(pid, nullptr, WNOHANG) != 0; })) {
        ADD_FAILURE() << "memsnap-exporter " << pid << " has not exited";
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
      }
    }
    set_exporter_logging(false, "info");  // the default, whatever a case set and left
    if (!mounted_.empty()) ::umount2(mounted_.c_str(), MNT_DETACH);
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // A handover pause's export request, as memsnapd builds it.
  static PauseRequest request(int memfd, std::uint64_t size, const std::string& strategy,
                              const std::string& out) {
    PauseRequest req;
    req.pid = -1;
    req.memfd = memfd;
    req.freeze = false;
    req.allow_fallback = false;
    req.guest_size = size;
    req.block_size = kPage;
    req.strategy = strategy;
    req.out_path = out;
    req.sync = true;
    return req;
  }

  // Fills a memfd of size bytes, starts its export (strategy memfd) to out, and closes the
  // test's own reference: the exporter's is then the only one. Null (a failure) if it did not.
  std::unique_ptr<BackgroundExport> start(std::uint64_t size, const std::string& out,
                                          std::function<void(const ExportStatus&)> on_change) {
    const int memfd = pattern_memfd(size);
    EXPECT_GE(memfd, 0);
    if (memfd < 0) return nullptr;
    auto started = core_pipeline().start_export(registry_, request(memfd, size, "memfd", out),
                                                std::move(on_change));
    ::close(memfd);
    EXPECT_TRUE(started.ok()) << started.error().to_string();
    return started.ok() ? std::move(*started) : nullptr;
  }

  // A tmpfs of `size` at dir_/small; false (the test skips) without the right to mount.
  bool mount_small(const std::string& size) {
    const std::string small = dir_ + "/small";
    fs::create_directory(small);
    if (::mount("memsnap-exporter-test", small.c_str(), "tmpfs", 0, ("size=" + size).c_str()) !=
        0) {
      return false;
    }
    mounted_ = small;
    return true;
  }

  PluginRegistry registry_;
  std::string dir_;
  std::string mounted_;
};

TEST_F(ExporterTest, ExportsTheMemfdInTheBackgroundToADurableSnapshot) {
  constexpr std::uint64_t kSize = 32ULL << 20;
  const std::string out = dir_ + "/base.snap";
  Changes changes;
  auto exp = start(kSize, out, changes.callback());  // the test's memfd is closed at once
  ASSERT_NE(exp, nullptr);

  const ExportStatus st = exp->wait(kDeadline);
  ASSERT_EQ(st.state, ExportState::kDurable) << (st.error ? st.error->to_string() : "");
  ASSERT_TRUE(st.report.has_value());
  EXPECT_EQ(st.report->snapshot_path, out);
  EXPECT_EQ(st.report->strategy, "memfd");
  EXPECT_EQ(st.report->dirty_bytes, written_bytes(kSize));  // SEEK_DATA: the holes are left out
  EXPECT_EQ(st.bytes_total, st.report->dirty_bytes);
  EXPECT_EQ(st.bytes_done, st.bytes_total);
  EXPECT_EQ(st.attempts, 1);
  EXPECT_FALSE(st.error.has_value());
  EXPECT_GT(st.cpu_seconds, 0.0);
  EXPECT_EQ(mismatches_in(out, kSize), 0);
  // Durable means let go: the exporter holds no reference to the guest memory once it has said
  // so (memsnapd counts the bytes as no longer held at that moment).
  EXPECT_EQ(exporters_holding_the_memory(), std::vector<pid_t>{})
      << "memsnap-exporter said durable while still holding the guest memory";

  // Nothing to retry or release once durable.
  EXPECT_EQ(exp->retry().error().code, Errc::kInvalidState);
  EXPECT_TRUE(exp->release().ok());
  // The exporter has exited and the watcher reaped it: no zombie is left.
  EXPECT_TRUE(eventually([] { return exporter_children().empty(); }))
      << "memsnap-exporter is still a child (a zombie?)";
  exp.reset();  // joins the watcher: every callback has run
  EXPECT_EQ(changes.states(), std::vector<ExportState>{ExportState::kDurable});
  // Only the snapshot: no temporary file is left beside it.
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir_)) files.push_back(e.path().string());
  EXPECT_EQ(files, std::vector<std::string>{out});
}

// The exporter logs as memsnapd does (set_exporter_logging: memsnapd's logging.format and
// level): JSON lines naming it, and nothing below the level. Its stderr is the test's fd 2 at the
// moment it is spawned, pointed at a file for that moment.
TEST_F(ExporterTest, TheExporterLogsInMemsnapdsFormatAndLevel) {
  constexpr std::uint64_t kSize = 4ULL << 20;
  // Each export's stderr lines.
  auto export_logging_to = [&](const std::string& name) {
    const std::string log = dir_ + "/" + name + ".log";
    const int file = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    EXPECT_GE(file, 0);
    const int saved = ::fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 0);
    ::dup2(file, STDERR_FILENO);
    auto exp = start(kSize, dir_ + "/" + name + ".snap", nullptr);
    ::dup2(saved, STDERR_FILENO);
    ::close(saved);
    ::close(file);
    std::vector<std::string> lines;
    if (exp == nullptr) return lines;
    EXPECT_EQ(exp->wait(kDeadline).state, ExportState::kDurable);
    EXPECT_TRUE(eventually([] { return exporter_children().empty(); }));  // all it wrote is in
    std::ifstream in(log);
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
  };

  set_exporter_logging(true, "info");
  const auto json_lines = export_logging_to("json");
  int durable = 0;
  for (const auto& line : json_lines) {
    EXPECT_EQ(line.find("memsnap-exporter["), std::string::npos) << "a text line: " << line;
    if (line.empty() || line[0] != '{') continue;  // the test's own logging
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    ASSERT_TRUE(j.is_object()) << "not JSON: " << line;
    if (j.value("program", "") != "memsnap-exporter") continue;
    EXPECT_TRUE(j.contains("time") && j.contains("level") && j.contains("pid")) << line;
    if (j.value("msg", "").find("is durable") != std::string::npos) ++durable;
  }
  EXPECT_EQ(durable, 1) << "the exporter's JSON line saying durable, in:\n"
                        << testing::PrintToString(json_lines);

  set_exporter_logging(true, "warning");
  for (const auto& line : export_logging_to("quiet")) {
    EXPECT_EQ(line.find("\"program\":\"memsnap-exporter\""), std::string::npos)
        << "an info line at level warning: " << line;
  }
}

TEST_F(ExporterTest, WithoutTheExporterBinaryNothingStarts) {
  const char* saved = std::getenv("MEMSNAP_BIN_DIR");
  const std::string keep = saved != nullptr ? saved : "";
  ::setenv("MEMSNAP_BIN_DIR", (dir_ + "/nowhere").c_str(), 1);
  const int memfd = pattern_memfd(1 << 20);
  ASSERT_GE(memfd, 0);
  auto started = core_pipeline().start_export(
      registry_, request(memfd, 1 << 20, "memfd", dir_ + "/x.snap"), nullptr);
  ::close(memfd);
  if (saved != nullptr)
    ::setenv("MEMSNAP_BIN_DIR", keep.c_str(), 1);
  else
    ::unsetenv("MEMSNAP_BIN_DIR");
  ASSERT_FALSE(started.ok());
  EXPECT_EQ(started.error().code, Errc::kNotFound) << started.error().to_string();
  EXPECT_NE(started.error().message.find("memsnap-exporter"), std::string::npos);
  EXPECT_FALSE(fs::exists(dir_ + "/x.snap"));
}

TEST_F(ExporterTest, ARequestNamingTheVmmIsRefusedBeforeAnythingStarts) {
  const int memfd = pattern_memfd(1 << 20);
  ASSERT_GE(memfd, 0);
  PauseRequest req = request(memfd, 1 << 20, "memfd", dir_ + "/x.snap");
  req.freeze = true;
  req.pid = ::getpid();
  auto started = core_pipeline().start_export(registry_, req, nullptr);
  ::close(memfd);
  ASSERT_FALSE(started.ok());
  EXPECT_EQ(started.error().code, Errc::kInvalidArgument) << started.error().to_string();
}

// A full disk: failed with the error, nothing at the final path, the memory still held by the
// exporter alone (the test closed its memfd); room is made, retry() makes it durable and the
// snapshot equals the memory as it was at the start.
TEST_F(ExporterTest, AFullDiskFailsTheExportWithTheMemoryHeldUntilARetrySucceeds) {
  if (!mount_small("8m")) GTEST_SKIP() << "cannot mount a small tmpfs here (needs root)";
  constexpr std::uint64_t kSize = 16ULL << 20;
  const std::string out = mounted_ + "/full.snap";
  Changes changes;
  auto exp = start(kSize, out, changes.callback());  // the test's memfd is closed at once
  ASSERT_NE(exp, nullptr);

  ExportStatus st = exp->wait(kDeadline);
  ASSERT_EQ(st.state, ExportState::kFailed);
  ASSERT_TRUE(st.error.has_value());
  EXPECT_TRUE(st.error->sys_errno == ENOSPC ||
              st.error->message.find("No space left") != std::string::npos)
      << st.error->to_string();
  EXPECT_FALSE(st.report.has_value());
  EXPECT_EQ(st.attempts, 1);
  EXPECT_FALSE(fs::exists(out)) << "a failed export left its snapshot visible";
  std::uint64_t leftovers = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(mounted_)) ++leftovers;
  EXPECT_EQ(leftovers, 0u) << "the failed attempt left its temporary file";
  // It stays failed (the exporter waits, holding the memory) until told otherwise.
  EXPECT_EQ(exp->wait(50ms).state, ExportState::kFailed);
  const auto exporters = exporter_children();
  ASSERT_EQ(exporters.size(), 1u);
  EXPECT_TRUE(holds_the_guest_memory(exporters[0]));

  ASSERT_EQ(::mount(nullptr, mounted_.c_str(), nullptr, MS_REMOUNT, "size=64m"), 0)
      << std::strerror(errno);
  ASSERT_TRUE(exp->retry().ok());
  EXPECT_EQ(exp->status().attempts, 2);
  // Running again: release() is refused (an answered pause is never dropped half way); ok only
  // if it was durable already.
  if (const Status released = exp->release(); released.ok()) {
    EXPECT_EQ(exp->status().state, ExportState::kDurable);
  } else {
    EXPECT_EQ(released.error().code, Errc::kInvalidState);
  }
  st = exp->wait(kDeadline);
  ASSERT_EQ(st.state, ExportState::kDurable) << (st.error ? st.error->to_string() : "");
  EXPECT_EQ(st.attempts, 2);
  EXPECT_EQ(st.bytes_done, written_bytes(kSize));
  EXPECT_EQ(st.report->dirty_bytes, written_bytes(kSize));
  EXPECT_EQ(mismatches_in(out, kSize), 0);
  EXPECT_EQ(exporters_holding_the_memory(), std::vector<pid_t>{})
      << "memsnap-exporter said durable while still holding the guest memory";
  EXPECT_EQ(exp->retry().error().code, Errc::kInvalidState);
  exp.reset();
  EXPECT_EQ(changes.states(), (std::vector<ExportState>{ExportState::kFailed, ExportState::kRunning,
                                                        ExportState::kDurable}));
}

// A failed export that is released: the exporter exits and lets the memory go; neither retry
// nor release is possible after, and nothing was committed.
TEST_F(ExporterTest, AReleasedFailedExportCommitsNothing) {
  if (!mount_small("4m")) GTEST_SKIP() << "cannot mount a small tmpfs here (needs root)";
  constexpr std::uint64_t kSize = 16ULL << 20;
  const std::string out = mounted_ + "/full.snap";
  auto exp = start(kSize, out, nullptr);
  ASSERT_NE(exp, nullptr);
  ASSERT_EQ(exp->wait(kDeadline).state, ExportState::kFailed);
  ASSERT_EQ(exporter_children().size(), 1u);
  ASSERT_TRUE(exp->release().ok());
  EXPECT_EQ(exp->retry().error().code, Errc::kInvalidState);
  EXPECT_TRUE(exp->release().ok());  // nothing more to do
  // The exporter exits (the memory goes with it) and is reaped.
  EXPECT_TRUE(eventually([] { return exporter_children().empty(); }));
  EXPECT_EQ(exp->status().state, ExportState::kFailed);
  exp.reset();
  EXPECT_FALSE(fs::exists(out));
}

// A failed export whose memsnapd is gone (its BackgroundExport destroyed: the socket closes, as
// when memsnapd dies) retries on its own every retry interval, and commits once there is room.
TEST_F(ExporterTest, AFailedExportRetriesOnItsOwnOnceMemsnapdIsGone) {
  if (!mount_small("8m")) GTEST_SKIP() << "cannot mount a small tmpfs here (needs root)";
  constexpr std::uint64_t kSize = 16ULL << 20;
  const int memfd = pattern_memfd(kSize);
  ASSERT_GE(memfd, 0);
  const std::string out = mounted_ + "/later.snap";
  auto started = start_exporter(registry_, request(memfd, kSize, "memfd", out), nullptr,
                                {.binary = "", .retry_interval = 100ms});
  ::close(memfd);
  ASSERT_TRUE(started.ok()) << started.error().to_string();
  ASSERT_EQ((*started)->wait(kDeadline).state, ExportState::kFailed);
  started->reset();  // "memsnapd" is gone; the exporter is not
  ASSERT_EQ(exporters_holding_the_memory().size(), 1u);
  EXPECT_FALSE(fs::exists(out));
  ASSERT_EQ(::mount(nullptr, mounted_.c_str(), nullptr, MS_REMOUNT, "size=64m"), 0)
      << std::strerror(errno);
  ASSERT_TRUE(eventually([&] { return fs::exists(out); }));
  EXPECT_EQ(mismatches_in(out, kSize), 0);
  EXPECT_TRUE(eventually([] { return exporters_holding_the_memory().empty(); }));
  // Still this process's child, its BackgroundExport gone: reaped here (memsnapd reaps such
  // orphans when its next export starts or ends).
  for (pid_t pid : exporter_children()) ::waitpid(pid, nullptr, 0);
}

// memsnapd killed with SIGKILL in the middle of an export: the exporter, in its own session and
// now the only holder of the guest memory, still commits the snapshot, and it is right page by
// page. memsnapd is a child forked by the test (single-threaded then: the export's watcher
// thread only ever runs in the child); the gated_punch fixture holds the export half way (after
// punching what it wrote out of the memfd) until the child is dead.
TEST_F(ExporterTest, TheExportOutlivesMemsnapdKilledMidway) {
  constexpr std::uint64_t kSize = 16ULL << 20;
  const std::string gate = dir_ + "/gate";
  fs::create_directory(gate);
  ::setenv("MEMSNAP_GATE_DIR", gate.c_str(), 1);
  const int memfd = pattern_memfd(kSize);
  ASSERT_GE(memfd, 0);
  const std::string out = dir_ + "/outlived.snap";

  const pid_t memsnapd = ::fork();
  ASSERT_GE(memsnapd, 0);
  if (memsnapd == 0) {
    // "memsnapd": starts the export, waits until it is half way, and dies without a word.
    auto loaded =
        registry_.load_file(std::string(MEMSNAP_GATED_PLUGIN_DIR) + "/memsnap_gated_punch.so");
    if (!loaded.ok()) ::_exit(10);
    auto started =
        core_pipeline().start_export(registry_, request(memfd, kSize, "gated_punch", out), nullptr);
    if (!started.ok()) ::_exit(11);
    ::close(memfd);
    if (!eventually([&] { return fs::exists(gate + "/waiting"); })) ::_exit(12);
    if ((*started)->status().state != ExportState::kRunning) ::_exit(13);
    ::kill(::getpid(), SIGKILL);
    ::_exit(14);
  }
  ::close(memfd);
  ::unsetenv("MEMSNAP_GATE_DIR");
  int status = 0;
  ASSERT_EQ(::waitpid(memsnapd, &status, 0), memsnapd);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
      << "the stand-in memsnapd did not get to kill itself: exit "
      << (WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  EXPECT_FALSE(fs::exists(out)) << "committed before the gate opened";

  std::ofstream(gate + "/open").put('\n');
  ASSERT_TRUE(eventually([&] { return fs::exists(out); }))
      << "no snapshot: the export died with memsnapd";
  EXPECT_EQ(mismatches_in(out, kSize), 0);
  // Durable, the exporter exits and the memory goes with it.
  EXPECT_TRUE(eventually([] { return exporters_holding_the_memory().empty(); }));
}

}  // namespace
}  // namespace memsnap::daemon
