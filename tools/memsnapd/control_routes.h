// memsnapd's control API: the routes of docs/api.md on top of the HTTP transport
// (tools/control_api) and the SandboxService. Every error is
// {"error":{"code":"<stable code>","message":"..."}} with the status errc_status() gives.
#pragma once

#include <functional>

#include "core/base/result.h"
#include "core/metrics/host_metrics.h"
#include "tools/control_api/http_server.h"
#include "tools/memsnapd/sandbox_service.h"

namespace memsnap::daemon {

// The HTTP status of an error code (400 bad input, 403 not the caller's process or sandbox, 404
// unknown sandbox, 409 conflict with the sandbox's state, 429 a configured limit reached, 503
// shutting down, 504 timed out waiting, 500 the rest).
int errc_status(Errc code) noexcept;

struct RouteHooks {
  // GET /v1/config: the running configuration, as YAML text in JSON.
  std::function<nlohmann::json()> config;
};

// Registers every route on server. The service and metrics must outlive the server.
void add_routes(control_api::HttpServer& server, SandboxService& service,
                metrics::HostMetrics& metrics, RouteHooks hooks);

}  // namespace memsnap::daemon
