#include "core/base/unix_socket.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace memsnap::io {
namespace {

Error io_error(const std::string& what, int err) {
  return make_error(Errc::kIoError, what + ": " + std::strerror(err), err);
}

bool fill_address(const std::string& path, sockaddr_un& addr) {
  addr = {};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) return false;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return true;
}

// True when a socket file has nobody listening behind it (connect is refused).
Result<bool> socket_is_stale(const sockaddr_un& addr, const std::string& path) {
  UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (probe.get() < 0) return io_error("socket", errno);
  if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) {
    return false;
  }
  const int err = errno;
  if (err == ECONNREFUSED || err == ENOENT) return true;
  if (err == EAGAIN) return false;  // a listener whose backlog is full: very much alive
  return io_error("cannot tell whether " + path + " is in use: connect", err);
}

Status clear_path(const sockaddr_un& addr, const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return {};
    return io_error("lstat " + path, errno);
  }
  if (!S_ISSOCK(st.st_mode)) {
    return make_error(Errc::kInvalidArgument,
                      path + " exists and is not a socket; refusing to replace it");
  }
  auto stale = socket_is_stale(addr, path);
  if (!stale) return stale.error();
  if (!stale.value()) {
    return make_error(Errc::kInvalidArgument, path + " is a socket somebody is listening on");
  }
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return io_error("unlink " + path, errno);
  return {};
}

}  // namespace

Result<ListeningSocket> listen_unix(const std::string& path, mode_t mode,
                                    std::optional<gid_t> group, int backlog) {
  sockaddr_un addr{};
  if (!fill_address(path, addr)) {
    return make_error(Errc::kInvalidArgument, "socket path must be 1.." +
                                                  std::to_string(sizeof(addr.sun_path) - 1) +
                                                  " bytes: \"" + path + "\"");
  }
  if ((mode & ~static_cast<mode_t>(0777)) != 0) {
    return make_error(Errc::kInvalidArgument, "socket mode must be permission bits only");
  }
  MEMSNAP_RETURN_IF_ERROR(clear_path(addr, path));

  ListeningSocket s;
  s.fd.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (s.fd.get() < 0) return io_error("socket", errno);
  // A failure of this fchmod is caught by the check after bind.
  (void)::fchmod(s.fd.get(), mode);
  if (::bind(s.fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    return io_error("bind " + path, errno);
  }
  // The file is ours from here on: remove it on every error.
  auto fail = [&](Error e) -> Error {
    ::unlink(path.c_str());
    return e;
  };
  if (group && ::fchownat(AT_FDCWD, path.c_str(), static_cast<uid_t>(-1), *group,
                          AT_SYMLINK_NOFOLLOW) != 0) {
    return fail(io_error("chown " + path + " to group " + std::to_string(*group), errno));
  }
  if (::fchmodat(AT_FDCWD, path.c_str(), mode, AT_SYMLINK_NOFOLLOW) != 0) {
    return fail(io_error("chmod " + path, errno));
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return fail(io_error("lstat " + path, errno));
  if (!S_ISSOCK(st.st_mode) || (st.st_mode & 07777) != mode || (group && st.st_gid != *group)) {
    return fail(make_error(Errc::kIoError,
                           path + " does not have the expected type, mode or group after bind"));
  }
  s.dev = st.st_dev;
  s.ino = st.st_ino;
  if (::listen(s.fd.get(), backlog) != 0) return fail(io_error("listen " + path, errno));
  return s;
}

void unlink_if_ours(const std::string& path, const ListeningSocket& socket) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == socket.dev &&
      st.st_ino == socket.ino) {
    ::unlink(path.c_str());
  }
}

Status send_with_fds(int socket, std::string_view payload, std::span<const int> fds,
                     const std::string& what) {
  constexpr std::size_t kMaxFds = 4;
  if (fds.size() > kMaxFds) {
    return make_error(Errc::kInvalidArgument, what + ": more than 4 descriptors in one message");
  }
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
  std::size_t sent = 0;
  do {
    iovec iov{const_cast<char*>(payload.data() + sent), payload.size() - sent};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (sent == 0 && !fds.empty()) {
      msg.msg_control = control;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    const ssize_t n = ::sendmsg(socket, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      return make_error(Errc::kIoError, errno_message(what, err), err);
    }
    sent += static_cast<std::size_t>(n);
  } while (sent < payload.size());
  return {};
}

}  // namespace memsnap::io
