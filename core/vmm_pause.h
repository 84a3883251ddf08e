// Pause and resume of a VMM through its adapter (core/vmm_adapter.h): the guest stops, its
// device state is saved next to the memory snapshot, and its memory goes through the same pause
// pipeline and strategy plugins as every other sandbox (core/pause.h). A resume starts a new VMM
// of the same machine, puts the chain's guest image in place, loads the device state and runs.
//
//   pause:  stop -> device_state -> (pause pipeline: resolve, dirty_set, export, commit) -> run?
//   resume: open (every checksum) -> start -> restore -> device_load -> run
//
// Files: the memory snapshot at out_path (format of docs/snapshot-format.md) and the VMM's device
// state beside it, device_state_path(out_path) ("generation-2.snap" -> "generation-2.vmstate"),
// each written to a temporary name and renamed; the device state is committed first, so a
// committed memory snapshot always has its device state.
//
// A diff pause (parent_chain given) exports the blocks whose content differs from the parent
// chain's image: exact whatever the VMM did, at the price of reading the guest and the parent
// once (a VMM like QEMU does not register memsnap's userfaultfd, so writes cannot be tracked).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/base/result.h"
#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/resume.h"
#include "core/snapshot/snapshot_reader.h"
#include "core/vmm_adapter.h"

namespace memsnap {

std::string device_state_path(const std::string& snapshot_path);

struct VmmPauseRequest {
  std::string out_path;
  std::vector<std::string> parent_chain;  // empty: a base snapshot; else base first, the newest
                                          // is the diff's parent
  std::string strategy;
  std::vector<std::pair<std::string, std::string>> strategy_options;
  bool allow_fallback = false;
  std::string fallback_strategy = "process_vm_readv";
  bool sync = true;
  // After the pause: run the guest again (only for strategies that leave memory in place), or
  // leave the VMM stopped for the caller to end (a paused sandbox does not run).
  bool run_after = false;
};

struct VmmPauseReport {
  PauseReport memory;  // the pause pipeline's report (strategy, bytes, its phases)
  std::string device_state_path;
  std::uint64_t device_state_bytes = 0;
  // stop, device_state, then the pipeline's resolve/dirty_set/export/commit, then run (if asked).
  std::vector<PhaseTiming> phases;
  double wall_seconds = 0;  // until the snapshot is committed (and the guest runs, if asked)
  // Until the caller could be answered: for pause_vmm the whole pause (wall_seconds without the
  // run); for handover_vmm the guest stopped, its device state committed, its memory held.
  double handover_seconds = 0;
};

Result<VmmPauseReport> pause_vmm(const PluginRegistry& registry, VmmAdapter& vmm,
                                 const VmmPauseRequest& request);

// A handover pause of a VMM (issue 19): the guest stops, its device state is committed, and
// memsnap takes its own reference to the memfd behind guest memory; that is the answer. The
// export runs later, on any thread, with finish_handover(), from the held memfd alone (the VMM
// may be ended as soon as handover_vmm returns). A diff's dirty set (what differs from the parent
// chain) is computed by the export, not at the handover. Only for strategies that export from
// the memfd and a VMM that stays stopped (kUnsupported otherwise, before anything is stopped).
struct VmmHandover {
  VmmPauseReport report;  // device state, handover_seconds; memory filled by finish_handover
  PauseRequest request;   // the export: pid -1, the held memfd, no freeze
  io::UniqueFd memfd;     // the held reference
  std::vector<PhaseTiming> before;
  std::shared_ptr<const SnapshotChain> parent;
  std::chrono::steady_clock::time_point started;
};
Result<VmmHandover> handover_vmm(const PluginRegistry& registry, VmmAdapter& vmm,
                                 const VmmPauseRequest& request);
// Runs a handover's export into its snapshot and completes the report (wall_seconds: from the
// start of the handover to the commit). On failure nothing is committed and the device state
// written at the handover is removed.
Result<VmmPauseReport> finish_handover(const PluginRegistry& registry, VmmHandover handover);

struct VmmResumeRequest {
  std::vector<std::string> chain;  // snapshot files, base first
  std::string strategy;            // the strategy that paused it (picks warm vs cold)
  // Memory a memfd pause kept (warm candidate): used, with no copy, when it holds exactly the
  // chain's newest snapshot and the launcher gives VMMs memsnap-owned RAM. Consumed if used.
  RetainedMemory* retained = nullptr;
  Verify verify = Verify::kFull;
};

struct VmmResumeReport {
  std::string mode;  // warm, fill (a fresh memfd), write (into the VMM's own memory)
  std::string mode_reason;
  std::string snapshot_id;  // the newest layer's
  std::uint64_t generation = 0;
  std::uint64_t bytes = 0;  // copied into guest memory
  // open, start, restore, device_load, run.
  std::vector<PhaseTiming> phases;
  double wall_seconds = 0;
  std::unique_ptr<VmmAdapter> vmm;  // the resumed VMM, running
};

Result<VmmResumeReport> resume_vmm(const PluginRegistry& registry, VmmLauncher& launcher,
                                   const VmmResumeRequest& request);

}  // namespace memsnap
