// Memory integrity end to end, with real processes, real userfaultfd and real file descriptors:
// for each strategy (and each resume mode), a 256 MiB stand-in VMM is filled, paused into
// generation 1, killed, resumed into a new VMM through the Firecracker UFFD handshake, verified
// page by page, 10% dirtied, paused into generation 2 (a diff), killed, resumed from the chain
// and verified again. Zero mismatches allowed; a corrupted block must be caught.
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/resume.h"
#include "core/snapshot/snapshot_reader.h"
#include "core/vmm_process.h"
#include "tools/cycle/cycle.h"
#include "tools/guest_client/guest_client.h"

namespace memsnap {
namespace {

constexpr std::uint64_t kGuest = 256ULL << 20;

class ResumeE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* dir = std::getenv("MEMSNAP_PLUGIN_DIR");
    ASSERT_NE(dir, nullptr) << "MEMSNAP_PLUGIN_DIR is not set";
    auto loaded = registry_.load_directory(dir);
    ASSERT_TRUE(loaded.ok()) << loaded.error().to_string();
    char templ[] = "/var/tmp/memsnap-resume-e2e-XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  CycleOptions options(const std::string& strategy) const {
    CycleOptions o;
    o.strategy = strategy;
    o.size = kGuest;
    o.dir = dir_;
    o.generations = 2;
    o.dirty_fraction = 0.10;
    o.zero_fraction = 0.05;
    o.discard_pages = 300;  // a balloon gives some back: they must return as zeros
    o.sync = false;         // durability is the pause tests' business; this is about the bytes
    return o;
  }

  // Runs the cycle and checks what every strategy must satisfy. With exact_diff, the generation-2
  // diff must hold about what the guest wrote (tracking armed before the guest ran).
  CycleReport run(const CycleOptions& o, bool exact_diff = true) {
    auto r = run_cycle(registry_, o);
    EXPECT_TRUE(r.ok()) << r.error().to_string();
    if (!r.ok()) return {};
    EXPECT_EQ(r->generations.size(), static_cast<std::size_t>(o.generations));
    for (const auto& g : r->generations) {
      EXPECT_EQ(g.pages, kGuest / 4096) << "generation " << g.generation;
      EXPECT_EQ(g.mismatches, 0u) << "generation " << g.generation << ": " << g.first_mismatch;
      EXPECT_FALSE(g.faults.vmm_gone);
    }
    if (r->generations.size() == 2 && exact_diff) {
      const auto& second = r->generations[1];
      // The diff holds what the guest wrote, not the whole guest: write tracking works (10%
      // dirtied; zero pages the resume installed may be reported too, they cost no data).
      EXPECT_TRUE(second.pause.dirty_set_source.find("written") != std::string::npos)
          << second.pause.dirty_set_source;
      EXPECT_LT(second.pause.data_blocks, kGuest / 4096 / 5)
          << "the generation-2 diff stored more than 20% of the guest";
      EXPECT_GT(second.pause.data_blocks, kGuest / 4096 / 20);
      EXPECT_GT(second.pause.parent_blocks, 0u);
    }
    return std::move(*r);
  }

  PluginRegistry registry_;
  std::string dir_;
};

TEST_F(ResumeE2E, ProcessVmReadvLazyAnonymous4K) {
  const CycleReport r = run(options("process_vm_readv"));
  ASSERT_EQ(r.generations.size(), 2u);
  EXPECT_EQ(r.backing, "anon");
  for (const auto& g : r.generations) {
    EXPECT_EQ(g.resume.mode, ResumeMode::kLazy);
    EXPECT_TRUE(g.resume.write_tracking) << g.resume.write_tracking_reason;
    // Every page was touched by the verify, and came through a fault.
    EXPECT_EQ(g.faults.copies + g.faults.zeropages, kGuest / 4096);
  }
}

TEST_F(ResumeE2E, ProcessVmReadvLazyAnonymousTransparentHugePages) {
  CycleOptions o = options("process_vm_readv");
  o.thp = true;
  const CycleReport r = run(o);
  // The first VMM's memory is in 2 MiB pages when the kernel allows THP at all (madvise or
  // always); the resumed VMMs get 4 KiB pages from UFFDIO_COPY, which the verify covers.
  const std::string setting = thp_setting("enabled");
  if (setting != "never" && !setting.empty()) {
    EXPECT_TRUE(r.thp_used) << "THP is " << setting << " but the stand-in got no huge pages";
  } else {
    std::printf("note: THP is off on this machine; the THP variant ran on 4 KiB pages\n");
  }
}

// memfd guests get 2 MiB pages only when shmem THP is allowed
// (/sys/kernel/mm/transparent_hugepage/shmem_enabled). Debian's default is "never"; as root this
// sets "advise" (huge pages only where a process asks with MADV_HUGEPAGE, as the stand-in does) for
// the test's duration and puts the old value back. ctest runs the tests one at a time.
class ShmemThpAllowed {
 public:
  ShmemThpAllowed() {
    const std::string now = thp_setting("shmem_enabled");
    for (const char* allowed : {"always", "within_size", "advise", "force"}) {
      if (now == allowed) {
        usable_ = true;
        return;
      }
    }
    if (write("advise") && thp_setting("shmem_enabled") == "advise") {
      restore_ = now;
      usable_ = true;
    } else {
      why_not_ = "shmem THP is '" + now + "' and cannot be set to 'advise' (not root?)";
    }
  }
  ~ShmemThpAllowed() {
    if (!restore_.empty()) write(restore_);
  }
  bool usable() const { return usable_; }
  const std::string& why_not() const { return why_not_; }

 private:
  static constexpr const char* kPath = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
  static bool write(const std::string& value) {
    std::ofstream out(kPath);
    out << value;
    out.flush();
    return static_cast<bool>(out);
  }
  bool usable_ = false;
  std::string restore_;
  std::string why_not_;
};

// A memfd guest in 2 MiB pages, paused and resumed warm twice with write tracking: every page
// intact, the diff still exact. Armed write protection maps the guest in 4 KiB pages again.
TEST_F(ResumeE2E, MemfdWarmTransparentHugePages) {
  ShmemThpAllowed thp;
  if (!thp.usable()) GTEST_SKIP() << thp.why_not();
  CycleOptions o = options("memfd");
  o.thp = true;
  o.arm_tracking_before_ready = true;
  const CycleReport r = run(o);
  EXPECT_TRUE(r.thp_used) << "shmem THP is allowed but the stand-in's memfd got no huge pages";
  ASSERT_EQ(r.generations.size(), 2u);
  for (const auto& g : r.generations) {
    EXPECT_EQ(g.resume.mode, ResumeMode::kWarm) << g.resume.mode_reason;
    EXPECT_EQ(g.faults.copies, 0u) << "a warm resume copies nothing";
  }
}

// Without write tracking a warm resume gives the guest its huge pages back (the kept memfd still
// holds them; the resumed VMM asks for THP too). docs/resume.md states this trade-off.
TEST_F(ResumeE2E, MemfdWarmWithoutTrackingKeepsHugePages) {
  ShmemThpAllowed thp;
  if (!thp.usable()) GTEST_SKIP() << thp.why_not();
  CycleOptions o = options("memfd");
  o.thp = true;
  o.discard_pages = 0;  // a discard splits the huge page it falls in
  o.track_writes = o.vmm_supports_wp_async = false;
  const CycleReport r = run(o, /*exact_diff=*/false);
  ASSERT_TRUE(r.thp_used);
  ASSERT_EQ(r.generations.size(), 2u);
  for (const auto& g : r.generations) {
    EXPECT_EQ(g.resume.mode, ResumeMode::kWarm) << g.resume.mode_reason;
    EXPECT_GE(g.huge_bytes, kGuest / 2) << "generation " << g.generation;
  }
}

// hole_punch on a memfd guest in 2 MiB pages: the punches free whole huge pages, the cold
// background fill brings every byte back.
TEST_F(ResumeE2E, HolePunchTransparentHugePages) {
  ShmemThpAllowed thp;
  if (!thp.usable()) GTEST_SKIP() << thp.why_not();
  CycleOptions o = options("hole_punch");
  o.thp = true;
  const CycleReport r = run(o);
  EXPECT_TRUE(r.thp_used) << "shmem THP is allowed but the stand-in's memfd got no huge pages";
  ASSERT_EQ(r.generations.size(), 2u);
  for (const auto& g : r.generations) {
    EXPECT_EQ(g.resume.mode, ResumeMode::kBackground) << g.resume.mode_reason;
    EXPECT_GT(g.pause.export_stats.bytes_released, 0u);
  }
}

TEST_F(ResumeE2E, MemfdWarmHandsTheKeptMemfdBack) {
  CycleOptions o = options("memfd");
  o.arm_tracking_before_ready = true;
  const CycleReport r = run(o);
  ASSERT_EQ(r.generations.size(), 2u);
  for (const auto& g : r.generations) {
    EXPECT_TRUE(g.retained_memfd);
    EXPECT_EQ(g.resume.mode, ResumeMode::kWarm) << g.resume.mode_reason;
    EXPECT_EQ(g.faults.copies, 0u) << "a warm resume copies nothing";
    EXPECT_EQ(g.faults.continues, 0u);
  }
}

// The default: tracking on the handed-over memfd is armed by memsnap while the guest already runs
// (here: verifies every page at once). Pages touched before their turn count as dirty, so the
// diff may be larger, but no write may be missed: generation 2 still verifies byte for byte.
TEST_F(ResumeE2E, MemfdWarmArmsWriteTrackingWhileTheGuestRuns) {
  const CycleReport r = run(options("memfd"), /*exact_diff=*/false);
  ASSERT_EQ(r.generations.size(), 2u);
  for (const auto& g : r.generations) {
    EXPECT_EQ(g.resume.mode, ResumeMode::kWarm) << g.resume.mode_reason;
    EXPECT_TRUE(g.resume.write_tracking) << g.resume.write_tracking_reason;
    EXPECT_TRUE(g.resume.tracking_armed_in_background);
  }
  const auto& second = r.generations[1];
  EXPECT_NE(second.pause.dirty_set_source.find("written"), std::string::npos)
      << second.pause.dirty_set_source;
  // At least what the guest wrote (10%) is in the diff.
  EXPECT_GT(second.pause.data_blocks, kGuest / 4096 / 20);
}

// The race that matters: the guest writes at once, while memsnap is still arming. A write that
// lands before its page is armed must be reported by the arm itself, or generation 2 loses it.
TEST_F(ResumeE2E, MemfdWarmWritesDuringTheArmAreNotLost) {
  CycleOptions o = options("memfd");
  o.dirty_first = true;
  o.generations = 3;  // the second resume is warm too, with a chain of three
  const CycleReport r = run(o, /*exact_diff=*/false);
  ASSERT_EQ(r.generations.size(), 3u);
  for (const auto& g : r.generations) {
    EXPECT_EQ(g.resume.mode, ResumeMode::kWarm) << g.resume.mode_reason;
    EXPECT_TRUE(g.resume.tracking_armed_in_background);
  }
}

TEST_F(ResumeE2E, MemfdColdBackgroundFillWithMinorFaults) {
  CycleOptions o = options("memfd");
  o.mode = ResumeMode::kBackground;
  const CycleReport r = run(o);
  for (const auto& g : r.generations) {
    EXPECT_EQ(g.resume.mode, ResumeMode::kBackground);
    EXPECT_GT(g.faults.filled_bytes, 0u);
    EXPECT_GT(g.faults.continues + g.faults.copies, 0u);
  }
}

TEST_F(ResumeE2E, MemfdColdEagerFill) {
  CycleOptions o = options("memfd");
  o.mode = ResumeMode::kEager;
  o.arm_tracking_before_ready = true;
  const CycleReport r = run(o);
  for (const auto& g : r.generations) {
    EXPECT_EQ(g.resume.mode, ResumeMode::kEager);
    EXPECT_GT(g.resume.eager_bytes, kGuest / 2);
    EXPECT_EQ(g.faults.copies, 0u);
  }
}

TEST_F(ResumeE2E, MemfdLazy) {
  CycleOptions o = options("memfd");
  o.mode = ResumeMode::kLazy;
  const CycleReport r = run(o);
  for (const auto& g : r.generations) {
    EXPECT_EQ(g.resume.mode, ResumeMode::kLazy);
    EXPECT_EQ(g.faults.copies + g.faults.zeropages, kGuest / 4096);
  }
}

TEST_F(ResumeE2E, HolePunchIsAlwaysCold) {
  const CycleReport r = run(options("hole_punch"));
  ASSERT_EQ(r.generations.size(), 2u);
  for (const auto& g : r.generations) {
    EXPECT_FALSE(g.retained_memfd);
    EXPECT_EQ(g.resume.mode, ResumeMode::kBackground) << g.resume.mode_reason;
    EXPECT_GT(g.pause.export_stats.bytes_released, 0u);
  }
}

TEST_F(ResumeE2E, WithoutWpAsyncTheDiffFallsBackToEveryPopulatedPageAndSaysSo) {
  for (const char* strategy : {"process_vm_readv", "memfd"}) {
    SCOPED_TRACE(strategy);
    CycleOptions o = options(strategy);
    o.vmm_supports_wp_async = false;  // a VMM whose userfaultfd has no WP_ASYNC
    if (std::string(strategy) == "memfd") o.mode = ResumeMode::kBackground;
    auto r = run_cycle(registry_, o);
    ASSERT_TRUE(r.ok()) << r.error().to_string();
    ASSERT_EQ(r->generations.size(), 2u);
    for (const auto& g : r->generations) {
      EXPECT_EQ(g.mismatches, 0u) << g.first_mismatch;
      EXPECT_FALSE(g.resume.write_tracking);
      EXPECT_FALSE(g.resume.write_tracking_reason.empty());
    }
    const PauseReport& second = r->generations[1].pause;
    EXPECT_NE(second.dirty_set_source.find("every populated page"), std::string::npos)
        << second.dirty_set_source;
    EXPECT_NE(second.dirty_set_source.find("WP_ASYNC"), std::string::npos)
        << "the fallback must say why: " << second.dirty_set_source;
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
}

// Flips one byte inside the first DATA block of a snapshot.
void corrupt_first_data_block(const std::string& path) {
  auto reader = SnapshotReader::open(path, Verify::kHeaderAndMap);
  ASSERT_TRUE(reader.ok()) << reader.error().to_string();
  std::uint64_t offset = 0;
  bool found = false;
  for (const MapRun& run : (*reader)->runs()) {
    if (run.kind == RunKind::kData) {
      offset = (*reader)->header().data_offset + run.data_offset + 100;
      found = true;
      break;
    }
  }
  ASSERT_TRUE(found);
  reader->reset();
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  unsigned char byte = 0;
  ASSERT_EQ(::pread(fd, &byte, 1, static_cast<off_t>(offset)), 1);
  byte ^= 0x01;
  ASSERT_EQ(::pwrite(fd, &byte, 1, static_cast<off_t>(offset)), 1);
  ::close(fd);
}

TEST_F(ResumeE2E, CorruptedBlockIsRefusedByTheChecksum) {
  CycleOptions o = options("process_vm_readv");
  o.before_resume = [](int generation, const std::vector<std::string>& chain) {
    if (generation == 2) corrupt_first_data_block(chain.back());
  };
  auto r = run_cycle(registry_, o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::kSnapshotChecksumMismatch) << r.error().to_string();
}

TEST_F(ResumeE2E, CorruptedBlockIsCaughtByTheGuestWithoutChecksums) {
  // Without checksum verification the corrupted byte reaches the guest: the page check must see
  // exactly that one page.
  for (const char* strategy : {"process_vm_readv", "memfd"}) {
    SCOPED_TRACE(strategy);
    CycleOptions o = options(strategy);
    o.verify_checksums = false;
    if (std::string(strategy) == "memfd") o.mode = ResumeMode::kBackground;
    o.before_resume = [](int generation, const std::vector<std::string>& chain) {
      if (generation == 2) corrupt_first_data_block(chain.back());
    };
    auto r = run_cycle(registry_, o);
    ASSERT_TRUE(r.ok()) << r.error().to_string();
    ASSERT_EQ(r->generations.size(), 2u);
    EXPECT_EQ(r->generations[0].mismatches, 0u);
    EXPECT_EQ(r->generations[1].mismatches, 1u) << r->generations[1].first_mismatch;
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
}

// ---- A VMM that misbehaves after its handshake (memsnap-guest --ack, --stray-page) ----

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

constexpr std::uint64_t kSmallGuest = 16ULL << 20;

class MisbehavingVmm : public ResumeE2E {
 protected:
  // A guest paused into one snapshot by `strategy`, its VMM gone; for memfd, the memfd kept for a
  // warm resume, as memsnapd keeps it.
  void pause_one(const std::string& strategy, const std::string& backing) {
    GuestOptions go;
    go.size = kSmallGuest;
    go.backing = backing;
    go.seed = 5;
    auto guest = GuestProcess::spawn(go);
    ASSERT_TRUE(guest.ok()) << guest.error().to_string();
    io::UniqueFd memfd;
    if (backing == "memfd") {
      auto taken = take_fd_of_process((*guest)->pid(), (*guest)->memfd_number());
      ASSERT_TRUE(taken.ok()) << taken.error().to_string();
      memfd.reset(*taken);
    }
    PauseRequest req;
    req.pid = (*guest)->pid();
    req.regions = (*guest)->regions();
    req.memfd = memfd.get();
    req.guest_size = kSmallGuest;
    req.strategy = strategy;
    req.freeze = true;
    req.stay_frozen = true;
    req.sync = false;
    req.out_path = dir_ + "/generation-1.snap";
    auto paused = pause(registry_, req);
    ASSERT_TRUE(paused.ok()) << paused.error().to_string();
    snapshot_ = req.out_path;
    if (memfd.get() >= 0) {
      retained_.memfd.reset(::dup(memfd.get()));
      retained_.snapshot_id = paused->snapshot_id;
      retained_.generation = paused->generation;
      retained_.guest_size = kSmallGuest;
    }
    expected_ = (*guest)->expected_generations();
    (*guest)->kill();
  }

  ResumeRequest request(const std::string& strategy, const std::string& socket_name) {
    ResumeRequest rr;
    rr.chain = {snapshot_};
    rr.socket_path = dir_ + "/" + socket_name;
    rr.strategy = strategy;
    rr.retained = &retained_;
    rr.verify_checksums = false;
    return rr;
  }

  GuestOptions resumed_vmm(const ResumeRequest& rr, const std::string& backing) const {
    GuestOptions go;
    go.size = kSmallGuest;
    go.backing = backing;
    go.seed = 5;
    go.handshake_socket = rr.socket_path;
    go.no_fill = true;
    go.expect = expected_;
    go.accept_memfd = true;
    return go;
  }

  // After a failed hand-over: the kept memfd no longer counts as the snapshot, a warm resume is
  // refused, and the strategy's own choice (cold, from the chain) restores every page.
  void expect_next_resume_is_cold_and_whole() {
    EXPECT_LT(retained_.memfd.get(), 0) << "the memfd a failed VMM was handed is still kept";
    EXPECT_TRUE(retained_.snapshot_id.empty()) << retained_.snapshot_id;
    ResumeRequest warm = request("memfd", "warm-again.sock");
    warm.mode = ResumeMode::kWarm;
    auto refused = ResumeSession::prepare(registry_, std::move(warm));
    ASSERT_FALSE(refused.ok()) << "a warm resume from memory a failed VMM held was accepted";
    EXPECT_EQ(refused.error().code, Errc::kGenerationMismatch) << refused.error().to_string();

    ResumeRequest cold = request("memfd", "cold.sock");
    std::unique_ptr<GuestProcess> vmm;
    auto session = ResumeSession::prepare(registry_, cold);
    ASSERT_TRUE(session.ok()) << session.error().to_string();
    EXPECT_EQ((*session)->report().mode, ResumeMode::kBackground)
        << (*session)->report().mode_reason;
    auto spawned = GuestProcess::spawn(resumed_vmm(cold, "memfd"));
    ASSERT_TRUE(spawned.ok()) << spawned.error().to_string();
    vmm = std::move(*spawned);
    ASSERT_TRUE((*session)->accept_and_serve().ok());
    ASSERT_TRUE(vmm->wait_ready(std::chrono::seconds(30)).ok());
    auto bad = vmm->verify();
    ASSERT_TRUE(bad.ok()) << bad.error().to_string();
    EXPECT_EQ(*bad, 0u);
    vmm.reset();
  }

  std::string snapshot_;
  RetainedMemory retained_;
  std::vector<std::uint32_t> expected_;
};

// A VMM handed the kept memfd answers with a wrong ack: the resume fails, and that VMM, which
// maps the memfd and whose memory nobody will serve, is ended at once (it used to keep running,
// and the kept memfd it may have written stayed marked as the snapshot for the next warm resume).
TEST_F(MisbehavingVmm, AWrongAckEndsTheVmmAndTheKeptMemfdIsNoLongerTheSnapshot) {
  ASSERT_NO_FATAL_FAILURE(pause_one("memfd", "memfd"));
  ASSERT_GE(retained_.memfd.get(), 0);
  std::unique_ptr<GuestProcess> vmm;  // destroyed after the session
  ResumeRequest rr = request("memfd", "bad-ack.sock");
  auto session = ResumeSession::prepare(registry_, rr);
  ASSERT_TRUE(session.ok()) << session.error().to_string();
  ASSERT_EQ((*session)->report().mode, ResumeMode::kWarm) << (*session)->report().mode_reason;
  GuestOptions go = resumed_vmm(rr, "memfd");
  go.ack = "bad";
  auto spawned = GuestProcess::spawn(go);
  ASSERT_TRUE(spawned.ok()) << spawned.error().to_string();
  vmm = std::move(*spawned);
  const Status served = (*session)->accept_and_serve();
  ASSERT_FALSE(served.ok());
  EXPECT_NE(served.error().message.find("ended"), std::string::npos) << served.error().to_string();
  EXPECT_TRUE(ends_within(vmm->pid(), std::chrono::seconds(5)))
      << "the VMM whose hand-over failed still runs";
  EXPECT_TRUE((*session)->vmm_ended());
  expect_next_resume_is_cold_and_whole();
}

// The same when the ack never comes (within ResumeRequest::ack_timeout).
TEST_F(MisbehavingVmm, ALateAckEndsTheVmmAndTheKeptMemfdIsNoLongerTheSnapshot) {
  ASSERT_NO_FATAL_FAILURE(pause_one("memfd", "memfd"));
  std::unique_ptr<GuestProcess> vmm;
  ResumeRequest rr = request("memfd", "late-ack.sock");
  rr.ack_timeout = std::chrono::milliseconds(300);
  auto session = ResumeSession::prepare(registry_, rr);
  ASSERT_TRUE(session.ok()) << session.error().to_string();
  ASSERT_EQ((*session)->report().mode, ResumeMode::kWarm);
  GuestOptions go = resumed_vmm(rr, "memfd");
  go.ack = "none";
  auto spawned = GuestProcess::spawn(go);
  ASSERT_TRUE(spawned.ok()) << spawned.error().to_string();
  vmm = std::move(*spawned);
  const Status served = (*session)->accept_and_serve();
  ASSERT_FALSE(served.ok());
  EXPECT_EQ(served.error().code, Errc::kHandshakeTimeout) << served.error().to_string();
  EXPECT_TRUE(ends_within(vmm->pid(), std::chrono::seconds(5)))
      << "the VMM that never acked still runs";
  expect_next_resume_is_cold_and_whole();
}

// The fault server stops on an error while the VMM runs (here: a fault outside every region the
// VMM announced). The VMM could only hang on its next fault: it is ended, and the session says
// why.
TEST_F(MisbehavingVmm, AFaultServerErrorEndsTheVmmInsteadOfLeavingItHanging) {
  ASSERT_NO_FATAL_FAILURE(pause_one("process_vm_readv", "anon"));
  std::unique_ptr<GuestProcess> vmm;
  ResumeRequest rr = request("process_vm_readv", "stray.sock");
  auto session = ResumeSession::prepare(registry_, rr);
  ASSERT_TRUE(session.ok()) << session.error().to_string();
  GuestOptions go = resumed_vmm(rr, "anon");
  go.stray_page = true;
  auto spawned = GuestProcess::spawn(go);
  ASSERT_TRUE(spawned.ok()) << spawned.error().to_string();
  vmm = std::move(*spawned);
  ASSERT_TRUE((*session)->accept_and_serve().ok());
  ASSERT_TRUE(vmm->wait_ready(std::chrono::seconds(30)).ok());
  ASSERT_EQ((*session)->report().mode, ResumeMode::kLazy);
  auto touching = vmm->command("touch-stray");
  ASSERT_TRUE(touching.ok()) << touching.error().to_string();
  ASSERT_EQ((*touching).value("touching", false), true) << touching->dump();
  EXPECT_TRUE(ends_within(vmm->pid(), std::chrono::seconds(5)))
      << "the VMM hangs on a fault nobody serves";
  EXPECT_FALSE((*session)->serve_error().ok());
  EXPECT_TRUE((*session)->vmm_ended());
  EXPECT_FALSE((*session)->vmm_running());
}

}  // namespace
}  // namespace memsnap
