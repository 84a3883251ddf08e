// A real QEMU microVM round and round: boot, then per generation pause (the first a base, the
// next diffs), end the VM, resume a new one from the chain, and wait for the guest itself to say
// that every page of its test memory is intact (tools/qemu-guest: "MEMSNAP-CHECK ok" lines).
// Shared by `memsnap qemu cycle`, the QEMU end-to-end test and the QEMU benchmark.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/plugin_host/plugin_registry.h"
#include "core/vmm_pause.h"
#include "tools/qemu/qemu_vm.h"

namespace memsnap::qemu {

// One line of the guest checker.
struct CheckLine {
  enum class Kind { kReady, kOk, kBad, kOther } kind = Kind::kOther;
  std::uint64_t round = 0;
  std::uint64_t pages = 0;
  std::uint64_t gens = 0;       // sum of page generations: grows while the guest writes
  std::uint64_t first_pfn = 0;  // ready: the guest frame of the checked memory's first page
  std::string text;
};
CheckLine parse_check_line(const std::string& line);

struct CycleOptions {
  Machine machine;
  std::string strategy;
  bool allow_fallback = false;
  int generations = 2;
  std::string dir;  // snapshots (generation-N.snap, generation-N.vmstate)
  bool sync = true;
  // Full rounds of the guest's check to wait for after each resume (the first complete round
  // after the resume verifies every page).
  int rounds_after_resume = 2;
  std::chrono::milliseconds boot_timeout{90000};
  std::chrono::milliseconds round_timeout{60000};
  // Also measure QEMU's own migration of the whole VM (RAM included) to a file and back, once,
  // before the first pause: the reference a user would otherwise pick.
  bool reference = false;
  // true: each pause is a handover (core/vmm_pause.h handover_vmm): it is answered once QEMU is
  // stopped, its device state committed and its RAM memfd held; QEMU is then ended and the
  // export runs on another thread; the resume waits until the snapshot is durable.
  bool handover = false;
  std::function<void(const std::string&)> progress;
};

struct ReferenceReport {
  std::uint64_t bytes = 0;
  std::vector<PhaseTiming> save_phases;  // stop, migrate
  std::vector<PhaseTiming> load_phases;  // start, migrate_incoming
  double save_seconds = 0, load_seconds = 0;
};

struct GenerationReport {
  int generation = 0;
  VmmPauseReport pause;  // pause.handover_seconds: until the caller could be answered
  std::string resume_mode, resume_reason;
  std::vector<PhaseTiming> resume_phases;
  double resume_seconds = 0;
  std::uint64_t resume_bytes = 0;
  std::uint64_t round_before = 0;  // last ok round before the pause
  std::uint64_t round_after = 0;   // last ok round waited for after the resume
  std::uint64_t gens_before = 0, gens_after = 0;
  std::vector<std::string> bad_lines;  // BAD (or a new "ready": the guest restarted)
};

struct CycleReport {
  std::string strategy;
  std::string accel;
  bool memsnap_owns_ram = true;
  bool handover = false;
  std::uint64_t memory_bytes = 0;
  double boot_seconds = 0;  // to the first ok line
  std::optional<ReferenceReport> reference;
  std::vector<GenerationReport> generations;
  bool intact() const;
};

// How many progress lines run_cycle gives for a complete run of o (for "step i of n").
int progress_steps(const CycleOptions& o);

// The largest memsnap.mib the test guest (tools/qemu-guest: Debian 12's kernel and the
// initramfs) can check in a VM of memory_mib MiB, 0 when the VM is too small to boot at all.
// Measured under TCG: beside its test memory the guest needs about 72 MiB plus 1/16 of its RAM
// (128 MiB: 48 works, 52 is killed by the guest's OOM killer; 256 MiB: 168 works, 176 does not),
// and below 86 MiB the kernel panics before the checker starts (at 64 MiB it hangs silently).
std::uint64_t largest_guest_mib(std::uint64_t memory_mib);
inline constexpr std::uint64_t kSmallestGuestMemoryMib = 88;

// Why a wait for the guest's check ended without it: the console's last line (or that the guest
// printed nothing at all), QEMU's state ("exited with status 0") and what QEMU itself printed.
std::string check_failure_text(const std::vector<std::string>& console,
                               const std::string& qemu_state, const std::string& qemu_output);

// kProcessGone / kTimeout when the guest stops reporting; pause and resume errors as they are.
// A guest that reports BAD is not an error: see CycleReport::intact().
Result<CycleReport> run_cycle(const PluginRegistry& registry, const CycleOptions& options);

// Waits, on vm's console after line `skip`, for `count` ok lines (returns the last), failing at
// once on a BAD line or a restart ("ready").
Result<CheckLine> wait_for_ok_rounds(QemuVm& vm, std::size_t skip, int count,
                                     std::chrono::milliseconds timeout,
                                     std::vector<std::string>* bad_lines);

}  // namespace memsnap::qemu
