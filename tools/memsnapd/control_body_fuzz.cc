// libFuzzer target: the JSON bodies of memsnapd's control API (register, pause, resume), through
// the daemon's own routes (control_routes.cc) and SandboxService (sandbox_service.cc), both
// compiled in unchanged; requests go to HttpServer::handle(), the router without sockets.
//
// Input: [endpoint byte] [request body]. endpoint % 3: POST /v1/sandboxes (register),
// POST /v1/sandboxes/{id}/pause, POST /v1/sandboxes/{id}/resume.
//
// Containment (no real process is touched, nothing leaves a temporary directory):
//  - the plugin registry is empty, so no strategy is ever loaded and no sandbox is ever
//    registered as paused (that needs a loaded strategy);
//  - pause and resume go to the id "no/such", which register can never create ('/' is not
//    allowed in ids): their bodies are validated in full, then the sandbox is not found, before
//    anything is done;
//  - a vmm_pid in a register body that could be a pid is replaced by this process's own pid, so
//    the running-VMM path (regions, memfd_fd) is exercised against a live process that is this
//    fuzzer (memfd_fd then dups one of our own fds, and closes it); every sandbox a body
//    registers is removed again at once;
//  - snapshot paths are confined to a fresh temporary directory (that confinement is part of
//    what is fuzzed).
// The answer must be well-formed JSON, and a handler must never throw (code "internal").
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "core/metrics/host_metrics.h"
#include "core/plugin_host/plugin_registry.h"
#include "tools/control_api/http_server.h"
#include "tools/memsnapd/control_routes.h"
#include "tools/memsnapd/sandbox_service.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

void check(bool ok) {
  if (!ok) std::abort();
}

struct World {
  std::string dir;
  memsnap::PluginRegistry registry;
  memsnap::metrics::HostMetrics metrics;
  std::unique_ptr<memsnap::daemon::SandboxService> service;
  std::unique_ptr<memsnap::control_api::HttpServer> server;

  World() {
    spdlog::set_level(spdlog::level::off);
    char tmpl[] = "/tmp/memsnap-control-fuzz.XXXXXX";
    check(::mkdtemp(tmpl) != nullptr);
    dir = tmpl;
    // Something for "snapshots" paths to find: a directory and a file that is no snapshot.
    fs::create_directories(dir + "/snapshots/sb-1");
    std::ofstream(dir + "/snapshots/sb-1/generation-1.snap") << "not a snapshot";
    memsnap::daemon::ServiceOptions options;
    options.snapshot_dir = dir + "/snapshots";
    options.sync = false;
    options.settings.queue_timeout = std::chrono::milliseconds(10);
    auto created = memsnap::daemon::SandboxService::create(registry, metrics, options);
    check(created.ok());
    service = std::move(created).value();
    memsnap::control_api::ServerOptions server_options;
    server_options.socket_path = dir + "/never-started.sock";
    server = std::make_unique<memsnap::control_api::HttpServer>(server_options);
    memsnap::daemon::add_routes(*server, *service, metrics, {});
  }
};

World& world() {
  // Never destroyed (libFuzzer leaves through exit()); its directory is removed at exit.
  static World* w = [] {
    auto* made = new World();
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(world().dir, ec);
    });
    return made;
  }();
  return *w;
}

// A vmm_pid that could name a process becomes ours (see the containment notes above).
std::string contain(std::string body) {
  json parsed = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (!parsed.is_object()) return body;
  auto it = parsed.find("vmm_pid");
  if (it == parsed.end() || !it->is_number_unsigned()) return body;
  const std::uint64_t pid = it->get<std::uint64_t>();
  if (pid == 0 || pid > 4194304) return body;
  *it = static_cast<std::uint64_t>(::getpid());
  return parsed.dump();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1 || size > 64 * 1024) return 0;
  World& w = world();
  memsnap::control_api::Request request;
  request.method = "POST";
  std::string body(reinterpret_cast<const char*>(data + 1), size - 1);
  switch (data[0] % 3) {
    case 0:
      request.path = "/v1/sandboxes";
      body = contain(std::move(body));
      break;
    case 1:
      request.path = "/v1/sandboxes/no%2Fsuch/pause";
      break;
    default:
      request.path = "/v1/sandboxes/no%2Fsuch/resume";
      break;
  }
  request.body = std::move(body);
  const memsnap::control_api::Response response = w.server->handle(request);
  check(response.status >= 200 && response.status < 600);
  const json answer = json::parse(response.body, nullptr, /*allow_exceptions=*/false);
  check(!answer.is_discarded());
  if (response.status >= 400) {
    check(answer.contains("error") && answer["error"].is_object());
    check(answer["error"].value("code", "") != "internal");
  }
  if (data[0] % 3 != 0) {
    check(response.status == 400 || response.status == 404);
  }
  if (response.status == 201) {
    check(answer.contains("id") && answer["id"].is_string());
    check(w.service->remove(memsnap::daemon::Caller{}, answer["id"].get<std::string>()).ok());
  }
  return 0;
}
