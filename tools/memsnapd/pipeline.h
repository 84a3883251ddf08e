// What memsnapd's sandbox service runs to move memory: the pause pipeline and the preparation of
// a resume session. memsnapd runs core's (core/pause.h, core/resume.h); the service's unit tests
// give a fake that records the requests, answers as scripted and can hold a pause half way, so
// that every state of the lifecycle is reached on purpose rather than by timing.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string_view>

#include "core/base/result.h"
#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/resume.h"

namespace memsnap::daemon {

// A handover pause's export, after the answer (core/pause_mode/pause_mode.h).
enum class ExportState { kRunning, kDurable, kFailed };
// "running", "durable", "failed" (the API's export.state).
std::string_view export_state_name(ExportState state) noexcept;

struct ExportStatus {
  ExportState state = ExportState::kRunning;
  std::uint64_t bytes_done = 0;   // handed by the strategy to the snapshot so far (this attempt)
  std::uint64_t bytes_total = 0;  // the dirty set's bytes; 0 until it is known
  int attempts = 1;               // 1 + the retries
  std::optional<PauseReport> report;  // durable: what the pipeline reported
  std::optional<Error> error;         // failed: why (the memory is still held)
  double cpu_seconds = 0;             // of the whole export so far, every attempt, all threads
};

// A pause's export that runs after its handover, away from the caller. It holds the memory it
// exports (its own reference to the memfd) until the snapshot is durable -- or, after a failure,
// until release(). It does not depend on memsnapd staying alive: if memsnapd dies, the export
// still finishes and commits (and a failed one keeps retrying), so an answered pause is never
// lost with the daemon.
class BackgroundExport {
 public:
  // Does not stop the export and does not let go of the memory; only the callbacks stop.
  virtual ~BackgroundExport() = default;
  virtual ExportStatus status() const = 0;
  // Until the state is not running, or timeout; the status then.
  virtual ExportStatus wait(std::chrono::milliseconds timeout) const = 0;
  // A failed export tries again, from the start, into a fresh temporary file. kInvalidState when
  // it has not failed.
  virtual Status retry() = 0;
  // A failed export is given up and its memory let go (the sandbox was removed). kInvalidState
  // while it runs (nothing acknowledged may be dropped half way); nothing to do once durable.
  virtual Status release() = 0;
};

class Pipeline {
 public:
  virtual ~Pipeline() = default;
  // Runs one pause (memsnap::pause's contract: nothing committed unless it succeeds).
  virtual Result<PauseReport> pause(const PluginRegistry& registry,
                                    const PauseRequest& request) = 0;
  // Checks a resume and listens for its VMM (ResumeSession::prepare's contract).
  virtual Result<std::unique_ptr<ResumeSession>> prepare_resume(const PluginRegistry& registry,
                                                                ResumeRequest request) = 0;
  // Starts exporting request in the background and returns at once. The request describes memory
  // nobody changes any more: pid -1, memfd set (duplicated before this returns: the caller may
  // close its own), freeze false, allow_fallback false, dirty given or nullopt (SEEK_DATA), no
  // dirty_source. on_change is called (from another thread, never after the BackgroundExport is
  // destroyed) each time the state changes, with the new status.
  virtual Result<std::unique_ptr<BackgroundExport>> start_export(
      const PluginRegistry& registry, const PauseRequest& request,
      std::function<void(const ExportStatus&)> on_change) = 0;
};

// core's pipelines; one for the process, stateless.
Pipeline& core_pipeline();

}  // namespace memsnap::daemon
