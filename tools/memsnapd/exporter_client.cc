#include "tools/memsnapd/exporter_client.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

#include "core/base/file_io.h"
#include "tools/exporter/export_protocol.h"
#include "tools/exporter/log_format.h"

extern char** environ;

namespace memsnap::daemon {
namespace {

using exporter::EventKind;
using exporter::ExportEvent;

constexpr const char* kExporterName = "memsnap-exporter";

double seconds_of(const rusage& ru) {
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// Exporters whose BackgroundExport was destroyed before they exited: still memsnapd's children,
// reaped (without waiting) whenever an export starts or ends, so that none stays a zombie for
// longer than until the next one.
std::mutex orphans_mutex;
std::vector<pid_t> orphans;

void reap_orphans() {
  std::lock_guard lock(orphans_mutex);
  std::erase_if(orphans, [](pid_t pid) {
    const pid_t r = ::waitpid(pid, nullptr, WNOHANG);
    return r == pid || (r < 0 && errno == ECHILD);
  });
}

Status send_all(int fd, const std::string& text) {
  for (std::size_t off = 0; off < text.size();) {
    const ssize_t n = ::send(fd, text.data() + off, text.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return make_error(Errc::kIoError, io::errno_message("writing to memsnap-exporter", errno),
                        errno);
    }
    off += std::size_t(n);
  }
  return {};
}

std::string exit_description(int wait_status) {
  if (WIFEXITED(wait_status))
    return "exited with status " + std::to_string(WEXITSTATUS(wait_status));
  if (WIFSIGNALED(wait_status))
    return "was killed by signal " + std::to_string(WTERMSIG(wait_status));
  return "ended";
}

class ExporterProcess final : public BackgroundExport {
 public:
  ExporterProcess(pid_t pid, io::UniqueFd channel, io::UniqueFd pidfd, io::UniqueFd wake,
                  std::string request_line, std::function<void(const ExportStatus&)> on_change)
      : pid_(pid),
        channel_(std::move(channel)),
        pidfd_(std::move(pidfd)),
        wake_(std::move(wake)),
        on_change_(std::move(on_change)) {
    watcher_ = std::thread([this, line = std::move(request_line)] { watch(line); });
  }

  ~ExporterProcess() override {
    const std::uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = ::write(wake_.get(), &one, sizeof one);
    watcher_.join();
    if (!reaped_) {
      // Still running (or waiting for a command that will now never come: it retries on its
      // own once it sees the socket close). Not killed: it holds an answered pause's memory.
      std::lock_guard lock(orphans_mutex);
      orphans.push_back(pid_);
    }
    reap_orphans();
  }

  ExportStatus status() const override {
    std::lock_guard lock(mutex_);
    return status_;
  }

  ExportStatus wait(std::chrono::milliseconds timeout) const override {
    std::unique_lock lock(mutex_);
    changed_.wait_for(lock, timeout, [&] { return status_.state != ExportState::kRunning; });
    return status_;
  }

  Status retry() override {
    std::lock_guard lock(mutex_);
    if (status_.state != ExportState::kFailed) {
      return make_error(Errc::kInvalidState, "the export is " +
                                                 std::string(export_state_name(status_.state)) +
                                                 ", not failed: nothing to retry");
    }
    if (!retryable_) {
      const std::string why = released_       ? "it was released"
                              : exited_       ? "memsnap-exporter has exited"
                              : status_.error ? status_.error->to_string()
                                              : "the exporter said so";
      return make_error(Errc::kInvalidState, "this export cannot be retried: " + why);
    }
    MEMSNAP_RETURN_IF_ERROR(send_all(channel_.get(), "retry\n"));
    // on_change hears of it from the watcher (never from the caller's thread), at the
    // exporter's "retrying" or whatever comes first.
    set_state(ExportState::kRunning);
    status_.attempts += 1;
    status_.bytes_done = 0;
    status_.error.reset();
    changed_.notify_all();
    return {};
  }

  Status release() override {
    std::lock_guard lock(mutex_);
    if (status_.state == ExportState::kRunning) {
      return make_error(Errc::kInvalidState,
                        "the export is running: an answered pause is never dropped half way");
    }
    if (status_.state == ExportState::kDurable || released_ || exited_) return {};
    MEMSNAP_RETURN_IF_ERROR(send_all(channel_.get(), "release\n"));
    released_ = true;
    retryable_ = false;
    return {};
  }

 private:
  // The watcher thread: sends the request, then reads events until the exporter has exited and
  // is reaped, or the object is being destroyed.
  void watch(const std::string& request_line) {
    if (auto s = send_all(channel_.get(), request_line); !s.ok()) {
      spdlog::warn("memsnap-exporter (pid {}) did not take its request: {}", pid_,
                   s.error().to_string());
    }
    std::string buffer;
    bool channel_open = true;
    for (;;) {
      pollfd fds[3] = {
          {wake_.get(), POLLIN, 0}, {pidfd_.get(), POLLIN, 0}, {channel_.get(), POLLIN, 0}};
      if (::poll(fds, channel_open ? 3 : 2, -1) < 0) {
        if (errno == EINTR) continue;
        spdlog::error("watching memsnap-exporter (pid {}): {}", pid_,
                      io::errno_message("poll", errno));
        return;
      }
      if (fds[0].revents != 0) return;
      // Whatever it wrote before it exited is still in the socket: read that first. Its end
      // of the socket closes only when it exits (EOF then means it is exiting: without a
      // pidfd, that is how its end is seen).
      const bool exited = fds[1].revents != 0;
      if (channel_open && (exited || fds[2].revents != 0)) channel_open = read_events(buffer);
      if (exited || !channel_open) {
        reap();
        return;
      }
    }
  }

  // Reads what is there; false at EOF (or a read error).
  bool read_events(std::string& buffer) {
    for (;;) {
      char chunk[16384];
      const ssize_t n = ::recv(channel_.get(), chunk, sizeof chunk, MSG_DONTWAIT);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
      if (n <= 0) return false;
      buffer.append(chunk, std::size_t(n));
      for (auto nl = buffer.find('\n'); nl != std::string::npos; nl = buffer.find('\n')) {
        const std::string line = buffer.substr(0, nl);
        buffer.erase(0, nl + 1);
        auto event = exporter::decode_event(line);
        if (!event.ok()) {
          spdlog::warn("memsnap-exporter (pid {}) said something unreadable: {}", pid_,
                       event.error().to_string());
          continue;
        }
        apply(std::move(*event));
      }
    }
  }

  void apply(ExportEvent e) {
    std::unique_lock lock(mutex_);
    status_.attempts = std::max(status_.attempts, e.attempt);
    status_.bytes_done = e.bytes_done;
    status_.bytes_total = e.bytes_total;
    status_.cpu_seconds = std::max(status_.cpu_seconds, e.cpu_seconds);
    switch (e.kind) {
      case EventKind::kProgress:
        break;
      case EventKind::kRetrying:
        set_state(ExportState::kRunning);
        status_.error.reset();
        break;
      case EventKind::kDurable:
        set_state(ExportState::kDurable);
        status_.report = std::move(e.report);
        status_.error.reset();
        break;
      case EventKind::kFailed:
        set_state(ExportState::kFailed);
        status_.error = std::move(e.error);
        retryable_ = e.retryable && !released_;
        break;
      case EventKind::kReleased:
        released_ = true;
        retryable_ = false;
        break;
    }
    publish(lock);
  }

  // The exporter has exited: reaps it, takes its CPU, and fails an export it left unfinished.
  void reap() {
    int wait_status = 0;
    rusage ru{};
    pid_t r;
    do {
      r = ::wait4(pid_, &wait_status, 0, &ru);
    } while (r < 0 && errno == EINTR);
    std::unique_lock lock(mutex_);
    if (r == pid_) {
      reaped_ = true;
      status_.cpu_seconds = std::max(status_.cpu_seconds, seconds_of(ru));
    }
    exited_ = true;
    retryable_ = false;
    if (status_.state != ExportState::kDurable && !released_) {
      std::string message = "memsnap-exporter (pid " + std::to_string(pid_) + ") " +
                            (r == pid_ ? exit_description(wait_status) : "ended") +
                            " before the snapshot was durable (its own reference to the memory is gone; a retry "
                            "starts a new export from the caller's, if it holds one)";
      if (status_.error) message += " (its last error: " + status_.error->to_string() + ")";
      spdlog::error("export of a handover pause lost: {}", message);
      set_state(ExportState::kFailed);
      status_.error = make_error(Errc::kExportFailed, std::move(message));
    }
    publish(lock);
  }

  void set_state(ExportState state) {
    if (status_.state == state) return;
    status_.state = state;
    ++changes_;
  }

  // Wakes the waiters and, if the state changed since on_change last heard, tells it (unlocked).
  void publish(std::unique_lock<std::mutex>& lock) {
    changed_.notify_all();
    if (changes_ == notified_changes_) return;
    notified_changes_ = changes_;
    const ExportStatus copy = status_;
    lock.unlock();
    if (on_change_) on_change_(copy);
  }

  const pid_t pid_;
  const io::UniqueFd channel_;
  const io::UniqueFd pidfd_;
  const io::UniqueFd wake_;
  const std::function<void(const ExportStatus&)> on_change_;
  std::thread watcher_;
  bool reaped_ = false;  // the watcher's only, read after join

  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  ExportStatus status_;
  std::uint64_t changes_ = 0;           // of status_.state
  std::uint64_t notified_changes_ = 0;  // the changes on_change has heard of
  bool retryable_ = true;
  bool released_ = false;
  bool exited_ = false;
};

// set_exporter_logging's settings, as the environment entries an exporter is given.
std::mutex logging_mutex;
std::string log_format_entry = std::string(exporter::kLogFormatEnv) + "=text";
std::string log_level_entry = std::string(exporter::kLogLevelEnv) + "=info";

// memsnapd's environment without any exporter logging entries of its own, then the current
// ones. The strings live in `storage` (and environ's, unchanged while memsnapd runs).
std::vector<char*> exporter_environment(std::vector<std::string>& storage) {
  {
    std::lock_guard lock(logging_mutex);
    storage = {log_format_entry, log_level_entry};
  }
  std::vector<char*> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string_view entry(*e);
    if (entry.starts_with(std::string(exporter::kLogFormatEnv) + "=") ||
        entry.starts_with(std::string(exporter::kLogLevelEnv) + "=")) {
      continue;
    }
    env.push_back(*e);
  }
  for (auto& s : storage) env.push_back(s.data());
  env.push_back(nullptr);
  return env;
}

// posix_spawn (no allocation nor locking between fork and exec in the child, whatever memsnapd's
// other threads hold): a new session, so no signal to memsnapd's process group or terminal
// reaches it; an empty signal mask and default dispositions; the memfd as fd 3, its end of the
// socket as fd 4, /dev/null as stdin; stdout and stderr shared with memsnapd's (its log).
Result<pid_t> spawn_exporter(const std::string& binary, int memfd, int channel) {
  // Copies above 4, so that no dup2 below has the same source and target (which would leave
  // O_CLOEXEC set, and the fd closed at exec).
  const io::UniqueFd memfd_copy(::fcntl(memfd, F_DUPFD_CLOEXEC, 10));
  const io::UniqueFd channel_copy(::fcntl(channel, F_DUPFD_CLOEXEC, 10));
  if (memfd_copy.get() < 0 || channel_copy.get() < 0) {
    return make_error(Errc::kIoError, io::errno_message("duplicating the memfd", errno), errno);
  }
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  ::posix_spawn_file_actions_init(&actions);
  ::posix_spawnattr_init(&attr);
  ::posix_spawn_file_actions_adddup2(&actions, memfd_copy.get(), exporter::kMemfdFd);
  ::posix_spawn_file_actions_adddup2(&actions, channel_copy.get(), exporter::kChannelFd);
  ::posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  for (int sig : {SIGHUP, SIGINT, SIGTERM, SIGCHLD, SIGPIPE, SIGUSR1, SIGUSR2}) {
    sigaddset(&defaults, sig);
  }
  ::posix_spawnattr_setsigmask(&attr, &none);
  ::posix_spawnattr_setsigdefault(&attr, &defaults);
  ::posix_spawnattr_setflags(&attr,
                             POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  std::string arg0 = binary;
  char* argv[] = {arg0.data(), nullptr};
  std::vector<std::string> env_storage;
  const std::vector<char*> env = exporter_environment(env_storage);
  pid_t pid = -1;
  const int err = ::posix_spawn(&pid, binary.c_str(), &actions, &attr, argv, env.data());
  ::posix_spawn_file_actions_destroy(&actions);
  ::posix_spawnattr_destroy(&attr);
  if (err != 0) {
    return make_error(Errc::kIoError, io::errno_message("starting " + binary, err), err);
  }
  return pid;
}

}  // namespace

void set_exporter_logging(bool json, const std::string& level) {
  std::lock_guard lock(logging_mutex);
  log_format_entry = std::string(exporter::kLogFormatEnv) + (json ? "=json" : "=text");
  log_level_entry = std::string(exporter::kLogLevelEnv) + "=" + level;
}

Result<std::string> find_exporter_binary() {
  std::vector<std::string> tried;
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) tried.push_back((self.parent_path() / kExporterName).string());
  if (const char* dir = std::getenv("MEMSNAP_BIN_DIR"); dir != nullptr && *dir != '\0') {
    tried.push_back((std::filesystem::path(dir) / kExporterName).string());
  }
  std::string where;
  for (const auto& path : tried) {
    if (::access(path.c_str(), X_OK) == 0) return path;
    where += (where.empty() ? "" : ", ") + path;
  }
  return make_error(Errc::kNotFound,
                    std::string(kExporterName) + " is not installed (looked for " +
                        (where.empty() ? std::string("nothing: no /proc/self/exe") : where) +
                        "; $MEMSNAP_BIN_DIR names another directory): no background export");
}

Result<std::unique_ptr<BackgroundExport>> start_exporter(
    const PluginRegistry& registry, const PauseRequest& request,
    std::function<void(const ExportStatus&)> on_change, const ExporterOptions& options) {
  reap_orphans();
  exporter::ExporterRequest job;
  job.pause = request;
  job.pause.dirty_source = nullptr;
  job.pause.progress_bytes = nullptr;
  job.pause.total_bytes = nullptr;
  job.retry_interval = options.retry_interval;
  const PluginInfo* info = registry.find(request.strategy);
  if (info == nullptr) {
    return make_error(Errc::kPluginNotLoaded, "strategy " + request.strategy + " is not loaded");
  }
  job.plugins.push_back(info->path);
  if (request.allow_fallback) {
    if (const PluginInfo* fallback = registry.find(request.fallback_strategy);
        fallback != nullptr && fallback != info) {
      job.plugins.push_back(fallback->path);
    }
  }
  if (request.dirty_source) {
    return make_error(Errc::kInvalidArgument,
                      "a background export cannot run this request: it has a dirty_source");
  }
  MEMSNAP_RETURN_IF_ERROR(exporter::check_background_request(job));
  std::string binary = options.binary;
  if (binary.empty()) {
    MEMSNAP_ASSIGN_OR_RETURN(binary, find_exporter_binary());
  }
  std::string line = exporter::to_json(job).dump() + "\n";

  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    return make_error(Errc::kIoError, io::errno_message("socketpair", errno), errno);
  }
  io::UniqueFd ours(sv[0]);
  const io::UniqueFd theirs(sv[1]);
  io::UniqueFd wake(::eventfd(0, EFD_CLOEXEC));
  if (wake.get() < 0) return make_error(Errc::kIoError, io::errno_message("eventfd", errno), errno);
  MEMSNAP_ASSIGN_OR_RETURN(const pid_t pid, spawn_exporter(binary, request.memfd, theirs.get()));
  // A pidfd tells the watcher when the exporter exits; the pid cannot be reused before it is
  // reaped, so opening it now is race-free. Without one (a kernel before 5.3) the watcher sees
  // it exit by the socket's EOF. From here on nothing fails: the exporter runs.
  io::UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  spdlog::info("background export of {} started: memsnap-exporter pid {}, strategy {}",
               request.out_path, pid, request.strategy);
  return std::unique_ptr<BackgroundExport>(
      std::make_unique<ExporterProcess>(pid, std::move(ours), std::move(pidfd), std::move(wake),
                                        std::move(line), std::move(on_change)));
}

}  // namespace memsnap::daemon
