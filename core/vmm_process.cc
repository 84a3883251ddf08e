#include "core/vmm_process.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

namespace memsnap {
namespace {

std::string proc_path(pid_t pid, const std::string& rest) {
  return "/proc/" + std::to_string(pid) + "/" + rest;
}

bool stopped_state(char s) { return s == 't' || s == 'T' || s == 'Z' || s == 'X'; }

Status signal_pidfd(int pidfd, pid_t pid, int sig) {
  if (::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0) == 0) return {};
  const int err = errno;
  return make_error(err == ESRCH ? Errc::kProcessGone : Errc::kIoError,
                    std::string("cannot ") + (sig == SIGCONT ? "continue" : "stop") +
                        " process " + std::to_string(pid) + ": " + std::strerror(err),
                    err);
}

}  // namespace

std::vector<RunningTask> tasks_not_stopped(pid_t pid) {
  std::vector<RunningTask> running;
  std::error_code ec;
  std::filesystem::directory_iterator it(proc_path(pid, "task"), ec);
  if (ec) return running;  // the process is gone
  for (const auto& entry : it) {
    std::ifstream in(entry.path() / "stat");
    std::string line;
    if (!std::getline(in, line)) continue;  // the thread exited
    const auto close_paren = line.rfind(')');
    if (close_paren == std::string::npos || close_paren + 2 >= line.size()) continue;
    const char s = line[close_paren + 2];
    if (stopped_state(s)) continue;
    running.push_back({static_cast<pid_t>(std::stol(entry.path().filename().string())), s});
  }
  return running;
}

std::optional<pid_t> pid_of_pidfd(int pidfd) {
  std::ifstream in("/proc/self/fdinfo/" + std::to_string(pidfd));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("Pid:", 0) == 0) return static_cast<pid_t>(std::stol(line.substr(4)));
  }
  return std::nullopt;
}

Result<Freezer> Freezer::freeze(pid_t pid, int pidfd, std::chrono::milliseconds timeout) {
  // The process to stop, pinned: the caller's pidfd (duplicated), else one opened now.
  io::UniqueFd pinned(pidfd >= 0 ? ::fcntl(pidfd, F_DUPFD_CLOEXEC, 0)
                                 : static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (pinned.get() < 0) {
    const int err = errno;
    return make_error(err == ESRCH ? Errc::kProcessGone : Errc::kIoError,
                      "cannot pin process " + std::to_string(pid) + " (pidfd): " +
                          std::strerror(err),
                      err);
  }
  if (pidfd >= 0) {
    const std::optional<pid_t> of_fd = pid_of_pidfd(pinned.get());
    if (of_fd == -1) {
      return make_error(Errc::kProcessGone, "process " + std::to_string(pid) + " has exited");
    }
    if (of_fd != pid) {
      return make_error(Errc::kInvalidArgument,
                        "the pidfd given to stop process " + std::to_string(pid) + " is " +
                            (!of_fd ? std::string("not a pidfd")
                                    : "of process " + std::to_string(*of_fd)));
    }
  }
  MEMSNAP_RETURN_IF_ERROR(signal_pidfd(pinned.get(), pid, SIGSTOP));
  Freezer f(pid, std::move(pinned));
  // SIGSTOP stops the whole thread group, but each thread only when it next leaves the kernel:
  // a vCPU thread in the middle of a syscall (a read() into guest memory, KVM_RUN) can still
  // write after the leader stopped. Frozen means every task of the process is stopped. The
  // tasks are read by pid from /proc: the pidfd tells whether that is still our process (it
  // polls readable once the process has exited, before its pid can be reused).
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    pollfd exited{f.pidfd_.get(), POLLIN, 0};
    if (::poll(&exited, 1, 0) > 0) {
      f.keep_stopped();
      return make_error(Errc::kProcessGone,
                        "process " + std::to_string(pid) + " exited while being stopped");
    }
    const std::vector<RunningTask> running = tasks_not_stopped(pid);
    if (running.empty()) {
      // Stopped -- or gone since the poll, which the pidfd tells apart.
      if (::poll(&exited, 1, 0) > 0) continue;
      return f;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return make_error(Errc::kIoError,
                        "process " + std::to_string(pid) + " did not stop within " +
                            std::to_string(timeout.count()) + " ms (task " +
                            std::to_string(running.front().tid) + " is in state '" +
                            std::string(1, running.front().state) + "')");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

Freezer::Freezer(Freezer&& other) noexcept
    : pid_(other.pid_), pidfd_(std::move(other.pidfd_)) {
  other.pid_ = -1;
}

Freezer::~Freezer() { (void)thaw(); }

Status Freezer::thaw() {
  if (pid_ < 0) return {};
  const pid_t pid = pid_;
  pid_ = -1;
  io::UniqueFd pidfd = std::move(pidfd_);
  Status s = signal_pidfd(pidfd.get(), pid, SIGCONT);
  if (!s.ok() && s.error().code == Errc::kProcessGone) return {};
  return s;
}

Result<int> take_fd_of_process(pid_t pid, int target_fd) {
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) {
    const int err = errno;
    return make_error(err == ESRCH ? Errc::kProcessGone : Errc::kIoError,
                      "pidfd_open(" + std::to_string(pid) + "): " + std::strerror(err), err);
  }
  const int fd = static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd, target_fd, 0));
  const int err = errno;
  ::close(pidfd);
  if (fd < 0) {
    return make_error(err == ESRCH ? Errc::kProcessGone : Errc::kIoError,
                      "pidfd_getfd(" + std::to_string(pid) + ", fd " + std::to_string(target_fd) +
                          "): " + std::strerror(err),
                      err);
  }
  return fd;
}

Result<std::vector<ProcessMemfd>> find_memfds_of_process(
    pid_t pid, const std::optional<std::string>& name_filter) {
  const std::string fd_dir = proc_path(pid, "fd");
  std::vector<ProcessMemfd> found;
  std::vector<ino_t> inodes;
  std::error_code ec;
  std::filesystem::directory_iterator it(fd_dir, ec);
  if (ec) {
    return make_error(ec.value() == ENOENT ? Errc::kProcessGone : Errc::kIoError,
                      "cannot read " + fd_dir + ": " + ec.message(), ec.value());
  }
  for (const auto& entry : it) {
    std::error_code link_ec;
    const auto target = std::filesystem::read_symlink(entry.path(), link_ec);
    if (link_ec) continue;  // closed meanwhile
    std::string name = target.string();
    if (name.rfind("/memfd:", 0) != 0) continue;
    name = name.substr(1);
    if (const auto del = name.find(" (deleted)"); del != std::string::npos) name.resize(del);
    if (name_filter && name.find(*name_filter) == std::string::npos) continue;
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) != 0) continue;
    ProcessMemfd m;
    m.fd_number = std::stoi(entry.path().filename().string());
    m.name = name;
    m.size = static_cast<std::uint64_t>(st.st_size);
    found.push_back(std::move(m));
    inodes.push_back(st.st_ino);
  }
  std::ifstream maps(proc_path(pid, "maps"));
  std::string line;
  while (std::getline(maps, line)) {
    std::istringstream ls(line);
    std::string range, perms, offset_hex, dev;
    unsigned long long inode = 0;
    ls >> range >> perms >> offset_hex >> dev >> inode;
    if (perms.size() < 4 || perms[3] != 's') continue;  // only shared mappings see the memfd
    for (std::size_t i = 0; i < found.size(); ++i) {
      if (inodes[i] != inode || line.find("/memfd:") == std::string::npos) continue;
      const auto dash = range.find('-');
      const std::uint64_t start = std::stoull(range.substr(0, dash), nullptr, 16);
      const std::uint64_t end = std::stoull(range.substr(dash + 1), nullptr, 16);
      found[i].mappings.push_back({std::stoull(offset_hex, nullptr, 16), start, end - start});
    }
  }
  return found;
}

std::uint64_t proc_kb_fields(pid_t pid, const char* file,
                             std::initializer_list<std::string_view> keys) {
  std::ifstream in(proc_path(pid, file));
  std::string line;
  std::uint64_t total = 0;
  while (std::getline(in, line)) {
    for (const std::string_view key : keys) {
      if (line.size() > key.size() && line.compare(0, key.size(), key) == 0 &&
          line[key.size()] == ':') {
        total += std::stoull(line.substr(key.size() + 1)) * 1024;
      }
    }
  }
  return total;
}

std::uint64_t huge_page_bytes(pid_t pid) {
  return proc_kb_fields(pid, "smaps_rollup", {"AnonHugePages", "ShmemPmdMapped", "FilePmdMapped"});
}

std::string thp_setting(const char* file) {
  std::ifstream in(std::string("/sys/kernel/mm/transparent_hugepage/") + file);
  std::string text;
  std::getline(in, text);
  const auto open = text.find('['), close = text.find(']');
  return open != std::string::npos && close > open ? text.substr(open + 1, close - open - 1) : "";
}

}  // namespace memsnap
