// JsonLogic with flagd's operators, compiled once at load time and evaluated many times.
//
// Supported: var, missing, missing_some, if (and ?:), ==, ===, !=, !==, <, <=, >, >= (< and <=
// also in the 3-argument "between" form), !, !!, and, or, in, cat, substr, + - * / %, min, max,
// merge, some, all, none, map, filter, reduce; flagd's fractional, sem_ver, starts_with,
// ends_with; {"$ref": name} to a shared evaluator, compiled once per LogicCompileSession and shared
// by every use (never inlined: a chain of evaluators each using the next twice stays linear).
// Compilation and evaluation are bounded by the budgets of flags/budgets.h. Semantics follow
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

#include "flags/budgets.h"
#include "flags/types.h"

namespace memsnap::flags {

// Expressions nested deeper than this (operators and array literals, a $ref counting as its
// evaluator inlined) are refused at compile time, so evaluation recursion is bounded.
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
  [[nodiscard]] bool borrowed() const { return p_ != nullptr; }
  Json take() && { return p_ != nullptr ? *p_ : std::move(own_); }

 private:
  const Json* p_ = nullptr;
  Json own_;
};

// What the rules of one source share when compiled: its "$evaluators" (or null), each compiled
// once at its first $ref and shared by every later one, and the budget of compiled nodes
// (kMaxCompiledNodes) they all count against. A warning inside an evaluator is reported at its
// first use only. Not thread-safe; the compiled rules outlive it.
class LogicCompileSession {
 public:
  explicit LogicCompileSession(const Json* evaluators,
                               std::size_t max_nodes = kMaxCompiledNodes);
  ~LogicCompileSession();
  LogicCompileSession(const LogicCompileSession&) = delete;
  LogicCompileSession& operator=(const LogicCompileSession&) = delete;

  [[nodiscard]] std::size_t nodes() const noexcept;  // compiled so far

  struct State;  // opaque (jsonlogic.cc)

 private:
  friend class Logic;
  std::unique_ptr<State> state_;
};

class Logic {
 public:
  // Compiles rule. evaluators is the "$evaluators" object (or null) that {"$ref": name} resolves
  // in. Errors: unknown operator, $ref to a missing evaluator or a $ref cycle, malformed operator
  // arguments (e.g. a fractional bucket that is not [name, weight]), nesting too deep, more
  // compiled nodes than the budget.
  static std::optional<Logic> compile(const Json& rule, const Json* evaluators, LogicError* error,
                                      std::vector<LogicError>* warnings = nullptr);
  // The same within session (shared evaluators, one node budget for every rule compiled in it).
  static std::optional<Logic> compile(const Json& rule, LogicCompileSession& session,
                                      LogicError* error,
                                      std::vector<LogicError>* warnings = nullptr);

  // The rule's value; null means "no match". Never throws: an internal failure, or an evaluation
  // past kMaxEvaluationSteps or kMaxEvaluationValues (the message names the budget and where in
  // the rule it ran out), returns null and sets *error (when given).
  [[nodiscard]] LogicValue evaluate(const LogicEnv& env, std::string* error = nullptr) const;

 private:
  std::shared_ptr<const LogicNode> root_;
};

// JavaScript truthiness as JsonLogic uses it ([] and "" and 0 are false, {} is true).
bool truthy(const Json& v);

}  // namespace memsnap::flags
