// Strategy selection: which export strategy a sandbox's pause uses, decided by the feature flag
// `memory-export-strategy` (flags/, flagd format) evaluated with a context built from the
// sandbox, and checked against what the host can actually run.
//
// The flag's string variants name plugins. The choice falls back, explicitly and with the reason
// recorded (and logged at warn), to the configured safe strategy (process_vm_readv by default)
// when the flag cannot be evaluated (not found, wrong type, broken), when the variant names a
// plugin that is not loaded (unknown, or refused by the plugin host), or when the sandbox lacks
// the plugin's prerequisites (StrategyPolicy::cannot_serve: a memfd for needs-memfd plugins, the
// VMM's pid and regions for needs-pid ones; a minimum VMM version).
// A DISABLED flag, or one that selects no variant, means "the safe strategy" and is not a
// fallback.
//
// Thread-safety: select() may be called from any number of threads; it evaluates against the
// FlagStore's current snapshot and never blocks on a reload.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/plugin_host/plugin_registry.h"
#include "core/strategy_policy/strategy_policy.h"
#include "flags/flag_set.h"
#include "flags/flag_store.h"

namespace memsnap {

// What the host knows about a sandbox when it pauses it.
struct SandboxAttributes {
  std::string id;  // the targeting key: a sandbox keeps its rollout bucket for its lifetime
  std::string team;
  std::string template_name;  // "template" in the flag context
  std::string vmm;            // e.g. "firecracker"
  std::string vmm_version;    // semver, e.g. "1.7.0"
  std::string kernel_version;
  std::uint64_t memory_mib = 0;
  bool hugepages = false;
  std::string host;
  bool has_memfd = false;  // guest memory is backed by a memfd the host can reach
  // The host knows the VMM's pid and its guest regions. memsnapd registers a running VMM only
  // with both; the CLI may pause without them. Not part of the flag context.
  bool has_pid = true;
};

// The evaluation context for a sandbox: targetingKey, team, template, vmm, vmm_version,
// kernel_version, memory_mib, hugepages, host, has_memfd.
nlohmann::json sandbox_context(const SandboxAttributes& sandbox);

struct StrategySelectionOptions {
  std::string flag_key = "memory-export-strategy";
  std::string safe_strategy = "process_vm_readv";
  // Strategy -> minimum VMM version (sem_ver). An older or unparseable vmm_version falls back.
  std::map<std::string, std::string> min_vmm_version;
};

struct StrategyChoice {
  std::string strategy;   // the strategy to run
  std::string requested;  // what the flag asked for (the safe strategy when it asked nothing)
  bool fell_back = false;
  std::string fallback_reason;   // why, when fell_back
  // The same, typed: kFlagError, kPluginNotLoaded, kPluginRefused, kMissingMemfd, kMissingPid or
  // kVmmVersion (fallback_names(cause, FallbackStage::kSelection) names it).
  FallbackCause fallback = FallbackCause::kNone;
  flags::Resolution resolution;  // the flag evaluation: variant, reason, error code, metadata
};

// A variant of the strategy flag that can never be used as it says: its value is not a string,
// or names no loaded strategy plugin (every sandbox it picks would fall back).
struct StrategyVariantProblem {
  std::string variant;  // the variant's name
  std::string value;    // its value as JSON text, e.g. "\"memfdd\"" or "true"
  std::string why;      // "names no loaded strategy plugin", or why the plugin was refused
};

// Checks every variant of options.flag_key in set against the loaded plugins of registry. Empty
// when the set has no such flag or every variant names a loaded plugin.
std::vector<StrategyVariantProblem> check_strategy_variants(
    const flags::FlagSet& set, const PluginRegistry& registry,
    const StrategySelectionOptions& options = {});

// The names of the loaded plugins, sorted and joined with ", " ("(none)" when there are none).
std::string loaded_strategy_names(const PluginRegistry& registry);

class StrategySelector {
 public:
  // Both must outlive the selector. The registry must be done loading (its const methods are
  // then thread-safe).
  StrategySelector(const flags::FlagStore& flags, const PluginRegistry& plugins,
                   StrategySelectionOptions options = {});

  [[nodiscard]] StrategyChoice select(const SandboxAttributes& sandbox) const;

  // How many select() calls fell back since construction.
  [[nodiscard]] std::uint64_t fallbacks() const noexcept {
    return fallbacks_.load(std::memory_order_relaxed);
  }

 private:
  // Empty when strategy can serve sandbox, else why not (and *cause the typed reason).
  std::string refusal(const std::string& strategy, const SandboxAttributes& sandbox,
                      FallbackCause* cause) const;

  const flags::FlagStore& flags_;
  const PluginRegistry& plugins_;
  StrategySelectionOptions options_;
  mutable std::atomic<std::uint64_t> fallbacks_{0};
};

}  // namespace memsnap
