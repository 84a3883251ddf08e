// The control API transport of memsnapd: HTTP/1.1 with JSON bodies over a Unix stream socket
// (the convention of Firecracker's own API). HTTP itself is parsed and written by Boost.Beast;
// this header stays free of Boost so the daemon compiles fast.
//
// Model: the daemon registers handlers on routes ("POST", "/v1/sandboxes/{id}/pause"), then
// start()s the server. Every connection is served on its own thread with blocking reads and
// writes, so a handler may block for as long as its work takes (a pause can take seconds); other
// connections are not affected. Handlers run concurrently with each other and must be
// thread-safe.
//
// Every answer the server makes by itself is a JSON error (json_error below):
//   {"error":{"code":"<code>","message":"<human readable text>"}}
// The codes are stable snake_case words; clients match on `code`, never on `message`:
//   code                   status  when
//   bad_request            400     malformed HTTP (request line, headers, chunking, target),
//                                  chunk extensions or trailers over 64 KiB, or a bad
//                                  percent-escape in the path or query; connection closed
//                                  afterwards
//   forbidden              403     the peer (SO_PEERCRED uid and gid, SO_PEERGROUPS) is not
//                                  allowed; closed
//   not_found              404     no route has this path
//   method_not_allowed     405     a route has this path but not this method; the answer has
//                                  an Allow header listing the methods that exist
//   request_timeout        408     a request was started but not completed within
//                                  read_timeout; closed (a connection that sent nothing is
//                                  closed silently)
//   body_too_large         413     the body (Content-Length or chunked) exceeds max_body_bytes;
//                                  closed
//   headers_too_large      431     the request line and headers exceed 8 KiB; closed
//   internal               500     a handler threw, or returned an invalid response
//   too_many_connections   503     max_connections connections are already being served;
//                                  closed
// Handlers are free to use json_error with their own codes (e.g. "sandbox_not_found").
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/base/result.h"

namespace memsnap::control_api {

// The stable error codes the server itself uses (see the table above).
namespace codes {
inline constexpr std::string_view kBadRequest = "bad_request";
inline constexpr std::string_view kForbidden = "forbidden";
inline constexpr std::string_view kNotFound = "not_found";
inline constexpr std::string_view kMethodNotAllowed = "method_not_allowed";
inline constexpr std::string_view kRequestTimeout = "request_timeout";
inline constexpr std::string_view kBodyTooLarge = "body_too_large";
inline constexpr std::string_view kHeadersTooLarge = "headers_too_large";
inline constexpr std::string_view kInternal = "internal";
inline constexpr std::string_view kTooManyConnections = "too_many_connections";
}  // namespace codes

// Who is on the other end of a connection, as the kernel saw it at connect() (SO_PEERCRED).
struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

struct Request {
  std::string method;  // "GET", "POST", ... exactly as sent (methods are case-sensitive)
  std::string path;    // the target without its query, still percent-encoded: "/v1/sandboxes/a%2Fb"
  std::map<std::string, std::string> path_params;  // {name} segments, percent-decoded
  std::map<std::string, std::string> query;        // percent-decoded, '+' is a space; a key
                                                   // given twice keeps its last value
  std::map<std::string, std::string> headers;      // names lower-cased; repeats joined with ", "
  std::string body;
  PeerCredentials peer;
  // True once the client has closed its connection (set by the server, valid while the handler
  // runs; empty for a request without a socket, such as HttpServer::handle's). A handler that
  // waits long (a long poll) asks it now and then and gives up when nobody is left to answer.
  // A client that only shut down its sending side (half-close) is still there.
  std::function<bool()> client_gone;
};

struct Response {
  int status = 200;  // 200..599
  std::string body;
  std::string content_type = "application/json";  // sent when the body is not empty
  // Extra headers (e.g. {"Retry-After", "1"}). Values must not contain CR or LF.
  std::vector<std::pair<std::string, std::string>> headers;
};

// {"error":{"code":"<code>","message":"<message>"}} with the given status (JSON-escaped).
Response json_error(int status, std::string_view code, std::string_view message);

using Handler = std::function<Response(const Request&)>;

struct ServerOptions {
  std::string socket_path;
  mode_t mode = 0600;          // permission bits of the socket file, set before it can be reached
  std::optional<gid_t> group;  // chown the socket file to this group (mode 0660 to use it)
  // Peers allowed besides root and the server's own effective uid (checked with SO_PEERCRED on
  // every connection; the file mode is the first layer, this is the second).
  std::vector<uid_t> allowed_uids;
  // Peers whose effective gid or any supplementary group (SO_PEERCRED and SO_PEERGROUPS, both
  // as they were at connect()) is one of these.
  std::vector<gid_t> allowed_gids;
  std::size_t max_body_bytes = 1 << 20;
  // A request must arrive completely within read_timeout of the server starting to wait for it
  // (that includes the idle time of a keep-alive connection before its next request).
  std::chrono::milliseconds read_timeout{10000};
  // Writing one response must complete within write_timeout (a peer that does not read).
  std::chrono::milliseconds write_timeout{10000};
  // Connections served at once; more get 503. An idle kept-alive connection holds its slot
  // until it is used again, closed by the client, or closed after read_timeout.
  std::size_t max_connections = 64;
  // How long stop() (and the destructor) lets requests in flight finish.
  std::chrono::milliseconds drain_timeout{5000};
};

// Counters, e.g. for a health endpoint.
struct ServerStats {
  std::uint64_t accepted = 0;           // connections served (not counting refused ones)
  std::uint64_t refused_forbidden = 0;  // answered 403
  std::uint64_t refused_busy = 0;       // answered 503
  std::uint64_t requests = 0;           // requests answered on served connections
  std::size_t active_connections = 0;   // being served now
};

class HttpServer {
 public:
  explicit HttpServer(ServerOptions options);
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Registers `handler` for `method` on `pattern`: a path of '/'-separated segments, each either
  // literal or "{name}", which matches one non-empty segment and is captured into path_params.
  // When several patterns match a path, the one with a literal segment at the first place where
  // they differ wins ("/v1/sandboxes/stats" over "/v1/sandboxes/{id}").
  // Call before start(). Programming errors throw: std::invalid_argument (bad method or pattern,
  // the same method and pattern twice), std::logic_error (after start()).
  void route(std::string method, std::string pattern, Handler handler);

  // Creates the socket (see below) and starts accepting. Never throws:
  //   kInvalidArgument  bad options; the path exists and is not a socket (left untouched); the
  //                     path is a socket somebody is listening on; already started
  //   kIoError          a system call failed (the message names it and the path)
  // The socket file gets `mode` (and `group`) before anyone can connect: the mode is set on the
  // socket inode before bind (so the file is never created with more bits), set again by path
  // and verified with lstat between bind and listen (connect is refused until listen). A stale
  // socket file (nobody listening) is replaced.
  Status start();

  // Stops accepting and removes the socket file (if it is still ours), closes idle
  // connections, lets requests in flight finish and answers them with "Connection: close", up to
  // options.drain_timeout; then shuts the remaining connections down (their reads and writes
  // fail) and joins every thread. A handler that never returns blocks stop() forever, so
  // handlers must be bounded. Idempotent; safe to call from any thread but a handler.
  void stop();
  // stop() with another deadline, e.g. on SIGTERM (call it from a normal thread, such as the
  // one that sigwait()s or reads a signalfd, never from a signal handler).
  void shutdown_gracefully(std::chrono::milliseconds deadline);

  bool running() const;
  const ServerOptions& options() const;
  ServerStats stats() const;

  // What the server answers to a request that reached routing: the handler's response, 404,
  // 405 or 500. Lets endpoint tests run without sockets. Never throws.
  Response handle(Request request) const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace memsnap::control_api
