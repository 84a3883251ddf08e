// memsnapd's configuration: a YAML file (yaml-cpp) validated into DaemonConfig.
//
// Every key has a built-in default (the member initialisers below; config/memsnapd.yaml lists
// them all, and a test checks the two agree), so the daemon runs with no file at all. Loading is
// strict: an unknown key, a wrong type, an out-of-range value or a duplicate key is an error
// with file, line and column, and every error found is reported, not just the first.
//
// Schema: a map of sections, each a map of keys (see config/README.md for each key):
//   plugins.directory          string path   ""  = <memsnapd binary's dir>/../lib/memsnap/plugins
//   flags.file                 string path   ""  = no flag file: every sandbox gets the fallback
//   flags.strategy_flag        string        memory-export-strategy
//   flags.pause_mode_flag      string        pause-mode
//   snapshots.directory        absolute path /var/lib/memsnap/snapshots
//   snapshots.durable_write    buffered|direct  buffered (how synced pauses write guest data)
//   state.directory            absolute path /var/lib/memsnap/state ("" keeps no registry)
//   control.socket             absolute path /run/memsnap/memsnapd.sock
//   control.handshake_directory absolute path /run/memsnap/handshake (resume sockets go here)
//   control.mode               octal text    "0600"
//   control.group              group name    ""  = the daemon's group
//   control.allowed_uids       [uid, ...]    []  (root and the daemon's own uid always allowed)
//   control.max_request_bytes  integer       1048576
//   metrics.listen             host:port     127.0.0.1:9464 ("" disables metrics)
//   metrics.allow_non_loopback bool          false
//   limits.max_concurrent_pauses   integer   4
//   limits.max_concurrent_resumes  integer   4
//   limits.handshake_timeout_ms    integer   10000
//   limits.max_guest_size          integer   1099511627776 (bytes, 1 TiB)
//   limits.max_sandboxes           integer   4096
//   limits.max_background_exports  integer   16
//   limits.max_export_backlog_bytes integer  68719476736 (64 GiB)
//   strategy.fallback          plugin name   process_vm_readv
//   strategy.allow_fallback    bool          true
//   logging.level              trace|debug|info|warn|error|critical|off   info
//   logging.format             text|json     text (json = JSON lines)
//   drain.timeout_ms           integer       30000
//
// Types are checked on the YAML node, not by yaml-cpp's lenient conversions: a quoted "4" is a
// string, not an integer; integers are plain decimal (no 0x, no leading zero: yaml-cpp would read
// 010 as octal 8 where YAML 1.2 says 10, so it is refused as ambiguous); booleans are true/false
// (not yes/on); null is never a string (write "" for an empty one). A section written with no
// keys (`limits:` followed only by comments) is an empty section: all its defaults.
//
// control.mode is read as octal text, as chmod reads its argument: "0600", 0600, 600 and 0o600
// all mean rw-------. Quoting it is recommended, because YAML 1.2 tools read a plain 0600 as the
// decimal 600; this loader never reads it as a number, so quoted or not it means the same here.
//
// Paths: snapshots.directory and control.socket must be absolute (snapshot paths in requests are
// checked to be inside the former, and a relative socket would depend on the daemon's working
// directory). plugins.directory and flags.file may be relative: in a file they are resolved
// against the directory of that file, in an override (--set) against the current directory, so
// the loaded DaemonConfig only ever holds absolute paths (or ""). Paths are normalised
// lexically (no "." or "..", no trailing "/"); symlinks are not resolved.
//
// SIGHUP reload: the daemon loads the file again (plus its --set overrides) and compares.
//   Applied at runtime: logging.*, flags.file, flags.strategy_flag, flags.pause_mode_flag,
//   limits.*, strategy.*,
//     drain.timeout_ms, snapshots.durable_write.
//   Need a restart (restart_required_changes names them; the daemon keeps the running value and
//     logs them): plugins.directory, snapshots.directory, control.* (the control API's server is
//     configured once, at start), metrics.listen, metrics.allow_non_loopback.
//   A reload that fails to load changes nothing.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace memsnap::config {

// spdlog's levels, named as spdlog names them (the daemon maps them; no spdlog dependency here).
enum class LogLevel { kTrace, kDebug, kInfo, kWarn, kError, kCritical, kOff };
enum class LogFormat { kText, kJson };  // kJson: one JSON object per line

struct PluginsConfig {
  std::string directory;  // "" = <directory of the memsnapd binary>/../lib/memsnap/plugins
  bool operator==(const PluginsConfig&) const = default;
};

struct FlagsConfig {
  std::string file;  // flagd-format flag file; "" = none: every sandbox gets strategy.fallback
  std::string strategy_flag = "memory-export-strategy";
  std::string pause_mode_flag = "pause-mode";
  bool operator==(const FlagsConfig&) const = default;
};

// How a pause with sync (the default) writes the guest's bytes into its snapshot; memsnapd maps
// it to core's DataWrite (core/snapshot/snapshot_writer.h).
enum class DurableWrite { kBuffered, kDirect };

struct SnapshotsConfig {
  std::string directory = "/var/lib/memsnap/snapshots";  // never "/"
  // kBuffered: through the page cache, then fsync (never slower on the wall clock here);
  // kDirect: O_DIRECT, then fsync (less CPU with some strategies). Unsynced pauses always buffer.
  DurableWrite durable_write = DurableWrite::kBuffered;
  bool operator==(const SnapshotsConfig&) const = default;
};

// Where memsnapd keeps what must outlive it: the registry of sandboxes (registry.json), taken
// back at the next start. "" keeps none (a restart forgets every sandbox).
struct StateConfig {
  std::string directory = "/var/lib/memsnap/state";  // never "/"
  bool operator==(const StateConfig&) const = default;
};

struct ControlConfig {
  std::string socket = "/run/memsnap/memsnapd.sock";  // at most 107 bytes (sun_path)
  // Resumes' handshake sockets are names in it; memsnapd's uid's, writable by nobody else.
  std::string handshake_directory = "/run/memsnap/handshake";  // at most 80 bytes
  std::uint32_t mode = 0600;                          // permission bits, 0..0777
  std::string group;                                  // "" = leave the socket's group alone
  std::vector<std::uint32_t> allowed_uids;            // besides root and the daemon's own uid
  std::uint64_t max_request_bytes = 1048576;          // 1 KiB .. 1 GiB
  bool operator==(const ControlConfig&) const = default;
};

struct MetricsConfig {
  // "" disables the endpoint. host is an IPv4 address, a bracketed IPv6 address or a host name;
  // only 127.0.0.0/8, [::1] and localhost count as loopback.
  std::string listen = "127.0.0.1:9464";
  bool allow_non_loopback = false;
  bool operator==(const MetricsConfig&) const = default;
};

struct LimitsConfig {
  int max_concurrent_pauses = 4;                       // per host, 1..1024
  int max_concurrent_resumes = 4;                      // per host, 1..1024
  std::chrono::milliseconds handshake_timeout{10000};  // key handshake_timeout_ms, 1 ms .. 1 h
  // The largest guest a snapshot (or a registration) may describe, bytes, 4 KiB .. 1 PiB:
  // snapshot files are hostile input, and a header is checked against this before anything is
  // sized by it.
  std::uint64_t max_guest_size = std::uint64_t{1} << 40;
  int max_sandboxes = 4096;                            // registered at once, 1..1000000
  // Handover pauses not durable yet, 1..4096, and the bytes they may still write, 1 MiB..2^50.
  int max_background_exports = 16;
  std::uint64_t max_export_backlog_bytes = std::uint64_t{64} << 30;
  bool operator==(const LimitsConfig&) const = default;
};

struct StrategyConfig {
  std::string fallback = "process_vm_readv";  // a plugin name, [a-z0-9_]+
  // true: a sandbox whose flagged strategy cannot be used gets the fallback; false: it fails.
  bool allow_fallback = true;
  bool operator==(const StrategyConfig&) const = default;
};

struct LoggingConfig {
  LogLevel level = LogLevel::kInfo;
  LogFormat format = LogFormat::kText;
  bool operator==(const LoggingConfig&) const = default;
};

struct DrainConfig {
  // Key timeout_ms, 0 .. 1 day: on SIGTERM/SIGINT, how long memsnapd waits for the pauses and
  // resumes in flight before it removes its socket. Nothing is aborted: those still running are
  // waited for all the same, and memsnapd then exits 1 instead of 0.
  std::chrono::milliseconds timeout{30000};
  bool operator==(const DrainConfig&) const = default;
};

struct DaemonConfig {
  PluginsConfig plugins;
  FlagsConfig flags;
  SnapshotsConfig snapshots;
  StateConfig state;
  ControlConfig control;
  MetricsConfig metrics;
  LimitsConfig limits;
  StrategyConfig strategy;
  LoggingConfig logging;
  DrainConfig drain;
  bool operator==(const DaemonConfig&) const = default;
};

// One problem in a config source. line and column are 1-based; 0 when unknown (e.g. a file that
// cannot be read). For an override, file is "--set '<override text>'", line is 1 and column is
// the position in the override text.
struct ConfigError {
  std::string file;
  int line = 0;
  int column = 0;
  std::string key;  // "section.key" (or "section", or "" for the document itself)
  std::string message;

  // "file:line:column: key: message"; the position is left out when line is 0, the key when
  // empty.
  [[nodiscard]] std::string to_string() const;
};

// config is set exactly when errors is empty.
struct LoadResult {
  std::optional<DaemonConfig> config;
  std::vector<ConfigError> errors;

  [[nodiscard]] bool ok() const noexcept { return config.has_value(); }
  // Every error's to_string(), one per line.
  [[nodiscard]] std::string error_text() const;
};

// Refused above this size: a config file is a few hundred bytes.
inline constexpr std::size_t kMaxConfigBytes = 1 << 20;

// Reads and validates the file at path. A missing or unreadable file is an error (the daemon
// decides whether to pass a path at all); an empty file gives the defaults.
LoadResult load_file(const std::string& path);

// Validates yaml; name is the file name used in errors and the file whose directory relative
// plugins.directory / flags.file are resolved against (the current directory when name has no
// directory part). An empty document (or only comments) gives the defaults. More than one
// document is an error.
LoadResult load_string(std::string_view yaml, std::string_view name);

// Applies "section.key=value" overrides, in order, to base. value is read as a YAML node (a
// scalar or a flow collection such as [1000,1001]) and checked exactly as in a file; relative
// paths are resolved against the current directory. Cross-key rules (metrics.listen needs
// allow_non_loopback) are checked on the result.
LoadResult apply_overrides(DaemonConfig base, const std::vector<std::string>& overrides);

// "section.key" of every key whose value differs, in schema order.
std::vector<std::string> changed_keys(const DaemonConfig& a, const DaemonConfig& b);

// The subset of changed_keys that a SIGHUP reload cannot apply (see the split above): the
// daemon logs them and keeps running with the old values until restarted.
std::vector<std::string> restart_required_changes(const DaemonConfig& running,
                                                  const DaemonConfig& reloaded);

// Every key, in schema order, as YAML that load_string reads back to the same DaemonConfig
// (memsnapd --print-config).
std::string to_yaml(const DaemonConfig& config);

std::string_view to_string(LogLevel level) noexcept;    // "trace" ... "off"
std::string_view to_string(LogFormat format) noexcept;  // "text" | "json"

}  // namespace memsnap::config
