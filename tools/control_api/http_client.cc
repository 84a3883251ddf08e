// Synchronous HTTP/1.1 client over a Unix stream socket (see http_client.h).
#include "tools/control_api/http_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <utility>

#include <boost/asio/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "core/base/file_io.h"
#include "tools/control_api/fd_stream.h"

namespace memsnap::control_api {
namespace {

namespace http = boost::beast::http;
using boost::system::error_code;
using detail::Clock;

constexpr std::uint64_t kMaxResponseBody = std::uint64_t{64} << 20;

bool is_token(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return u > 32 && u < 127 &&
           std::string_view("\"(),/:;<=>?@[\\]{}").find(c) == std::string_view::npos;
  });
}

bool is_target(std::string_view s) {
  return !s.empty() && s.front() == '/' && std::all_of(s.begin(), s.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return u > 32 && u < 127;
  });
}

Error io_error(std::string message, int err) {
  return make_error(Errc::kIoError, std::move(message), err);
}

// True if the kept connection is still usable: not closed by the server, nothing unexpected
// waiting on it.
bool still_open(int fd) {
  pollfd p{fd, POLLIN, 0};
  const int r = ::poll(&p, 1, 0);
  return r == 0;
}

}  // namespace

std::optional<ApiError> parse_api_error(std::string_view body) {
  const auto j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("error")) return std::nullopt;
  const auto& e = j["error"];
  if (!e.is_object() || !e.contains("code") || !e["code"].is_string()) return std::nullopt;
  ApiError out;
  out.code = e["code"].get<std::string>();
  if (e.contains("message") && e["message"].is_string()) {
    out.message = e["message"].get<std::string>();
  }
  return out;
}

struct UnixHttpClient::Impl {
  std::string path;
  std::chrono::milliseconds timeout;
  io::UniqueFd fd;

  Status connect(Clock::time_point deadline);
};

Status UnixHttpClient::Impl::connect(Clock::time_point deadline) {
  const std::string what = "cannot connect to " + path;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return make_error(Errc::kInvalidArgument, what + ": a socket path must be 1.." +
                                                  std::to_string(sizeof(addr.sun_path) - 1) +
                                                  " bytes");
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  io::UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (s.get() < 0) return io_error(io::errno_message(what + ": socket", errno), errno);
  // A Unix connect() blocks while the listener's backlog is full; SO_SNDTIMEO bounds that wait
  // (it then fails with EAGAIN).
  const auto left = std::max<std::chrono::microseconds::rep>(
      1, std::chrono::duration_cast<std::chrono::microseconds>(deadline - Clock::now()).count());
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(left / 1000000);
  tv.tv_usec = static_cast<suseconds_t>(left % 1000000);
  (void)::setsockopt(s.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  int r;
  do {
    r = ::connect(s.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  } while (r != 0 && errno == EINTR);
  if (r != 0) {
    const int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      return io_error(
          what + ": the server did not accept within " + std::to_string(timeout.count()) + " ms",
          ETIMEDOUT);
    }
    return io_error(io::errno_message(what, err), err);
  }
  // From here on every wait is a poll() against the deadline (FdStream).
  const int flags = ::fcntl(s.get(), F_GETFL);
  if (flags < 0 || ::fcntl(s.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
    return io_error(io::errno_message(what + ": fcntl", errno), errno);
  }
  fd = std::move(s);
  return {};
}

UnixHttpClient::UnixHttpClient(std::string socket_path, std::chrono::milliseconds timeout)
    : impl_(std::make_unique<Impl>()) {
  impl_->path = std::move(socket_path);
  impl_->timeout = timeout;
}

UnixHttpClient::~UnixHttpClient() = default;
UnixHttpClient::UnixHttpClient(UnixHttpClient&&) noexcept = default;
UnixHttpClient& UnixHttpClient::operator=(UnixHttpClient&&) noexcept = default;

void UnixHttpClient::close() {
  if (impl_) impl_->fd.reset();
}

const std::string& UnixHttpClient::socket_path() const { return impl_->path; }

Result<ClientResponse> UnixHttpClient::call(std::string_view method, std::string_view target,
                                            std::string_view body) {
  if (!impl_) return make_error(Errc::kInvalidArgument, "call on a moved-from client");
  Impl& c = *impl_;
  if (!is_token(method)) {
    return make_error(Errc::kInvalidArgument, "bad HTTP method \"" + std::string(method) + "\"");
  }
  if (!is_target(target)) {
    return make_error(Errc::kInvalidArgument,
                      "target must start with '/' and contain no spaces or control characters: \"" +
                          std::string(target) + "\"");
  }
  const auto deadline = Clock::now() + c.timeout;
  if (c.fd.get() >= 0 && !still_open(c.fd.get())) c.fd.reset();
  if (c.fd.get() < 0) {
    MEMSNAP_RETURN_IF_ERROR(c.connect(deadline));
  }

  try {
    http::request<http::string_body> req;
    req.method_string(boost::beast::string_view(method.data(), method.size()));
    req.target(boost::beast::string_view(target.data(), target.size()));
    req.version(11);
    req.set(http::field::host, "localhost");
    req.set(http::field::user_agent, "memsnap");
    if (!body.empty()) req.set(http::field::content_type, "application/json");
    req.body() = std::string(body);
    req.keep_alive(true);
    req.prepare_payload();

    detail::FdStream stream(c.fd.get());
    stream.set_deadline(deadline);
    error_code write_ec;
    http::write(stream, req, write_ec);

    // Read the answer even when writing failed: a server that refuses a request (403, 503, a
    // body too large) answers and closes before reading all of it.
    boost::beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    parser.body_limit(kMaxResponseBody);
    if (req.method() == http::verb::head) parser.skip(true);
    error_code ec;
    if (write_ec == boost::asio::error::timed_out) {
      ec = write_ec;
    } else {
      http::read(stream, buffer, parser, ec);
    }
    if (ec) {
      c.fd.reset();
      if (ec == boost::asio::error::timed_out) {
        return io_error("no complete answer from " + c.path + " within " +
                            std::to_string(c.timeout.count()) + " ms",
                        ETIMEDOUT);
      }
      if (write_ec) {
        return io_error(
            "sending the request to " + c.path + " failed: " + write_ec.message(),
            write_ec.category() == boost::system::system_category() ? write_ec.value() : EIO);
      }
      if (ec == http::error::end_of_stream) {
        return io_error(c.path + " closed the connection without answering", ECONNRESET);
      }
      return io_error("reading the answer from " + c.path + " failed: " + ec.message(),
                      ec.category() == boost::system::system_category() ? ec.value() : EPROTO);
    }

    auto& res = parser.get();
    ClientResponse out;
    out.status = static_cast<int>(res.result_int());
    const auto ct = res[http::field::content_type];
    out.content_type.assign(ct.data(), ct.size());
    for (const auto& field : res) {
      std::string name(field.name_string().data(), field.name_string().size());
      std::transform(name.begin(), name.end(), name.begin(),
                     [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
      const std::string_view value(field.value().data(), field.value().size());
      auto [it, inserted] = out.headers.try_emplace(std::move(name), value);
      if (!inserted) it->second.append(", ").append(value);
    }
    out.body = std::move(res.body());
    if (write_ec || !res.keep_alive()) c.fd.reset();
    return out;
  } catch (const std::exception& e) {
    c.fd.reset();
    return make_error(Errc::kInternal, "calling " + c.path + " failed: " + e.what());
  }
}

}  // namespace memsnap::control_api
