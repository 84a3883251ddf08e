#include "config/daemon_config.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <system_error>
#include <utility>
#include <variant>

#include <yaml-cpp/yaml.h>

#include "text/utf8.h"

namespace memsnap::config {
namespace {

namespace fs = std::filesystem;

// ---- error locations ----

// Where errors are reported and how a yaml-cpp Mark (0-based) becomes a 1-based position. For an
// override the parsed text is only the value, which starts value_offset bytes into the override.
struct Source {
  std::string file;
  int value_offset = 0;  // added to columns on the first line
  fs::path base_dir;     // relative plugins.directory / flags.file are resolved against it
};

struct Pos {
  int line = 0;
  int column = 0;
};

Pos pos_of(const Source& src, const YAML::Mark& m) {
  if (m.line < 0 || m.column < 0) return {};  // yaml-cpp's null mark
  return {m.line + 1, m.column + 1 + (m.line == 0 ? src.value_offset : 0)};
}

// What a codec needs to report a problem with one value.
struct Where {
  const Source* src;
  std::string key;  // "section.key"
  Pos pos;
  std::vector<ConfigError>* errors;

  void fail(std::string message) const {
    errors->push_back({src->file, pos.line, pos.column, key, std::move(message)});
  }
  // A problem inside the value (an element of a sequence), at its own position.
  void fail_at(const YAML::Mark& m, std::string message) const {
    const Pos p = pos_of(*src, m);
    errors->push_back({src->file, p.line, p.column, key, std::move(message)});
  }
};

// ---- what a YAML node is, by the YAML 1.2 core schema ----
//
// yaml-cpp's as<T>() is lenient in ways that hide mistakes (a quoted "4" converts to 4, 0600
// becomes 384, yes/on become true), so nodes are classified here and each codec accepts only
// its own kind.

enum class Kind { kNull, kBool, kInt, kFloat, kString, kMap, kSeq, kBadTag };

bool is_core_bool(const std::string& s) {
  return s == "true" || s == "True" || s == "TRUE" || s == "false" || s == "False" || s == "FALSE";
}

bool all_of_chars(std::string_view s, int (*pred)(int)) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [pred](char c) {
    return pred(static_cast<unsigned char>(c)) != 0;
  });
}

bool is_core_int(std::string_view s) {
  if (s.starts_with("0o")) {
    return s.size() > 2 && s.substr(2).find_first_not_of("01234567") == std::string_view::npos;
  }
  if (s.starts_with("0x")) return all_of_chars(s.substr(2), isxdigit);
  if (!s.empty() && (s[0] == '-' || s[0] == '+')) s.remove_prefix(1);
  return all_of_chars(s, isdigit);
}

bool is_core_float(std::string_view s) {
  if (!s.empty() && (s[0] == '-' || s[0] == '+')) s.remove_prefix(1);
  if (s == ".inf" || s == ".Inf" || s == ".INF" || s == ".nan" || s == ".NaN" || s == ".NAN") {
    return true;
  }
  std::size_t i = 0;
  std::size_t digits = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i])) != 0) ++i, ++digits;
  if (i < s.size() && s[i] == '.') {
    ++i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i])) != 0) ++i, ++digits;
  }
  if (digits == 0) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '-' || s[i] == '+')) ++i;
    if (!all_of_chars(s.substr(i), isdigit)) return false;
    i = s.size();
  }
  return i == s.size();
}

Kind kind_of(const YAML::Node& n) {
  if (n.IsMap()) return Kind::kMap;
  if (n.IsSequence()) return Kind::kSeq;
  if (!n.IsScalar()) return Kind::kNull;  // null or undefined
  const std::string& tag = n.Tag();
  // "!" is the non-specific tag yaml-cpp gives quoted scalars: always strings.
  if (tag == "!" || tag == "tag:yaml.org,2002:str") return Kind::kString;
  if (tag != "?" && tag != "tag:yaml.org,2002:int" && tag != "tag:yaml.org,2002:bool" &&
      tag != "tag:yaml.org,2002:float") {
    return Kind::kBadTag;
  }
  const std::string& s = n.Scalar();
  if (is_core_bool(s)) return Kind::kBool;
  if (is_core_int(s)) return Kind::kInt;
  if (is_core_float(s)) return Kind::kFloat;
  return Kind::kString;
}

std::string shorten(const std::string& s) {
  std::string out;
  for (char c : s.substr(0, 40)) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  if (s.size() > 40) out += "...";
  return out;
}

// "the string \"abc\"", "a map", ... for messages.
std::string describe(const YAML::Node& n) {
  switch (kind_of(n)) {
    case Kind::kNull:
      return "null";
    case Kind::kBool:
      return "the boolean " + n.Scalar();
    case Kind::kInt:
      return "the integer " + n.Scalar();
    case Kind::kFloat:
      return "the number " + n.Scalar();
    case Kind::kString:
      return "the string \"" + shorten(n.Scalar()) + "\"";
    case Kind::kMap:
      return "a map";
    case Kind::kSeq:
      return "a sequence";
    case Kind::kBadTag:
      return "a value tagged " + n.Tag();
  }
  return "?";
}

// ---- suggestions for unknown names ----

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// The closest candidate, if close enough to be a likely typo.
std::optional<std::string_view> closest(std::string_view word,
                                        const std::vector<std::string_view>& candidates) {
  std::optional<std::string_view> best;
  std::size_t best_d = std::max<std::size_t>(2, word.size() / 3) + 1;
  for (std::string_view c : candidates) {
    // A truncated or extended name ("warning" for "warn") counts as one edit, however long.
    const bool prefix =
        std::min(word.size(), c.size()) >= 3 && (word.starts_with(c) || c.starts_with(word));
    const std::size_t d = prefix ? 1 : edit_distance(word, c);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  return best;
}

// ---- codecs: one per value type; parse() reports through Where and returns nullopt on error ----

std::optional<std::string> parse_string(const YAML::Node& n, const Where& w) {
  const Kind k = kind_of(n);
  if (k == Kind::kString) {
    if (n.Scalar().find('\0') != std::string::npos) {
      w.fail("contains a NUL byte");
      return std::nullopt;
    }
    return n.Scalar();
  }
  std::string message = "expected a string, got " + describe(n);
  if (k == Kind::kNull) message += " (write \"\" for an empty string)";
  if (k == Kind::kBool || k == Kind::kInt || k == Kind::kFloat) message += " (quote it)";
  w.fail(std::move(message));
  return std::nullopt;
}

std::optional<std::int64_t> parse_int(const YAML::Node& n, const Where& w, std::int64_t min,
                                      std::int64_t max) {
  if (kind_of(n) != Kind::kInt) {
    w.fail("expected an integer, got " + describe(n));
    return std::nullopt;
  }
  std::string_view s = n.Scalar();
  if (s.starts_with("0x") || s.starts_with("0o")) {
    w.fail("write integers in decimal, got " + std::string(s));
    return std::nullopt;
  }
  if (s[0] == '+') s.remove_prefix(1);
  const std::string_view digits = s[0] == '-' ? s.substr(1) : s;
  if (digits.size() > 1 && digits[0] == '0') {
    // YAML 1.1 readers (yaml-cpp's own as<int>) take a leading 0 as octal, YAML 1.2 as decimal.
    w.fail("ambiguous leading zero in " + n.Scalar() + " (write it without)");
    return std::nullopt;
  }
  std::int64_t v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < min || v > max) {
    w.fail("must be between " + std::to_string(min) + " and " + std::to_string(max) + ", got " +
           n.Scalar());
    return std::nullopt;
  }
  return v;
}

std::optional<bool> parse_bool(const YAML::Node& n, const Where& w) {
  if (kind_of(n) != Kind::kBool) {
    w.fail("expected true or false, got " + describe(n));
    return std::nullopt;
  }
  return n.Scalar()[0] == 't' || n.Scalar()[0] == 'T';
}

void emit_string(YAML::Emitter& e, const std::string& s) { e << YAML::DoubleQuoted << s; }

struct StringCodec {
  // Checks a parsed string; returns an error message or "".
  std::function<std::string(const std::string&)> check;
  std::optional<std::string> parse(const YAML::Node& n, const Where& w) const {
    std::optional<std::string> s = parse_string(n, w);
    if (!s) return std::nullopt;
    if (check) {
      if (std::string message = check(*s); !message.empty()) {
        w.fail(std::move(message));
        return std::nullopt;
      }
    }
    return s;
  }
  void emit(YAML::Emitter& e, const std::string& s) const { emit_string(e, s); }
};

std::string normalise(const fs::path& p) {
  std::string s = p.lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

struct PathCodec {
  bool absolute_required = false;  // else "" is allowed and relative paths are resolved
  bool not_root = false;
  std::size_t max_length = 4095;  // PATH_MAX - 1
  bool empty_allowed = false;     // with absolute_required: "" (none) is allowed too
  std::optional<std::string> parse(const YAML::Node& n, const Where& w) const {
    std::optional<std::string> s = parse_string(n, w);
    if (!s) return std::nullopt;
    if (s->empty()) {
      if (absolute_required && !empty_allowed) {
        w.fail("must not be empty");
        return std::nullopt;
      }
      return s;
    }
    const fs::path p(*s);
    if (absolute_required && !p.is_absolute()) {
      w.fail("must be an absolute path, got \"" + shorten(*s) + "\"");
      return std::nullopt;
    }
    std::string out = normalise(p.is_absolute() ? p : w.src->base_dir / p);
    if (not_root && out == "/") {
      w.fail("must not be /");
      return std::nullopt;
    }
    if (out.size() > max_length) {
      w.fail("must be at most " + std::to_string(max_length) + " bytes long, got " +
             std::to_string(out.size()));
      return std::nullopt;
    }
    return out;
  }
  void emit(YAML::Emitter& e, const std::string& s) const { emit_string(e, s); }
};

template <typename T>
struct IntCodec {
  std::int64_t min;
  std::int64_t max;
  std::optional<T> parse(const YAML::Node& n, const Where& w) const {
    std::optional<std::int64_t> v = parse_int(n, w, min, max);
    if (!v) return std::nullopt;
    return static_cast<T>(*v);
  }
  void emit(YAML::Emitter& e, T v) const { e << static_cast<std::int64_t>(v); }
};

struct MillisCodec {
  std::int64_t min;
  std::int64_t max;
  std::optional<std::chrono::milliseconds> parse(const YAML::Node& n, const Where& w) const {
    std::optional<std::int64_t> v = parse_int(n, w, min, max);
    if (!v) return std::nullopt;
    return std::chrono::milliseconds(*v);
  }
  void emit(YAML::Emitter& e, std::chrono::milliseconds v) const {
    e << static_cast<std::int64_t>(v.count());
  }
};

struct BoolCodec {
  std::optional<bool> parse(const YAML::Node& n, const Where& w) const { return parse_bool(n, w); }
  void emit(YAML::Emitter& e, bool v) const { e << v; }
};

// Octal text, as chmod reads it; never through a YAML integer (see the header).
struct ModeCodec {
  std::optional<std::uint32_t> parse(const YAML::Node& n, const Where& w) const {
    const Kind k = kind_of(n);
    if (k == Kind::kString || k == Kind::kInt) {
      std::string_view s = n.Scalar();
      if (s.starts_with("0o")) s.remove_prefix(2);
      std::uint32_t v = 0;
      const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v, 8);
      if (!s.empty() && ec == std::errc() && end == s.data() + s.size() && v <= 0777) return v;
    }
    w.fail("expected permission bits in octal, 0000 to 0777 (like \"0600\"), got " + describe(n));
    return std::nullopt;
  }
  void emit(YAML::Emitter& e, std::uint32_t v) const {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%04o", static_cast<unsigned>(v));
    emit_string(e, buf);
  }
};

struct UidListCodec {
  std::optional<std::vector<std::uint32_t>> parse(const YAML::Node& n, const Where& w) const {
    if (!n.IsSequence()) {
      w.fail("expected a sequence of uids like [1000, 1001], got " + describe(n));
      return std::nullopt;
    }
    std::vector<std::uint32_t> out;
    bool ok = true;
    for (const YAML::Node& item : n) {
      // Each element at its own position: several bad uids are all reported.
      Where at = w;
      at.pos = pos_of(*w.src, item.Mark());
      // (uid_t)-1 means "no uid" to chown and friends, so it is not a valid peer.
      std::optional<std::int64_t> v = parse_int(item, at, 0, 4294967294);
      if (v) {
        out.push_back(static_cast<std::uint32_t>(*v));
      } else {
        ok = false;
      }
    }
    if (!ok) return std::nullopt;
    return out;
  }
  void emit(YAML::Emitter& e, const std::vector<std::uint32_t>& v) const {
    e << YAML::Flow << YAML::BeginSeq;
    for (std::uint32_t uid : v) e << uid;
    e << YAML::EndSeq;
  }
};

template <typename E>
struct EnumCodec {
  std::vector<std::pair<std::string_view, E>> names;
  std::optional<E> parse(const YAML::Node& n, const Where& w) const {
    std::optional<std::string> s = parse_string(n, w);
    if (!s) return std::nullopt;
    std::vector<std::string_view> all;
    for (const auto& [name, value] : names) {
      if (name == *s) return value;
      all.push_back(name);
    }
    std::string message = "unknown value \"" + shorten(*s) + "\"";
    if (auto near = closest(*s, all)) message += " (did you mean \"" + std::string(*near) + "\"?)";
    message += "; one of:";
    for (std::string_view name : all) message += " " + std::string(name);
    w.fail(std::move(message));
    return std::nullopt;
  }
  void emit(YAML::Emitter& e, E v) const {
    for (const auto& [name, value] : names) {
      if (value == v) {
        emit_string(e, std::string(name));
        return;
      }
    }
    emit_string(e, "?");  // not a valid enumerator: reading it back fails, as it should
  }
};

const std::vector<std::pair<std::string_view, LogLevel>> kLevelNames = {
    {"trace", LogLevel::kTrace}, {"debug", LogLevel::kDebug}, {"info", LogLevel::kInfo},
    {"warn", LogLevel::kWarn},   {"error", LogLevel::kError}, {"critical", LogLevel::kCritical},
    {"off", LogLevel::kOff}};
const std::vector<std::pair<std::string_view, LogFormat>> kFormatNames = {
    {"text", LogFormat::kText}, {"json", LogFormat::kJson}};
const std::vector<std::pair<std::string_view, DurableWrite>> kDurableWriteNames = {
    {"buffered", DurableWrite::kBuffered}, {"direct", DurableWrite::kDirect}};

// ---- metrics.listen ----

struct ListenAddress {
  std::string host;
  int port = 0;
  bool loopback = false;
};

bool is_hostname(std::string_view h) {
  if (h.empty() || h.size() > 253) return false;
  std::size_t start = 0;
  while (start <= h.size()) {
    std::size_t dot = h.find('.', start);
    if (dot == std::string_view::npos) dot = h.size();
    const std::string_view label = h.substr(start, dot - start);
    if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-') {
      return false;
    }
    for (char c : label) {
      if (std::isalnum(static_cast<unsigned char>(c)) == 0 && c != '-') return false;
    }
    start = dot + 1;
  }
  return true;
}

// A parsed "host:port", or the reason it is not one.
std::variant<ListenAddress, std::string> parse_listen(std::string_view s) {
  ListenAddress a;
  std::string_view port;
  if (s.starts_with("[")) {
    const std::size_t close = s.find(']');
    if (close == std::string_view::npos || close + 1 >= s.size() || s[close + 1] != ':') {
      return std::string("expected [ipv6]:port");
    }
    a.host = std::string(s.substr(1, close - 1));
    port = s.substr(close + 2);
    in6_addr addr{};
    if (inet_pton(AF_INET6, a.host.c_str(), &addr) != 1) {
      return "\"" + a.host + "\" is not an IPv6 address";
    }
    a.loopback =
        IN6_IS_ADDR_LOOPBACK(&addr) || (IN6_IS_ADDR_V4MAPPED(&addr) && addr.s6_addr[12] == 127);
  } else {
    const std::size_t colon = s.rfind(':');
    if (colon == std::string_view::npos) return std::string("expected host:port");
    a.host = std::string(s.substr(0, colon));
    port = s.substr(colon + 1);
    if (a.host.empty()) return std::string("the host is missing (0.0.0.0 listens everywhere)");
    if (a.host.find(':') != std::string::npos) {
      return std::string("an IPv6 address must be in brackets, like [::1]:9464");
    }
    if (a.host.find_first_not_of("0123456789.") == std::string::npos) {
      in_addr addr{};
      if (inet_pton(AF_INET, a.host.c_str(), &addr) != 1) {
        return "\"" + a.host + "\" is not an IPv4 address";
      }
      a.loopback = a.host.starts_with("127.");
    } else if (is_hostname(a.host)) {
      std::string lower = a.host;
      std::transform(lower.begin(), lower.end(), lower.begin(),
                     [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      // Other names could resolve anywhere, so only this one counts as loopback.
      a.loopback = lower == "localhost";
    } else {
      return "\"" + a.host + "\" is not a host name or address";
    }
  }
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), a.port);
  if (port.empty() || port[0] == '+' || port[0] == '-' || ec != std::errc() ||
      end != port.data() + port.size() || a.port < 1 || a.port > 65535) {
    return "the port must be 1 to 65535, got \"" + std::string(port) + "\"";
  }
  return a;
}

// ---- the schema ----

struct Field {
  std::string_view section;
  std::string_view key;
  bool reloadable;  // SIGHUP can apply a change
  std::function<bool(const YAML::Node&, const Where&, DaemonConfig&)> parse;
  std::function<void(YAML::Emitter&, const DaemonConfig&)> emit;
  std::function<bool(const DaemonConfig&, const DaemonConfig&)> equal;

  [[nodiscard]] std::string name() const { return std::string(section) + "." + std::string(key); }
};

template <typename S, typename T, typename Codec>
Field field(std::string_view section, std::string_view key, bool reloadable, S DaemonConfig::*sec,
            T S::*member, Codec codec) {
  return Field{section,
               key,
               reloadable,
               [=](const YAML::Node& n, const Where& w, DaemonConfig& c) {
                 std::optional<T> v = codec.parse(n, w);
                 if (!v) return false;
                 (c.*sec).*member = std::move(*v);
                 return true;
               },
               [=](YAML::Emitter& e, const DaemonConfig& c) { codec.emit(e, (c.*sec).*member); },
               [=](const DaemonConfig& a, const DaemonConfig& b) {
                 return (a.*sec).*member == (b.*sec).*member;
               }};
}

std::string check_flag_key(const std::string& s) { return s.empty() ? "must not be empty" : ""; }

std::string check_plugin_name(const std::string& s) {
  const bool ok = !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
  });
  return ok ? "" : "must be a plugin name, [a-z0-9_]+, got \"" + shorten(s) + "\"";
}

std::string check_group(const std::string& s) {
  if (s.empty()) return "";
  // The portable user/group name set (POSIX), with a trailing $ as Samba machine accounts use.
  const std::string_view body =
      s.back() == '$' ? std::string_view(s).substr(0, s.size() - 1) : std::string_view(s);
  const bool ok =
      !body.empty() && s.size() <= 32 && body[0] != '-' &&
      std::all_of(body.begin(), body.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '.' || c == '_' || c == '-';
      });
  return ok ? "" : "\"" + shorten(s) + "\" is not a valid group name";
}

std::string check_listen(const std::string& s) {
  if (s.empty()) return "";
  auto parsed = parse_listen(s);
  if (const std::string* why = std::get_if<std::string>(&parsed)) return *why;
  return "";
}

const std::vector<Field>& schema() {
  using DC = DaemonConfig;
  static const std::vector<Field> fields = {
      field("plugins", "directory", false, &DC::plugins, &PluginsConfig::directory, PathCodec{}),
      field("flags", "file", true, &DC::flags, &FlagsConfig::file, PathCodec{}),
      field("flags", "strategy_flag", true, &DC::flags, &FlagsConfig::strategy_flag,
            StringCodec{check_flag_key}),
      field("flags", "pause_mode_flag", true, &DC::flags, &FlagsConfig::pause_mode_flag,
            StringCodec{check_flag_key}),
      field("snapshots", "directory", false, &DC::snapshots, &SnapshotsConfig::directory,
            PathCodec{.absolute_required = true, .not_root = true}),
      field("snapshots", "durable_write", true, &DC::snapshots, &SnapshotsConfig::durable_write,
            EnumCodec<DurableWrite>{kDurableWriteNames}),
      field("state", "directory", false, &DC::state, &StateConfig::directory,
            PathCodec{.absolute_required = true, .not_root = true, .empty_allowed = true}),
      // sun_path holds 108 bytes with the terminating NUL.
      field("control", "socket", false, &DC::control, &ControlConfig::socket,
            PathCodec{.absolute_required = true, .not_root = true, .max_length = 107}),
      // Handshake sockets are <directory>/<name> (sun_path: 107 bytes for the whole path).
      field("control", "handshake_directory", false, &DC::control,
            &ControlConfig::handshake_directory,
            PathCodec{.absolute_required = true, .not_root = true, .max_length = 80}),
      field("control", "mode", false, &DC::control, &ControlConfig::mode, ModeCodec{}),
      field("control", "group", false, &DC::control, &ControlConfig::group,
            StringCodec{check_group}),
      field("control", "allowed_uids", false, &DC::control, &ControlConfig::allowed_uids,
            UidListCodec{}),
      field("control", "max_request_bytes", false, &DC::control, &ControlConfig::max_request_bytes,
            IntCodec<std::uint64_t>{1024, std::int64_t{1} << 30}),
      field("metrics", "listen", false, &DC::metrics, &MetricsConfig::listen,
            StringCodec{check_listen}),
      field("metrics", "allow_non_loopback", false, &DC::metrics,
            &MetricsConfig::allow_non_loopback, BoolCodec{}),
      field("limits", "max_concurrent_pauses", true, &DC::limits,
            &LimitsConfig::max_concurrent_pauses, IntCodec<int>{1, 1024}),
      field("limits", "max_concurrent_resumes", true, &DC::limits,
            &LimitsConfig::max_concurrent_resumes, IntCodec<int>{1, 1024}),
      field("limits", "handshake_timeout_ms", true, &DC::limits, &LimitsConfig::handshake_timeout,
            MillisCodec{1, 3'600'000}),
      field("limits", "max_guest_size", true, &DC::limits, &LimitsConfig::max_guest_size,
            IntCodec<std::uint64_t>{4096, std::int64_t{1} << 50}),
      field("limits", "max_sandboxes", true, &DC::limits, &LimitsConfig::max_sandboxes,
            IntCodec<int>{1, 1'000'000}),
      field("limits", "max_background_exports", true, &DC::limits,
            &LimitsConfig::max_background_exports, IntCodec<int>{1, 4096}),
      field("limits", "max_export_backlog_bytes", true, &DC::limits,
            &LimitsConfig::max_export_backlog_bytes,
            IntCodec<std::uint64_t>{std::int64_t{1} << 20, std::int64_t{1} << 50}),
      field("strategy", "fallback", true, &DC::strategy, &StrategyConfig::fallback,
            StringCodec{check_plugin_name}),
      field("strategy", "allow_fallback", true, &DC::strategy, &StrategyConfig::allow_fallback,
            BoolCodec{}),
      field("logging", "level", true, &DC::logging, &LoggingConfig::level,
            EnumCodec<LogLevel>{kLevelNames}),
      field("logging", "format", true, &DC::logging, &LoggingConfig::format,
            EnumCodec<LogFormat>{kFormatNames}),
      field("drain", "timeout_ms", true, &DC::drain, &DrainConfig::timeout,
            MillisCodec{0, 86'400'000}),
  };
  return fields;
}

std::vector<std::string_view> section_names() {
  std::vector<std::string_view> out;
  for (const Field& f : schema()) {
    if (std::find(out.begin(), out.end(), f.section) == out.end()) out.push_back(f.section);
  }
  return out;
}

const Field* find_field(std::string_view section, std::string_view key) {
  for (const Field& f : schema()) {
    if (f.section == section && f.key == key) return &f;
  }
  return nullptr;
}

std::string unknown_section_message(const std::string& name) {
  std::string message = "unknown section \"" + shorten(name) + "\"";
  for (const Field& f : schema()) {
    // A key written at the top level, flat ("socket") or dotted ("control.socket").
    if (f.key == name || f.name() == name) {
      return message + " (\"" + std::string(f.key) + "\" goes inside section \"" +
             std::string(f.section) + "\")";
    }
  }
  const std::vector<std::string_view> sections = section_names();
  if (auto near = closest(name, sections)) {
    return message + " (did you mean \"" + std::string(*near) + "\"?)";
  }
  message += "; sections:";
  for (std::string_view s : sections) message += " " + std::string(s);
  return message;
}

std::string unknown_key_message(std::string_view section, const std::string& key) {
  std::string message =
      "unknown key \"" + shorten(key) + "\" in section \"" + std::string(section) + "\"";
  std::vector<std::string_view> siblings;
  for (const Field& f : schema()) {
    if (f.section == section) siblings.push_back(f.key);
  }
  if (auto near = closest(key, siblings)) {
    return message + " (did you mean \"" + std::string(*near) + "\"?)";
  }
  for (const Field& f : schema()) {
    if (f.key == key) return message + " (did you mean \"" + f.name() + "\"?)";
  }
  message += "; keys:";
  for (std::string_view k : siblings) message += " " + std::string(k);
  return message;
}

// Where each key's current value came from, for checks that involve two keys.
using Origins = std::map<std::string, std::pair<const Source*, Pos>>;

void check_cross_keys(const DaemonConfig& c, const Origins& origins,
                      std::vector<ConfigError>& errors) {
  if (c.metrics.listen.empty() || c.metrics.allow_non_loopback) return;
  auto parsed = parse_listen(c.metrics.listen);
  const ListenAddress* a = std::get_if<ListenAddress>(&parsed);
  if (a == nullptr || a->loopback) return;  // a bad address was reported by its codec
  // Blame the address where it was set, else the allow_non_loopback that turned the check on.
  const Source* src = nullptr;
  Pos pos;
  for (const char* key : {"metrics.listen", "metrics.allow_non_loopback"}) {
    if (auto it = origins.find(key); it != origins.end()) {
      src = it->second.first;
      pos = it->second.second;
      break;
    }
  }
  errors.push_back({src != nullptr ? src->file : std::string("<config>"), pos.line, pos.column,
                    "metrics.listen",
                    "\"" + c.metrics.listen +
                        "\" is not a loopback address: metrics would be reachable from other "
                        "hosts; set metrics.allow_non_loopback: true to mean it"});
}

std::optional<std::string> key_text(const YAML::Node& key, const Source& src,
                                    const std::string& where, std::vector<ConfigError>& errors) {
  if (!key.IsScalar()) {
    const Pos p = pos_of(src, key.Mark());
    errors.push_back({src.file, p.line, p.column, where, "keys must be plain names"});
    return std::nullopt;
  }
  return key.Scalar();
}

// Checks that a mapping has no key twice (yaml-cpp keeps both entries and lookups see only the
// first, so a repeated key would otherwise be silently ignored).
bool first_occurrence(const std::string& key, const YAML::Node& key_node, const Source& src,
                      std::map<std::string, Pos>& seen, const std::string& error_key,
                      std::vector<ConfigError>& errors) {
  const Pos p = pos_of(src, key_node.Mark());
  auto [it, inserted] = seen.emplace(key, p);
  if (!inserted) {
    errors.push_back({src.file, p.line, p.column, error_key,
                      "duplicate key (first at line " + std::to_string(it->second.line) + ")"});
  }
  return inserted;
}

void parse_section(std::string_view section, const YAML::Node& body, const Source& src,
                   DaemonConfig& c, Origins& origins, std::vector<ConfigError>& errors) {
  std::map<std::string, Pos> seen;
  for (const auto& kv : body) {
    std::optional<std::string> key = key_text(kv.first, src, std::string(section), errors);
    if (!key) continue;
    const std::string full = std::string(section) + "." + *key;
    if (!first_occurrence(*key, kv.first, src, seen, full, errors)) continue;
    const Pos key_pos = pos_of(src, kv.first.Mark());
    const Field* f = find_field(section, *key);
    if (f == nullptr) {
      errors.push_back(
          {src.file, key_pos.line, key_pos.column, full, unknown_key_message(section, *key)});
      continue;
    }
    // A null value has no text of its own (its mark is wherever the parser stood next), so it
    // is reported at its key.
    const Pos value_pos = kv.second.IsNull() ? key_pos : pos_of(src, kv.second.Mark());
    if (f->parse(kv.second, Where{&src, full, value_pos, &errors}, c)) {
      origins[full] = {&src, value_pos};
    }
  }
}

void parse_document(const YAML::Node& root, const Source& src, DaemonConfig& c, Origins& origins,
                    std::vector<ConfigError>& errors) {
  if (root.IsNull()) return;  // empty document: the defaults
  if (!root.IsMap()) {
    const Pos p = pos_of(src, root.Mark());
    errors.push_back({src.file, p.line, p.column, "",
                      "the top level must be a map of sections, got " + describe(root)});
    return;
  }
  const std::vector<std::string_view> sections = section_names();
  std::map<std::string, Pos> seen;
  for (const auto& kv : root) {
    std::optional<std::string> name = key_text(kv.first, src, "", errors);
    if (!name) continue;
    if (!first_occurrence(*name, kv.first, src, seen, *name, errors)) continue;
    const Pos p = pos_of(src, kv.first.Mark());
    if (std::find(sections.begin(), sections.end(), *name) == sections.end()) {
      errors.push_back({src.file, p.line, p.column, *name, unknown_section_message(*name)});
      continue;
    }
    if (kv.second.IsNull()) continue;  // a section with every key commented out
    if (!kv.second.IsMap()) {
      const Pos vp = pos_of(src, kv.second.Mark());
      errors.push_back({src.file, vp.line, vp.column, *name,
                        "expected a map of keys, got " + describe(kv.second)});
      continue;
    }
    parse_section(*name, kv.second, src, c, origins, errors);
  }
}

fs::path directory_of(std::string_view name) {
  std::error_code ec;
  fs::path dir = fs::path(name).parent_path();
  if (dir.empty()) dir = fs::current_path(ec);
  fs::path abs = fs::absolute(dir, ec);
  return ec ? dir : abs;
}

LoadResult finish(DaemonConfig c, std::vector<ConfigError> errors) {
  LoadResult r;
  if (errors.empty()) {
    r.config = std::move(c);
  } else {
    r.errors = std::move(errors);
  }
  return r;
}

}  // namespace

std::string ConfigError::to_string() const {
  std::string out = file;
  if (line > 0) out += ":" + std::to_string(line) + ":" + std::to_string(column);
  out += ": ";
  if (!key.empty()) out += key + ": ";
  return out + message;
}

std::string LoadResult::error_text() const {
  std::string out;
  for (const ConfigError& e : errors) out += e.to_string() + "\n";
  return out;
}

LoadResult load_string(std::string_view yaml, std::string_view name) {
  Source src{std::string(name), 0, directory_of(name)};
  std::vector<ConfigError> errors;
  if (yaml.size() > kMaxConfigBytes) {
    errors.push_back(
        {src.file, 0, 0, "",
         "larger than " + std::to_string(kMaxConfigBytes) + " bytes: not a config file?"});
    return finish({}, std::move(errors));
  }
  if (const std::size_t bad = first_invalid_utf8(yaml); bad != std::string_view::npos) {
    const std::string_view before = yaml.substr(0, bad);
    const std::size_t nl = before.rfind('\n');
    const int line = static_cast<int>(std::count(before.begin(), before.end(), '\n')) + 1;
    const int column = static_cast<int>(nl == std::string_view::npos ? bad + 1 : bad - nl);
    errors.push_back({src.file, line, column, "", "not valid UTF-8 text"});
    return finish({}, std::move(errors));
  }
  // YAML::Load, not LoadAll: Debian 12's yaml-cpp 0.7 never returns from LoadAll (and grows
  // without bound) on a document that starts with ',' (found by config_fuzz). Load reads the
  // first document only, so a second one is found by its "---" start line, which yaml-cpp
  // would otherwise drop silently.
  YAML::Node doc;
  try {
    doc = YAML::Load(std::string(yaml));
  } catch (const YAML::Exception& e) {
    const Pos p = pos_of(src, e.mark);
    errors.push_back({src.file, p.line, p.column, "", e.msg});
    return finish({}, std::move(errors));
  }
  DaemonConfig c;
  Origins origins;
  if (doc) parse_document(doc, src, c, origins, errors);
  {
    int line = 0;
    int first_content_line = 0;
    bool content = false;
    std::size_t start = 0;
    while (start <= yaml.size()) {
      const std::size_t end = std::min(yaml.find('\n', start), yaml.size());
      const std::string_view text = yaml.substr(start, end - start);
      ++line;
      const bool marker = text.substr(0, 3) == "---" &&
                          (text.size() == 3 || text[3] == ' ' || text[3] == '\t' || text[3] == '\r');
      if (marker && content) {
        errors.push_back({src.file, line, 1, "", "more than one YAML document"});
        break;
      }
      const std::size_t first = text.find_first_not_of(" \t\r");
      if (!marker && first != std::string_view::npos && text[first] != '#' && !content) {
        content = true;
        first_content_line = line;
      }
      if (end == yaml.size()) break;
      start = end + 1;
    }
    // Text that yaml-cpp read as no document at all (e.g. a lone ","): not silently defaults.
    if (content && (!doc || doc.IsNull()) && errors.empty()) {
      errors.push_back({src.file, first_content_line, 1, "",
                        "not a YAML mapping of settings"});
    }
  }
  check_cross_keys(c, origins, errors);
  // In reading order, whatever order the checks found them in.
  std::stable_sort(errors.begin(), errors.end(), [](const ConfigError& a, const ConfigError& b) {
    return std::pair(a.line, a.column) < std::pair(b.line, b.column);
  });
  return finish(std::move(c), std::move(errors));
}

LoadResult load_file(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  std::string problem;
  if (ec) {
    problem = "cannot read: " + ec.message();
  } else if (!fs::is_regular_file(st)) {
    problem = "not a regular file";
  } else if (fs::file_size(path, ec) > kMaxConfigBytes && !ec) {
    problem = "larger than " + std::to_string(kMaxConfigBytes) + " bytes: not a config file?";
  }
  std::string text;
  if (problem.empty()) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream buf;
    buf << in.rdbuf();
    if (!in) {
      problem = "cannot read";
    } else {
      text = std::move(buf).str();
    }
  }
  if (!problem.empty()) {
    LoadResult r;
    r.errors.push_back({path, 0, 0, "", std::move(problem)});
    return r;
  }
  return load_string(text, path);
}

LoadResult apply_overrides(DaemonConfig base, const std::vector<std::string>& overrides) {
  std::vector<ConfigError> errors;
  // The base is revalidated (through its YAML form) so that a config built in code cannot
  // smuggle an invalid value past the rules every file and override obeys.
  {
    LoadResult checked = load_string(to_yaml(base), "<base config>");
    if (!checked.ok()) return checked;
  }
  // Sources are referenced by origins until the end, so they must not move: a list per override.
  std::vector<std::unique_ptr<Source>> sources;
  Origins origins;
  std::error_code ec;
  const fs::path cwd = fs::current_path(ec);
  for (const std::string& text : overrides) {
    // Quoted, so the override's own colons do not read as part of file:line:column.
    sources.push_back(std::make_unique<Source>(Source{"--set '" + text + "'", 0, cwd}));
    Source& src = *sources.back();
    if (const std::size_t bad = first_invalid_utf8(text); bad != std::string_view::npos) {
      errors.push_back({src.file, 1, static_cast<int>(bad + 1), "", "not valid UTF-8 text"});
      continue;
    }
    const std::size_t eq = text.find('=');
    const std::string path = text.substr(0, eq);
    const std::size_t dot = path.find('.');
    if (eq == std::string::npos || dot == std::string::npos ||
        path.find('.', dot + 1) != std::string::npos) {
      errors.push_back({src.file, 1, 1, eq == std::string::npos ? text : path,
                        "expected section.key=value, like limits.max_concurrent_pauses=2"});
      continue;
    }
    const std::string section = path.substr(0, dot);
    const std::string key = path.substr(dot + 1);
    const std::vector<std::string_view> sections = section_names();
    if (std::find(sections.begin(), sections.end(), section) == sections.end()) {
      errors.push_back({src.file, 1, 1, path, unknown_section_message(section)});
      continue;
    }
    const Field* f = find_field(section, key);
    if (f == nullptr) {
      errors.push_back(
          {src.file, 1, static_cast<int>(dot) + 2, path, unknown_key_message(section, key)});
      continue;
    }
    src.value_offset = static_cast<int>(eq) + 1;
    const Pos value_start{1, src.value_offset + 1};
    YAML::Node value;
    try {
      value = YAML::Load(text.substr(eq + 1));
    } catch (const YAML::Exception& e) {
      const Pos p = pos_of(src, e.mark);
      errors.push_back(
          {src.file, p.line != 0 ? p.line : 1, p.column != 0 ? p.column : 1, path, e.msg});
      continue;
    }
    const Pos value_pos = value.IsNull() ? value_start : pos_of(src, value.Mark());
    if (f->parse(value, Where{&src, path, value_pos, &errors}, base)) {
      origins[path] = {&src, value_pos};
    }
  }
  // Only overrides were recorded; the cross-key check blames the later of the two keys set.
  if (auto l = origins.find("metrics.listen"), a = origins.find("metrics.allow_non_loopback");
      l != origins.end() && a != origins.end()) {
    // Keep just the one set last, so the error names that override.
    const auto index = [&](const Source* s) {
      for (std::size_t i = 0; i < sources.size(); ++i) {
        if (sources[i].get() == s) return i;
      }
      return sources.size();
    };
    if (index(l->second.first) > index(a->second.first)) {
      origins.erase(a);
    } else {
      origins.erase(l);
    }
  }
  check_cross_keys(base, origins, errors);
  return finish(std::move(base), std::move(errors));
}

std::vector<std::string> changed_keys(const DaemonConfig& a, const DaemonConfig& b) {
  std::vector<std::string> out;
  for (const Field& f : schema()) {
    if (!f.equal(a, b)) out.push_back(f.name());
  }
  return out;
}

std::vector<std::string> restart_required_changes(const DaemonConfig& running,
                                                  const DaemonConfig& reloaded) {
  std::vector<std::string> out;
  for (const Field& f : schema()) {
    if (!f.reloadable && !f.equal(running, reloaded)) out.push_back(f.name());
  }
  return out;
}

std::string to_yaml(const DaemonConfig& config) {
  YAML::Emitter e;
  e << YAML::BeginMap;
  std::string_view open_section;
  for (const Field& f : schema()) {
    if (f.section != open_section) {
      if (!open_section.empty()) e << YAML::EndMap;
      e << YAML::Key << std::string(f.section) << YAML::Value << YAML::BeginMap;
      open_section = f.section;
    }
    e << YAML::Key << std::string(f.key) << YAML::Value;
    f.emit(e, config);
  }
  e << YAML::EndMap << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

std::string_view to_string(LogLevel level) noexcept {
  for (const auto& [name, value] : kLevelNames) {
    if (value == level) return name;
  }
  return "?";
}

std::string_view to_string(LogFormat format) noexcept {
  for (const auto& [name, value] : kFormatNames) {
    if (value == format) return name;
  }
  return "?";
}

}  // namespace memsnap::config
