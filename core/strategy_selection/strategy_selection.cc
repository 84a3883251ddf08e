#include "core/strategy_selection/strategy_selection.h"

#include <algorithm>

#include <spdlog/spdlog.h>

#include "flags/semver.h"

namespace memsnap {

nlohmann::json sandbox_context(const SandboxAttributes& s) {
  return {{"targetingKey", s.id},
          {"team", s.team},
          {"template", s.template_name},
          {"vmm", s.vmm},
          {"vmm_version", s.vmm_version},
          {"kernel_version", s.kernel_version},
          {"memory_mib", s.memory_mib},
          {"hugepages", s.hugepages},
          {"host", s.host},
          {"has_memfd", s.has_memfd}};
}

std::vector<StrategyVariantProblem> check_strategy_variants(
    const flags::FlagSet& set, const PluginRegistry& registry,
    const StrategySelectionOptions& options) {
  std::vector<StrategyVariantProblem> problems;
  const flags::Flag* flag = set.find(options.flag_key);
  if (flag == nullptr) return problems;
  for (const auto& [name, value] : flag->variants) {
    if (!value.is_string()) {
      problems.push_back({name, value.dump(), "is not a strategy name (a string)"});
      continue;
    }
    const std::string strategy = value.get<std::string>();
    if (registry.find(strategy) != nullptr) continue;
    std::string why = "names no loaded strategy plugin";
    for (const PluginInfo& p : registry.plugins()) {
      if (p.name == strategy && !p.loaded()) {
        why = "names a plugin the plugin host refused (" + std::string(errc_name(p.error)) + ": " +
              p.reason + ")";
      }
    }
    problems.push_back({name, value.dump(), why});
  }
  return problems;
}

std::string loaded_strategy_names(const PluginRegistry& registry) {
  std::vector<std::string> names;
  for (const PluginInfo& p : registry.plugins()) {
    if (p.loaded()) names.push_back(p.name);
  }
  std::sort(names.begin(), names.end());
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out.empty() ? "(none)" : out;
}

StrategySelector::StrategySelector(const flags::FlagStore& flags, const PluginRegistry& plugins,
                                   StrategySelectionOptions options)
    : flags_(flags), plugins_(plugins), options_(std::move(options)) {}

std::string StrategySelector::refusal(const std::string& strategy, const SandboxAttributes& sandbox,
                                      FallbackCause* cause) const {
  const PluginInfo* info = plugins_.find(strategy);
  if (info == nullptr) {
    for (const PluginInfo& p : plugins_.plugins()) {
      if (p.name == strategy && !p.loaded()) {
        *cause = FallbackCause::kPluginRefused;
        return "plugin \"" + strategy + "\" was refused by the plugin host (" +
               std::string(errc_name(p.error)) + ": " + p.reason + ")";
      }
    }
    *cause = FallbackCause::kPluginNotLoaded;
    return "no loaded plugin is named \"" + strategy + "\"";
  }
  *cause = StrategyPolicy::of(*info).cannot_serve(
      {.has_memfd = sandbox.has_memfd, .has_pid = sandbox.has_pid});
  if (*cause == FallbackCause::kMissingMemfd) {
    return "\"" + strategy + "\" needs a memfd and sandbox " + sandbox.id + " has none";
  }
  if (*cause == FallbackCause::kMissingPid) {
    return "\"" + strategy + "\" needs the VMM's pid and guest regions, and sandbox " + sandbox.id +
           " has none";
  }
  if (const auto it = options_.min_vmm_version.find(strategy);
      it != options_.min_vmm_version.end()) {
    const auto ok = flags::semver_matches(sandbox.vmm_version, ">=", it->second);
    *cause = FallbackCause::kVmmVersion;
    if (!ok) {
      return "\"" + strategy + "\" needs VMM version >= " + it->second + "; sandbox " + sandbox.id +
             " reports \"" + sandbox.vmm_version + "\" (not a version)";
    }
    if (!*ok) {
      return "\"" + strategy + "\" needs VMM version >= " + it->second + "; sandbox " + sandbox.id +
             " runs " + sandbox.vmm_version;
    }
  }
  *cause = FallbackCause::kNone;
  return {};
}

StrategyChoice StrategySelector::select(const SandboxAttributes& sandbox) const {
  StrategyChoice choice;
  const auto snapshot = flags_.snapshot();
  choice.resolution = snapshot->evaluate(options_.flag_key, sandbox_context(sandbox),
                                         flags::FlagType::kString, options_.safe_strategy);
  const flags::Resolution& r = choice.resolution;
  choice.requested = r.value.is_string() ? r.value.get<std::string>() : options_.safe_strategy;
  std::string why;
  FallbackCause cause = FallbackCause::kNone;
  if (!r.ok()) {
    cause = FallbackCause::kFlagError;
    why = "flag \"" + options_.flag_key +
          "\": " + std::string(flags::error_code_name(r.error_code)) + ": " + r.error_message;
  } else if (choice.requested != options_.safe_strategy) {
    why = refusal(choice.requested, sandbox, &cause);
  }
  if (why.empty()) {
    choice.strategy = choice.requested;
    return choice;
  }
  choice.strategy = options_.safe_strategy;
  choice.fell_back = true;
  choice.fallback_reason = std::move(why);
  choice.fallback = cause;
  fallbacks_.fetch_add(1, std::memory_order_relaxed);
  spdlog::warn("strategy selection: sandbox {}: using {} instead of {}: {}", sandbox.id,
               choice.strategy, choice.requested, choice.fallback_reason);
  return choice;
}

}  // namespace memsnap
