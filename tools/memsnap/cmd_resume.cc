// memsnap resume: serve one VMM's guest memory from a snapshot chain through the Firecracker
// UFFD handshake, until the VMM exits (or SIGINT/SIGTERM).
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <stdexcept>

#include "core/resume.h"
#include "tools/memsnap/cli.h"

namespace memsnap::cli {
namespace {

volatile sig_atomic_t g_stop = 0;
void on_signal(int) { g_stop = 1; }

// Waits until pid exits or a stop signal arrives.
void wait_for_exit(pid_t pid) {
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  while (!g_stop) {
    if (pidfd < 0) {
      if (::kill(pid, 0) != 0) break;
      ::usleep(100 * 1000);
      continue;
    }
    pollfd p{pidfd, POLLIN, 0};
    if (::poll(&p, 1, 200) > 0) break;
  }
  if (pidfd >= 0) ::close(pidfd);
}

}  // namespace

int cmd_resume(Args& args) {
  ResumeRequest req;
  req.chain = args.values("--parent");
  const std::string newest = args.value("--snapshot");
  req.socket_path = args.value("--listen");
  const std::string listen = req.socket_path;  // req is moved into the session
  req.strategy = args.value("--strategy");
  const std::string mode = args.value("--mode");
  req.verify_checksums = !args.flag("--no-verify");
  req.track_writes = !args.flag("--no-track-writes");
  req.handshake_timeout =
      std::chrono::milliseconds(static_cast<long>(std::stod(args.value("--timeout", "60")) * 1e3));
  const bool json = args.flag("--json");
  const std::string plugins = plugin_dir(args);
  args.expect_done();
  if (newest.empty() || req.socket_path.empty()) {
    throw std::invalid_argument("--snapshot and --listen are required");
  }
  req.chain.push_back(newest);
  if (!mode.empty()) {
    auto m = parse_resume_mode(mode);
    if (!m.ok()) throw std::invalid_argument(m.error().message);
    if (*m == ResumeMode::kWarm) {
      throw std::invalid_argument(
          "--mode warm needs the memfd kept from the pause, which only a long-running host "
          "(memsnap cycle, memsnapd) holds");
    }
    req.mode = *m;
  }

  PluginRegistry registry;
  load_plugins(registry, plugins);
  auto session = ResumeSession::prepare(registry, std::move(req));
  if (!session.ok()) {
    std::fprintf(stderr, "memsnap resume: %s\n", session.error().to_string().c_str());
    return 1;
  }
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  const ResumeReport& r = (*session)->report();
  std::fprintf(stderr, "memsnap resume: listening on %s for a VMM (%s, %zu snapshot(s), mode %s)\n",
               listen.c_str(), format_bytes(double(r.guest_size)).c_str(), r.chain_length,
               std::string(resume_mode_name(r.mode)).c_str());
  if (Status s = (*session)->accept_and_serve(); !s.ok()) {
    std::fprintf(stderr, "memsnap resume: %s\n", s.error().to_string().c_str());
    return 1;
  }
  if (!json) {
    std::printf("resumed VMM pid %d: mode %s (%s); ready in %.3f ms; write tracking: %s\n",
                r.vmm_pid, std::string(resume_mode_name(r.mode)).c_str(), r.mode_reason.c_str(),
                r.ready_seconds * 1e3, r.write_tracking_reason.c_str());
    std::fflush(stdout);
  }
  wait_for_exit(r.vmm_pid);
  (*session)->stop();
  const FaultStats f = (*session)->fault_stats();
  const Status err = (*session)->serve_error();
  if (json) {
    nlohmann::json out = to_json(r);
    out["faults"] = to_json(f);
    out["error"] = err.ok() ? nlohmann::json(nullptr) : nlohmann::json(err.error().to_string());
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf(
        "served %llu faults (%llu copies, %llu zero pages, %llu continues), %.1f us "
        "average; background fill %s\n",
        static_cast<unsigned long long>(f.faults), static_cast<unsigned long long>(f.copies),
        static_cast<unsigned long long>(f.zeropages), static_cast<unsigned long long>(f.continues),
        f.faults ? f.service_seconds / double(f.faults) * 1e6 : 0.0,
        f.fill_done ? "done" : "not done");
    if (!err.ok()) std::printf("ERROR: %s\n", err.error().to_string().c_str());
  }
  return err.ok() ? 0 : 1;
}

}  // namespace memsnap::cli
