// What a strategy's capabilities (PluginInfo::capabilities, plugins/plugin_api) mean for a pause
// and the resume after it, in one place: whether it can serve a sandbox (and if not, the typed
// cause of the fallback), whether the VMM may run on after it (it releases what it exported),
// whether the paused memory can be kept warm, and how a resume starts from its snapshot.
// Used by the strategy selector, the pause pipeline, resume and memsnapd.
#pragma once

#include <cstdint>

#include "core/plugin_host/plugin_registry.h"
#include "core/fallback/fallback.h"

namespace memsnap {

// What a sandbox offers a strategy when it pauses.
struct SandboxMemory {
  bool has_memfd = false;  // the memfd backing guest memory is reachable (and all of it there)
  bool has_pid = false;    // the VMM's pid and its guest regions are known
};

// How a resume of this strategy's snapshot starts by default.
enum class ResumeStart {
  kLazy,        // the VMM's memory was left alone: pages are served from the chain on fault
  kBackground,  // no resident copy to reuse: a background fill from the chain (cold)
  kWarm,        // the memfd kept from the pause holds exactly that snapshot
};

class StrategyPolicy {
 public:
  explicit StrategyPolicy(std::uint32_t capabilities) noexcept : capabilities_(capabilities) {}
  static StrategyPolicy of(const PluginInfo& info) noexcept {
    return StrategyPolicy(info.capabilities);
  }

  // kNone when the strategy can serve a sandbox offering memory, else what is missing
  // (kMissingMemfd before kMissingPid).
  [[nodiscard]] FallbackCause cannot_serve(const SandboxMemory& memory) const noexcept;

  // It releases the guest's memory as it exports it: the VMM must stay stopped after the pause.
  [[nodiscard]] bool vmm_must_stay_stopped() const noexcept { return releases_memory(); }

  // It exports from the memfd and leaves it whole: the memfd can be kept warm for a resume.
  [[nodiscard]] bool keeps_memory() const noexcept { return needs_memfd() && !releases_memory(); }

  // How a resume from its snapshot starts; kept_memfd_matches: a memfd kept from the pause holds
  // exactly the snapshot resumed.
  [[nodiscard]] ResumeStart resume_start(bool kept_memfd_matches) const noexcept;

  [[nodiscard]] bool needs_pid() const noexcept { return has(plugin::kCapNeedsPid); }
  [[nodiscard]] bool needs_memfd() const noexcept { return has(plugin::kCapNeedsMemfd); }
  [[nodiscard]] bool releases_memory() const noexcept { return has(plugin::kCapReleasesMemory); }

 private:
  [[nodiscard]] bool has(std::uint32_t bit) const noexcept { return (capabilities_ & bit) != 0; }

  std::uint32_t capabilities_;
};

}  // namespace memsnap
