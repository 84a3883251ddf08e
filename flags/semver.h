// Semantic versions as flagd's sem_ver reads them (golang.org/x/mod/semver): an optional "v" or
// "V", MAJOR[.MINOR[.PATCH[-PRERELEASE][+BUILD]]] with no leading zeros; a partial version
// ("1", "1.2") means .0 for what is missing and cannot carry a pre-release; build metadata is
// ignored when comparing.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace memsnap::flags {

struct SemVer {
  std::string major, minor, patch;  // decimal digits, no leading zeros
  std::string prerelease;           // without the '-'; empty when none
};

std::optional<SemVer> parse_semver(std::string_view text);

// <0, 0, >0 as a orders before, equal to or after b (semver precedence).
int compare_semver(const SemVer& a, const SemVer& b);

// flagd's operators: "=", "!=", "<", "<=", ">", ">=", "^" (same major), "~" (same major and
// minor). nullopt for an unknown operator or an invalid version.
std::optional<bool> semver_matches(std::string_view left, std::string_view op,
                                   std::string_view right);

}  // namespace memsnap::flags
