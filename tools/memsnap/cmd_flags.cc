// memsnap flags: evaluate and check flagd-format feature-flag files (flags/).
//
//   memsnap flags eval --flags FILE|DIR --flag KEY [--type T] [--default JSON] [--context JSON]
//                      [--explain]
//   memsnap flags eval --flags FILE|DIR --batch [--explain]     (JSON lines on stdin)
//   memsnap flags check [--plugins DIR] [--strategy-flag KEY] FILE...
//
// check also holds the variants of the strategy flag (memory-export-strategy) against the loaded
// strategy plugins: a variant naming none is a warning, an error with --plugins DIR.
//
// eval prints one JSON object per result: {"flag", "value", "variant", "reason", "errorCode",
// "errorMessage", "metadata"} (+ "explain" with --explain); variant, errorCode and errorMessage
// are null when absent. It exits 0 whenever it produced results, ERROR results included; 1 when
// the flags file cannot be loaded; 2 on bad usage.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "core/strategy_selection/strategy_selection.h"
#include "flags/flag_set.h"
#include "tools/memsnap/cli.h"

namespace memsnap::cli {
namespace {

using flags::FlagType;
using Ordered = nlohmann::ordered_json;

Ordered result_json(const flags::Resolution& r, bool explain) {
  Ordered out;
  out["flag"] = r.flag;
  out["value"] = r.value;
  out["variant"] = r.variant ? Ordered(*r.variant) : Ordered(nullptr);
  out["reason"] = flags::reason_name(r.reason);
  out["errorCode"] =
      r.ok() ? Ordered(nullptr) : Ordered(std::string(flags::error_code_name(r.error_code)));
  out["errorMessage"] = r.ok() ? Ordered(nullptr) : Ordered(r.error_message);
  out["metadata"] = r.metadata();
  if (explain) out["explain"] = r.trace;
  return out;
}

// An ERROR result for a request that could not even be evaluated (bad input line).
Ordered input_error(const nlohmann::json& flag, const nlohmann::json& fallback,
                    const std::string& message) {
  Ordered out;
  out["flag"] = flag;
  out["value"] = fallback;
  out["variant"] = nullptr;
  out["reason"] = "ERROR";
  out["errorCode"] = "GENERAL";
  out["errorMessage"] = message;
  out["metadata"] = Ordered::object();
  return out;
}

std::optional<FlagType> type_arg(const std::string& text) {
  if (text.empty()) return std::nullopt;
  const auto t = flags::parse_type(text);
  if (!t) {
    throw std::invalid_argument("--type must be boolean, string, integer, float or object, not '" +
                                text + "'");
  }
  return t;
}

nlohmann::json json_arg(const std::string& name, const std::string& text,
                        const nlohmann::json& fallback) {
  if (text.empty()) return fallback;
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::invalid_argument(name + " is not valid JSON: " + e.what());
  }
}

void print_line(const Ordered& j) {
  const std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

int run_batch(const flags::FlagSet& set, bool explain) {
  flags::EvalOptions opts;
  opts.explain = explain;
  std::string line;
  long lineno = 0;
  while (std::getline(std::cin, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) {
      // Still one output line per input line, so callers can pair them up by position.
      print_line(input_error(nullptr, nullptr, "input line " + std::to_string(lineno) + ": empty"));
      continue;
    }
    nlohmann::json req;
    try {
      req = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      print_line(
          input_error(nullptr, nullptr,
                      "input line " + std::to_string(lineno) + ": invalid JSON: " + e.what()));
      continue;
    }
    if (!req.is_object() || !req.contains("flag") || !req["flag"].is_string()) {
      print_line(input_error(req.is_object() && req.contains("flag") ? req["flag"] : nullptr,
                             req.is_object() ? req.value("default", nlohmann::json()) : nullptr,
                             "input line " + std::to_string(lineno) +
                                 ": expected {\"flag\": KEY, \"type\", \"default\", \"context\"}"));
      continue;
    }
    const nlohmann::json fallback = req.value("default", nlohmann::json());
    std::optional<FlagType> type;
    if (const auto t = req.find("type"); t != req.end() && !t->is_null()) {
      type = t->is_string() ? flags::parse_type(t->get<std::string>()) : std::nullopt;
      if (!type) {
        print_line(
            input_error(req["flag"], fallback,
                        "input line " + std::to_string(lineno) + ": unknown type " + t->dump()));
        continue;
      }
    }
    const nlohmann::json context = req.value("context", nlohmann::json::object());
    if (!context.is_object()) {
      print_line(
          input_error(req["flag"], fallback,
                      "input line " + std::to_string(lineno) + ": context must be an object"));
      continue;
    }
    print_line(result_json(
        set.evaluate(req["flag"].get<std::string>(), context, type, fallback, opts), explain));
  }
  return 0;
}

int cmd_flags_eval(Args& args) {
  const std::string file = args.value("--flags");
  const std::string key = args.value("--flag");
  const std::optional<FlagType> type = type_arg(args.value("--type"));
  const nlohmann::json fallback = json_arg("--default", args.value("--default"), nullptr);
  const nlohmann::json context =
      json_arg("--context", args.value("--context"), nlohmann::json::object());
  const bool explain = args.flag("--explain");
  const bool batch = args.flag("--batch");
  args.positional();  // "eval"
  args.expect_done();
  if (file.empty()) throw std::invalid_argument("--flags FILE is required");
  if (batch == !key.empty()) throw std::invalid_argument("give exactly one of --flag KEY, --batch");
  if (!context.is_object()) throw std::invalid_argument("--context must be a JSON object");

  const flags::LoadResult loaded = flags::load_flag_source(file);
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", loaded.error_text().c_str());
    return 1;
  }
  if (batch) return run_batch(*loaded.flags, explain);
  flags::EvalOptions opts;
  opts.explain = explain;
  print_line(result_json(loaded.flags->evaluate(key, context, type, fallback, opts), explain));
  return 0;
}

// The plugins `flags check` holds the strategy flag's variants against: with --plugins DIR a
// variant naming none of them is an error, else (the plugin directory memsnap would use) a
// warning, and a directory that cannot be read only means the variants go unchecked.
struct StrategyCheck {
  PluginRegistry registry;
  std::string dir;
  std::string flag_key = StrategySelectionOptions{}.flag_key;  // memsnapd's flags.strategy_flag
  bool strict = false;
  bool usable = false;
};

void load_strategy_check(StrategyCheck& check) {
  if (auto s = check.registry.load_directory(check.dir); !s.ok()) {
    std::fprintf(stderr, "memsnap flags check: %s: cannot load plugins from %s: %s\n",
                 check.strict ? "error" : "warning (strategy variants not checked)",
                 check.dir.c_str(), s.error().to_string().c_str());
    return;
  }
  const auto& seen = check.registry.plugins();
  const bool any =
      std::any_of(seen.begin(), seen.end(), [](const PluginInfo& p) { return p.loaded(); });
  if (!any && !check.strict) {
    std::fprintf(stderr,
                 "memsnap flags check: warning: no strategy plugin loaded from %s (strategy "
                 "variants not checked; set --plugin-dir, MEMSNAP_PLUGIN_DIR or --plugins)\n",
                 check.dir.c_str());
    return;
  }
  check.usable = true;
}

// Says what is wrong with the strategy flag's variants in file; false when that is an error.
bool report_strategy_variants(const std::string& file, const flags::FlagSet& set,
                              const StrategyCheck& check) {
  if (!check.usable) return !check.strict;
  StrategySelectionOptions options;
  options.flag_key = check.flag_key;
  const auto problems = check_strategy_variants(set, check.registry, options);
  for (const auto& p : problems) {
    std::fprintf(stderr,
                 "%s: %sflag \"%s\": variant \"%s\" = %s %s (loaded from %s: %s); a sandbox "
                 "it picks falls back to %s\n",
                 file.c_str(), check.strict ? "" : "warning: ", options.flag_key.c_str(),
                 p.variant.c_str(), p.value.c_str(), p.why.c_str(), check.dir.c_str(),
                 loaded_strategy_names(check.registry).c_str(), options.safe_strategy.c_str());
  }
  return problems.empty() || !check.strict;
}

int cmd_flags_check(Args& args) {
  StrategyCheck check;
  check.dir = args.value("--plugins");
  check.strict = !check.dir.empty();
  if (const std::string key = args.value("--strategy-flag"); !key.empty()) check.flag_key = key;
  const std::string plugin_dir_given = args.value("--plugin-dir");
  if (check.strict && !plugin_dir_given.empty()) {
    throw std::invalid_argument(
        "give --plugins DIR (variants must name its plugins) or "
        "--plugin-dir DIR (a warning when they do not), not both");
  }
  if (!check.strict) check.dir = plugin_dir_given.empty() ? plugin_dir(args) : plugin_dir_given;
  auto files = args.positional();  // "check" FILE...
  args.expect_done();
  files.erase(files.begin());
  if (files.empty()) {
    throw std::invalid_argument("usage: memsnap flags check [--plugins DIR] FILE...");
  }
  load_strategy_check(check);
  if (check.strict && !check.usable) return 1;
  int bad = 0;
  for (const auto& f : files) {
    flags::LoadResult r = flags::load_flag_source(f, {.strict = true});
    // The budgets of loading apply as they do to a reload; those of evaluation to each flag
    // evaluated once with an empty context (a rule that explodes whatever the context is).
    if (r.ok()) {
      auto over = flags::check_evaluation_budgets(*r.flags);
      if (!over.empty()) {
        r.flags.reset();
        r.diagnostics.insert(r.diagnostics.end(), over.begin(), over.end());
      }
    }
    for (const auto& d : r.diagnostics) std::fprintf(stderr, "%s\n", d.to_string().c_str());
    if (r.ok() && report_strategy_variants(f, *r.flags, check)) {
      std::printf("%s: ok, %zu flags\n", f.c_str(), r.flags->size());
    } else {
      ++bad;
    }
  }
  return bad == 0 ? 0 : 1;
}

}  // namespace

int cmd_flags(Args& args) {
  // The subcommand is the first word that is not an option value; peek without consuming.
  Args probe = args;
  probe.values("--flags");
  probe.values("--flag");
  probe.values("--type");
  probe.values("--default");
  probe.values("--context");
  probe.values("--plugins");
  probe.values("--strategy-flag");
  probe.values("--plugin-dir");
  const auto words = probe.positional();
  const std::string sub = words.empty() ? "" : words.front();
  if (sub == "eval") return cmd_flags_eval(args);
  if (sub == "check") return cmd_flags_check(args);
  throw std::invalid_argument(
      "usage: memsnap flags eval --flags FILE (--flag KEY | --batch) ... | memsnap flags check "
      "FILE...");
}

}  // namespace memsnap::cli
