// The vocabulary of the flag evaluator: value types, reasons, error codes, diagnostics and the
// result of one evaluation. Plain data; no dependency on anything in core/.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace memsnap::flags {

using Json = nlohmann::json;

// The type a caller asks for (OpenFeature's typed resolvers).
enum class FlagType { kBoolean, kString, kInteger, kFloat, kObject };

// OpenFeature / flagd resolution reasons.
enum class Reason { kStatic, kTargetingMatch, kDefault, kDisabled, kError };

// OpenFeature error codes as flagd uses them. kNone when the evaluation succeeded.
enum class ErrorCode { kNone, kFlagNotFound, kParseError, kTypeMismatch, kGeneral };

// "BOOLEAN"-style names are not used by flagd for types; these are the lower-case CLI names:
// "boolean", "string", "integer", "float", "object".
std::string_view type_name(FlagType type) noexcept;
std::optional<FlagType> parse_type(std::string_view name) noexcept;
// "STATIC", "TARGETING_MATCH", "DEFAULT", "DISABLED", "ERROR".
std::string_view reason_name(Reason reason) noexcept;
// "FLAG_NOT_FOUND", "PARSE_ERROR", "TYPE_MISMATCH", "GENERAL"; "" for kNone.
std::string_view error_code_name(ErrorCode code) noexcept;

// A problem found in a flag source, located in it. line and col are 1-based; 0 when unknown.
struct Diagnostic {
  enum class Severity {
    kError,      // the file is rejected
    kFlagError,  // one flag is unusable (evaluates to PARSE_ERROR); rejected in strict mode
    kWarning,    // legal but probably not what was meant (e.g. fractional weights summing to 0)
  };
  Severity severity = Severity::kError;
  std::string file;
  int line = 0;
  int col = 0;
  std::string message;

  // "file:line:col: message", with "warning: " before warnings' messages.
  [[nodiscard]] std::string to_string() const;
};

// The result of evaluating one flag. value is the caller's default whenever the reason is
// kError or kDisabled, or when no variant was selected.
struct Resolution {
  std::string flag;
  Json value;
  std::optional<std::string> variant;
  Reason reason = Reason::kError;
  ErrorCode error_code = ErrorCode::kNone;
  std::string error_message;  // empty when error_code is kNone
  // The flag's metadata (flag set metadata overlaid with the flag's own), shared with the
  // snapshot rather than copied; null when the flag was not found.
  std::shared_ptr<const Json> metadata_ptr;
  Json trace;  // null unless explain was asked: an array of steps

  [[nodiscard]] bool ok() const noexcept { return error_code == ErrorCode::kNone; }
  // The metadata, or an empty object.
  [[nodiscard]] const Json& metadata() const noexcept;
};

}  // namespace memsnap::flags
