// Deadline-bound reads and writes on a non-blocking Unix stream socket (see fd_stream.h).
#include "tools/control_api/fd_stream.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <limits>

#include <boost/asio/error.hpp>

namespace memsnap::control_api::detail {
namespace {

boost::system::error_code errno_code(int err) { return {err, boost::system::system_category()}; }

}  // namespace

boost::system::error_code FdStream::wait(short events, bool watch_abort) {
  for (;;) {
    int ms = -1;
    if (deadline_ != Clock::time_point::max()) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline_ - Clock::now());
      if (left.count() <= 0) return boost::asio::error::timed_out;
      ms = static_cast<int>(
          std::min<std::chrono::milliseconds::rep>(left.count(), std::numeric_limits<int>::max()));
    }
    pollfd fds[2] = {{fd_, events, 0}, {abort_fd_, POLLIN, 0}};
    const nfds_t n = (watch_abort && abort_fd_ >= 0) ? 2 : 1;
    const int r = ::poll(fds, n, ms);
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno_code(errno);
    }
    if (r == 0) continue;  // re-check the deadline (poll may round down)
    // Data (or hang-up / error, which the next recv/send reports) wins over the abort signal.
    if (fds[0].revents != 0) return {};
    if (n == 2 && fds[1].revents != 0) return boost::asio::error::operation_aborted;
  }
}

std::size_t FdStream::read_into(void* data, std::size_t size, boost::system::error_code& ec) {
  for (;;) {
    const ssize_t n = ::recv(fd_, data, size, MSG_DONTWAIT);
    if (n > 0) {
      received_ += static_cast<std::size_t>(n);
      ec = {};
      return static_cast<std::size_t>(n);
    }
    if (n == 0) {
      ec = boost::asio::error::eof;
      return 0;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      ec = errno_code(errno);
      return 0;
    }
    // Only an idle connection (nothing of the next request received yet) gives up on stop.
    ec = wait(POLLIN, received_ == 0);
    if (ec) return 0;
  }
}

std::size_t FdStream::write_iov(iovec* iov, int count, boost::system::error_code& ec) {
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = static_cast<std::size_t>(count);
  for (;;) {
    // MSG_NOSIGNAL: a peer that went away is EPIPE here, never a SIGPIPE for the process.
    const ssize_t n = ::sendmsg(fd_, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n >= 0) {
      ec = {};
      return static_cast<std::size_t>(n);
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      ec = errno_code(errno);
      return 0;
    }
    ec = wait(POLLOUT, false);
    if (ec) return 0;
  }
}

}  // namespace memsnap::control_api::detail
