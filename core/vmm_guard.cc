#include "core/vmm_guard.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <spdlog/spdlog.h>

#include "core/base/unix_socket.h"

namespace memsnap {
namespace {

constexpr int kMaxWatched = 4096;
constexpr int kGuardSocket = 3;

// The guardian's whole life: system calls only (it is a fork of a possibly threaded process).
[[noreturn]] void guardian_main(int socket) {
  ::prctl(PR_SET_NAME, "memsnap-guard");
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  if (socket != kGuardSocket) {
    ::dup2(socket, kGuardSocket);
  }
  ::syscall(SYS_close_range, kGuardSocket + 1, ~0U, 0);
  static std::uint64_t tokens[kMaxWatched];
  static int fds[kMaxWatched];
  int count = 0;
  bool goodbye = false;
  for (;;) {
    char message[9];
    iovec iov{message, sizeof(message)};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    const ssize_t n = ::recvmsg(kGuardSocket, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // memsnap's end closed: memsnap is gone
    int fd = -1;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
      }
    }
    if (n == 1 && message[0] == 'Q') {
      goodbye = true;
      break;
    }
    if (n != 9) {
      if (fd >= 0) ::close(fd);
      continue;
    }
    std::uint64_t token = 0;
    std::memcpy(&token, message + 1, sizeof(token));
    if (message[0] == 'W' && fd >= 0) {
      if (count < kMaxWatched) {
        tokens[count] = token;
        fds[count++] = fd;
      } else {
        ::close(fd);
      }
    } else if (message[0] == 'R') {
      for (int i = 0; i < count; ++i) {
        if (tokens[i] != token) continue;
        ::close(fds[i]);
        tokens[i] = tokens[count - 1];
        fds[i] = fds[count - 1];
        --count;
        break;
      }
    } else if (fd >= 0) {
      ::close(fd);
    }
  }
  if (!goodbye) {
    for (int i = 0; i < count; ++i) ::syscall(SYS_pidfd_send_signal, fds[i], SIGKILL, nullptr, 0);
  }
  ::_exit(0);
}

}  // namespace

Result<std::unique_ptr<VmmGuard>> VmmGuard::start() {
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
    const int err = errno;
    return make_error(Errc::kIoError, std::string("socketpair: ") + std::strerror(err), err);
  }
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(pair[0]);
    ::close(pair[1]);
    return make_error(Errc::kIoError, std::string("fork: ") + std::strerror(err), err);
  }
  if (pid == 0) {
    ::close(pair[0]);
    guardian_main(pair[1]);
  }
  ::close(pair[1]);
  return std::unique_ptr<VmmGuard>(new VmmGuard(io::UniqueFd(pair[0]), pid));
}

VmmGuard::~VmmGuard() {
  {
    std::lock_guard lock(mu_);
    const char q = 'Q';
    (void)!::send(socket_.get(), &q, 1, MSG_NOSIGNAL);
    socket_.reset();
  }
  while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
  }
}

Status VmmGuard::send(char op, std::uint64_t token, int fd) {
  char message[9];
  message[0] = op;
  std::memcpy(message + 1, &token, sizeof(token));
  std::lock_guard lock(mu_);
  return io::send_with_fds(socket_.get(), std::string_view(message, sizeof(message)),
                           fd >= 0 ? std::span<const int>(&fd, 1) : std::span<const int>(),
                           "telling the VMM guardian");
}

Result<std::uint64_t> VmmGuard::watch(int pidfd) {
  if (pidfd < 0) return make_error(Errc::kInvalidArgument, "no pidfd to watch");
  std::uint64_t token = 0;
  {
    std::lock_guard lock(mu_);
    token = ++tokens_;
  }
  if (Status s = send('W', token, pidfd); !s.ok()) return s.error();
  return token;
}

void VmmGuard::release(std::uint64_t token) {
  if (Status s = send('R', token, -1); !s.ok()) {
    spdlog::warn("{}", s.error().to_string());
  }
}

}  // namespace memsnap
