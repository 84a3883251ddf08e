#include "tools/memsnapd/control_routes.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

namespace memsnap::daemon {

using control_api::Request;
using control_api::Response;
using nlohmann::json;

int errc_status(Errc code) noexcept {
  switch (code) {
    case Errc::kInvalidArgument:
    case Errc::kPathNotAllowed:
    case Errc::kHandshakeBadRegions:
    case Errc::kSnapshotTruncated:
    case Errc::kSnapshotBadMagic:
    case Errc::kSnapshotBadVersion:
    case Errc::kSnapshotBadHeader:
    case Errc::kSnapshotBadMap:
    case Errc::kSnapshotChecksumMismatch:
    case Errc::kSnapshotChainMismatch:
    case Errc::kUnsupported:
    case Errc::kPluginNotLoaded:
      return 400;
    case Errc::kForbidden:
      return 403;
    case Errc::kNotFound:
    case Errc::kSandboxNotFound:
      return 404;
    case Errc::kAlreadyExists:
    case Errc::kInvalidState:
    case Errc::kBusy:
    case Errc::kGenerationMismatch:  // a warm resume without (the right) kept memory
      return 409;
    case Errc::kProcessGone:
      return 410;
    case Errc::kLimitReached:
      return 429;
    case Errc::kShuttingDown:
      return 503;
    case Errc::kTimeout:
    case Errc::kHandshakeTimeout:
      return 504;
    default:
      return 500;
  }
}

namespace {

Response error_response(const Error& e) {
  return control_api::json_error(errc_status(e.code), errc_name(e.code), e.message);
}

Response ok(const json& body, int status = 200) {
  Response r;
  r.status = status;
  r.body = body.dump();
  return r;
}

// Parses a request body; an empty body is {}.
Result<json> body_of(const Request& request) {
  if (request.body.empty()) return json::object();
  json parsed = json::parse(request.body, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) {
    return make_error(Errc::kInvalidArgument, "the body is not valid JSON");
  }
  return parsed;
}

// Who is asking: what the kernel said of the connection (SO_PEERCRED).
Caller caller_of(const Request& request) {
  return Caller{request.peer.uid, request.peer.gid, request.peer.pid};
}

Response respond(const Result<json>& result, int ok_status = 200) {
  if (!result.ok()) return error_response(result.error());
  return ok(result.value(), ok_status);
}

// The query parameters a route takes, in the order its documentation lists them.
using QueryParams = std::vector<std::string>;

// Refuses a query parameter the route does not take, as an unknown body field is refused: a typo
// (wait_for for wait_while) must not silently change what the request does.
std::optional<Response> unknown_query(const Request& request, const QueryParams& known) {
  for (const auto& [name, value] : request.query) {
    if (std::find(known.begin(), known.end(), name) != known.end()) continue;
    std::string list;
    for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
    return control_api::json_error(
        400, errc_name(Errc::kInvalidArgument),
        request.method + " " + request.path + ": unknown query parameter \"" + name + "\" (" +
            (known.empty() ? std::string("this endpoint takes none") : "known: " + list) + ")");
  }
  return std::nullopt;
}

}  // namespace

void add_routes(control_api::HttpServer& server, SandboxService& service,
                metrics::HostMetrics& metrics, RouteHooks hooks) {
  // Every route is counted in memsnap_api_requests_total under a fixed name (never the path:
  // paths hold sandbox ids).
  // Every route also refuses query parameters it does not take (`query`: those it does).
  auto counted = [&metrics](const char* endpoint, auto handler, QueryParams query = {}) {
    return [&metrics, endpoint, handler = std::move(handler),
            query = std::move(query)](const Request& request) {
      std::optional<Response> refused = unknown_query(request, query);
      Response r = refused ? std::move(*refused) : handler(request);
      metrics.record_api_request(endpoint, r.status);
      if (r.status >= 500) {
        spdlog::error("api {} {}: {} {}", request.method, request.path, r.status, r.body);
      } else if (r.status >= 400) {
        spdlog::info("api {} {}: {} {}", request.method, request.path, r.status, r.body);
      }
      return r;
    };
  };

  server.route("GET", "/v1/health",
               counted("health", [&service](const Request&) { return ok(service.health()); }));
  server.route("GET", "/v1/config", counted("config", [hooks](const Request&) {
                 return ok(hooks.config ? hooks.config() : json::object());
               }));
  server.route("GET", "/v1/sandboxes",
               counted("sandbox_list", [&service](const Request& request) {
                 return ok(service.list(caller_of(request)));
               }));
  server.route("POST", "/v1/sandboxes",
               counted("sandbox_register", [&service](const Request& request) {
                 auto body = body_of(request);
                 if (!body.ok()) return error_response(body.error());
                 return respond(service.register_sandbox(caller_of(request), *body), 201);
               }));
  server.route(
      "GET", "/v1/sandboxes/{id}", counted("sandbox_get", [&service](const Request& request) {
        std::string wait;
        std::chrono::milliseconds timeout{30000};
        if (auto it = request.query.find("wait_while"); it != request.query.end()) {
          wait = it->second;
        }
        if (auto it = request.query.find("timeout_ms"); it != request.query.end()) {
          const std::string& text = it->second;
          const bool digits =
              !text.empty() && text.size() <= 9 &&
              std::all_of(text.begin(), text.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
          if (!digits) {
            return control_api::json_error(
                400, "invalid_argument",
                "timeout_ms must be a number of milliseconds (0 .. 600000)");
          }
          timeout = std::chrono::milliseconds(std::stoul(text));
          if (timeout > std::chrono::minutes(10)) timeout = std::chrono::minutes(10);
        }
        return respond(service.get(caller_of(request), request.path_params.at("id"), wait, timeout,
                                   [&request] {
                                     return request.client_gone && request.client_gone();
                                   }));
      }, {"wait_while", "timeout_ms"}));
  server.route(
      "DELETE", "/v1/sandboxes/{id}", counted("sandbox_remove", [&service](const Request& request) {
        bool force = false;
        if (auto it = request.query.find("force"); it != request.query.end()) {
          if (it->second != "true" && it->second != "false") {
            return control_api::json_error(400, "invalid_argument", "force is true or false");
          }
          force = it->second == "true";
        }
        return respond(service.remove(caller_of(request), request.path_params.at("id"), force));
      }, {"force"}));
  server.route("POST", "/v1/sandboxes/{id}/pause",
               counted("sandbox_pause", [&service](const Request& request) {
                 auto body = body_of(request);
                 if (!body.ok()) return error_response(body.error());
                 return respond(service.pause(caller_of(request), request.path_params.at("id"), *body));
               }));
  server.route("POST", "/v1/sandboxes/{id}/resume",
               counted("sandbox_resume", [&service](const Request& request) {
                 auto body = body_of(request);
                 if (!body.ok()) return error_response(body.error());
                 return respond(service.resume(caller_of(request), request.path_params.at("id"), *body), 202);
               }));
  server.route("POST", "/v1/sandboxes/{id}/export/retry",
               counted("sandbox_export_retry", [&service](const Request& request) {
                 return respond(
                     service.retry_export(caller_of(request), request.path_params.at("id")));
               }));
  server.route("GET", "/v1/sandboxes/{id}/strategy",
               counted("sandbox_strategy", [&service](const Request& request) {
                 return respond(service.explain(caller_of(request), request.path_params.at("id")));
               }));
}

}  // namespace memsnap::daemon
