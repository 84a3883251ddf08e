// libFuzzer target: memsnapd's configuration. YAML text through load_string(); when it loads,
// "section.key=value" overrides through apply_overrides(); and the documented round trip: every
// config that loads is dumped by to_yaml() as YAML that loads back to the same DaemonConfig.
//
// Input: [YAML text] then, optionally, '\0'-separated override strings.
// The round trip and the equality of configs are checked (a difference aborts). Nothing here
// reads or writes files: load_string() only normalises paths.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "config/daemon_config.h"

namespace {

using memsnap::config::DaemonConfig;
using memsnap::config::LoadResult;

void check(bool ok) {
  if (!ok) std::abort();
}

void check_result(const LoadResult& r) {
  check(r.ok() == r.errors.empty());
  (void)r.error_text();
}

// to_yaml() must give text that load_string() reads back to the same config.
void round_trip(const DaemonConfig& c) {
  const std::string dumped = memsnap::config::to_yaml(c);
  const LoadResult again = memsnap::config::load_string(dumped, "/fuzz/dump.yaml");
  check(again.ok());
  check(*again.config == c);
  check(memsnap::config::changed_keys(c, *again.config).empty());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > memsnap::config::kMaxConfigBytes) return 0;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::size_t nul = input.find('\0');
  const std::string_view yaml = input.substr(0, nul);
  std::vector<std::string> overrides;
  if (nul != std::string_view::npos) {
    std::string_view rest = input.substr(nul + 1);
    while (overrides.size() < 16) {
      const std::size_t next = rest.find('\0');
      overrides.emplace_back(rest.substr(0, next));
      if (next == std::string_view::npos) break;
      rest = rest.substr(next + 1);
    }
  }

  // An absolute name: relative paths in the file resolve against /fuzz, never the current
  // directory, so the result does not depend on where the fuzzer runs.
  const LoadResult loaded = memsnap::config::load_string(yaml, "/fuzz/memsnapd.yaml");
  check_result(loaded);
  DaemonConfig base;
  if (loaded.ok()) {
    base = *loaded.config;
    round_trip(base);
    (void)memsnap::config::restart_required_changes(DaemonConfig{}, base);
  }
  if (overrides.empty()) return 0;
  const LoadResult applied = memsnap::config::apply_overrides(base, overrides);
  check_result(applied);
  if (applied.ok()) {
    round_trip(*applied.config);
    (void)memsnap::config::changed_keys(base, *applied.config);
  }
  return 0;
}
