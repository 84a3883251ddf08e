// Why a sandbox did not get the strategy it asked for: one closed set of causes shared by the
// strategy selector, the pause pipeline, memsnapd's answers and the metrics. The free-text
// detail (which plugin, which version, what failed) travels beside it and belongs in logs and
// answers, never in a metric label.
#pragma once

#include <string_view>

namespace memsnap {

enum class FallbackCause {
  kNone,             // no fallback
  kFlagError,        // the flag could not be evaluated (not found, wrong type, broken)
  kPluginNotLoaded,  // no loaded plugin has that name
  kPluginRefused,    // the plugin exists but the plugin host refused it
  kMissingMemfd,     // it reads the memfd that backs guest memory, and there is none
  kMissingPid,       // it reads the VMM's address space, and there is no pid or no regions
  kVmmVersion,       // the VMM is older than the strategy's minimum (or its version unparseable)
  kStrategyFailed,   // it ran, failed half way, and the fallback exported the same dirty set
};

// Where the fallback was decided: by the selector before the pause (the flag's choice cannot
// be used) or by the pause pipeline itself (the strategy cannot run the request, or failed).
enum class FallbackStage { kSelection, kPipeline };

struct FallbackNames {
  std::string_view metric_label;  // memsnap_strategy_fallbacks_total{reason=...}
  std::string_view api_code;      // the API's fallback.reason
  std::string_view text;          // a sentence for people (logs, CLI)
};

// The names of cause decided at stage. metric_label does not depend on the stage: flag_error,
// plugin_not_loaded, plugin_refused, missing_memfd, missing_pid, vmm_version, strategy_failed
// ("other" for kNone, which is never recorded). api_code is the metric label for the selector's
// causes; for the pipeline's it is strategy_failed or strategy_cannot_run (docs/api.md).
FallbackNames fallback_names(FallbackCause cause, FallbackStage stage) noexcept;

inline std::string_view fallback_metric_label(FallbackCause cause) noexcept {
  return fallback_names(cause, FallbackStage::kSelection).metric_label;
}

}  // namespace memsnap
