#include "core/strategy_policy/strategy_policy.h"

namespace memsnap {

FallbackCause StrategyPolicy::cannot_serve(const SandboxMemory& memory) const noexcept {
  if (needs_memfd() && !memory.has_memfd) return FallbackCause::kMissingMemfd;
  if (needs_pid() && !memory.has_pid) return FallbackCause::kMissingPid;
  return FallbackCause::kNone;
}

ResumeStart StrategyPolicy::resume_start(bool kept_memfd_matches) const noexcept {
  if (releases_memory()) return ResumeStart::kBackground;
  if (!needs_memfd()) return ResumeStart::kLazy;
  return kept_memfd_matches ? ResumeStart::kWarm : ResumeStart::kBackground;
}

}  // namespace memsnap
