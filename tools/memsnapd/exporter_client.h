// memsnapd's side of a background export (issue 19): starts memsnap-exporter (tools/exporter),
// the process that runs a handover pause's export and outlives memsnapd, and follows it through
// a BackgroundExport (pipeline.h). core_pipeline().start_export() is start_exporter() with the
// default options.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "core/base/result.h"
#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "tools/memsnapd/pipeline.h"

namespace memsnap::daemon {

struct ExporterOptions {
  // The memsnap-exporter executable; empty: find_exporter_binary().
  std::string binary;
  // How often a failed export retries on its own once memsnapd is gone.
  std::chrono::milliseconds retry_interval{10000};
};

// How the exporters started from now on log (tools/exporter/log_format.h): JSON lines or text,
// at level (spdlog's names). memsnapd calls it with its own logging settings, at start and on
// each reload; until then exporters log text at info.
void set_exporter_logging(bool json, const std::string& level);

// memsnap-exporter in the directory of /proc/self/exe, else in $MEMSNAP_BIN_DIR; kNotFound
// saying where it looked.
Result<std::string> find_exporter_binary();

// Pipeline::start_export's contract. Spawns the exporter (posix_spawn, its own session, the
// memfd as its fd 3: the caller may close its own as soon as this returns) and a watcher thread
// that reads its events, keeps the status, calls on_change on each change of state and reaps it.
// Errors before anything is started: kInvalidArgument (the request is not a background one),
// kPluginNotLoaded (its strategy), kNotFound (no exporter binary), kIoError (the spawn).
Result<std::unique_ptr<BackgroundExport>> start_exporter(
    const PluginRegistry& registry, const PauseRequest& request,
    std::function<void(const ExportStatus&)> on_change, const ExporterOptions& options = {});

}  // namespace memsnap::daemon
