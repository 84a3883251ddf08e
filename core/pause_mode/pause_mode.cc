#include "core/pause_mode/pause_mode.h"

namespace memsnap {

std::string_view pause_mode_name(PauseMode mode) noexcept {
  switch (mode) {
    case PauseMode::kCopy:
      return "copy";
    case PauseMode::kHandover:
      return "handover";
    case PauseMode::kLive:
      return "live";
  }
  return "copy";
}

std::optional<PauseMode> parse_pause_mode(std::string_view name) noexcept {
  for (const PauseMode mode : kPauseModes) {
    if (pause_mode_name(mode) == name) return mode;
  }
  return std::nullopt;
}

std::string_view pause_mode_fallback_name(PauseModeFallback cause) noexcept {
  switch (cause) {
    case PauseModeFallback::kNone:
      return "none";
    case PauseModeFallback::kFlagError:
      return "flag_error";
    case PauseModeFallback::kStrategyReadsVmm:
      return "strategy_reads_vmm";
    case PauseModeFallback::kNoMemfd:
      return "no_memfd";
    case PauseModeFallback::kMemoryNotResident:
      return "memory_not_resident";
    case PauseModeFallback::kContinues:
      return "continues";
    case PauseModeFallback::kStops:
      return "stops";
    case PauseModeFallback::kNoWriteFaults:
      return "no_write_faults";
  }
  return "none";
}

std::string_view pause_mode_fallback_text(PauseModeFallback cause) noexcept {
  switch (cause) {
    case PauseModeFallback::kNone:
      return "";
    case PauseModeFallback::kFlagError:
      return "the pause-mode flag could not be evaluated or named no pause mode";
    case PauseModeFallback::kStrategyReadsVmm:
      return "the strategy reads the VMM's address space, so there is no memory to hold without "
             "the VMM";
    case PauseModeFallback::kNoMemfd:
      return "the sandbox's guest memory is not in a memfd memsnapd holds";
    case PauseModeFallback::kMemoryNotResident:
      return "the resumed guest's memory is not all in its memfd yet";
    case PauseModeFallback::kContinues:
      return "handover needs after \"stop\": the VMM would run on the memory being exported";
    case PauseModeFallback::kStops:
      return "live needs after \"continue\"";
    case PauseModeFallback::kNoWriteFaults:
      return "live needs a sandbox memsnapd serves whose VMM sends it write-protect faults "
             "(userfaultfd write-protect without WP_ASYNC), with its memory in a memfd memsnapd "
             "holds";
  }
  return "";
}

PauseModeDecision decide_pause_mode(PauseMode requested, const PauseModeInputs& in) noexcept {
  PauseModeDecision d;
  d.mode = requested;
  auto fall = [&](PauseModeFallback why) {
    d.mode = PauseMode::kCopy;
    d.fallback = why;
    return d;
  };
  switch (requested) {
    case PauseMode::kCopy:
      return d;
    case PauseMode::kHandover:
      if (!in.stop) return fall(PauseModeFallback::kContinues);
      if (!in.strategy_needs_memfd) return fall(PauseModeFallback::kStrategyReadsVmm);
      if (!in.memfd_held) {
        return fall(in.memory_resident ? PauseModeFallback::kNoMemfd
                                       : PauseModeFallback::kMemoryNotResident);
      }
      if (!in.memory_resident) return fall(PauseModeFallback::kMemoryNotResident);
      return d;
    case PauseMode::kLive:
      if (in.stop) return fall(PauseModeFallback::kStops);
      if (!in.live_capable) return fall(PauseModeFallback::kNoWriteFaults);
      return d;
  }
  return d;
}

}  // namespace memsnap
