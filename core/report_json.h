// JSON forms of the host's reports, shared by the memsnap CLI (--json) and memsnapd's control
// API, so that a field means the same thing in both.
#pragma once

#include <nlohmann/json.hpp>

#include "core/fault_server.h"
#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/resume.h"

namespace memsnap {

nlohmann::json to_json(const PauseReport& report);
// The PauseReport that to_json wrote (the background exporter sends its report this way). Lossless
// but for `fallback`: a fallback after a failure half way reads back as kStrategyFailed, any other
// as kPluginNotLoaded (the JSON names no cause). Phases come back in the pipeline's order.
// kInvalidArgument naming the field when a field is missing or of the wrong type.
Result<PauseReport> report_from_json(const nlohmann::json& json);
nlohmann::json to_json(const PluginInfo& info);
nlohmann::json to_json(const ResumeReport& report);
nlohmann::json to_json(const FaultStats& stats);
// {"code": "<errc_name>", "message": ...}: the error object of --json output and the control API.
nlohmann::json to_json(const Error& error);

}  // namespace memsnap
