// How a pause answers: the pause modes, why a sandbox may not get the one it asked for, and the
// one decision between them. A leaf (no dependencies), so that metrics can label by it.
//
//   copy      the answer comes once the snapshot is durable (committed and fsynced): the VMM is
//             stopped for the whole export. The default.
//   handover  the answer comes once the VMM is stopped and memsnapd holds what the export needs
//             (a reference to the memfd behind guest memory, and the dirty set); the export runs
//             in the background and becomes durable later. Only for a strategy that exports from
//             the memfd, a sandbox whose memory is all in that memfd, and after "stop".
//   live      after "continue": the guest stops only while its dirty set is write-protected and
//             runs during the export; a block it writes meanwhile is copied out first
//             (copy-before-write), so the snapshot is its memory at the pause. Only for a
//             sandbox memsnapd serves whose VMM sends write-protect faults to memsnap (userfaultfd
//             write-protect without WP_ASYNC) and whose memory is a memfd memsnapd holds. The
//             answer comes when the snapshot is durable.
#pragma once

#include <array>
#include <optional>
#include <string_view>

namespace memsnap {

enum class PauseMode { kCopy, kHandover, kLive };

inline constexpr std::array<PauseMode, 3> kPauseModes = {PauseMode::kCopy, PauseMode::kHandover,
                                                         PauseMode::kLive};

// "copy", "handover", "live": the API's, the flag's and the metrics' name.
std::string_view pause_mode_name(PauseMode mode) noexcept;
std::optional<PauseMode> parse_pause_mode(std::string_view name) noexcept;

// Why a pause runs in another mode than the one asked for.
enum class PauseModeFallback {
  kNone,
  kFlagError,          // the pause-mode flag could not be evaluated, or named no mode
  kStrategyReadsVmm,   // the strategy reads the VMM's address space: nothing to hold without it
  kNoMemfd,            // the sandbox's memory is not in a memfd memsnapd holds
  kMemoryNotResident,  // a resumed guest's memory is not all in its memfd yet (lazy, filling)
  kContinues,          // handover with after "continue": the VMM would run on the held memory
  kStops,              // live with after "stop": nothing runs during the export
  kNoWriteFaults,      // live: memsnap does not resolve this VMM's write-protect faults
};

inline constexpr std::array<PauseModeFallback, 7> kPauseModeFallbacks = {
    PauseModeFallback::kFlagError,    PauseModeFallback::kStrategyReadsVmm,
    PauseModeFallback::kNoMemfd,      PauseModeFallback::kMemoryNotResident,
    PauseModeFallback::kContinues,    PauseModeFallback::kStops,
    PauseModeFallback::kNoWriteFaults};

// The metric label and API code ("flag_error", "strategy_reads_vmm", "no_memfd",
// "memory_not_resident", "continues", "stops", "no_write_faults"; "none" for kNone).
std::string_view pause_mode_fallback_name(PauseModeFallback cause) noexcept;
// A sentence for people (answers, logs).
std::string_view pause_mode_fallback_text(PauseModeFallback cause) noexcept;

// What decides whether a pause can run in a mode.
struct PauseModeInputs {
  bool strategy_needs_memfd = false;  // StrategyPolicy::needs_memfd() of the strategy that runs
  bool memfd_held = false;            // the pause reads a memfd (not the VMM's mappings)
  bool memory_resident = true;        // all of the guest's memory is in that memfd
  bool stop = true;                   // after "stop"
  // A live pause can run (ResumeSession::can_pause_live() on the memfd the pause reads).
  bool live_capable = false;
};

struct PauseModeDecision {
  PauseMode mode = PauseMode::kCopy;  // the mode the pause runs in
  PauseModeFallback fallback = PauseModeFallback::kNone;  // why not the one asked for
};

// The mode a pause that asked for `requested` runs in. Copy is always possible.
PauseModeDecision decide_pause_mode(PauseMode requested, const PauseModeInputs& in) noexcept;

}  // namespace memsnap
