#include "flags/types.h"

namespace memsnap::flags {

std::string_view type_name(FlagType type) noexcept {
  switch (type) {
    case FlagType::kBoolean:
      return "boolean";
    case FlagType::kString:
      return "string";
    case FlagType::kInteger:
      return "integer";
    case FlagType::kFloat:
      return "float";
    case FlagType::kObject:
      return "object";
  }
  return "unknown";
}

std::optional<FlagType> parse_type(std::string_view name) noexcept {
  for (FlagType t : {FlagType::kBoolean, FlagType::kString, FlagType::kInteger, FlagType::kFloat,
                     FlagType::kObject}) {
    if (type_name(t) == name) return t;
  }
  return std::nullopt;
}

std::string_view reason_name(Reason reason) noexcept {
  switch (reason) {
    case Reason::kStatic:
      return "STATIC";
    case Reason::kTargetingMatch:
      return "TARGETING_MATCH";
    case Reason::kDefault:
      return "DEFAULT";
    case Reason::kDisabled:
      return "DISABLED";
    case Reason::kError:
      return "ERROR";
  }
  return "ERROR";
}

std::string_view error_code_name(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kNone:
      return "";
    case ErrorCode::kFlagNotFound:
      return "FLAG_NOT_FOUND";
    case ErrorCode::kParseError:
      return "PARSE_ERROR";
    case ErrorCode::kTypeMismatch:
      return "TYPE_MISMATCH";
    case ErrorCode::kGeneral:
      return "GENERAL";
  }
  return "GENERAL";
}

const Json& Resolution::metadata() const noexcept {
  static const Json kEmpty = Json::object();
  return metadata_ptr != nullptr ? *metadata_ptr : kEmpty;
}

std::string Diagnostic::to_string() const {
  std::string out = file.empty() ? std::string("<input>") : file;
  if (line > 0) {
    out += ':' + std::to_string(line);
    if (col > 0) out += ':' + std::to_string(col);
  }
  out += ": ";
  if (severity == Severity::kWarning) out += "warning: ";
  out += message;
  return out;
}

}  // namespace memsnap::flags
