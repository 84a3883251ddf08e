#include "core/snapshot/snapshot_origin.h"

namespace memsnap {
namespace {

constexpr std::size_t kMaxKeyBytes = 64;
constexpr std::size_t kMaxValueBytes = 256;

// Empty when the key is well formed, else why not.
std::string key_problem(std::string_view key) {
  if (key.empty() || key.size() > kMaxKeyBytes) return "a key must have 1-64 characters";
  for (char c : key) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) {
      return "key \"" + std::string(key) + "\" has a character outside [a-z0-9_]";
    }
  }
  return {};
}

std::string value_problem(std::string_view key, std::string_view value) {
  if (value.size() > kMaxValueBytes) {
    return "the value of " + std::string(key) + " is longer than 256 characters";
  }
  for (char c : value) {
    if (c < 0x20 || c > 0x7e) {
      return "the value of " + std::string(key) + " has a character that is not printable ASCII";
    }
  }
  return {};
}

}  // namespace

Result<SnapshotOrigin> SnapshotOrigin::parse(std::string_view text) {
  SnapshotOrigin origin;
  std::size_t line_no = 0;
  while (!text.empty()) {
    ++line_no;
    const std::size_t end = text.find('\n');
    auto bad = [&](const std::string& why) {
      return make_error(Errc::kSnapshotBadHeader,
                        "origin record, line " + std::to_string(line_no) + ": " + why);
    };
    if (end == std::string_view::npos) return bad("does not end with a newline");
    const std::string_view line = text.substr(0, end);
    text.remove_prefix(end + 1);
    const std::size_t eq = line.find('=');
    if (eq == std::string_view::npos) return bad("no '=' between key and value");
    const std::string_view key = line.substr(0, eq);
    const std::string_view value = line.substr(eq + 1);
    if (std::string why = key_problem(key); !why.empty()) return bad(why);
    if (std::string why = value_problem(key, value); !why.empty()) return bad(why);
    if (origin.find(key) != nullptr) return bad("key " + std::string(key) + " appears twice");
    origin.fields_.emplace_back(std::string(key), std::string(value));
  }
  return origin;
}

Status SnapshotOrigin::set(std::string_view key, std::string_view value) {
  if (std::string why = key_problem(key); !why.empty()) {
    return make_error(Errc::kInvalidArgument, "snapshot origin: " + why);
  }
  if (std::string why = value_problem(key, value); !why.empty()) {
    return make_error(Errc::kInvalidArgument, "snapshot origin: " + why);
  }
  for (Field& f : fields_) {
    if (f.first == key) {
      f.second = std::string(value);
      return {};
    }
  }
  fields_.emplace_back(std::string(key), std::string(value));
  return {};
}

const std::string* SnapshotOrigin::find(std::string_view key) const {
  for (const Field& f : fields_) {
    if (f.first == key) return &f.second;
  }
  return nullptr;
}

std::string SnapshotOrigin::strategy() const {
  const std::string* s = find(kOriginStrategy);
  return s == nullptr ? std::string() : *s;
}

std::string SnapshotOrigin::serialize() const {
  std::string out;
  for (const Field& f : fields_) out += f.first + "=" + f.second + "\n";
  return out;
}

}  // namespace memsnap
