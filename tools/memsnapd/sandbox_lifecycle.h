// A sandbox's lifecycle as a type: its states, the one table of moves between them, and the
// count of sandboxes in each state that the by-state gauge publishes.
//
//   running  --pause-->  pausing  --ok, after=stop-->      paused
//                                 --handed over (mode handover)--> exporting
//                                 --ok, after=continue-->  running
//                                 --refused before work--> running
//                                 --error-->               running (the VMM was continued), or
//                                                          failed (the VMM is gone, or memory is
//                                                          at risk and the VMM was kept stopped)
//   paused   --resume--> resuming --VMM handshake ok-->    running (the new VMM)
//                                 --refused / error-->     paused (the chain is untouched)
//   running  --serving its memory stopped on an error-->   failed (the VMM was ended)
//   exporting --the background export is durable-->        paused
//             --it failed (memory still held)-->           export_failed
//   export_failed --retry-->                               exporting
//   exporting --resume (before durable)--> resuming --ok--> running, the export goes on
//                                                   --refused / error--> exporting, export_failed
//                                                     or paused (as the export stands then)
//
// exporting and export_failed are paused sandboxes whose newest snapshot is not durable yet: the
// pause was answered at handover, and memsnapd's background export (its own process) holds the
// guest memory until the snapshot is committed. Neither is owned (a GET, a wait or a removal
// with force may act on them). A resume of a strategy that leaves the held memory whole (memfd)
// does not wait: it is served from that memory while the export runs on (docs/resume.md), and
// the sandbox is then running with its export still pending; its next pause waits until the
// export is durable. Other resumes, and pauses, need the export durable first.
//
// pausing and resuming are owned: exactly one pause or resume works on the sandbox, and only it
// moves the sandbox out of that state. Registration enters running (a VMM) or paused (a chain);
// unregistering leaves from any state that is not owned. failed is left only by unregistering.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace memsnap::daemon {

enum class SandboxState : std::uint8_t {
  kRunning,
  kPausing,
  kPaused,
  kResuming,
  kFailed,
  kExporting,
  kExportFailed
};

inline constexpr std::array<SandboxState, 7> kSandboxStates = {
    SandboxState::kRunning,  SandboxState::kPausing, SandboxState::kPaused,
    SandboxState::kResuming, SandboxState::kFailed,  SandboxState::kExporting,
    SandboxState::kExportFailed};

// The state's name in the API, the metrics and the logs ("running", ...).
std::string_view state_name(SandboxState state);
// The state named so, or nothing for a name that is not a state.
std::optional<SandboxState> parse_sandbox_state(std::string_view name);
// Every state's name, in kSandboxStates order.
const std::vector<std::string>& sandbox_state_names();

// Whether one pause or resume owns a sandbox in this state (pausing, resuming).
bool is_owned(SandboxState state);

// Whether a sandbox in this state with a VMM still alive has it stopped by memsnapd's last pause
// (after: stop), waiting for a resume that no one else would give it: paused, exporting,
// export_failed. (A registration with a VMM enters running; one from a chain has no VMM.)
bool vmm_left_stopped(SandboxState state);

// Whether the table above allows moving from `from` to `to`. Staying in a state is not a move.
bool transition_allowed(SandboxState from, SandboxState to);

// How many sandboxes are in each state. Not thread-safe (SandboxService guards it with its lock).
class StateCounts {
 public:
  void enter(SandboxState state) { ++counts_[index(state)]; }
  void leave(SandboxState state) { --counts_[index(state)]; }
  std::int64_t count(SandboxState state) const { return counts_[index(state)]; }
  // By name, every state present (0 included): what HostMetrics::set_sandboxes_by_state takes.
  std::map<std::string, std::int64_t> by_name() const;

 private:
  static std::size_t index(SandboxState state) { return static_cast<std::size_t>(state); }
  std::array<std::int64_t, kSandboxStates.size()> counts_{};
};

}  // namespace memsnap::daemon
