// SnapshotOrigin: what a snapshot file records about how it was written (format version 2):
// which strategy wrote it, that strategy's version and declared capabilities, and which memsnap.
// A resume needs the strategy (it decides how the memory is served), so a paused sandbox can be
// registered from its snapshot files alone. docs/snapshot-format.md, "Origin record".
//
// On disk it is text right after the 128-byte header, covered by the header checksum: lines
// "key=value\n", keys of [a-z0-9_] (1-64 characters, each at most once), values printable ASCII
// (0x20-0x7e, at most 256 characters). Readers keep keys they do not know, so later writers may
// add keys without a new format version.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/base/result.h"

namespace memsnap {

// The keys memsnap writes.
inline constexpr std::string_view kOriginStrategy = "strategy";
inline constexpr std::string_view kOriginStrategyVersion = "strategy_version";
// Comma-separated capability names as `memsnap plugins list` shows them (needs-pid,
// needs-memfd, releases-memory, experimental); empty when the strategy declared none.
inline constexpr std::string_view kOriginStrategyCapabilities = "strategy_capabilities";
inline constexpr std::string_view kOriginMemsnapVersion = "memsnap_version";

// The most bytes of origin text a writer stores: header and origin fit before the data area.
inline constexpr std::size_t kMaxOriginBytes = 2048;

class SnapshotOrigin {
 public:
  using Field = std::pair<std::string, std::string>;

  // Parses origin text; kSnapshotBadHeader names the first malformed line.
  static Result<SnapshotOrigin> parse(std::string_view text);

  // Sets (or replaces) a field. kInvalidArgument for a bad key or value.
  Status set(std::string_view key, std::string_view value);
  // The value of key, or nullptr when the origin does not record it.
  [[nodiscard]] const std::string* find(std::string_view key) const;
  // The strategy that wrote the snapshot; empty when not recorded.
  [[nodiscard]] std::string strategy() const;

  [[nodiscard]] bool empty() const { return fields_.empty(); }
  // In the order they were set (or stored).
  [[nodiscard]] const std::vector<Field>& fields() const { return fields_; }
  // The text stored in the file.
  [[nodiscard]] std::string serialize() const;

 private:
  std::vector<Field> fields_;
};

}  // namespace memsnap
