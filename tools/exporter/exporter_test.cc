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

// A memfd of size bytes filled as above.
int pattern_memfd(std::uint64_t size) {
  const int fd = ::memfd_create("exporter-test-guest", MFD_CLOEXEC);
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
  const int memfd = pattern_memfd(kSize);
  ASSERT_GE(memfd, 0);
  const std::string out = dir_ + "/base.snap";
  Changes changes;
  auto started = core_pipeline().start_export(registry_, request(memfd, kSize, "memfd", out),
                                              changes.callback());
  ::close(memfd);  // the caller may close its own at once: the exporter holds the memory
  ASSERT_TRUE(started.ok()) << started.error().to_string();
  auto& exp = **started;

  const ExportStatus st = exp.wait(kDeadline);
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

  // Nothing to retry or release once durable.
  EXPECT_EQ(exp.retry().error().code, Errc::kInvalidState);
  EXPECT_TRUE(exp.release().ok());
  started->reset();  // joins the watcher: every callback has run
  EXPECT_EQ(changes.states(), std::vector<ExportState>{ExportState::kDurable});
  // Only the snapshot: no temporary file is left beside it.
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir_)) files.push_back(e.path().string());
  EXPECT_EQ(files, std::vector<std::string>{out});
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
  const int memfd = pattern_memfd(kSize);
  ASSERT_GE(memfd, 0);
  const std::string out = mounted_ + "/full.snap";
  Changes changes;
  auto started = core_pipeline().start_export(registry_, request(memfd, kSize, "memfd", out),
                                              changes.callback());
  ::close(memfd);
  ASSERT_TRUE(started.ok()) << started.error().to_string();
  auto& exp = **started;

  ExportStatus st = exp.wait(kDeadline);
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
  EXPECT_EQ(exp.wait(50ms).state, ExportState::kFailed);

  ASSERT_EQ(::mount(nullptr, mounted_.c_str(), nullptr, MS_REMOUNT, "size=64m"), 0)
      << std::strerror(errno);
  ASSERT_TRUE(exp.retry().ok());
  EXPECT_EQ(exp.status().attempts, 2);
  st = exp.wait(kDeadline);
  ASSERT_EQ(st.state, ExportState::kDurable) << (st.error ? st.error->to_string() : "");
  EXPECT_EQ(st.attempts, 2);
  EXPECT_EQ(st.bytes_done, written_bytes(kSize));
  EXPECT_EQ(st.report->dirty_bytes, written_bytes(kSize));
  EXPECT_EQ(mismatches_in(out, kSize), 0);
  EXPECT_EQ(exp.retry().error().code, Errc::kInvalidState);
  started->reset();
  EXPECT_EQ(changes.states(), (std::vector<ExportState>{ExportState::kFailed, ExportState::kRunning,
                                                        ExportState::kDurable}));
}

// A failed export that is released: the exporter exits and lets the memory go; neither retry
// nor release is possible after, and nothing was committed.
TEST_F(ExporterTest, AReleasedFailedExportCommitsNothing) {
  if (!mount_small("4m")) GTEST_SKIP() << "cannot mount a small tmpfs here (needs root)";
  constexpr std::uint64_t kSize = 16ULL << 20;
  const int memfd = pattern_memfd(kSize);
  ASSERT_GE(memfd, 0);
  const std::string out = mounted_ + "/full.snap";
  auto started =
      core_pipeline().start_export(registry_, request(memfd, kSize, "memfd", out), nullptr);
  ::close(memfd);
  ASSERT_TRUE(started.ok()) << started.error().to_string();
  auto& exp = **started;
  ASSERT_EQ(exp.wait(kDeadline).state, ExportState::kFailed);
  ASSERT_TRUE(exp.release().ok());
  EXPECT_EQ(exp.retry().error().code, Errc::kInvalidState);
  EXPECT_TRUE(exp.release().ok());  // nothing more to do
  started->reset();
  EXPECT_FALSE(fs::exists(out));
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
}

}  // namespace
}  // namespace memsnap::daemon
