// A small fleet on one host, driven the way an orchestrator drives it: a real memsnapd (child
// process, its own socket, snapshot directory and metrics port) and stand-in VMMs
// (memsnap-guest) registered with it, paused and resumed through the control API.
//
// Shared by the README's demo (`memsnap demo`), the daemon's integration tests and the A/B
// experiment runner, so all three exercise the same path a production orchestrator uses.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/base/result.h"
#include "tools/control_api/http_client.h"
#include "tools/guest_client/guest_client.h"

namespace memsnap::fleet {

struct DaemonOptions {
  std::string binary;  // empty: memsnapd next to this executable, else in $MEMSNAP_BIN_DIR
  std::string dir;     // must exist: control socket, snapshots/, handshake sockets, log go here
  std::string config_file;             // --config (empty: built-in defaults)
  std::string flags_file;              // flags.file (empty: none)
  std::vector<std::string> overrides;  // more --set section.key=value
  bool metrics = true;                 // serve metrics on a loopback port:
  std::uint16_t metrics_port = 0;      // this one (0: a free one)
  std::chrono::milliseconds start_timeout{20000};
};

// An API answer: the HTTP status and the parsed body (null if it was not JSON).
struct Answer {
  int status = 0;
  nlohmann::json body;
  bool ok() const { return status >= 200 && status < 300; }
  // "code: message" of an error body, or the body itself.
  std::string error_text() const;
};

class Daemon {
 public:
  static Result<std::unique_ptr<Daemon>> start(const DaemonOptions& options);
  // SIGTERM, then SIGKILL if it has not exited within 30 s.
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // One API call (thread-safe: a connection per call). body null: no body.
  Result<Answer> call(const std::string& method, const std::string& target,
                      const nlohmann::json& body = nullptr,
                      std::chrono::milliseconds timeout = std::chrono::seconds(120));
  // Sends sig (SIGTERM: drain) and waits for the exit; returns its exit status (128+n for a
  // signal), or -1 on timeout.
  int stop(int sig, std::chrono::milliseconds timeout);

  pid_t pid() const { return pid_; }
  const std::string& socket() const { return socket_; }
  const std::string& snapshot_dir() const { return snapshot_dir_; }
  const std::string& dir() const { return dir_; }
  const std::string& log_path() const { return log_; }
  std::uint16_t metrics_port() const { return metrics_port_; }
  std::string metrics_url() const;  // empty when metrics are off
  // GET /metrics over loopback.
  Result<std::string> scrape() const;

 private:
  Daemon() = default;
  pid_t pid_ = -1;
  std::string dir_, socket_, snapshot_dir_, log_;
  std::uint16_t metrics_port_ = 0;
};

// A loopback TCP port nobody listened on a moment ago.
Result<std::uint16_t> free_loopback_port();

// An HTTP GET to host:port (metrics, Prometheus' API; host is a name or an address). Body of a
// 200, else an error.
Result<std::string> http_get(const std::string& host, std::uint16_t port, const std::string& target,
                             std::chrono::milliseconds timeout = std::chrono::seconds(10));
inline Result<std::string> http_get_loopback(
    std::uint16_t port, const std::string& target,
    std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  return http_get("127.0.0.1", port, target, timeout);
}

struct SandboxSpec {
  std::string id;
  std::uint64_t size = 64ULL << 20;
  std::string backing = "memfd";  // the VMM's guest memory: memfd or anon
  nlohmann::json attributes = nlohmann::json::object();  // targeting attributes
  std::uint64_t seed = 1;
  double zero_fraction = 0.05;
  bool thp = false;  // the VMM asks for 2 MiB transparent huge pages (MADV_HUGEPAGE)
  // Resumed VMMs track writes with write-protect faults memsnap resolves (no WP_ASYNC): such a
  // sandbox can pause live.
  bool write_faults = false;
};

// One sandbox: its current VMM stand-in and what the daemon said about it.
// The two moments of one pause (docs/api.md "Handover pauses"): when memsnapd answered, and when
// the snapshot was durable. For a copy pause they are the same moment.
struct PauseMoments {
  nlohmann::json answer;   // the pause's answer
  nlohmann::json durable;  // the pause once durable: the answer (copy), or the sandbox's
                           // last_pause after the wait (handover: bytes, report, durable_seconds)
  std::string mode;        // the mode that ran: copy or handover
  double answer_wall_seconds = 0;  // at the client: from sending the request to reading the answer
  double answer_seconds = 0;       // memsnapd's handover_seconds
  double durable_seconds = 0;      // from the request to the commit: copy: answer_seconds;
                                   // handover: last_pause.durable_seconds
  double export_cpu_seconds = 0;   // export.cpu_seconds once durable (handover: the exporter's)
};

class Sandbox {
 public:
  // Starts the first VMM (filled with the pattern) and registers it.
  static Result<std::unique_ptr<Sandbox>> launch(Daemon& daemon, const SandboxSpec& spec);

  // POST pause (body as in docs/api.md), then kills the stopped VMM, like an orchestrator.
  Result<nlohmann::json> pause(const nlohmann::json& body = nlohmann::json::object());
  // pause(body), then, for a handover pause, waits until its snapshot is durable (GET
  // ?wait_while=exporting); an export that failed or did not finish within `timeout` is an error.
  Result<PauseMoments> pause_until_durable(
      const nlohmann::json& body = nlohmann::json::object(),
      std::chrono::milliseconds timeout = std::chrono::seconds(120));
  // POST resume, starts a new VMM that connects to the handshake socket, waits until running.
  Result<nlohmann::json> resume(const nlohmann::json& body = nlohmann::json::object());
  // Dirties a share of the guest's pages (new generation), scattered or in one sequential run.
  Status dirty(double fraction, std::uint64_t seed, bool sequential = false);
  // Pages that do not hold what they should, as the guest sees them.
  Result<std::uint64_t> verify();

  const SandboxSpec& spec() const { return spec_; }
  GuestProcess* vmm() { return vmm_.get(); }

 private:
  Sandbox(Daemon& daemon, SandboxSpec spec) : daemon_(daemon), spec_(std::move(spec)) {}
  Daemon& daemon_;
  SandboxSpec spec_;
  std::unique_ptr<GuestProcess> vmm_;
  std::vector<std::uint32_t> expected_;  // what the next resumed VMM must hold
  int resumes_ = 0;
};

}  // namespace memsnap::fleet
