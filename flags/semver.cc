#include "flags/semver.h"

#include <cctype>
#include <vector>

namespace memsnap::flags {
namespace {

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_ident_char(char c) {
  return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-';
}

// Digits with no leading zero; consumes them from text.
bool take_number(std::string_view& text, std::string& out) {
  std::size_t i = 0;
  while (i < text.size() && is_digit(text[i])) ++i;
  if (i == 0 || (i > 1 && text[0] == '0')) return false;
  out.assign(text.substr(0, i));
  text.remove_prefix(i);
  return true;
}

bool all_digits(std::string_view s) {
  for (char c : s) {
    if (!is_digit(c)) return false;
  }
  return !s.empty();
}

std::vector<std::string_view> split_dots(std::string_view s) {
  std::vector<std::string_view> parts;
  std::size_t start = 0;
  for (;;) {
    const std::size_t dot = s.find('.', start);
    parts.push_back(s.substr(start, dot == std::string_view::npos ? dot : dot - start));
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return parts;
}

// Dot-separated identifiers, none empty; numeric ones without leading zeros when prerelease.
bool valid_identifiers(std::string_view s, bool prerelease) {
  for (std::string_view id : split_dots(s)) {
    if (id.empty()) return false;
    for (char c : id) {
      if (!is_ident_char(c)) return false;
    }
    if (prerelease && all_digits(id) && id.size() > 1 && id[0] == '0') return false;
  }
  return true;
}

int compare_numeric(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return a.size() < b.size() ? -1 : 1;
  return a.compare(b) < 0 ? -1 : (a == b ? 0 : 1);
}

int compare_prerelease(std::string_view a, std::string_view b) {
  if (a == b) return 0;
  if (a.empty()) return 1;  // a release orders after any of its pre-releases
  if (b.empty()) return -1;
  const auto pa = split_dots(a);
  const auto pb = split_dots(b);
  for (std::size_t i = 0; i < pa.size() && i < pb.size(); ++i) {
    const bool na = all_digits(pa[i]);
    const bool nb = all_digits(pb[i]);
    int c = 0;
    if (na && nb) {
      c = compare_numeric(pa[i], pb[i]);
    } else if (na != nb) {
      c = na ? -1 : 1;  // numeric identifiers order before alphanumeric ones
    } else {
      c = pa[i].compare(pb[i]) < 0 ? -1 : (pa[i] == pb[i] ? 0 : 1);
    }
    if (c != 0) return c;
  }
  if (pa.size() == pb.size()) return 0;
  return pa.size() < pb.size() ? -1 : 1;
}

}  // namespace

std::optional<SemVer> parse_semver(std::string_view text) {
  if (!text.empty() && (text[0] == 'v' || text[0] == 'V')) text.remove_prefix(1);
  SemVer v;
  if (!take_number(text, v.major)) return std::nullopt;
  if (text.empty()) {
    v.minor = v.patch = "0";
    return v;
  }
  if (text[0] != '.') return std::nullopt;
  text.remove_prefix(1);
  if (!take_number(text, v.minor)) return std::nullopt;
  if (text.empty()) {
    v.patch = "0";
    return v;
  }
  if (text[0] != '.') return std::nullopt;
  text.remove_prefix(1);
  if (!take_number(text, v.patch)) return std::nullopt;
  if (!text.empty() && text[0] == '-') {
    text.remove_prefix(1);
    const std::size_t plus = text.find('+');
    const std::string_view pre = text.substr(0, plus);
    if (!valid_identifiers(pre, true)) return std::nullopt;
    v.prerelease.assign(pre);
    text.remove_prefix(pre.size());
  }
  if (!text.empty() && text[0] == '+') {
    text.remove_prefix(1);
    if (!valid_identifiers(text, false)) return std::nullopt;
    text = {};
  }
  if (!text.empty()) return std::nullopt;
  return v;
}

int compare_semver(const SemVer& a, const SemVer& b) {
  if (int c = compare_numeric(a.major, b.major); c != 0) return c;
  if (int c = compare_numeric(a.minor, b.minor); c != 0) return c;
  if (int c = compare_numeric(a.patch, b.patch); c != 0) return c;
  return compare_prerelease(a.prerelease, b.prerelease);
}

std::optional<bool> semver_matches(std::string_view left, std::string_view op,
                                   std::string_view right) {
  const auto a = parse_semver(left);
  const auto b = parse_semver(right);
  if (!a || !b) return std::nullopt;
  if (op == "^") return a->major == b->major;
  if (op == "~") return a->major == b->major && a->minor == b->minor;
  const int c = compare_semver(*a, *b);
  if (op == "=") return c == 0;
  if (op == "!=") return c != 0;
  if (op == "<") return c < 0;
  if (op == "<=") return c <= 0;
  if (op == ">") return c > 0;
  if (op == ">=") return c >= 0;
  return std::nullopt;
}

}  // namespace memsnap::flags
