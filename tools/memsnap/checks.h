// Checks of command-line values that several commands share, made before a command does any
// work: each throws std::invalid_argument (exit 2) with a message naming the option.
#pragma once

#include <string>
#include <vector>

#include "core/plugin_host/plugin_registry.h"

namespace memsnap::cli {

// A fraction in [0, 1] (e.g. --dirty-fraction 0.1); anything else, NaN included, is refused.
double parse_fraction(const std::string& option, const std::string& text);

// A whole number in [min, max] (e.g. --guest-mib 64).
long parse_integer(const std::string& option, const std::string& text, long min, long max);

// Each name must be a strategy plugin loaded from dir; the refusal names the unknown one(s) and
// the loaded ones.
void require_loaded_strategies(const PluginRegistry& registry, const std::string& dir,
                               const std::string& option, const std::vector<std::string>& names);

// "a,b,c" -> {"a", "b", "c"}; empty items are refused.
std::vector<std::string> split_names(const std::string& option, const std::string& text);

}  // namespace memsnap::cli
