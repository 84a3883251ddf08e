#include "tools/memsnapd/sandbox_lifecycle.h"

namespace memsnap::daemon {
namespace {

struct Move {
  SandboxState from;
  SandboxState to;
};

// The lifecycle, one row a move (see the picture in the header).
constexpr Move kMoves[] = {
    {SandboxState::kRunning, SandboxState::kPausing},    // a pause claims it
    {SandboxState::kPausing, SandboxState::kPaused},     // done, after=stop
    {SandboxState::kPausing, SandboxState::kRunning},    // done, after=continue; refused; failed
                                                         // with the VMM continued
    {SandboxState::kPausing, SandboxState::kFailed},     // failed, the VMM gone or kept stopped
    {SandboxState::kPaused, SandboxState::kResuming},    // a resume claims it
    {SandboxState::kResuming, SandboxState::kRunning},   // the new VMM is served
    {SandboxState::kResuming, SandboxState::kPaused},    // refused or failed: the chain is kept
    {SandboxState::kRunning, SandboxState::kFailed},     // serving its memory stopped on an error
    {SandboxState::kPausing, SandboxState::kExporting},  // answered at handover
    {SandboxState::kExporting, SandboxState::kPaused},   // the background export is durable
    {SandboxState::kExporting, SandboxState::kExportFailed},  // it failed; the memory is held
    {SandboxState::kExportFailed, SandboxState::kExporting},  // retried
    {SandboxState::kExporting, SandboxState::kResuming},      // a resume before durable claims it
    {SandboxState::kResuming, SandboxState::kExporting},      // refused or failed, export running
    {SandboxState::kResuming, SandboxState::kExportFailed},   // ... the export failed meanwhile
};

}  // namespace

std::string_view state_name(SandboxState state) {
  switch (state) {
    case SandboxState::kRunning:
      return "running";
    case SandboxState::kPausing:
      return "pausing";
    case SandboxState::kPaused:
      return "paused";
    case SandboxState::kResuming:
      return "resuming";
    case SandboxState::kFailed:
      return "failed";
    case SandboxState::kExporting:
      return "exporting";
    case SandboxState::kExportFailed:
      return "export_failed";
  }
  return "unknown";
}

std::optional<SandboxState> parse_sandbox_state(std::string_view name) {
  for (SandboxState s : kSandboxStates) {
    if (state_name(s) == name) return s;
  }
  return std::nullopt;
}

const std::vector<std::string>& sandbox_state_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (SandboxState s : kSandboxStates) out.emplace_back(state_name(s));
    return out;
  }();
  return names;
}

bool is_owned(SandboxState state) {
  return state == SandboxState::kPausing || state == SandboxState::kResuming;
}

bool vmm_left_stopped(SandboxState state) {
  return state == SandboxState::kPaused || state == SandboxState::kExporting ||
         state == SandboxState::kExportFailed;
}

bool transition_allowed(SandboxState from, SandboxState to) {
  for (const Move& m : kMoves) {
    if (m.from == from && m.to == to) return true;
  }
  return false;
}

std::map<std::string, std::int64_t> StateCounts::by_name() const {
  std::map<std::string, std::int64_t> out;
  for (SandboxState s : kSandboxStates) out[std::string(state_name(s))] = count(s);
  return out;
}

}  // namespace memsnap::daemon
