// What memsnapd and memsnap-exporter (the background export process of a handover pause, issue
// 19) say to each other, as JSON. One connected Unix stream socket, the exporter's fd 4:
//
//   memsnapd -> exporter   first line: the request (ExporterRequest, below); then commands, one a
//                          line: "retry" (a failed export runs again from the start) or "release"
//                          (a failed export is given up: the exporter exits, the memory goes)
//   exporter -> memsnapd   events, one JSON object a line (ExportEvent, below)
//
// The memfd behind guest memory is the exporter's fd 3. Both ends write with MSG_NOSIGNAL and
// take EOF as "the other end is gone": the exporter then finishes on its own (docs/architecture.md,
// "The background exporter").
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/base/result.h"
#include "core/pause.h"

namespace memsnap::exporter {

inline constexpr int kMemfdFd = 3;    // the memfd in the exporter
inline constexpr int kChannelFd = 4;  // the socket to memsnapd in the exporter
inline constexpr int kProtocolVersion = 1;

// Exit statuses of memsnap-exporter.
inline constexpr int kExitDurable = 0;   // the snapshot is committed
inline constexpr int kExitStartup = 1;   // no request, a bad one, or a plugin did not load
inline constexpr int kExitReleased = 3;  // failed, then released: the memory is let go

struct ExporterRequest {
  // The PauseRequest fields a background export uses: memfd (always kMemfdFd in the exporter),
  // guest_size, block_size, reader_limits, dirty, strategy, strategy_options, allow_fallback,
  // fallback_strategy, out_path, parent_path, stay_frozen, sync, data_write. Never a pid, pidfd,
  // regions, freeze nor dirty_source (the VMM is stopped and may be gone).
  PauseRequest pause;
  // The plugin files the exporter loads (PluginInfo::path of the strategy, and of the fallback
  // when one is allowed), with the registry's checks.
  std::vector<std::string> plugins;
  // After a failure with nobody to tell (memsnapd gone), the exporter tries again this often.
  std::chrono::milliseconds retry_interval{10000};
};

// kInvalidArgument when pause has what a background export cannot take (a pid, regions, a
// freeze, a dirty_source) or lacks what it needs (a memfd, an output path, plugins).
Status check_background_request(const ExporterRequest& request);

nlohmann::json to_json(const ExporterRequest& request);
// kInvalidArgument naming what is wrong; pause.memfd is kMemfdFd.
Result<ExporterRequest> request_from_json(const nlohmann::json& json);

enum class EventKind {
  kProgress,  // the running attempt moved on
  kDurable,   // committed: report is set; the exporter exits 0 next
  kFailed,    // this attempt failed: error is set; the memory is still held (see retryable)
  kRetrying,  // a new attempt starts (commanded, or on its own when memsnapd is gone)
  kReleased,  // given up on "release": the exporter exits next and the memory goes
};
std::string_view event_kind_name(EventKind kind) noexcept;

// One line from the exporter: {"event": "...", "attempt": n, "bytes_done": n, "bytes_total": n,
// "cpu_seconds": x, ["report": {...to_json(PauseReport)}], ["error": {"code", "message",
// "errno"}, "retryable": bool]}. cpu_seconds: the exporter process's CPU so far (all threads,
// user + system, every attempt).
struct ExportEvent {
  EventKind kind = EventKind::kProgress;
  int attempt = 1;
  std::uint64_t bytes_done = 0;
  std::uint64_t bytes_total = 0;
  double cpu_seconds = 0;
  std::optional<PauseReport> report;  // kDurable
  std::optional<Error> error;         // kFailed
  // kFailed: false when running again cannot be right (kDataAtRisk: the strategy released memory
  // it could not put back, so the memfd no longer holds the guest; only release is left).
  bool retryable = true;
};

// One line, without its newline.
std::string encode_event(const ExportEvent& event);
Result<ExportEvent> decode_event(std::string_view line);

// The Errc whose errc_name is name; kInternal for a name this build does not know.
Errc errc_from_name(std::string_view name) noexcept;

}  // namespace memsnap::exporter
