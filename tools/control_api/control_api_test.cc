// The control API transport over real Unix sockets in a temporary directory: routing and JSON
// errors, socket creation and removal, limits and timeouts, concurrency, peer credentials,
// stopping, keep-alive, and the client.
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tools/control_api/http_client.h"
#include "tools/control_api/http_server.h"

namespace memsnap::control_api {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

long long ms_since(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
}

// ---- raw socket helpers (to send what a well-behaved client never would) ----

int raw_connect(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

bool send_all(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

// Everything the server sends until it closes the connection (or an error, or `limit`).
std::string read_until_closed(int fd, std::chrono::milliseconds limit = 5000ms) {
  std::string out;
  const auto deadline = Clock::now() + limit;
  char buf[4096];
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) break;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;  // EOF, or ECONNRESET after the data
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

// Sends `request` on a new connection and returns everything until the server closes.
std::string raw_exchange(const std::string& path, std::string_view request) {
  const int fd = raw_connect(path);
  if (fd < 0) return "connect failed: " + std::string(std::strerror(errno));
  send_all(fd, request);
  std::string out = read_until_closed(fd);
  ::close(fd);
  return out;
}

std::string body_of(const std::string& raw) {
  const auto pos = raw.find("\r\n\r\n");
  return pos == std::string::npos ? std::string() : raw.substr(pos + 4);
}

// Checks the documented error shape exactly: {"error":{"code":...,"message":...}}.
void expect_json_error(const std::string& body, const std::string& code) {
  const json j = json::parse(body, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << body;
  ASSERT_TRUE(j.is_object()) << body;
  EXPECT_EQ(j.size(), 1u) << body;
  ASSERT_TRUE(j.contains("error")) << body;
  const json& e = j["error"];
  ASSERT_TRUE(e.is_object()) << body;
  EXPECT_EQ(e.size(), 2u) << body;
  EXPECT_EQ(e.value("code", ""), code) << body;
  ASSERT_TRUE(e.contains("message") && e["message"].is_string()) << body;
  EXPECT_FALSE(e["message"].get<std::string>().empty()) << body;
}

Response text(std::string body) {
  Response r;
  r.body = std::move(body);
  r.content_type = "text/plain";
  return r;
}

class ControlApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/memsnap-api-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/api.sock";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  ServerOptions options() const {
    ServerOptions o;
    o.socket_path = path_;
    o.read_timeout = 2000ms;
    o.write_timeout = 2000ms;
    return o;
  }

  // A server with a few routes most tests use.
  static void add_basic_routes(HttpServer& server) {
    server.route("GET", "/v1/health", [](const Request&) { return text("ok"); });
    server.route("POST", "/v1/echo", [](const Request& r) {
      Response res;
      res.body = r.body;
      return res;
    });
    server.route("GET", "/v1/whoami", [](const Request& r) {
      Response res;
      res.body = json{{"pid", r.peer.pid}, {"uid", r.peer.uid}, {"gid", r.peer.gid}}.dump();
      return res;
    });
  }

  std::string dir_;
  std::string path_;
};

// ---- routing ----

TEST_F(ControlApiTest, RoutesWithPathParamsAndQuery) {
  HttpServer server(options());
  server.route("POST", "/v1/sandboxes/{id}/pause", [](const Request& r) {
    Response res;
    res.body =
        json{{"id", r.path_params.at("id")},
             {"path", r.path},
             {"mode", r.query.count("mode") ? r.query.at("mode") : ""},
             {"body", r.body},
             {"content_type", r.headers.count("content-type") ? r.headers.at("content-type") : ""}}
            .dump();
    return res;
  });
  server.route("POST", "/v1/sandboxes/{id}/resume",
               [](const Request& r) { return text("resume " + r.path_params.at("id")); });
  // A literal segment wins over a capture at the same place, whatever the registration order.
  server.route("GET", "/v1/sandboxes/{id}",
               [](const Request& r) { return text("sandbox " + r.path_params.at("id")); });
  server.route("GET", "/v1/sandboxes/stats", [](const Request&) { return text("stats"); });
  ASSERT_TRUE(server.start().ok());

  UnixHttpClient client(path_, 5000ms);
  auto r = client.call("POST", "/v1/sandboxes/sb%2F42/pause?mode=fast+now&x=%41", R"({"a":1})");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->content_type, "application/json");
  const json j = json::parse(r->body);
  EXPECT_EQ(j["id"], "sb/42");  // captured segments are percent-decoded
  EXPECT_EQ(j["path"], "/v1/sandboxes/sb%2F42/pause");
  EXPECT_EQ(j["mode"], "fast now");
  EXPECT_EQ(j["body"], R"({"a":1})");
  EXPECT_EQ(j["content_type"], "application/json");

  r = client.call("POST", "/v1/sandboxes/sb-7/resume");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->body, "resume sb-7");
  r = client.call("GET", "/v1/sandboxes/stats");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->body, "stats");
  r = client.call("GET", "/v1/sandboxes/sb-9");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->body, "sandbox sb-9");
}

TEST_F(ControlApiTest, UnknownPathIs404AndWrongMethodIs405WithAllow) {
  HttpServer server(options());
  const Handler h = [](const Request&) { return text("x"); };
  server.route("POST", "/v1/sandboxes/{id}/pause", h);
  server.route("GET", "/v1/sandboxes/{id}/pause", h);
  ASSERT_TRUE(server.start().ok());
  UnixHttpClient client(path_, 5000ms);

  auto r = client.call("GET", "/v1/nothing/here");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 404);
  EXPECT_EQ(r->content_type, "application/json");
  expect_json_error(r->body, "not_found");
  // A capture needs a non-empty segment, and trailing slashes are not ignored.
  r = client.call("POST", "/v1/sandboxes//pause");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 404);
  r = client.call("POST", "/v1/sandboxes/a/pause/");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 404);

  r = client.call("DELETE", "/v1/sandboxes/a/pause");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 405);
  expect_json_error(r->body, "method_not_allowed");
  EXPECT_EQ(r->headers["allow"], "GET, POST");

  // The same over a raw connection, to see the header on the wire.
  const std::string raw = raw_exchange(
      path_, "PUT /v1/sandboxes/a/pause HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(raw.rfind("HTTP/1.1 405 ", 0), 0u) << raw;
  EXPECT_NE(raw.find("\r\nAllow: GET, POST\r\n"), std::string::npos) << raw;

  // The answer to HEAD has the headers only (its Content-Length describes a GET's body).
  const std::string head = raw_exchange(
      path_, "HEAD /v1/sandboxes/a/pause HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(head.rfind("HTTP/1.1 405 ", 0), 0u) << head;
  EXPECT_NE(head.find("Content-Length: "), std::string::npos) << head;
  EXPECT_EQ(body_of(head), "") << head;
}

TEST_F(ControlApiTest, ThrowingHandlerIs500AndTheServerKeepsServing) {
  HttpServer server(options());
  server.route("GET", "/v1/boom",
               [](const Request&) -> Response { throw std::runtime_error("disk on fire"); });
  server.route("GET", "/v1/boom2", [](const Request&) -> Response { throw 42; });
  server.route("GET", "/v1/bad", [](const Request&) {
    Response r;
    r.status = 42;  // not an HTTP status
    return r;
  });
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());
  UnixHttpClient client(path_, 5000ms);

  auto r = client.call("GET", "/v1/boom");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 500);
  expect_json_error(r->body, "internal");
  EXPECT_NE(r->body.find("disk on fire"), std::string::npos);
  r = client.call("GET", "/v1/boom2");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 500);
  expect_json_error(r->body, "internal");
  r = client.call("GET", "/v1/bad");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 500);
  expect_json_error(r->body, "internal");
  r = client.call("GET", "/v1/health");  // same connection, still fine
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "ok");
}

TEST_F(ControlApiTest, JsonErrorHelperEscapesAndHasTheDocumentedShape) {
  const Response r = json_error(409, "sandbox_busy", "sandbox \"a\\b\" is\nbusy");
  EXPECT_EQ(r.status, 409);
  EXPECT_EQ(r.content_type, "application/json");
  expect_json_error(r.body, "sandbox_busy");
  EXPECT_EQ(json::parse(r.body)["error"]["message"], "sandbox \"a\\b\" is\nbusy");
  const auto parsed = parse_api_error(r.body);
  ASSERT_TRUE(parsed.has_value());
  EXPECT_EQ(parsed->code, "sandbox_busy");
  EXPECT_FALSE(parse_api_error("{\"ok\":true}").has_value());
  EXPECT_FALSE(parse_api_error("not json").has_value());
}

TEST_F(ControlApiTest, HandleRoutesWithoutSockets) {
  HttpServer server(options());
  server.route("GET", "/v1/sandboxes/{id}",
               [](const Request& r) { return text(r.path_params.at("id")); });
  Request req;
  req.method = "GET";
  req.path = "/v1/sandboxes/abc";
  EXPECT_EQ(server.handle(req).body, "abc");
  req.method = "POST";
  EXPECT_EQ(server.handle(req).status, 405);
  req.path = "/v2";
  EXPECT_EQ(server.handle(req).status, 404);
}

TEST_F(ControlApiTest, RouteRegistrationErrorsThrow) {
  HttpServer server(options());
  const Handler h = [](const Request&) { return text("x"); };
  server.route("GET", "/v1/sandboxes/{id}", h);
  EXPECT_THROW(server.route("GET", "/v1/sandboxes/{other}", h), std::invalid_argument);
  EXPECT_THROW(server.route("GET", "v1/no-slash", h), std::invalid_argument);
  EXPECT_THROW(server.route("GET", "/v1//x", h), std::invalid_argument);
  EXPECT_THROW(server.route("GET", "/v1/{id}/{id}", h), std::invalid_argument);
  EXPECT_THROW(server.route("GET", "/v1/{}", h), std::invalid_argument);
  EXPECT_THROW(server.route("GET", "/v1/a{b}", h), std::invalid_argument);
  EXPECT_THROW(server.route("BAD METHOD", "/v1/x", h), std::invalid_argument);
  EXPECT_THROW(server.route("GET", "/v1/x", Handler{}), std::invalid_argument);
  server.route("POST", "/v1/sandboxes/{id}", h);  // another method: fine
  ASSERT_TRUE(server.start().ok());
  EXPECT_THROW(server.route("GET", "/v1/late", h), std::logic_error);
}

// ---- the socket file ----

TEST_F(ControlApiTest, SocketIs0600ByDefaultAndRemovedOnStop) {
  HttpServer server(options());
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());
  struct stat st {};
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(st.st_uid, ::geteuid());
  server.stop();
  EXPECT_FALSE(server.running());
  EXPECT_NE(::lstat(path_.c_str(), &st), 0);
  EXPECT_EQ(errno, ENOENT);
  // And it can start again.
  ASSERT_TRUE(server.start().ok());
  UnixHttpClient client(path_, 5000ms);
  auto r = client.call("GET", "/v1/health");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->body, "ok");
}

TEST_F(ControlApiTest, SocketGetsTheModeAndGroupAskedFor) {
  const mode_t old_umask = ::umask(0077);  // the mode must not depend on the umask
  ServerOptions o = options();
  o.mode = 0660;
  const bool root = ::geteuid() == 0;
  if (root) o.group = 65534;
  HttpServer server(o);
  add_basic_routes(server);
  const Status s = server.start();
  ::umask(old_umask);
  ASSERT_TRUE(s.ok()) << s.error().to_string();
  struct stat st {};
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0660u);
  if (root) {
    EXPECT_EQ(st.st_gid, 65534u);
  }

  o.mode = 01777;  // not permission bits only
  o.socket_path = dir_ + "/other.sock";
  HttpServer bad(o);
  const Status b = bad.start();
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.error().code, Errc::kInvalidArgument);
}

TEST_F(ControlApiTest, RegularFileAtThePathIsRefusedAndLeftAlone) {
  { std::ofstream(path_) << "precious"; }
  HttpServer server(options());
  add_basic_routes(server);
  const Status s = server.start();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, Errc::kInvalidArgument);
  EXPECT_NE(s.error().message.find("not a socket"), std::string::npos) << s.error().message;
  std::ifstream in(path_);
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(content, "precious");
  // A symlink is not a socket either, even one pointing at nothing.
  const std::string link = dir_ + "/link.sock";
  ASSERT_EQ(::symlink("/nonexistent", link.c_str()), 0);
  ServerOptions o = options();
  o.socket_path = link;
  HttpServer server2(o);
  EXPECT_FALSE(server2.start().ok());
  struct stat st {};
  EXPECT_EQ(::lstat(link.c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));
}

TEST_F(ControlApiTest, StaleSocketIsReplacedButALiveOneIsNot) {
  {  // a socket file left by a process that died
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)), 0);
    ::close(fd);
  }
  struct stat st {};
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  ASSERT_TRUE(S_ISSOCK(st.st_mode));

  HttpServer server(options());
  add_basic_routes(server);
  const Status s = server.start();
  ASSERT_TRUE(s.ok()) << s.error().to_string();
  UnixHttpClient client(path_, 5000ms);
  auto r = client.call("GET", "/v1/health");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 200);

  HttpServer second(options());
  const Status s2 = second.start();
  ASSERT_FALSE(s2.ok());
  EXPECT_NE(s2.error().message.find("listening"), std::string::npos) << s2.error().message;
  // The first one still owns and serves its socket.
  r = client.call("GET", "/v1/health");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 200);
}

// ---- limits and malformed input ----

TEST_F(ControlApiTest, BodyOverTheLimitIs413) {
  ServerOptions o = options();
  o.max_body_bytes = 1024;
  HttpServer server(o);
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());
  UnixHttpClient client(path_, 5000ms);

  auto r = client.call("POST", "/v1/echo", std::string(1024, 'a'));  // exactly the limit
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body.size(), 1024u);

  r = client.call("POST", "/v1/echo", std::string(1025, 'a'));
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 413);
  expect_json_error(r->body, "body_too_large");

  // Larger than a socket buffer: the server answers before reading it all.
  r = client.call("POST", "/v1/echo", std::string(4 << 20, 'a'));
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 413);

  // Chunked: no Content-Length to check up front, the parser counts.
  const std::string chunk(800, 'b');
  const std::string raw = raw_exchange(
      path_, "POST /v1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n320\r\n" +
                 chunk + "\r\n320\r\n" + chunk + "\r\n0\r\n\r\n");
  EXPECT_EQ(raw.rfind("HTTP/1.1 413 ", 0), 0u) << raw;
  expect_json_error(body_of(raw), "body_too_large");
}

// Beast bounds the header but not chunk extensions or trailers: the connection's buffer is
// bounded instead, so an endless chunk extension or trailer is a 400, not memory without end.
TEST_F(ControlApiTest, EndlessChunkExtensionOrTrailerIs400NotUnboundedMemory) {
  HttpServer server(options());
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());
  const std::string head = "POST /v1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
  for (const std::string& start : {head + "1;x=", head + "1\r\na\r\n0\r\nX-Trailer: "}) {
    SCOPED_TRACE(start);
    const int fd = raw_connect(path_);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(send_all(fd, start));
    // 4 MiB of the same extension or trailer value, never ended. The server answers and closes
    // long before the end (sending then fails, which is fine).
    const std::string more(64 * 1024, 'a');
    for (int i = 0; i < 64 && send_all(fd, more); ++i) {
    }
    const std::string raw = read_until_closed(fd);
    ::close(fd);
    EXPECT_EQ(raw.rfind("HTTP/1.1 400 ", 0), 0u) << raw.substr(0, 300);
    expect_json_error(body_of(raw), "bad_request");
  }
  // The server still serves.
  UnixHttpClient client(path_, 5000ms);
  auto r = client.call("GET", "/v1/health");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 200);
}

TEST_F(ControlApiTest, MalformedRequestsAre400AndClosed) {
  HttpServer server(options());
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());
  for (const std::string& bad :
       {std::string("THIS IS NOT HTTP\r\n\r\n"),
        std::string("GET /v1/health HTTP/1.1\r\nBad Header\r\n\r\n"),
        std::string("GET http://host/v1/health HTTP/1.1\r\nHost: x\r\n\r\n"),
        std::string("GET /v1/health?a=%zz HTTP/1.1\r\nHost: x\r\n\r\n")}) {
    const std::string raw = raw_exchange(path_, bad);  // returns once the server closed
    EXPECT_EQ(raw.rfind("HTTP/1.1 400 ", 0), 0u) << bad << " -> " << raw;
    expect_json_error(body_of(raw), "bad_request");
    EXPECT_NE(raw.find("Connection: close"), std::string::npos) << raw;
  }
  const std::string huge_header =
      "GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(10000, 'h') + "\r\n\r\n";
  const std::string raw = raw_exchange(path_, huge_header);
  EXPECT_EQ(raw.rfind("HTTP/1.1 431 ", 0), 0u) << raw.substr(0, 200);
  expect_json_error(body_of(raw), "headers_too_large");
}

TEST_F(ControlApiTest, ExpectContinueGetsA100BeforeTheBody) {
  HttpServer server(options());
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());
  const int fd = raw_connect(path_);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(send_all(fd,
                       "POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                       "Expect: 100-continue\r\nConnection: close\r\n\r\n"));
  char buf[256];
  const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
  ASSERT_GT(n, 0);
  EXPECT_EQ(std::string(buf, static_cast<std::size_t>(n)), "HTTP/1.1 100 Continue\r\n\r\n");
  ASSERT_TRUE(send_all(fd, "hello"));
  const std::string raw = read_until_closed(fd);
  ::close(fd);
  EXPECT_EQ(raw.rfind("HTTP/1.1 200 ", 0), 0u) << raw;
  EXPECT_EQ(body_of(raw), "hello");
}

// ---- timeouts and concurrency ----

TEST_F(ControlApiTest, SilentClientDoesNotBlockOthersAndIsDroppedAfterTheReadTimeout) {
  ServerOptions o = options();
  o.read_timeout = 400ms;
  HttpServer server(o);
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());

  const auto start = Clock::now();
  const int silent = raw_connect(path_);
  ASSERT_GE(silent, 0);
  const int half = raw_connect(path_);
  ASSERT_GE(half, 0);
  ASSERT_TRUE(send_all(half, "GET /v1/health HTTP/1.1\r\nHost: x\r\n"));  // never finished

  UnixHttpClient client(path_, 5000ms);
  auto r = client.call("GET", "/v1/health");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 200);
  EXPECT_LT(ms_since(start), 350) << "another client was held up by the silent ones";

  // The silent one is closed without a word; the half request gets 408.
  const std::string nothing = read_until_closed(silent, 5000ms);
  const auto silent_ms = ms_since(start);
  EXPECT_EQ(nothing, "");
  EXPECT_GE(silent_ms, 350);
  EXPECT_LT(silent_ms, 3000);
  const std::string timed_out = read_until_closed(half, 5000ms);
  EXPECT_EQ(timed_out.rfind("HTTP/1.1 408 ", 0), 0u) << timed_out;
  expect_json_error(body_of(timed_out), "request_timeout");
  ::close(silent);
  ::close(half);
}

TEST_F(ControlApiTest, SlowHandlersRunInParallel) {
  HttpServer server(options());
  std::atomic<int> in_flight{0};
  std::atomic<int> max_in_flight{0};
  server.route("GET", "/v1/slow", [&](const Request&) {
    const int now = ++in_flight;
    int seen = max_in_flight.load();
    while (now > seen && !max_in_flight.compare_exchange_weak(seen, now)) {
    }
    std::this_thread::sleep_for(300ms);
    --in_flight;
    return text("done");
  });
  ASSERT_TRUE(server.start().ok());

  constexpr int kClients = 4;
  const auto start = Clock::now();
  std::vector<std::future<int>> results;
  for (int i = 0; i < kClients; ++i) {
    results.push_back(std::async(std::launch::async, [&] {
      UnixHttpClient client(path_, 10000ms);
      auto r = client.call("GET", "/v1/slow");
      return r.ok() ? r->status : -1;
    }));
  }
  for (auto& f : results) EXPECT_EQ(f.get(), 200);
  const auto elapsed = ms_since(start);
  // Serially this takes 1200 ms; in parallel about 300.
  EXPECT_LT(elapsed, 900) << "handlers did not run in parallel";
  EXPECT_GE(max_in_flight.load(), 2);
}

TEST_F(ControlApiTest, MaxConnectionsIsEnforcedWith503) {
  ServerOptions o = options();
  o.max_connections = 2;
  HttpServer server(o);
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());

  // Two kept-alive connections occupy both slots.
  UnixHttpClient a(path_, 5000ms);
  UnixHttpClient b(path_, 5000ms);
  ASSERT_TRUE(a.call("GET", "/v1/health").ok());
  ASSERT_TRUE(b.call("GET", "/v1/health").ok());
  EXPECT_EQ(server.stats().active_connections, 2u);

  UnixHttpClient c(path_, 5000ms);
  auto r = c.call("GET", "/v1/health");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 503);
  expect_json_error(r->body, "too_many_connections");
  EXPECT_EQ(server.stats().refused_busy, 1u);

  // A slot frees up when a client leaves.
  a.close();
  const auto deadline = Clock::now() + 3s;
  while (server.stats().active_connections > 1 && Clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  r = c.call("GET", "/v1/health");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 200);
}

// A handler that waits long can tell that its client closed the connection (and a request made
// without a socket has no client_gone to ask).
TEST_F(ControlApiTest, HandlerSeesItsClientCloseTheConnection) {
  HttpServer server(options());
  std::atomic<bool> entered{false};
  std::atomic<int> gone_seen{-1};  // -1: still waiting, 0: gave up (bounded), 1: saw it
  server.route("GET", "/v1/wait", [&](const Request& r) {
    if (!r.client_gone) return text("no socket");
    EXPECT_FALSE(r.client_gone());
    entered = true;
    const auto until = Clock::now() + 10s;
    while (!r.client_gone() && Clock::now() < until) std::this_thread::sleep_for(5ms);
    gone_seen = r.client_gone() ? 1 : 0;
    return text("nobody reads this");
  });
  ASSERT_TRUE(server.start().ok());
  Request direct;
  direct.method = "GET";
  direct.path = "/v1/wait";
  EXPECT_EQ(server.handle(direct).body, "no socket");

  const int fd = raw_connect(path_);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(send_all(fd, "GET /v1/wait HTTP/1.1\r\nHost: x\r\n\r\n"));
  for (const auto until = Clock::now() + 5s; !entered && Clock::now() < until;) {
    std::this_thread::sleep_for(5ms);
  }
  ASSERT_TRUE(entered);
  ::close(fd);
  for (const auto until = Clock::now() + 10s; gone_seen == -1 && Clock::now() < until;) {
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_EQ(gone_seen.load(), 1) << "the handler did not see its client leave";
  for (const auto until = Clock::now() + 5s;
       server.stats().active_connections > 0 && Clock::now() < until;) {
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_EQ(server.stats().active_connections, 0u);
}

// ---- peer credentials ----

TEST_F(ControlApiTest, OwnUidIsAllowedAndSeenInTheRequest) {
  HttpServer server(options());
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());
  UnixHttpClient client(path_, 5000ms);
  auto r = client.call("GET", "/v1/whoami");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  ASSERT_EQ(r->status, 200);
  const json j = json::parse(r->body);
  EXPECT_EQ(j["pid"], ::getpid());
  EXPECT_EQ(j["uid"], ::geteuid());
  EXPECT_EQ(j["gid"], ::getegid());
}

// Forks a child that becomes uid 65534 with primary group `gid` and the supplementary groups
// `groups` and sends one request; the child exits 0 when the answer starts with
// `expected_status_line` and contains `expected_text`.
int run_as_nobody(const std::string& path, const char* expected_status_line,
                  const char* expected_text, gid_t gid = 65534,
                  const std::vector<gid_t>& groups = {}) {
  const gid_t* group_list = groups.empty() ? nullptr : groups.data();
  const std::size_t group_count = groups.size();
  const pid_t child = ::fork();
  if (child < 0) return -1;
  if (child == 0) {
    // Only system calls from here on (the parent has threads).
    if (::setgroups(group_count, group_list) != 0 || ::setgid(gid) != 0 || ::setuid(65534) != 0) {
      _exit(10);
    }
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) _exit(11);
    static const char kRequest[] = "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n";
    (void)::send(fd, kRequest, sizeof(kRequest) - 1, MSG_NOSIGNAL);
    static char buf[4096];
    std::size_t got = 0;
    for (;;) {
      const ssize_t n = ::recv(fd, buf + got, sizeof(buf) - 1 - got, 0);
      if (n <= 0) break;
      got += static_cast<std::size_t>(n);
      if (got == sizeof(buf) - 1 || ::memmem(buf, got, "\r\n\r\n", 4) != nullptr) {
        // Enough to judge once the body is in too; keep reading until close or full.
        if (::memmem(buf, got, expected_text, std::strlen(expected_text)) != nullptr) break;
      }
    }
    const std::size_t len = std::strlen(expected_status_line);
    if (got < len || std::memcmp(buf, expected_status_line, len) != 0) _exit(12);
    if (::memmem(buf, got, expected_text, std::strlen(expected_text)) == nullptr) _exit(13);
    _exit(0);
  }
  int status = 0;
  if (::waitpid(child, &status, 0) != child) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
}

TEST_F(ControlApiTest, ForeignUidGets403) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root (to setuid a child to 65534)";
  ASSERT_EQ(::chmod(dir_.c_str(), 0711), 0);  // the child must reach the socket
  ServerOptions o = options();
  o.mode = 0666;  // so the peer check, not the file mode, is what refuses
  {
    HttpServer server(o);
    add_basic_routes(server);
    ASSERT_TRUE(server.start().ok());
    EXPECT_EQ(run_as_nobody(path_, "HTTP/1.1 403 ", "\"code\":\"forbidden\""), 0);
    EXPECT_EQ(server.stats().refused_forbidden, 1u);
    EXPECT_EQ(server.stats().accepted, 0u);
  }
  o.allowed_uids = {65534};
  HttpServer server(o);
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());
  EXPECT_EQ(run_as_nobody(path_, "HTTP/1.1 200 ", "ok"), 0);
  EXPECT_EQ(server.stats().refused_forbidden, 0u);
}

// control.group: a peer whose primary group or any supplementary group (SO_PEERGROUPS) is an
// allowed gid may connect; membership of other groups does not help.
TEST_F(ControlApiTest, AllowedGroupAdmitsPrimaryAndSupplementaryMembersOnly) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root (to setuid a child to 65534)";
  ASSERT_EQ(::chmod(dir_.c_str(), 0711), 0);  // the child must reach the socket
  constexpr gid_t kGroup = 4711;              // need not exist in /etc/group
  ServerOptions o = options();
  o.mode = 0666;  // so the peer check, not the file mode, is what decides
  o.allowed_gids = {kGroup};
  HttpServer server(o);
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());
  EXPECT_EQ(run_as_nobody(path_, "HTTP/1.1 200 ", "ok", 65534, {4700, kGroup}), 0)
      << "a supplementary member of the group was refused";
  EXPECT_EQ(run_as_nobody(path_, "HTTP/1.1 200 ", "ok", kGroup), 0)
      << "a primary member of the group was refused";
  EXPECT_EQ(run_as_nobody(path_, "HTTP/1.1 403 ", "\"code\":\"forbidden\"", 65534, {4700, 4712}),
            0)
      << "a peer in neither group was let in";
  EXPECT_EQ(server.stats().accepted, 2u);
  EXPECT_EQ(server.stats().refused_forbidden, 1u);
}

// ---- stopping and keep-alive ----

TEST_F(ControlApiTest, StopLetsARequestInFlightFinish) {
  HttpServer server(options());
  std::atomic<bool> entered{false};
  std::atomic<bool> finished{false};
  server.route("POST", "/v1/sandboxes/{id}/pause", [&](const Request& r) {
    entered = true;
    std::this_thread::sleep_for(500ms);
    finished = true;
    return text("paused " + r.path_params.at("id"));
  });
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());

  UnixHttpClient idle(path_, 5000ms);  // an idle keep-alive connection is closed right away
  ASSERT_TRUE(idle.call("GET", "/v1/health").ok());

  auto pending = std::async(std::launch::async, [&] {
    UnixHttpClient client(path_, 5000ms);
    return client.call("POST", "/v1/sandboxes/sb-1/pause");
  });
  const auto wait_until = Clock::now() + 5s;
  while (!entered && Clock::now() < wait_until) std::this_thread::sleep_for(5ms);
  ASSERT_TRUE(entered);

  server.stop();
  EXPECT_TRUE(finished) << "stop() returned before the handler finished";
  struct stat st {};
  EXPECT_NE(::lstat(path_.c_str(), &st), 0);  // file gone

  auto r = pending.get();
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "paused sb-1");
  EXPECT_EQ(r->headers["connection"], "close");

  auto gone = UnixHttpClient(path_, 1000ms).call("GET", "/v1/health");
  EXPECT_FALSE(gone.ok());
}

TEST_F(ControlApiTest, StopPastTheDeadlineShutsConnectionsDown) {
  HttpServer server(options());
  std::atomic<bool> entered{false};
  server.route("GET", "/v1/stuck", [&](const Request&) {
    entered = true;
    std::this_thread::sleep_for(600ms);
    return text("too late");
  });
  ASSERT_TRUE(server.start().ok());
  auto pending = std::async(std::launch::async, [&] {
    UnixHttpClient client(path_, 5000ms);
    return client.call("GET", "/v1/stuck");
  });
  while (!entered) std::this_thread::sleep_for(5ms);
  const auto start = Clock::now();
  server.shutdown_gracefully(50ms);
  EXPECT_GE(ms_since(start), 300);  // it still joined the handler's thread
  auto r = pending.get();
  EXPECT_FALSE(r.ok()) << "the connection should have been shut down";
}

TEST_F(ControlApiTest, KeepAliveServesSeveralRequestsOnOneConnection) {
  HttpServer server(options());
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());

  UnixHttpClient client(path_, 5000ms);
  auto r1 = client.call("POST", "/v1/echo", "one");
  auto r2 = client.call("POST", "/v1/echo", "two");
  ASSERT_TRUE(r1.ok() && r2.ok());
  EXPECT_EQ(r1->body, "one");
  EXPECT_EQ(r2->body, "two");
  EXPECT_EQ(server.stats().accepted, 1u);
  EXPECT_EQ(server.stats().requests, 2u);

  // Two pipelined requests in one write on a raw connection; the second asks to close.
  const std::string raw = raw_exchange(
      path_,
      "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
      "POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc");
  std::size_t count = 0;
  for (auto pos = raw.find("HTTP/1.1 200 OK"); pos != std::string::npos;
       pos = raw.find("HTTP/1.1 200 OK", pos + 1)) {
    ++count;
  }
  EXPECT_EQ(count, 2u) << raw;
  EXPECT_EQ(raw.substr(raw.size() - 3), "abc");
  EXPECT_EQ(server.stats().accepted, 2u);
}

TEST_F(ControlApiTest, ClientReconnectsWhenTheServerClosedAnIdleConnection) {
  ServerOptions o = options();
  o.read_timeout = 200ms;  // also the idle limit of a kept-alive connection
  HttpServer server(o);
  add_basic_routes(server);
  ASSERT_TRUE(server.start().ok());
  UnixHttpClient client(path_, 5000ms);
  ASSERT_TRUE(client.call("GET", "/v1/health").ok());
  std::this_thread::sleep_for(500ms);
  auto r = client.call("GET", "/v1/health");
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(server.stats().accepted, 2u);
}

// ---- the client ----

TEST_F(ControlApiTest, ClientRoundTripAndErrors) {
  HttpServer server(options());
  add_basic_routes(server);
  server.route("GET", "/v1/slow", [](const Request&) {
    std::this_thread::sleep_for(1000ms);
    return text("slow");
  });
  ASSERT_TRUE(server.start().ok());

  UnixHttpClient client(path_, 5000ms);
  const std::string payload = json{{"sandbox", "sb-1"}, {"bytes", 1 << 20}}.dump();
  auto r = client.call("POST", "/v1/echo", payload);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, payload);
  EXPECT_EQ(r->content_type, "application/json");
  EXPECT_EQ(r->headers["server"], "memsnap");

  EXPECT_EQ(client.call("GET", "no-slash").error().code, Errc::kInvalidArgument);
  EXPECT_EQ(client.call("G T", "/v1/health").error().code, Errc::kInvalidArgument);

  UnixHttpClient impatient(path_, 200ms);
  const auto start = Clock::now();
  auto t = impatient.call("GET", "/v1/slow");
  ASSERT_FALSE(t.ok());
  EXPECT_LT(ms_since(start), 900);
  EXPECT_NE(t.error().message.find("within 200 ms"), std::string::npos) << t.error().message;
  EXPECT_EQ(t.error().sys_errno, ETIMEDOUT);
}

TEST_F(ControlApiTest, ClientReportsAMissingSocketClearly) {
  const std::string missing = dir_ + "/nobody-home.sock";
  UnixHttpClient client(missing, 1000ms);
  auto r = client.call("GET", "/v1/health");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message, "cannot connect to " + missing + ": No such file or directory");
  EXPECT_EQ(r.error().sys_errno, ENOENT);
  EXPECT_EQ(r.error().code, Errc::kIoError);
}

}  // namespace
}  // namespace memsnap::control_api
