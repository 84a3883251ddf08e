// Flag definitions in flagd's format and their evaluation.
//
// A FlagSet is an immutable snapshot of every flag loaded from one source (a file, or a directory
// of files merged). It is built by load_flag_set / load_flag_source and is safe to evaluate from
// any number of threads; FlagStore (flag_store.h) swaps snapshots on reload.
//
// File format (JSON or YAML), flagd's flag-definition schema:
//   flags:         map of key -> { state: ENABLED|DISABLED, variants: {name: value},
//                                  defaultVariant: name|null (optional), targeting: JsonLogic
//                                  (optional), metadata: {k: scalar} (optional) }
//   $evaluators:   map of name -> JsonLogic, used as {"$ref": name} inside targeting
//   metadata:      flag set metadata, inherited by every flag of the file (the flag's own wins)
//   $schema:       ignored
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "flags/document.h"
#include "flags/jsonlogic.h"
#include "flags/types.h"

namespace memsnap::flags {

struct Flag {
  std::string key;
  bool enabled = true;
  std::vector<std::pair<std::string, Json>> variants;  // in file order
  std::optional<std::string> default_variant;
  std::optional<Logic> targeting;        // absent: no targeting (or an empty {} rule)
  Position targeting_position;           // where the targeting starts in file
  std::shared_ptr<const Json> metadata;  // set metadata overlaid with the flag's own
  FlagType type = FlagType::kString;     // the variants' type (kInteger only if all are integers)
  std::optional<Diagnostic> error;       // set: the flag is unusable, evaluates to PARSE_ERROR
  std::string file;                      // where it was defined

  [[nodiscard]] const Json* variant(std::string_view name) const;
};

struct EvalOptions {
  bool explain = false;                   // fill Resolution::trace
  std::optional<std::int64_t> timestamp;  // $flagd.timestamp; the current time when unset
};

class FlagSet {
 public:
  // Evaluates flag key for context (an object; anything else is treated as {}). type: the type
  // the caller expects, or nullopt for "whatever the flag's variants are". default_value: what
  // the caller gets on DISABLED, on ERROR and when no variant is selected.
  [[nodiscard]] Resolution evaluate(std::string_view key, const Json& context,
                                    std::optional<FlagType> type, const Json& default_value,
                                    const EvalOptions& options = {}) const;

  [[nodiscard]] const Flag* find(std::string_view key) const;
  [[nodiscard]] std::size_t size() const noexcept { return flags_.size(); }
  [[nodiscard]] std::vector<std::string> keys() const;  // sorted
  // The files it was built from, and a hash of their contents.
  [[nodiscard]] const std::vector<std::string>& files() const noexcept { return files_; }
  [[nodiscard]] std::uint64_t content_hash() const noexcept { return content_hash_; }

 private:
  friend class FlagSetBuilder;
  [[nodiscard]] Resolution evaluate_unguarded(std::string_view key, const Json& context,
                                              std::optional<FlagType> type,
                                              const Json& default_value,
                                              const EvalOptions& options) const;
  struct Hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };
  std::unordered_map<std::string, Flag, Hash, std::equal_to<>> flags_;
  std::vector<std::string> files_;
  std::uint64_t content_hash_ = 0;
};

struct LoadOptions {
  // Reject the whole source when any flag is unusable (kFlagError), not only on file-level
  // errors. On for reloads and `memsnap flags check`; off to evaluate what can be evaluated.
  bool strict = false;
};

struct LoadResult {
  std::shared_ptr<const FlagSet> flags;  // null when rejected
  std::vector<Diagnostic> diagnostics;   // errors, flag errors and warnings, in file order

  [[nodiscard]] bool ok() const noexcept { return flags != nullptr; }
  // The diagnostics that caused the rejection (or, when ok(), the flag errors), one per line.
  [[nodiscard]] std::string error_text() const;
};

// Evaluates every flag that has targeting once, against an empty context, and returns a flag error
// (at the targeting's file:line:col) for each one that runs past an evaluation budget
// (flags/budgets.h) even so. `memsnap flags check` reports them; a rule whose cost depends on the
// context can still meet its budget later, at evaluation, and resolves to an ERROR then.
std::vector<Diagnostic> check_evaluation_budgets(const FlagSet& set);

// Builds a set from already-parsed documents (flag keys must be unique across them).
LoadResult build_flag_set(const std::vector<Document>& documents, const LoadOptions& options = {});

// Parses and builds from text; file names the source in diagnostics and picks the format.
LoadResult load_flag_text(std::string text, const std::string& file,
                          const LoadOptions& options = {},
                          SourceFormat format = SourceFormat::kAuto);

// Loads a file, or every *.json, *.yaml and *.yml file (not starting with '.') of a directory,
// sorted by name, symlinks followed (a Kubernetes ConfigMap mount works as it is).
LoadResult load_flag_source(const std::string& path, const LoadOptions& options = {});

}  // namespace memsnap::flags
