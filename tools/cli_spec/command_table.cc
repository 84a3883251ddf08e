#include "tools/cli_spec/command_table.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

namespace memsnap::cli_spec {
namespace {

// Edits (insert, delete, replace, swap two neighbours) that turn a into b.
std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::vector<std::size_t>> d(a.size() + 1, std::vector<std::size_t>(b.size() + 1));
  for (std::size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (std::size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.size()][b.size()];
}

std::string format_size(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB"};
  int u = 0;
  while (bytes >= 1024 && u < 3 && std::fmod(bytes, 1024) == 0) {
    bytes /= 1024;
    ++u;
  }
  std::ostringstream out;
  out << bytes << " " << units[u];
  return out.str();
}

std::string format_number(double v) {
  if (std::floor(v) == v && std::fabs(v) < 1e15) return std::to_string(static_cast<long long>(v));
  std::ostringstream out;
  out << v;
  return out.str();
}

std::string joined(const std::vector<std::string>& words, const std::string& separator) {
  std::string out;
  for (const auto& w : words) out += (out.empty() ? "" : separator) + w;
  return out;
}

const Option* find_option(const Command& command, const std::string& name) {
  for (const auto& o : command.options) {
    if (o.name == name) return &o;
  }
  return nullptr;
}

std::optional<double> parse_number(const std::string& text) {
  if (text.empty()) return std::nullopt;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (end == nullptr || *end != '\0' || !std::isfinite(v)) return std::nullopt;
  return v;
}

// Whether v is out of [o.min, max] (max: o.max, else `unbounded`): why, naming the bound.
std::string range_problem(const Option& o, double v, double unbounded) {
  const double max = o.max > 0 ? o.max : unbounded;
  if (v < o.min) return o.name + " must be at least " + format_number(o.min);
  if (v > max) return o.name + " must be at most " + format_number(max);
  return {};
}

// A decimal whole number, sign allowed, nothing else (no 0x, no exponent, no fraction).
std::optional<double> parse_integer(const std::string& text) {
  long long v = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data() + (text.rfind('+', 0) == 0 ? 1 : 0), end, v);
  if (text.empty() || ec != std::errc() || ptr != end) return std::nullopt;
  return static_cast<double>(v);
}

std::string check_positionals(const Command& command, const std::vector<std::string>& words) {
  const Positional& p = command.positional;
  const int n = static_cast<int>(words.size());
  if (p.max >= 0 && n > p.max) {
    if (p.max == 0) return "takes no arguments (got '" + words.front() + "')";
    return "takes " + (p.min == p.max ? "" : std::string("at most ")) + std::to_string(p.max) +
           " " + p.name + " (got " + std::to_string(n) + ": " + joined(words, ", ") + ")";
  }
  if (n < p.min) return "needs " + p.name + (p.help.empty() ? "" : " (" + p.help + ")");
  return {};
}

}  // namespace

std::string value_name(const Option& o) {
  if (o.kind == ValueKind::kFlag) return {};
  if (!o.placeholder.empty()) return o.placeholder;
  if (o.kind == ValueKind::kChoice) return joined(o.choices, "|");
  return "VALUE";
}

std::optional<std::uint64_t> parse_size(const std::string& text) {
  if (text.empty() || text[0] == '-' || text[0] == '+') return std::nullopt;
  std::size_t end = 0;
  std::uint64_t v = 0;
  try {
    v = std::stoull(text, &end, 0);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  const std::string suffix = text.substr(end);
  int shift = 0;
  if (suffix.empty()) {
    shift = 0;
  } else if (suffix == "K" || suffix == "k" || suffix == "KiB") {
    shift = 10;
  } else if (suffix == "M" || suffix == "MiB") {
    shift = 20;
  } else if (suffix == "G" || suffix == "GiB") {
    shift = 30;
  } else {
    return std::nullopt;
  }
  if (shift > 0 && v > (UINT64_MAX >> shift)) return std::nullopt;
  return v << shift;
}

const Command* find_command(const Program& program, const std::vector<std::string>& words,
                            Mode mode, int* used) {
  if (words.empty()) return nullptr;
  for (const auto& c : program.commands) {
    if (c.mode == mode && words.size() >= 2 && c.name == words[0] + " " + words[1]) {
      *used = 2;
      return &c;
    }
  }
  for (const auto& c : program.commands) {
    if (c.mode == mode && c.name == words[0]) {
      *used = 1;
      return &c;
    }
  }
  return nullptr;
}

std::vector<std::string> subcommands(const Program& program, const std::string& word) {
  std::vector<std::string> out;
  for (const auto& c : program.commands) {
    if (c.name.rfind(word + " ", 0) == 0) {
      const std::string sub = c.name.substr(word.size() + 1);
      if (std::find(out.begin(), out.end(), sub) == out.end()) out.push_back(sub);
    }
  }
  return out;
}

std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  if (word.size() >= 3) {  // the start of a name ("exp" for "experiment")
    for (const auto& c : candidates) {
      if (c.rfind(word, 0) == 0) return c;
    }
  }
  std::string best;
  std::size_t best_distance = 0;
  for (const auto& c : candidates) {
    const std::size_t d = edit_distance(word, c);
    if (best.empty() || d < best_distance) {
      best = c;
      best_distance = d;
    }
  }
  const std::size_t allowed = std::max<std::size_t>(1, std::min(word.size(), best.size()) / 3);
  return best_distance <= allowed ? best : std::string();
}

std::string check_value(const Option& o, const std::string& value) {
  const std::string quoted = "'" + value + "'";
  switch (o.kind) {
    case ValueKind::kFlag:
      return o.name + " takes no value";
    case ValueKind::kText:
    case ValueKind::kPath:
      return value.empty() ? o.name + " needs a non-empty " + value_name(o) : std::string();
    case ValueKind::kSize: {
      const auto v = parse_size(value);
      if (!v) return o.name + " takes a size like 4096, 64K, 2M or 1G, not " + quoted;
      const double bytes = static_cast<double>(*v);
      if (bytes == 0 && o.min > 0) {
        return o.name + " must be positive" +
               (o.min > 1 ? " (at least " + format_size(o.min) + ")" : std::string()) +
               ", not " + quoted;
      }
      if (bytes < o.min) {
        return o.name + " must be at least " + format_size(o.min) +
               (o.min == 1 ? " (a positive size)" : "") + ", not " + quoted;
      }
      if (o.max > 0 && bytes > o.max) {
        return o.name + " must be at most " + format_size(o.max) + ", not " + quoted;
      }
      if (o.multiple_of > 0 && std::fmod(bytes, o.multiple_of) != 0) {
        return o.name + " must be a multiple of " + format_size(o.multiple_of) + ", not " + quoted;
      }
      return {};
    }
    case ValueKind::kInteger: {
      const auto v = parse_integer(value);
      if (!v) return o.name + " takes a whole number, not " + quoted;
      const std::string p = range_problem(o, *v, kIntegerMax);
      return p.empty() ? p : p + ", not " + quoted;
    }
    case ValueKind::kNumber: {
      const auto v = parse_number(value);
      if (!v) return o.name + " takes a number, not " + quoted;
      const std::string p = range_problem(o, *v, kNumberMax);
      return p.empty() ? p : p + ", not " + quoted;
    }
    case ValueKind::kFraction: {
      const auto v = parse_number(value);
      if (!v || *v < 0 || *v > 1) {
        return o.name + " must be a fraction between 0 and 1 (0.1 = 10%), not " + quoted;
      }
      return {};
    }
    case ValueKind::kChoice: {
      if (std::find(o.choices.begin(), o.choices.end(), value) != o.choices.end()) return {};
      const std::string near = closest(value, o.choices);
      return o.name + " takes " + joined(o.choices, ", ") + ", not " + quoted +
             (near.empty() ? "" : " (did you mean " + near + "?)");
    }
    case ValueKind::kJson: {
      if (nlohmann::json::accept(value)) return {};
      return o.name + " takes JSON (e.g. '{\"key\": \"value\"}'), not " + quoted;
    }
    case ValueKind::kKeyValue:
      if (value.find('=') == std::string::npos || value.front() == '=') {
        return o.name + " takes KEY=VALUE, not " + quoted;
      }
      return {};
  }
  return {};
}

CheckResult check(const Command& command, const std::vector<std::string>& words) {
  CheckResult result;
  std::vector<std::string> positional;
  std::map<std::string, int> seen;
  std::vector<std::string> names;
  for (const auto& o : command.options) names.push_back(o.name);
  // --help anywhere wins: asking how to use a command is never a usage error.
  if (std::find_if(words.begin(), words.end(), [](const std::string& w) {
        return w == "--help" || w == "-h";
      }) != words.end()) {
    result.help = true;
    return result;
  }
  for (std::size_t i = 0; i < words.size(); ++i) {
    const std::string& w = words[i];
    const bool looks_like_option = w.size() > 1 && w[0] == '-' && !parse_number(w).has_value();
    if (!looks_like_option) {
      positional.push_back(w);
      continue;
    }
    const auto eq = w.find('=');
    const std::string name = w.substr(0, eq);
    const Option* o = find_option(command, name);
    if (o == nullptr) {
      const std::string near = closest(name, names);
      result.error = "unknown option '" + name + "'" +
                     (near.empty() ? "" : " (did you mean " + near + "?)");
      return result;
    }
    if (++seen[o->name] > 1 && !o->repeatable) {
      result.error = o->name + " given more than once";
      return result;
    }
    if (o->kind == ValueKind::kFlag) {
      if (eq != std::string::npos) {
        result.error = o->name + " takes no value";
        return result;
      }
      continue;
    }
    std::string value;
    if (eq != std::string::npos) {
      value = w.substr(eq + 1);
    } else if (i + 1 < words.size() && find_option(command, words[i + 1]) == nullptr) {
      value = words[++i];
    } else {
      result.error = o->name + " needs a value (" + value_name(*o) + ")";
      return result;
    }
    result.error = check_value(*o, value);
    if (!result.error.empty()) return result;
  }
  for (const auto& o : command.options) {
    if (o.required && seen[o.name] == 0) {
      result.error = "needs " + o.name + " " + value_name(o);
      return result;
    }
  }
  result.error = check_positionals(command, positional);
  return result;
}

}  // namespace memsnap::cli_spec
