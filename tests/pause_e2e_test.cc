// End to end: a real child process (memsnap-guest) holds 64 MiB of guest memory with a known
// pattern; each strategy, loaded as a plugin, pauses it into a base snapshot, the child dirties
// 10% of its pages, the strategy pauses a diff on top, and the chain is read back and every page
// compared with what the child wrote.
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/pattern/pattern.h"
#include "core/pause.h"
#include "core/snapshot/snapshot_chain.h"
#include "core/vmm_process.h"
#include "tests/unmapped_address.h"
#include "tools/guest_client/guest_client.h"

namespace memsnap {
namespace {

constexpr std::uint64_t kGuest = 64ULL << 20;


// ctest sets MEMSNAP_PLUGIN_DIR; run by hand, the test finds the build's plugins itself.
std::string plugin_dir() {
  if (const char* dir = std::getenv("MEMSNAP_PLUGIN_DIR")) return dir;
  const auto self = std::filesystem::read_symlink("/proc/self/exe");
  return (self.parent_path().parent_path() / "lib" / "memsnap" / "plugins").string();
}

class PauseE2ETest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(registry_.load_directory(plugin_dir()).ok());
    for (const auto& name : {"process_vm_readv", "memfd", "hole_punch"}) {
      ASSERT_NE(registry_.find(name), nullptr) << name << " did not load";
    }
    char templ[] = "/var/tmp/memsnap-e2e-XXXXXX";
    ASSERT_NE(mkdtemp(templ), nullptr);
    dir_ = templ;
  }
  void TearDown() override {
    if (memfd_ >= 0) close(memfd_);
    std::filesystem::remove_all(dir_);
  }

  std::unique_ptr<GuestProcess> start_guest(const std::string& backing, int regions = 1,
                                            double zero_fraction = 0.02) {
    GuestOptions o;
    o.size = kGuest;
    o.backing = backing;
    o.regions = regions;
    o.seed = 1234;
    o.zero_fraction = zero_fraction;
    auto g = GuestProcess::spawn(o);
    EXPECT_TRUE(g.ok()) << (g.ok() ? "" : g.error().to_string());
    if (!g.ok()) return nullptr;
    if (backing == "memfd") {
      auto fd = take_fd_of_process((*g)->pid(), (*g)->memfd_number());
      EXPECT_TRUE(fd.ok());
      memfd_ = fd.ok() ? *fd : -1;
    }
    return std::move(g).value();
  }

  PauseRequest request_for(const GuestProcess& g, const std::string& strategy) {
    PauseRequest req;
    req.pid = g.pid();
    req.regions = g.regions();
    req.memfd = memfd_;
    req.strategy = strategy;
    req.freeze = true;
    // A strategy that releases memory needs the VMM to stay stopped after the pause; the tests
    // continue the stand-in themselves where they go on using it (continue_guest).
    const PluginInfo* info = registry_.find(strategy);
    req.stay_frozen = info != nullptr && info->releases_memory();
    req.data_write = data_write_;
    return req;
  }
  static void continue_guest(const GuestProcess& g) { ASSERT_EQ(kill(g.pid(), SIGCONT), 0); }

  // Base, 10% random diff, chain check. Returns the two reports.
  void base_diff_and_check(GuestProcess& g, const std::string& strategy) {
    PauseRequest req = request_for(g, strategy);
    req.out_path = dir_ + "/base.snap";
    auto base = pause(registry_, req);
    ASSERT_TRUE(base.ok()) << base.error().to_string();
    EXPECT_EQ(base->strategy, strategy);
    EXPECT_TRUE(base->fallback_reason.empty());
    EXPECT_GT(base->zero_blocks + base->data_blocks, 0u);

    continue_guest(g);
    auto dirty = g.dirty(0.10, false, 99);
    ASSERT_TRUE(dirty.ok()) << dirty.error().to_string();
    req.dirty = *dirty;
    req.parent_path = req.out_path;
    req.out_path = dir_ + "/diff.snap";
    auto diff = pause(registry_, req);
    ASSERT_TRUE(diff.ok()) << diff.error().to_string();
    EXPECT_EQ(diff->generation, base->generation + 1);
    EXPECT_EQ(diff->parent_id, base->snapshot_id);
    EXPECT_EQ(diff->dirty_bytes, std::uint64_t(std::llround(0.10 * double(kGuest / 4096))) * 4096);
    EXPECT_EQ(diff->data_blocks, diff->dirty_bytes / 4096);  // freshly written pages are never zero

    auto chain = SnapshotChain::open({dir_ + "/base.snap", dir_ + "/diff.snap"}, Verify::kFull);
    ASSERT_TRUE(chain.ok()) << chain.error().to_string();
    auto check = check_chain_against_pattern(*chain, g.seed(), g.expected_generations());
    ASSERT_TRUE(check.ok()) << check.error().to_string();
    EXPECT_EQ(check->pages, kGuest / 4096);
    EXPECT_EQ(check->mismatches, 0u) << check->first_mismatch;
    base_ = *base;
    diff_ = *diff;
  }

  // Issue 18 part 4: a base and a diff written with O_DIRECT (pauses sync by default) check out
  // page by page like buffered ones; /var/tmp takes O_DIRECT, so nothing may fall back.
  void direct_base_and_diff(const std::string& strategy, const std::string& backing) {
    data_write_ = DataWrite::kDirect;
    auto g = start_guest(backing, 2);
    ASSERT_NE(g, nullptr);
    base_diff_and_check(*g, strategy);
    for (const PauseReport* r : {&base_, &diff_}) {
      EXPECT_EQ(r->data_write, "direct");
      EXPECT_EQ(r->data_write_fallback, "");
    }
  }

  PluginRegistry registry_;
  std::string dir_;
  int memfd_ = -1;
  DataWrite data_write_ = DataWrite::kBuffered;
  PauseReport base_, diff_;
};

TEST_F(PauseE2ETest, DirectDataWritesProcessVmReadv) {
  direct_base_and_diff("process_vm_readv", "anon");
}
TEST_F(PauseE2ETest, DirectDataWritesMemfd) { direct_base_and_diff("memfd", "memfd"); }
TEST_F(PauseE2ETest, DirectDataWritesHolePunch) { direct_base_and_diff("hole_punch", "memfd"); }

TEST_F(PauseE2ETest, ProcessVmReadvFromAnonymousMemoryInThreeRegions) {
  auto g = start_guest("anon", 3);
  ASSERT_NE(g, nullptr);
  base_diff_and_check(*g, "process_vm_readv");
  // Never-written pages are not populated, so PAGEMAP_SCAN leaves them out of the base.
  EXPECT_LT(base_.dirty_bytes, kGuest);
  EXPECT_EQ(base_.export_stats.bytes_read, base_.dirty_bytes);
  auto mismatches = g->verify();  // the child itself still holds the right memory
  ASSERT_TRUE(mismatches.ok());
  EXPECT_EQ(*mismatches, 0u);
}

TEST_F(PauseE2ETest, MemfdStrategy) {
  auto g = start_guest("memfd", 2);
  ASSERT_NE(g, nullptr);
  base_diff_and_check(*g, "memfd");
  EXPECT_EQ(base_.export_stats.bytes_released, 0u);
  auto mismatches = g->verify();
  ASSERT_TRUE(mismatches.ok());
  EXPECT_EQ(*mismatches, 0u);
}

// Issue 19: a caller watching a pause from another thread (the background exporter) sees the
// dirty set's bytes as the total and the bytes handed to the snapshot grow up to exactly that.
TEST_F(PauseE2ETest, ProgressEndsEqualToTheDirtyBytes) {
  auto g = start_guest("memfd", 1);
  ASSERT_NE(g, nullptr);
  for (const std::string strategy : {"memfd", "process_vm_readv"}) {
    std::atomic<std::uint64_t> done{123};  // reset by the pipeline when its export starts
    std::atomic<std::uint64_t> total{0};
    PauseRequest req = request_for(*g, strategy);
    req.out_path = dir_ + "/progress-" + strategy + ".snap";
    req.progress_bytes = &done;
    req.total_bytes = &total;
    auto r = pause(registry_, req);
    ASSERT_TRUE(r.ok()) << r.error().to_string();
    EXPECT_GT(r->dirty_bytes, kGuest / 2);
    EXPECT_EQ(total.load(), r->dirty_bytes) << strategy;
    EXPECT_EQ(done.load(), r->dirty_bytes) << strategy;
  }
}

TEST_F(PauseE2ETest, HolePunchReleasesTheMemfdsMemory) {
  auto g = start_guest("memfd", 1);
  ASSERT_NE(g, nullptr);
  struct stat before {};
  ASSERT_EQ(fstat(memfd_, &before), 0);
  EXPECT_GE(std::uint64_t(before.st_blocks) * 512, kGuest * 9 / 10);
  base_diff_and_check(*g, "hole_punch");
  struct stat after {};
  ASSERT_EQ(fstat(memfd_, &after), 0);
  // After the base every populated page was punched; after the diff the dirtied pages were
  // too, so nothing of the guest stays resident in the memfd.
  EXPECT_EQ(after.st_blocks, 0) << "memfd still holds " << after.st_blocks * 512 << " bytes";
  EXPECT_GE(base_.export_stats.bytes_released, kGuest * 9 / 10);
  EXPECT_EQ(diff_.export_stats.bytes_released, diff_.dirty_bytes);
}

// Issue 26 item 1: the pipeline's private reopen of the memfd keeps the caller's access mode. A
// read-only fd is never reopened read-write, so hole_punch cannot punch through it.
TEST_F(PauseE2ETest, AReadOnlyMemfdIsNeverReopenedWiderSoHolePunchPunchesNothing) {
  auto g = start_guest("memfd", 1);
  ASSERT_NE(g, nullptr);
  const std::string self = "/proc/self/fd/" + std::to_string(memfd_);
  const int ro = ::open(self.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(ro, 0);
  struct stat before {};
  ASSERT_EQ(fstat(memfd_, &before), 0);
  PauseRequest req = request_for(*g, "hole_punch");
  req.memfd = ro;
  req.out_path = dir_ + "/ro.snap";
  auto r = pause(registry_, req);
  ::close(ro);
  EXPECT_FALSE(r.ok()) << "a read-only memfd was punched";
  struct stat after {};
  ASSERT_EQ(fstat(memfd_, &after), 0);
  EXPECT_EQ(after.st_blocks, before.st_blocks) << "memory was released through a read-only fd";
  EXPECT_FALSE(std::filesystem::exists(req.out_path));
}

// Issue 16 item 11: a region that is not mapped in the VMM is an error, not a snapshot of zeros.
TEST_F(PauseE2ETest, ARegionNotMappedInTheVmmIsAnErrorNotZeros) {
  auto g = start_guest("anon", 1);
  ASSERT_NE(g, nullptr);
  PauseRequest req = request_for(*g, "process_vm_readv");
  const std::uint64_t nowhere = testing::unmapped_address(g->pid(), kGuest);
  ASSERT_NE(nowhere, 0u);
  req.regions = {{0, nowhere, kGuest}};
  req.out_path = dir_ + "/unmapped.snap";
  auto r = pause(registry_, req);
  ASSERT_FALSE(r.ok()) << "exported " << r->data_bytes << " bytes, " << r->zero_blocks
                       << " zero blocks of an unmapped range";
  EXPECT_NE(r.error().message.find("not mapped"), std::string::npos) << r.error().to_string();
  EXPECT_FALSE(std::filesystem::exists(req.out_path));
}

TEST_F(PauseE2ETest, MissingMemfdFallsBackOnlyWhenAllowedAndSaysSo) {
  auto g = start_guest("anon");
  ASSERT_NE(g, nullptr);
  PauseRequest req = request_for(*g, "memfd");
  req.out_path = dir_ + "/fallback.snap";
  auto refused = pause(registry_, req);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, Errc::kUnsupported);
  EXPECT_NE(refused.error().message.find("needs the memfd"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(req.out_path));

  req.allow_fallback = true;
  auto fell_back = pause(registry_, req);
  ASSERT_TRUE(fell_back.ok()) << fell_back.error().to_string();
  EXPECT_EQ(fell_back->requested_strategy, "memfd");
  EXPECT_EQ(fell_back->strategy, "process_vm_readv");
  EXPECT_NE(fell_back->fallback_reason.find("needs the memfd"), std::string::npos);
  EXPECT_EQ(fell_back->fallback, FallbackCause::kMissingMemfd);
  auto chain = SnapshotChain::open({req.out_path}, Verify::kFull);
  ASSERT_TRUE(chain.ok());
  auto check = check_chain_against_pattern(*chain, g->seed(), g->expected_generations());
  ASSERT_TRUE(check.ok());
  EXPECT_EQ(check->mismatches, 0u) << check->first_mismatch;
}

// A pause of the memfd alone (no VMM pid, no regions: a library caller holding only the memfd)
// asking for a strategy that reads the VMM's address space: the fallback reads the memfd, under
// the cause kMissingPid (issue 25 item 4: the cause is real here, and counted as missing_pid).
TEST_F(PauseE2ETest, MissingPidFallsBackToTheMemfdAndSaysSo) {
  auto g = start_guest("memfd");
  ASSERT_NE(g, nullptr);
  PauseRequest req = request_for(*g, "process_vm_readv");
  req.pid = 0;
  req.regions.clear();
  req.freeze = false;
  req.out_path = dir_ + "/no-pid.snap";
  req.fallback_strategy = "memfd";
  req.allow_fallback = true;
  auto fell_back = pause(registry_, req);
  ASSERT_TRUE(fell_back.ok()) << fell_back.error().to_string();
  EXPECT_EQ(fell_back->requested_strategy, "process_vm_readv");
  EXPECT_EQ(fell_back->strategy, "memfd");
  EXPECT_EQ(fell_back->fallback, FallbackCause::kMissingPid);
  EXPECT_NE(fell_back->fallback_reason.find("needs the VMM pid"), std::string::npos)
      << fell_back->fallback_reason;
  auto chain = SnapshotChain::open({req.out_path}, Verify::kFull);
  ASSERT_TRUE(chain.ok());
  auto check = check_chain_against_pattern(*chain, g->seed(), g->expected_generations());
  ASSERT_TRUE(check.ok());
  EXPECT_EQ(check->mismatches, 0u) << check->first_mismatch;
}

TEST_F(PauseE2ETest, VmmGoneIsACleanErrorWithNothingCommitted) {
  auto g = start_guest("anon");
  ASSERT_NE(g, nullptr);
  PauseRequest req = request_for(*g, "process_vm_readv");
  req.freeze = false;
  req.dirty = std::vector<plugin::ByteRange>{{0, kGuest}};
  req.out_path = dir_ + "/gone.snap";
  g->kill();
  auto r = pause(registry_, req);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::kProcessGone) << r.error().to_string();
  EXPECT_FALSE(std::filesystem::exists(req.out_path));
  for (const auto& e : std::filesystem::directory_iterator(dir_))
    ADD_FAILURE() << "left behind: " << e.path();
}

// A plugin that fails half way, after punching what it wrote out of the memfd: without fallback
// the pause fails with nothing committed and the memfd whole again; with fallback the fallback
// strategy exports everything into a fresh snapshot, and the report says what happened.
TEST_F(PauseE2ETest, PluginFailingHalfWayCommitsNothingAndTheFallbackCompletesThePause) {
  auto loaded = registry_.load_file(MEMSNAP_FAULT_PLUGIN);
  ASSERT_TRUE(loaded.ok()) << loaded.error().to_string();
  auto g = start_guest("memfd");
  ASSERT_NE(g, nullptr);
  struct stat before {};
  ASSERT_EQ(fstat(memfd_, &before), 0);

  PauseRequest req = request_for(*g, "fails_half_way");
  req.strategy_options = {{"fail_after_percent", "50"}, {"punch", "true"}};
  req.out_path = dir_ + "/half.snap";
  auto failed = pause(registry_, req);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.error().code, Errc::kExportFailed) << failed.error().to_string();
  EXPECT_NE(failed.error().message.find("injected failure"), std::string::npos);
  EXPECT_NE(failed.error().message.find("written back"), std::string::npos)
      << failed.error().to_string();
  for (const auto& e : std::filesystem::directory_iterator(dir_))
    ADD_FAILURE() << "left behind: " << e.path();
  struct stat after {};
  ASSERT_EQ(fstat(memfd_, &after), 0);
  EXPECT_EQ(after.st_blocks, before.st_blocks) << "the memfd lost memory it had";
  auto intact = g->verify();
  ASSERT_TRUE(intact.ok()) << intact.error().to_string();
  EXPECT_EQ(*intact, 0u);
  // The guest's check reads every page through its shared mapping, which allocates the memfd's
  // holes: count again.
  ASSERT_EQ(fstat(memfd_, &before), 0);

  for (const std::string fallback : {"process_vm_readv", "memfd"}) {
    SCOPED_TRACE(fallback);
    req.allow_fallback = true;
    req.fallback_strategy = fallback;
    req.out_path = dir_ + "/" + fallback + ".snap";
    auto done = pause(registry_, req);
    ASSERT_TRUE(done.ok()) << done.error().to_string();
    EXPECT_EQ(done->requested_strategy, "fails_half_way");
    EXPECT_EQ(done->strategy, fallback);
    EXPECT_EQ(done->fallback, FallbackCause::kStrategyFailed);
    EXPECT_NE(done->fallback_reason.find("failed half way"), std::string::npos)
        << done->fallback_reason;
    EXPECT_EQ(done->export_stats.bytes_released, 0u);  // the fallback's own figures
    auto chain = SnapshotChain::open({req.out_path}, Verify::kFull);
    ASSERT_TRUE(chain.ok()) << chain.error().to_string();
    auto check = check_chain_against_pattern(*chain, g->seed(), g->expected_generations());
    ASSERT_TRUE(check.ok());
    EXPECT_EQ(check->pages, kGuest / 4096);
    EXPECT_EQ(check->mismatches, 0u) << check->first_mismatch;
    ASSERT_EQ(fstat(memfd_, &after), 0);
    EXPECT_EQ(after.st_blocks, before.st_blocks);
  }
  continue_guest(*g);  // the fallbacks' successful pauses left it stopped
  auto still_intact = g->verify();
  ASSERT_TRUE(still_intact.ok());
  EXPECT_EQ(*still_intact, 0u);
}

// Issue 16 item 4: a strategy that releases the guest's memory as it exports it must never leave
// the VMM running on the holes, whoever calls the pipeline: a pause that would continue the VMM
// (freeze without stay_frozen) or never stopped it is refused before anything is touched.
TEST_F(PauseE2ETest, ReleasingStrategyIsRefusedWhenTheVmmWouldRunOn) {
  auto g = start_guest("memfd", 1);
  ASSERT_NE(g, nullptr);
  struct stat before {};
  ASSERT_EQ(fstat(memfd_, &before), 0);
  for (const bool freeze : {true, false}) {
    SCOPED_TRACE(freeze ? "freeze, then continue" : "no freeze");
    PauseRequest req = request_for(*g, "hole_punch");
    req.freeze = freeze;
    req.stay_frozen = false;
    req.out_path = dir_ + "/refused.snap";
    auto r = pause(registry_, req);
    ASSERT_FALSE(r.ok()) << "the pause released memory of a VMM that runs on";
    EXPECT_EQ(r.error().code, Errc::kInvalidArgument) << r.error().to_string();
    EXPECT_NE(r.error().message.find("must stay stopped"), std::string::npos)
        << r.error().to_string();
    EXPECT_FALSE(std::filesystem::exists(req.out_path));
    struct stat after {};
    ASSERT_EQ(fstat(memfd_, &after), 0);
    EXPECT_EQ(after.st_blocks, before.st_blocks) << "memory was released";
    EXPECT_FALSE(tasks_not_stopped(g->pid()).empty()) << "the guest was left stopped";
  }
  // A releasing fallback is not used either when the VMM would run on.
  PauseRequest req = request_for(*g, "memfd");
  req.memfd = -1;  // memfd cannot run: it falls back
  req.stay_frozen = false;
  req.allow_fallback = true;
  req.fallback_strategy = "hole_punch";
  req.out_path = dir_ + "/fallback.snap";
  auto r = pause(registry_, req);
  ASSERT_FALSE(r.ok());
  EXPECT_FALSE(std::filesystem::exists(req.out_path));
  auto intact = g->verify();
  ASSERT_TRUE(intact.ok()) << intact.error().to_string();
  EXPECT_EQ(*intact, 0u);
}

// Issue 16 item 3: a pause that released memory and cannot write it back leaves the VMM stopped
// (a guest running on those holes would read zeros where its data was), says so with its own
// code, and keeps the unfinished snapshot, the only copy, where the message says.
TEST_F(PauseE2ETest, UnrestorableReleasedMemoryLeavesTheVmmStoppedAndTheDataKept) {
  auto loaded = registry_.load_file(MEMSNAP_FAULT_PLUGIN);
  ASSERT_TRUE(loaded.ok()) << loaded.error().to_string();
  auto g = start_guest("memfd");
  ASSERT_NE(g, nullptr);
  // Frozen for the export and meant to stay stopped after a successful pause: a failed pause
  // continues the VMM -- except when the data is at risk.
  PauseRequest req = request_for(*g, "fails_half_way");
  ASSERT_TRUE(req.freeze && req.stay_frozen);
  req.strategy_options = {{"fail_after_percent", "50"}, {"punch", "true"}, {"seal", "true"}};
  req.out_path = dir_ + "/at-risk.snap";
  auto failed = pause(registry_, req);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.error().code, Errc::kDataAtRisk) << failed.error().to_string();
  EXPECT_TRUE(tasks_not_stopped(g->pid()).empty())
      << "the VMM runs on released memory: " << tasks_not_stopped(g->pid()).front().to_string();
  std::string kept;
  for (const auto& e : std::filesystem::directory_iterator(dir_)) {
    if (e.path().extension() != ".recovery") kept = e.path().string();
  }
  ASSERT_FALSE(kept.empty()) << "the only copy of the released memory is gone";
  EXPECT_TRUE(std::filesystem::exists(kept + ".recovery")) << "no recovery journal beside it";
  EXPECT_NE(failed.error().message.find(kept), std::string::npos) << failed.error().to_string();
  g->kill();
}

// A disk that fills up in the middle of a hole-punching pause: the pause fails, nothing is
// committed, and every byte the strategy had already punched out of the memfd is back in it.
TEST_F(PauseE2ETest, DiskFullDuringHolePunchLosesNothing) {
  const std::string small = dir_ + "/small";
  std::filesystem::create_directory(small);
  if (mount("memsnap-test", small.c_str(), "tmpfs", 0, "size=24m") != 0) {
    GTEST_SKIP() << "cannot mount a small tmpfs here (needs root)";
  }
  auto g = start_guest("memfd", 1, 0.0);
  ASSERT_NE(g, nullptr);
  PauseRequest req = request_for(*g, "hole_punch");
  req.out_path = small + "/full.snap";
  auto r = pause(registry_, req);
  EXPECT_FALSE(r.ok());
  if (!r.ok()) {
    EXPECT_NE(r.error().message.find("written back"), std::string::npos) << r.error().to_string();
  }
  EXPECT_FALSE(std::filesystem::exists(req.out_path));
  std::uint64_t leftovers = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(small)) ++leftovers;
  EXPECT_EQ(leftovers, 0u);
  umount2(small.c_str(), MNT_DETACH);
  auto mismatches = g->verify();  // the guest reads its own memory: all of it must be intact
  ASSERT_TRUE(mismatches.ok());
  EXPECT_EQ(*mismatches, 0u);
}

}  // namespace
}  // namespace memsnap
