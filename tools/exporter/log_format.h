// How memsnapd and memsnap-exporter write their logs, so that an exporter's lines read like
// memsnapd's in the same journal: memsnapd's logging.format (text or JSON lines) and
// logging.level reach the exporter through its environment (set by memsnapd at each spawn), so
// that even a failure before its request is read is logged the same way.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include <spdlog/formatter.h>

namespace memsnap::exporter {

inline constexpr const char* kLogFormatEnv = "MEMSNAP_EXPORTER_LOG_FORMAT";  // text | json
inline constexpr const char* kLogLevelEnv = "MEMSNAP_EXPORTER_LOG_LEVEL";    // spdlog's names

// Text: "2026-12-07 10:03:28.988 info <tag>: message", tag e.g. "memsnapd" or
// "memsnap-exporter[%P]". JSON lines: {"time", "level", "thread", "msg"}, and "program" and
// "pid" when program is not empty (the exporter's lines; memsnapd's have neither).
std::unique_ptr<spdlog::formatter> log_formatter(bool json, std::string_view text_tag,
                                                 std::string_view program = {});

}  // namespace memsnap::exporter
