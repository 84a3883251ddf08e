#include "core/fallback/fallback.h"

namespace memsnap {
namespace {

FallbackNames selection_names(FallbackCause cause) noexcept {
  switch (cause) {
    case FallbackCause::kNone:
      return {"other", "", "no fallback"};
    case FallbackCause::kFlagError:
      return {"flag_error", "flag_error", "the strategy flag could not be evaluated"};
    case FallbackCause::kPluginNotLoaded:
      return {"plugin_not_loaded", "plugin_not_loaded", "no loaded plugin has that name"};
    case FallbackCause::kPluginRefused:
      return {"plugin_refused", "plugin_refused", "the plugin host refused that plugin"};
    case FallbackCause::kMissingMemfd:
      return {"missing_memfd", "missing_memfd",
              "the strategy needs the memfd that backs guest memory, and there is none"};
    case FallbackCause::kMissingPid:
      return {"missing_pid", "missing_pid",
              "the strategy needs the VMM's pid and guest regions, and they are missing"};
    case FallbackCause::kVmmVersion:
      return {"vmm_version", "vmm_version", "the VMM is older than the strategy needs"};
    case FallbackCause::kStrategyFailed:
      return {"strategy_failed", "strategy_failed",
              "the strategy failed half way and the fallback exported the same dirty set"};
  }
  return {"other", "", "unknown fallback cause"};
}

}  // namespace

FallbackNames fallback_names(FallbackCause cause, FallbackStage stage) noexcept {
  FallbackNames names = selection_names(cause);
  if (stage == FallbackStage::kPipeline && cause != FallbackCause::kNone &&
      cause != FallbackCause::kStrategyFailed) {
    names.api_code = "strategy_cannot_run";
  }
  return names;
}

}  // namespace memsnap
