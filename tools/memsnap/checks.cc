#include "tools/memsnap/checks.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

#include "core/strategy_selection/strategy_selection.h"

namespace memsnap::cli {

double parse_fraction(const std::string& option, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  const bool number = !text.empty() && end != nullptr && *end == '\0' && errno == 0;
  if (!number || !std::isfinite(v) || v < 0 || v > 1) {
    throw std::invalid_argument(option + " must be a fraction between 0 and 1 (0.1 = 10%), not '" +
                                text + "'");
  }
  return v;
}

long parse_integer(const std::string& option, const std::string& text, long min, long max) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text.c_str(), &end, 10);
  const bool number = !text.empty() && end != nullptr && *end == '\0' && errno == 0;
  if (!number || v < min || v > max) {
    throw std::invalid_argument(option + " must be a whole number from " + std::to_string(min) +
                                " to " + std::to_string(max) + ", not '" + text + "'");
  }
  return v;
}

void require_loaded_strategies(const PluginRegistry& registry, const std::string& dir,
                               const std::string& option, const std::vector<std::string>& names) {
  std::string unknown;
  for (const std::string& name : names) {
    if (registry.find(name) == nullptr) unknown += (unknown.empty() ? "'" : ", '") + name + "'";
  }
  if (unknown.empty()) return;
  throw std::invalid_argument(option + ": no loaded strategy plugin " + unknown + " (loaded from " +
                              dir + ": " + loaded_strategy_names(registry) + ")");
}

std::vector<std::string> split_names(const std::string& option, const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    if (item.empty()) throw std::invalid_argument(option + ": an empty name in '" + text + "'");
    out.push_back(item);
  }
  if (out.empty()) throw std::invalid_argument(option + " names no strategy");
  return out;
}

}  // namespace memsnap::cli
