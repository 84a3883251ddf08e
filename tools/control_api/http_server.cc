// The control API server: the listening socket, the accept loop, one thread per connection, and
// Boost.Beast reading requests and writing responses (see http_server.h).
#include "tools/control_api/http_server.h"

#include "core/base/unix_socket.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <list>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <utility>

#include <spdlog/spdlog.h>
#include <boost/asio/error.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include "core/base/file_io.h"
#include "tools/control_api/fd_stream.h"
#include "tools/control_api/router.h"

namespace memsnap::control_api {
namespace {

namespace http = boost::beast::http;
namespace asio_error = boost::asio::error;
using boost::system::error_code;
using detail::Clock;

constexpr int kBacklog = 128;
constexpr std::uint32_t kHeaderLimit = 8 * 1024;
// The most unparsed input a connection may hold. Beast consumes bodies as they arrive and
// bounds the header with kHeaderLimit, but not chunk extensions and trailers: without this a
// client sending "1;x=aaaa..." makes the buffer grow without end.
constexpr std::size_t kBufferLimit = 64 * 1024;

Error io_error(const std::string& what, int err) {
  return make_error(Errc::kIoError, io::errno_message(what, err), err);
}

bool has_crlf(std::string_view s) { return s.find_first_of("\r\n") != std::string_view::npos; }

// The response as it goes on the wire; an invalid handler response becomes a 500.
http::response<http::string_body> to_beast(Response r, unsigned version, bool keep_alive) {
  bool valid = r.status >= 200 && r.status <= 599 && !has_crlf(r.content_type);
  for (const auto& [name, value] : r.headers) {
    if (name.empty() || has_crlf(name) || name.find(':') != std::string::npos || has_crlf(value)) {
      valid = false;
    }
  }
  if (!valid) {
    spdlog::warn("control api: a handler returned an invalid response (status {})", r.status);
    r = json_error(
        500, codes::kInternal,
        "the handler returned an invalid response (status " + std::to_string(r.status) + ")");
  }
  http::response<http::string_body> res{static_cast<http::status>(r.status), version};
  res.set(http::field::server, "memsnap");
  for (auto& [name, value] : r.headers) res.set(name, value);
  if (!r.body.empty() && !r.content_type.empty()) {
    res.set(http::field::content_type, r.content_type);
  }
  res.body() = std::move(r.body);
  res.keep_alive(keep_alive);
  res.prepare_payload();
  return res;
}

// Best effort, never blocks: for refusals answered from the accept loop. The answer is far
// smaller than a socket buffer, so it goes out whole unless the peer is already gone.
void refuse(int fd, const Response& r) {
  std::ostringstream out;
  out << to_beast(r, 11, false);
  const std::string wire = out.str();
  (void)::send(fd, wire.data(), wire.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  ::shutdown(fd, SHUT_WR);
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

std::string_view sv(boost::beast::string_view s) { return {s.data(), s.size()}; }

void signal_eventfd(int fd) {
  if (fd >= 0) (void)::eventfd_write(fd, 1);
}

// The peer closed the connection (or stop() shut it down): POLLHUP on a Unix stream socket
// means both directions are shut. Never blocks.
bool hung_up(int fd) {
  pollfd p{fd, 0, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLERR)) != 0;
}

}  // namespace

class HttpServer::Impl {
 public:
  explicit Impl(ServerOptions o) : options(std::move(o)) {}

  Status start();
  void stop(std::chrono::milliseconds deadline);

  ServerOptions options;
  detail::Router router;
  std::mutex lifecycle_mutex;  // start / stop / route
  std::atomic<bool> running{false};

  std::atomic<std::uint64_t> accepted{0};
  std::atomic<std::uint64_t> refused_forbidden{0};
  std::atomic<std::uint64_t> refused_busy{0};
  std::atomic<std::uint64_t> requests{0};

  mutable std::mutex mu;  // guards connections, active
  std::size_t active = 0;

 private:
  struct Connection {
    int fd = -1;  // closed by its thread (under mu), so stop() never touches a reused number
    bool done = false;
    std::thread thread;
  };

  void accept_loop();
  void on_accept(int fd);
  void serve(Connection& conn, PeerCredentials peer);
  void serve_requests(detail::FdStream& stream, const PeerCredentials& peer);
  bool allowed(int fd, const PeerCredentials& peer) const;
  void reap(bool all);
  void remove_socket_file();

  io::UniqueFd listen_fd_;
  io::UniqueFd wake_fd_;  // wakes the accept loop: stop, or a connection finished
  io::UniqueFd stop_fd_;  // readable once stop() began; idle connections watch it
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;
  dev_t socket_dev_ = 0;
  ino_t socket_ino_ = 0;
  std::condition_variable cv_;
  std::list<Connection> connections_;  // stable addresses: each thread holds its own entry
};

Status HttpServer::Impl::start() {
  const ServerOptions& o = options;
  if (o.max_connections == 0 || o.read_timeout.count() <= 0 || o.write_timeout.count() <= 0) {
    return make_error(Errc::kInvalidArgument,
                      "max_connections, read_timeout and write_timeout must be positive");
  }
  MEMSNAP_ASSIGN_OR_RETURN(auto listening,
                           io::listen_unix(o.socket_path, o.mode, o.group, kBacklog));
  io::UniqueFd fd = std::move(listening.fd);
  socket_dev_ = listening.dev;
  socket_ino_ = listening.ino;
  auto fail = [&](Error e) -> Status {
    ::unlink(o.socket_path.c_str());
    return e;
  };

  io::UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  io::UniqueFd stop(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (wake.get() < 0 || stop.get() < 0) return fail(io_error("eventfd", errno));

  listen_fd_ = std::move(fd);
  wake_fd_ = std::move(wake);
  stop_fd_ = std::move(stop);
  stopping_ = false;
  try {
    acceptor_ = std::thread([this] { accept_loop(); });
  } catch (const std::exception& e) {
    listen_fd_.reset();
    wake_fd_.reset();
    stop_fd_.reset();
    return fail(
        make_error(Errc::kInternal, std::string("cannot start the accept thread: ") + e.what()));
  }
  running = true;
  spdlog::info("control api: listening on {} (mode {:04o})", o.socket_path, o.mode);
  return {};
}

bool HttpServer::Impl::allowed(int fd, const PeerCredentials& peer) const {
  if (peer.uid == 0 || peer.uid == ::geteuid()) return true;
  if (std::find(options.allowed_uids.begin(), options.allowed_uids.end(), peer.uid) !=
      options.allowed_uids.end()) {
    return true;
  }
  if (options.allowed_gids.empty()) return false;
  const auto allowed_gid = [&](gid_t gid) {
    return std::find(options.allowed_gids.begin(), options.allowed_gids.end(), gid) !=
           options.allowed_gids.end();
  };
  if (allowed_gid(peer.gid)) return true;
  // The supplementary groups the peer had at connect(), as the kernel recorded them.
  std::vector<gid_t> groups(64);
  for (;;) {
    socklen_t len = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &len) == 0) {
      groups.resize(len / sizeof(gid_t));
      break;
    }
    if (errno != ERANGE || len / sizeof(gid_t) <= groups.size()) {
      spdlog::warn("control api: SO_PEERGROUPS: {}", std::strerror(errno));
      return false;  // refused rather than judged on half the facts
    }
    groups.resize(len / sizeof(gid_t));  // ERANGE: len is the size needed
  }
  return std::any_of(groups.begin(), groups.end(), allowed_gid);
}

void HttpServer::Impl::accept_loop() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {wake_fd_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("control api: poll: {}", std::strerror(errno));
      ::poll(nullptr, 0, 100);
      continue;
    }
    if (fds[1].revents != 0) {
      eventfd_t ignored = 0;
      (void)::eventfd_read(wake_fd_.get(), &ignored);
      reap(false);
      if (stopping_) return;
    }
    if (fds[0].revents == 0) continue;
    const int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      on_accept(fd);
      continue;
    }
    const int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR || err == ECONNABORTED ||
        err == EPROTO) {
      continue;
    }
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays queued; retry a little later
    // instead of spinning (still waking up for stop).
    spdlog::warn("control api: accept on {}: {}", options.socket_path, std::strerror(err));
    pollfd wake{wake_fd_.get(), POLLIN, 0};
    ::poll(&wake, 1, 100);
  }
}

void HttpServer::Impl::on_accept(int fd) {
  io::UniqueFd owned(fd);
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    spdlog::warn("control api: SO_PEERCRED: {}", std::strerror(errno));
    return;
  }
  const PeerCredentials peer{cred.pid, cred.uid, cred.gid};
  if (!allowed(fd, peer)) {
    ++refused_forbidden;
    spdlog::warn("control api: refused a connection from pid {} uid {} gid {}", peer.pid, peer.uid,
                 peer.gid);
    refuse(fd, json_error(403, codes::kForbidden,
                          "uid " + std::to_string(peer.uid) + " may not use this socket"));
    return;
  }
  std::unique_lock lock(mu);
  if (active >= options.max_connections) {
    lock.unlock();
    ++refused_busy;
    refuse(fd,
           json_error(503, codes::kTooManyConnections,
                      "the server is already serving " + std::to_string(options.max_connections) +
                          " connections; retry later"));
    return;
  }
  Connection& conn = connections_.emplace_back();
  conn.fd = owned.release();
  ++active;
  ++accepted;  // before the thread exists: its requests may be answered before we return
  try {
    conn.thread = std::thread([this, &conn, peer] { serve(conn, peer); });
  } catch (const std::exception& e) {
    --active;
    --accepted;
    owned.reset(conn.fd);
    connections_.pop_back();
    lock.unlock();
    spdlog::error("control api: cannot start a connection thread: {}", e.what());
    ++refused_busy;
    refuse(owned.get(), json_error(503, codes::kTooManyConnections,
                                   "the server cannot start another connection thread"));
  }
}

void HttpServer::Impl::serve(Connection& conn, PeerCredentials peer) {
  try {
    detail::FdStream stream(conn.fd);
    stream.set_abort_fd(stop_fd_.get());
    serve_requests(stream, peer);
  } catch (const std::exception& e) {
    spdlog::error("control api: connection from pid {} failed: {}", peer.pid, e.what());
  } catch (...) {
    spdlog::error("control api: connection from pid {} failed", peer.pid);
  }
  {
    std::lock_guard lock(mu);
    ::shutdown(conn.fd, SHUT_WR);
    ::close(conn.fd);
    conn.fd = -1;
    conn.done = true;
    --active;
    cv_.notify_all();
  }
  signal_eventfd(wake_fd_.get());  // the accept loop joins this thread
}

void HttpServer::Impl::serve_requests(detail::FdStream& stream, const PeerCredentials& peer) {
  boost::beast::flat_buffer buffer(kBufferLimit);
  const auto write = [&](http::response<http::string_body>& res, bool header_only) {
    error_code ec;
    stream.set_deadline(Clock::now() + options.write_timeout);
    if (header_only) {
      http::response_serializer<http::string_body> sr{res};
      http::write_header(stream, sr, ec);
    } else {
      http::write(stream, res, ec);
    }
    if (ec) spdlog::debug("control api: writing to pid {}: {}", peer.pid, ec.message());
    return !ec;
  };
  // Answers a request we could not read, and ends the connection.
  const auto fail = [&](int status, std::string_view code, const std::string& message) {
    auto res = to_beast(json_error(status, code, message), 11, false);
    write(res, false);
  };

  for (;;) {
    if (stopping_ && buffer.size() == 0) return;
    stream.reset_received(buffer.size());
    stream.set_deadline(Clock::now() + options.read_timeout);
    http::request_parser<http::string_body> parser;
    parser.body_limit(options.max_body_bytes);
    parser.header_limit(kHeaderLimit);

    error_code ec;
    http::read_header(stream, buffer, parser, ec);
    if (!ec && !parser.is_done()) {
      // A client that waits for "100 Continue" before sending its body (curl does for large
      // bodies) gets it; an oversized Content-Length was already refused by read_header.
      const auto& h = parser.get();
      if (h.version() >= 11 && iequals(sv(h[http::field::expect]), "100-continue")) {
        stream.set_deadline(Clock::now() + options.write_timeout);
        static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
        boost::asio::write(stream, boost::asio::buffer(kContinue.data(), kContinue.size()), ec);
        stream.set_deadline(Clock::now() + options.read_timeout);
      }
      if (!ec) http::read(stream, buffer, parser, ec);
    }
    if (ec) {
      if (ec == http::error::end_of_stream || ec == http::error::partial_message ||
          ec == asio_error::operation_aborted) {
        return;  // the peer left, or we are stopping and it was idle
      }
      if (ec == asio_error::timed_out) {
        if (stream.received() > 0) {
          fail(408, codes::kRequestTimeout,
               "the request did not arrive completely within " +
                   std::to_string(options.read_timeout.count()) + " ms");
        }
        return;
      }
      if (ec == http::error::body_limit) {
        fail(413, codes::kBodyTooLarge,
             "the request body exceeds " + std::to_string(options.max_body_bytes) + " bytes");
        return;
      }
      if (ec == http::error::header_limit) {
        fail(431, codes::kHeadersTooLarge,
             "the request line and headers exceed " + std::to_string(kHeaderLimit) + " bytes");
        return;
      }
      if (ec == http::error::buffer_overflow) {
        fail(400, codes::kBadRequest,
             "malformed HTTP request: chunk extensions or trailers exceed " +
                 std::to_string(kBufferLimit) + " bytes");
        return;
      }
      if (ec.category() == http::make_error_code(http::error::bad_method).category()) {
        fail(400, codes::kBadRequest, "malformed HTTP request: " + ec.message());
        return;
      }
      spdlog::debug("control api: reading from pid {}: {}", peer.pid, ec.message());
      return;  // a socket error: nobody to answer
    }

    auto& msg = parser.get();
    Request request;
    request.method = std::string(sv(msg.method_string()));
    std::string target_error;
    if (!detail::parse_target(sv(msg.target()), request, target_error)) {
      fail(400, codes::kBadRequest, target_error);
      return;
    }
    for (const auto& field : msg) {
      std::string name(sv(field.name_string()));
      std::transform(name.begin(), name.end(), name.begin(),
                     [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      const std::string_view value = sv(field.value());
      auto [it, inserted] = request.headers.try_emplace(std::move(name), value);
      if (!inserted) it->second.append(", ").append(value);
    }
    request.body = std::move(msg.body());
    request.peer = peer;
    request.client_gone = [fd = stream.fd()] { return hung_up(fd); };
    const bool head = msg.method() == http::verb::head;
    const unsigned version = msg.version();
    const bool keep_alive = msg.keep_alive();

    Response response = router.dispatch(std::move(request));
    ++requests;
    // Decided after the handler: a request that was in flight when stop() began is answered,
    // and then the connection ends.
    const bool keep = keep_alive && !stopping_;
    auto res = to_beast(std::move(response), version, keep);
    if (!write(res, head) || !keep) return;
  }
}

void HttpServer::Impl::reap(bool all) {
  std::list<Connection> finished;
  {
    std::lock_guard lock(mu);
    for (auto it = connections_.begin(); it != connections_.end();) {
      auto next = std::next(it);
      if (all || it->done) finished.splice(finished.end(), connections_, it);
      it = next;
    }
  }
  for (Connection& c : finished) {
    if (c.thread.joinable()) c.thread.join();
  }
}

void HttpServer::Impl::remove_socket_file() {
  // Only our own socket: if somebody replaced the file, it is not ours to remove.
  struct stat st {};
  if (::lstat(options.socket_path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) &&
      st.st_dev == socket_dev_ && st.st_ino == socket_ino_) {
    ::unlink(options.socket_path.c_str());
  }
}

void HttpServer::Impl::stop(std::chrono::milliseconds deadline) {
  if (!running) return;
  const auto until = Clock::now() + deadline;
  stopping_ = true;
  signal_eventfd(wake_fd_.get());
  if (acceptor_.joinable()) acceptor_.join();
  // No new connections from here on: the file goes first, so clients fail fast.
  remove_socket_file();
  listen_fd_.reset();
  signal_eventfd(stop_fd_.get());  // idle connections close now

  {
    std::unique_lock lock(mu);
    if (!cv_.wait_until(lock, until, [&] { return active == 0; })) {
      spdlog::warn("control api: {} connection(s) still busy after {} ms; shutting them down",
                   active, deadline.count());
      for (Connection& c : connections_) {
        if (!c.done && c.fd >= 0) ::shutdown(c.fd, SHUT_RDWR);
      }
    }
  }
  reap(true);  // waits for handlers still running to return
  wake_fd_.reset();
  stop_fd_.reset();
  running = false;
  spdlog::info("control api: stopped listening on {}", options.socket_path);
}

// ---- HttpServer ----

HttpServer::HttpServer(ServerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}

HttpServer::~HttpServer() { stop(); }

void HttpServer::route(std::string method, std::string pattern, Handler handler) {
  std::lock_guard lock(impl_->lifecycle_mutex);
  if (impl_->running) throw std::logic_error("HttpServer::route called after start()");
  impl_->router.add(std::move(method), std::move(pattern), std::move(handler));
}

Status HttpServer::start() {
  std::lock_guard lock(impl_->lifecycle_mutex);
  if (impl_->running) return make_error(Errc::kInvalidArgument, "the server is already running");
  try {
    return impl_->start();
  } catch (const std::exception& e) {
    return make_error(Errc::kInternal, std::string("starting the control API failed: ") + e.what());
  }
}

void HttpServer::stop() { shutdown_gracefully(impl_->options.drain_timeout); }

void HttpServer::shutdown_gracefully(std::chrono::milliseconds deadline) {
  std::lock_guard lock(impl_->lifecycle_mutex);
  impl_->stop(deadline);
}

bool HttpServer::running() const { return impl_->running; }

const ServerOptions& HttpServer::options() const { return impl_->options; }

ServerStats HttpServer::stats() const {
  ServerStats s;
  s.accepted = impl_->accepted;
  s.refused_forbidden = impl_->refused_forbidden;
  s.refused_busy = impl_->refused_busy;
  s.requests = impl_->requests;
  std::lock_guard lock(impl_->mu);
  s.active_connections = impl_->active;
  return s;
}

Response HttpServer::handle(Request request) const {
  return impl_->router.dispatch(std::move(request));
}

}  // namespace memsnap::control_api
