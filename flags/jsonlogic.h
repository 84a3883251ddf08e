// JsonLogic with flagd's operators, compiled once at load time and evaluated many times.
//
// Supported: var, missing, missing_some, if (and ?:), ==, ===, !=, !==, <, <=, >, >= (< and <=
// also in the 3-argument "between" form), !, !!, and, or, in, cat, substr, + - * / %, min, max,
// merge, some, all, none, map, filter, reduce; flagd's fractional, sem_ver, starts_with,
// ends_with; {"$ref": name} to a shared evaluator, inlined at compile time. Semantics follow
// json-logic-js (JavaScript truthiness, loose equality and comparison) except where flagd differs.
//
// A compiled Logic is immutable and safe to evaluate from any number of threads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "flags/types.h"

namespace memsnap::flags {

// Expressions nested deeper than this (operators and array literals, $refs inlined) are refused
// at compile time, so evaluation recursion is bounded.
inline constexpr int kMaxExpressionDepth = 128;

struct LogicNode;

// A compile-time problem, with the JSON pointer (relative to the compiled value) it concerns.
struct LogicError {
  std::string pointer;
  std::string message;
};

// What evaluation sees besides the rule.
struct LogicEnv {
  const Json* context = nullptr;          // the evaluation context (an object), never null
  std::string_view flag_key;              // $flagd.flagKey, and the default bucketing prefix
  std::optional<std::int64_t> timestamp;  // $flagd.timestamp (seconds); now when unset
  Json* trace = nullptr;                  // when set, an array that evaluation appends steps to
};

// A rule's result: either borrowed (from the rule or the context, so valid as long as both
// live) or owned. Looking values up never copies them.
class LogicValue {
 public:
  LogicValue() = default;
  LogicValue(Json v) : own_(std::move(v)) {}  // NOLINT: implicit by design
  static LogicValue ref(const Json& j) {
    LogicValue v;
    v.p_ = &j;
    return v;
  }
  [[nodiscard]] const Json& get() const { return p_ != nullptr ? *p_ : own_; }
  Json take() && { return p_ != nullptr ? *p_ : std::move(own_); }

 private:
  const Json* p_ = nullptr;
  Json own_;
};

class Logic {
 public:
  // Compiles rule. evaluators is the "$evaluators" object (or null) that {"$ref": name} resolves
  // in. Errors: unknown operator, $ref to a missing evaluator or a $ref cycle, malformed operator
  // arguments (e.g. a fractional bucket that is not [name, weight]), nesting too deep.
  static std::optional<Logic> compile(const Json& rule, const Json* evaluators, LogicError* error,
                                      std::vector<LogicError>* warnings = nullptr);

  // The rule's value; null means "no match". Never throws: an internal failure returns null and
  // sets *error (when given).
  [[nodiscard]] LogicValue evaluate(const LogicEnv& env, std::string* error = nullptr) const;

 private:
  std::shared_ptr<const LogicNode> root_;
};

// JavaScript truthiness as JsonLogic uses it ([] and "" and 0 are false, {} is true).
bool truthy(const Json& v);

}  // namespace memsnap::flags
