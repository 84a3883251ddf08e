// Internal to control_api: a Beast SyncReadStream / SyncWriteStream over a connected Unix stream
// socket, with deadlines.
//
// Why not boost::asio::local::stream_protocol::socket: Asio's synchronous operations block
// without a time limit (on EAGAIN they poll() with an infinite timeout), and the control API
// must drop clients that stall. So the fd is non-blocking and every wait is a poll() against a
// deadline; Beast's http::read / http::write drive this stream exactly as they drive a socket.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstddef>

#include <boost/asio/buffer.hpp>
#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

namespace memsnap::control_api::detail {

using Clock = std::chrono::steady_clock;

// Errors besides errno values: boost::asio::error::eof (peer closed), timed_out (deadline),
// operation_aborted (the abort fd became readable while waiting to read).
class FdStream {
 public:
  explicit FdStream(int fd) : fd_(fd) {}

  int fd() const { return fd_; }
  void set_deadline(Clock::time_point deadline) { deadline_ = deadline; }
  // While >= 0, a read that has to wait gives up with operation_aborted once abort_fd is
  // readable (the server's stop signal, watched only while a connection is idle).
  void set_abort_fd(int abort_fd) { abort_fd_ = abort_fd; }
  // Bytes of the current request received so far (tells "sent nothing" from "sent half a
  // request"); reset with the number already buffered when a new request starts.
  std::size_t received() const { return received_; }
  void reset_received(std::size_t already_buffered) { received_ = already_buffered; }

  template <class MutableBufferSequence>
  std::size_t read_some(const MutableBufferSequence& buffers, boost::system::error_code& ec) {
    const auto end = boost::asio::buffer_sequence_end(buffers);
    for (auto it = boost::asio::buffer_sequence_begin(buffers); it != end; ++it) {
      const boost::asio::mutable_buffer b(*it);
      if (b.size() != 0) return read_into(b.data(), b.size(), ec);
    }
    ec = {};
    return 0;
  }
  template <class MutableBufferSequence>
  std::size_t read_some(const MutableBufferSequence& buffers) {
    boost::system::error_code ec;
    const std::size_t n = read_some(buffers, ec);
    if (ec) throw boost::system::system_error(ec);
    return n;
  }

  template <class ConstBufferSequence>
  std::size_t write_some(const ConstBufferSequence& buffers, boost::system::error_code& ec) {
    constexpr int kMaxIov = 16;
    iovec iov[kMaxIov];
    int count = 0;
    const auto end = boost::asio::buffer_sequence_end(buffers);
    for (auto it = boost::asio::buffer_sequence_begin(buffers); it != end && count < kMaxIov;
         ++it) {
      const boost::asio::const_buffer b(*it);
      if (b.size() == 0) continue;
      iov[count].iov_base = const_cast<void*>(b.data());  // sendmsg does not write to it
      iov[count].iov_len = b.size();
      ++count;
    }
    if (count == 0) {
      ec = {};
      return 0;
    }
    return write_iov(iov, count, ec);
  }
  template <class ConstBufferSequence>
  std::size_t write_some(const ConstBufferSequence& buffers) {
    boost::system::error_code ec;
    const std::size_t n = write_some(buffers, ec);
    if (ec) throw boost::system::system_error(ec);
    return n;
  }

 private:
  std::size_t read_into(void* data, std::size_t size, boost::system::error_code& ec);
  std::size_t write_iov(iovec* iov, int count, boost::system::error_code& ec);
  // Waits for `events` on fd_ until the deadline (and the abort fd when watching it).
  boost::system::error_code wait(short events, bool watch_abort);

  int fd_;
  int abort_fd_ = -1;
  Clock::time_point deadline_ = Clock::time_point::max();
  std::size_t received_ = 0;
};

}  // namespace memsnap::control_api::detail
