#include "tools/fleet/fleet.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace memsnap::fleet {

namespace fs = std::filesystem;
using nlohmann::json;

std::string Answer::error_text() const {
  if (body.is_object() && body.contains("error") && body["error"].is_object()) {
    return body["error"].value("code", "") + ": " + body["error"].value("message", "");
  }
  return "HTTP " + std::to_string(status) + ": " + body.dump();
}

namespace {

std::string find_binary(const std::string& name) {
  std::error_code ec;
  const auto self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec && fs::exists(self.parent_path() / name)) return (self.parent_path() / name).string();
  if (const char* dir = std::getenv("MEMSNAP_BIN_DIR"); dir && *dir) {
    return (fs::path(dir) / name).string();
  }
  return name;
}

bool alive(pid_t pid) {
  int status = 0;
  return ::waitpid(pid, &status, WNOHANG) == 0;
}

}  // namespace

Result<std::uint16_t> free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return make_error(Errc::kIoError, std::string("socket: ") + std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int err = errno;
    ::close(fd);
    return make_error(Errc::kIoError, std::string("bind 127.0.0.1:0: ") + std::strerror(err));
  }
  ::close(fd);
  return static_cast<std::uint16_t>(ntohs(addr.sin_port));
}

Result<std::string> http_get(const std::string& host, std::uint16_t port, const std::string& target,
                             std::chrono::milliseconds timeout) {
  namespace beast = boost::beast;
  namespace http = beast::http;
  using tcp = boost::asio::ip::tcp;
  try {
    boost::asio::io_context io;
    tcp::socket socket(io);
    tcp::resolver resolver(io);
    boost::asio::connect(socket, resolver.resolve(host, std::to_string(port)));
    // Blocking reads and writes with a deadline each (the socket stays blocking).
    const timeval tv{static_cast<time_t>(timeout.count() / 1000),
                     static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
    ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    http::request<http::empty_body> req{http::verb::get, target, 11};
    req.set(http::field::host, host + ":" + std::to_string(port));
    req.set(http::field::connection, "close");
    http::write(socket, req);
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    parser.body_limit(64 * 1024 * 1024);
    http::read(socket, buffer, parser);
    const auto& res = parser.get();
    if (res.result_int() != 200) {
      return make_error(Errc::kIoError, "GET " + target + " on " + host + ":" + std::to_string(port) +
                                            ": HTTP " + std::to_string(res.result_int()) + ": " +
                                            res.body().substr(0, 500));
    }
    return res.body();
  } catch (const std::exception& e) {
    return make_error(Errc::kIoError,
                      "GET " + target + " on " + host + ":" + std::to_string(port) + ": " + e.what());
  }
}

Result<std::unique_ptr<Daemon>> Daemon::start(const DaemonOptions& o) {
  std::unique_ptr<Daemon> d(new Daemon());
  d->dir_ = o.dir;
  d->socket_ = o.dir + "/memsnapd.sock";
  d->snapshot_dir_ = o.dir + "/snapshots";
  d->log_ = o.dir + "/memsnapd.log";
  std::vector<std::string> args = {o.binary.empty() ? find_binary("memsnapd") : o.binary};
  if (!o.config_file.empty()) args.insert(args.end(), {"--config", o.config_file});
  args.insert(args.end(),
              {"--set", "snapshots.directory=" + d->snapshot_dir_, "--set",
               "control.socket=" + d->socket_, "--set", "control.handshake_directory=" + o.dir,
               "--set", "state.directory=" + o.dir + "/state"});
  if (o.metrics) {
    MEMSNAP_ASSIGN_OR_RETURN(
        auto port, o.metrics_port ? Result<std::uint16_t>(o.metrics_port) : free_loopback_port());
    d->metrics_port_ = port;
    args.insert(args.end(), {"--set", "metrics.listen=127.0.0.1:" + std::to_string(port)});
  } else {
    args.insert(args.end(), {"--set", "metrics.listen=\"\""});
  }
  if (!o.flags_file.empty()) args.insert(args.end(), {"--set", "flags.file=" + o.flags_file});
  for (const auto& s : o.overrides) args.insert(args.end(), {"--set", s});

  const int log_fd = ::open(d->log_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    return make_error(Errc::kIoError, "cannot open " + d->log_ + ": " + std::strerror(errno));
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(log_fd);
    return make_error(Errc::kIoError, std::string("fork: ") + std::strerror(errno));
  }
  if (pid == 0) {
    // A test or tool killed hard must not leave its memsnapd behind.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    ::execv(argv[0], argv.data());
    std::fprintf(stderr, "exec %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(log_fd);
  d->pid_ = pid;
  const auto deadline = std::chrono::steady_clock::now() + o.start_timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (!alive(pid)) {
      d->pid_ = -1;
      return make_error(Errc::kInternal, "memsnapd exited at start; see " + d->log_);
    }
    struct stat st {};
    if (::stat(d->socket_.c_str(), &st) == 0) {
      auto health = d->call("GET", "/v1/health", nullptr, std::chrono::seconds(2));
      if (health.ok() && health->ok()) return d;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return make_error(Errc::kTimeout, "memsnapd did not answer within " +
                                        std::to_string(o.start_timeout.count()) + " ms; see " +
                                        d->log_);
}

Daemon::~Daemon() {
  if (pid_ > 0 && stop(SIGTERM, std::chrono::seconds(30)) < 0) stop(SIGKILL, std::chrono::seconds(5));
}

int Daemon::stop(int sig, std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, sig);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return -1;
}

Result<Answer> Daemon::call(const std::string& method, const std::string& target,
                            const json& body, std::chrono::milliseconds timeout) {
  control_api::UnixHttpClient client(socket_, timeout);
  MEMSNAP_ASSIGN_OR_RETURN(
      auto r, client.call(method, target, body.is_null() ? std::string() : body.dump()));
  Answer a;
  a.status = r.status;
  a.body = json::parse(r.body, nullptr, /*allow_exceptions=*/false);
  if (a.body.is_discarded()) a.body = r.body;
  return a;
}

std::string Daemon::metrics_url() const {
  return metrics_port_ ? "http://127.0.0.1:" + std::to_string(metrics_port_) + "/metrics" : "";
}

Result<std::string> Daemon::scrape() const {
  if (!metrics_port_) return make_error(Errc::kInvalidArgument, "metrics are off");
  return http_get_loopback(metrics_port_, "/metrics");
}

Result<std::unique_ptr<Sandbox>> Sandbox::launch(Daemon& daemon, const SandboxSpec& spec) {
  std::unique_ptr<Sandbox> sb(new Sandbox(daemon, spec));
  GuestOptions go;
  go.size = spec.size;
  go.backing = spec.backing;
  go.seed = spec.seed;
  go.zero_fraction = spec.zero_fraction;
  go.thp = spec.thp;
  MEMSNAP_ASSIGN_OR_RETURN(auto vmm, GuestProcess::spawn(go));
  sb->vmm_ = std::move(vmm);
  json regions = json::array();
  for (const auto& r : sb->vmm_->regions()) {
    regions.push_back({{"guest_offset", r.guest_offset}, {"host_addr", r.host_addr},
                       {"size", r.size}});
  }
  json body = {{"id", spec.id},
               {"vmm_pid", sb->vmm_->pid()},
               {"regions", regions},
               {"attributes", spec.attributes}};
  if (sb->vmm_->memfd_number() >= 0) body["memfd_fd"] = sb->vmm_->memfd_number();
  MEMSNAP_ASSIGN_OR_RETURN(auto answer, daemon.call("POST", "/v1/sandboxes", body));
  if (!answer.ok()) {
    return make_error(Errc::kInternal, "register " + spec.id + ": " + answer.error_text());
  }
  return sb;
}

Result<json> Sandbox::pause(const json& body) {
  MEMSNAP_ASSIGN_OR_RETURN(auto answer,
                           daemon_.call("POST", "/v1/sandboxes/" + spec_.id + "/pause", body));
  if (!answer.ok()) {
    return make_error(Errc::kExportFailed, "pause " + spec_.id + ": " + answer.error_text());
  }
  if (body.value("after", "stop") == "stop" && vmm_) {
    expected_ = vmm_->expected_generations();
    vmm_->kill();
    vmm_.reset();
  }
  return answer.body;
}

Result<PauseMoments> Sandbox::pause_until_durable(const json& body,
                                                  std::chrono::milliseconds timeout) {
  PauseMoments m;
  const auto sent = std::chrono::steady_clock::now();
  MEMSNAP_ASSIGN_OR_RETURN(m.answer, pause(body));
  m.answer_wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - sent).count();
  m.mode = m.answer.value("mode", "copy");
  m.answer_seconds = m.answer.value("handover_seconds", m.answer.value("seconds", 0.0));
  if (m.answer.value("durable", true)) {
    m.durable = m.answer;
    // Answered when durable: from the request, the origin of a handover's durable_seconds too
    // (the answer's `seconds` is the pipeline's wall time, a fraction of a millisecond less).
    m.durable_seconds = m.answer_seconds;
  } else {
    const std::string target = "/v1/sandboxes/" + spec_.id +
                               "?wait_while=exporting&timeout_ms=" +
                               std::to_string(timeout.count());
    MEMSNAP_ASSIGN_OR_RETURN(
        auto state, daemon_.call("GET", target, nullptr, timeout + std::chrono::seconds(10)));
    if (!state.ok()) return make_error(Errc::kExportFailed, state.error_text());
    const json& last = state.body.contains("last_pause") ? state.body["last_pause"] : json();
    if (!state.body.value("durable", false) || !last.is_object() ||
        !last.value("durable", false)) {
      return make_error(Errc::kExportFailed,
                        "the handover pause of " + spec_.id + " is not durable: state " +
                            state.body.value("state", "?") + ", " +
                            state.body.value("last_error", json("")).dump());
    }
    m.durable = last;
    m.durable_seconds = last.value("durable_seconds", 0.0);
  }
  if (m.durable.contains("export") && m.durable["export"].is_object()) {
    m.export_cpu_seconds = m.durable["export"].value("cpu_seconds", 0.0);
  }
  return m;
}

Result<json> Sandbox::resume(const json& extra) {
  const std::string socket =
      daemon_.dir() + "/" + spec_.id + "-" + std::to_string(++resumes_) + ".uffd";
  json body = extra;
  body["handshake_socket"] = socket;
  MEMSNAP_ASSIGN_OR_RETURN(auto answer,
                           daemon_.call("POST", "/v1/sandboxes/" + spec_.id + "/resume", body));
  if (!answer.ok()) {
    return make_error(Errc::kResumeFailed, "resume " + spec_.id + ": " + answer.error_text());
  }
  GuestOptions go;
  go.size = spec_.size;
  go.backing = spec_.backing;
  go.seed = spec_.seed;
  go.thp = spec_.thp;
  go.handshake_socket = socket;
  go.no_fill = true;
  go.expect = expected_;
  go.accept_memfd = true;
  go.write_faults = spec_.write_faults;
  MEMSNAP_ASSIGN_OR_RETURN(auto vmm, GuestProcess::spawn(go));
  vmm_ = std::move(vmm);
  MEMSNAP_ASSIGN_OR_RETURN(
      auto state,
      daemon_.call("GET", "/v1/sandboxes/" + spec_.id + "?wait_while=resuming&timeout_ms=60000",
                   nullptr, std::chrono::seconds(70)));
  if (!state.ok()) return make_error(Errc::kResumeFailed, state.error_text());
  if (state.body.value("state", "") != "running") {
    return make_error(Errc::kResumeFailed, "resume " + spec_.id + " ended " +
                                               state.body.value("state", "?") + ": " +
                                               state.body.value("last_error", json("")).dump());
  }
  MEMSNAP_RETURN_IF_ERROR(vmm_->wait_ready(std::chrono::seconds(30)));
  return state.body["last_resume"];
}

Status Sandbox::dirty(double fraction, std::uint64_t seed, bool sequential) {
  if (!vmm_) return make_error(Errc::kInvalidState, spec_.id + " has no running VMM");
  MEMSNAP_RETURN_IF_ERROR(vmm_->dirty(fraction, sequential, seed));
  return {};
}

Result<std::uint64_t> Sandbox::verify() {
  if (!vmm_) return make_error(Errc::kInvalidState, spec_.id + " has no running VMM");
  return vmm_->verify();
}

}  // namespace memsnap::fleet
