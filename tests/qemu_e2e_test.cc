// A real Linux guest under QEMU (TCG), paused and resumed with every strategy, twice (the second
// pause a diff); the guest itself verifies every page of its test memory after each resume
// (tools/qemu-guest). A damaged snapshot is refused before any QEMU starts, and the guest's
// check is shown to fail when its memory is damaged behind the checksums' back.
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "core/snapshot/snapshot_chain.h"
#include "core/vmm_pause.h"
#include "tools/qemu/qemu_cycle.h"

namespace memsnap::qemu {
namespace {

namespace fs = std::filesystem;

class QemuE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(std::string(MEMSNAP_GUEST_DIR) + "/vmlinux")) {
      GTEST_FAIL() << "no guest image in " << MEMSNAP_GUEST_DIR
                   << " (the memsnap_qemu_guest target builds it)";
    }
    char templ[] = "/var/tmp/memsnap-qemu-test-XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
    const char* plugins = std::getenv("MEMSNAP_PLUGIN_DIR");
    ASSERT_NE(plugins, nullptr);
    ASSERT_TRUE(registry_.load_directory(plugins).ok());
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }

  Machine machine(bool memsnap_owns_ram) const {
    Machine m;
    m.kernel = std::string(MEMSNAP_GUEST_DIR) + "/vmlinux";
    m.initrd = std::string(MEMSNAP_GUEST_DIR) + "/initramfs.cpio.gz";
    m.memory_bytes = 256ULL << 20;
    m.memsnap_owns_ram = memsnap_owns_ram;
    m.work_dir = dir_;
    m.append = default_append("memsnap.mib=32 memsnap.dirty_pct=10 memsnap.interval_ms=200");
    return m;
  }

  // Boots a guest and waits for its first intact round.
  std::unique_ptr<QemuVm> boot(bool memsnap_owns_ram, CheckLine* ready) {
    io::UniqueFd ram;
    if (memsnap_owns_ram) {
      auto fd = create_guest_ram(256ULL << 20);
      EXPECT_TRUE(fd.ok());
      if (!fd.ok()) return nullptr;
      ram = std::move(*fd);
    }
    auto vm = QemuVm::start(machine(memsnap_owns_ram), std::move(ram), false);
    EXPECT_TRUE(vm.ok()) << vm.error().to_string();
    if (!vm.ok()) return nullptr;
    auto ok = wait_for_ok_rounds(**vm, 0, 1, std::chrono::seconds(90), nullptr);
    EXPECT_TRUE(ok.ok()) << ok.error().to_string();
    if (!ok.ok()) return nullptr;
    for (const std::string& line : (*vm)->console_lines()) {
      const CheckLine c = parse_check_line(line);
      if (c.kind == CheckLine::Kind::kReady && ready != nullptr) *ready = c;
    }
    return std::move(*vm);
  }

  std::string pause_and_damage(std::uint64_t at);

  std::string dir_;
  PluginRegistry registry_;
};

struct Case {
  const char* strategy;
  bool memsnap_owns_ram;
  const char* first_resume_mode;
  bool handover = false;  // answered at the handover; QEMU ended; the export in the background
};

class QemuStrategyTest : public QemuE2eTest, public ::testing::WithParamInterface<Case> {};

TEST_P(QemuStrategyTest, TwoPausesAndResumesAndTheGuestFindsItsMemoryIntact) {
  const Case c = GetParam();
  CycleOptions o;
  o.machine = machine(c.memsnap_owns_ram);
  o.strategy = c.strategy;
  o.generations = 2;
  o.dir = dir_;
  o.sync = false;
  o.handover = c.handover;
  auto r = run_cycle(registry_, o);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  ASSERT_EQ(r->generations.size(), 2u);
  for (const GenerationReport& g : r->generations) {
    SCOPED_TRACE("generation " + std::to_string(g.generation));
    EXPECT_EQ(g.pause.memory.strategy, c.strategy)
        << "it fell back: " << g.pause.memory.fallback_reason;
    EXPECT_TRUE(g.bad_lines.empty()) << g.bad_lines.front();
    // The guest went on from where it was paused (no reboot: no new "ready"), checked every
    // page, and kept writing.
    EXPECT_GT(g.round_after, g.round_before);
    EXPECT_GT(g.gens_after, g.gens_before);
    EXPECT_GT(g.pause.device_state_bytes, 0u);
    EXPECT_LT(g.pause.device_state_bytes, 4u << 20) << "RAM went into the device state";
    // A handover answers before the export: the answer is part of the durable time.
    EXPECT_GT(g.pause.handover_seconds, 0);
    EXPECT_LE(g.pause.handover_seconds, g.pause.wall_seconds);
  }
  const GenerationReport& first = r->generations[0];
  const GenerationReport& second = r->generations[1];
  EXPECT_EQ(first.resume_mode, c.first_resume_mode) << first.resume_reason;
  EXPECT_TRUE(first.pause.memory.parent_id.empty());
  EXPECT_EQ(second.pause.memory.parent_id, first.pause.memory.snapshot_id);
  EXPECT_EQ(second.pause.memory.dirty_set_source, "content compared with the parent chain");
  // The diff holds what the guest changed, not the whole guest.
  EXPECT_GT(second.pause.memory.data_bytes, 0u);
  EXPECT_LT(second.pause.memory.data_bytes, first.pause.memory.data_bytes);
  EXPECT_TRUE(r->intact());
}

INSTANTIATE_TEST_SUITE_P(Strategies, QemuStrategyTest,
                         ::testing::Values(Case{"process_vm_readv", false, "write"},
                                           Case{"memfd", true, "warm"},
                                           Case{"hole_punch", true, "fill"},
                                           Case{"memfd", true, "warm", true},
                                           Case{"hole_punch", true, "fill", true}),
                         [](const ::testing::TestParamInfo<Case>& param_info) {
                           return std::string(param_info.param.strategy) +
                                  (param_info.param.handover ? "_handover" : "");
                         });

// Counts the VMMs a resume starts.
class CountingLauncher final : public VmmLauncher {
 public:
  explicit CountingLauncher(Machine m) : inner_(std::move(m)) {}
  bool memsnap_owns_ram() const noexcept override { return inner_.memsnap_owns_ram(); }
  std::uint64_t guest_size() const noexcept override { return inner_.guest_size(); }
  Result<std::unique_ptr<VmmAdapter>> start_incoming(io::UniqueFd ram) override {
    ++starts;
    return inner_.start_incoming(std::move(ram));
  }
  int starts = 0;

 private:
  Launcher inner_;
};

// Flips one byte of the guest block at guest_offset in the snapshot file (its DATA run).
void flip_byte(const std::string& snapshot, std::uint64_t guest_offset) {
  auto chain = SnapshotChain::open({snapshot}, Verify::kHeaderAndMap);
  ASSERT_TRUE(chain.ok()) << chain.error().to_string();
  for (const ChainExtent& x : chain->flatten()) {
    const std::uint64_t bs = chain->block_size();
    if (x.kind != RunKind::kData || guest_offset < x.first_block * bs ||
        guest_offset >= (x.first_block + x.block_count) * bs) {
      continue;
    }
    const std::uint64_t at = x.file_offset + (guest_offset - x.first_block * bs);
    io::UniqueFd fd(::open(snapshot.c_str(), O_RDWR | O_CLOEXEC));
    ASSERT_GE(fd.get(), 0);
    unsigned char b = 0;
    ASSERT_EQ(::pread(fd.get(), &b, 1, static_cast<off_t>(at)), 1);
    b ^= 0x5a;
    ASSERT_EQ(::pwrite(fd.get(), &b, 1, static_cast<off_t>(at)), 1);
    return;
  }
  FAIL() << "guest offset " << guest_offset << " is not in a DATA run of " << snapshot;
}

// Boots a guest, pauses it with memfd into generation-1.snap, ends it, and flips one byte of the
// guest's checked page 0 (at offset `at` in it) in the snapshot. Returns the snapshot's path.
std::string QemuE2eTest::pause_and_damage(std::uint64_t at) {
  CheckLine ready;
  auto vm = boot(true, &ready);
  EXPECT_NE(vm, nullptr);
  if (vm == nullptr) return "";
  VmmPauseRequest p;
  p.out_path = dir_ + "/generation-1.snap";
  p.strategy = "memfd";
  p.sync = false;
  auto paused = pause_vmm(registry_, *vm, p);
  EXPECT_TRUE(paused.ok()) << paused.error().to_string();
  vm->terminate();
  EXPECT_GT(ready.first_pfn, 0u) << "the guest did not say where its checked memory is";
  if (!paused.ok() || ready.first_pfn == 0) return "";
  flip_byte(p.out_path, ready.first_pfn * 4096 + at);
  return p.out_path;
}

TEST_F(QemuE2eTest, ADamagedSnapshotIsRefusedBeforeAnyGuestRuns) {
  const std::string snapshot = pause_and_damage(0);
  ASSERT_FALSE(snapshot.empty());

  CountingLauncher launcher(machine(true));
  VmmResumeRequest r;
  r.chain = {snapshot};
  r.strategy = "memfd";
  auto resumed = resume_vmm(registry_, launcher, r);
  ASSERT_FALSE(resumed.ok()) << "a damaged snapshot was resumed";
  EXPECT_EQ(resumed.error().code, Errc::kSnapshotChecksumMismatch) << resumed.error().to_string();
  EXPECT_EQ(launcher.starts, 0) << "a QEMU was started for a damaged snapshot";
}

// The guest's own check is not a formality: the same damage, let through by skipping the
// checksums, is reported by the guest as a BAD page.
TEST_F(QemuE2eTest, TheGuestReportsDamageThatGetsPastTheChecksums) {
  const std::string snapshot = pause_and_damage(100);
  ASSERT_FALSE(snapshot.empty());
  Launcher launcher(machine(true));
  VmmResumeRequest r;
  r.chain = {snapshot};
  r.strategy = "memfd";
  r.verify = Verify::kHeaderAndMap;
  auto resumed = resume_vmm(registry_, launcher, r);
  ASSERT_TRUE(resumed.ok()) << resumed.error().to_string();
  auto* qemu = static_cast<QemuVm*>(resumed->vmm.get());
  std::vector<std::string> bad;
  auto line = wait_for_ok_rounds(*qemu, 0, 2, std::chrono::seconds(60), &bad);
  ASSERT_TRUE(line.ok()) << line.error().to_string();
  EXPECT_EQ(line->kind, CheckLine::Kind::kBad) << "the guest did not notice: " << line->text;
  ASSERT_FALSE(bad.empty());
}

}  // namespace
}  // namespace memsnap::qemu
