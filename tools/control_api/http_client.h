// The client side of the control API (the memsnap CLI's client mode, tests): synchronous
// HTTP/1.1 over a Unix stream socket, written and parsed by Boost.Beast. Free of Boost here.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "core/base/result.h"

namespace memsnap::control_api {

struct ClientResponse {
  int status = 0;
  std::string body;
  std::string content_type;                    // empty when the server sent none
  std::map<std::string, std::string> headers;  // names lower-cased; repeats joined with ", "
};

// The parts of a JSON error body {"error":{"code":...,"message":...}} (see http_server.h).
struct ApiError {
  std::string code;
  std::string message;
};
// nullopt when `body` is not such a JSON error.
std::optional<ApiError> parse_api_error(std::string_view body);

// One connection to the server at socket_path, opened by the first call and kept open while the
// server keeps it alive (a connection the server has closed in the meantime is noticed before
// sending and replaced). Not thread-safe: one call at a time; use one client per thread.
class UnixHttpClient {
 public:
  // `timeout` bounds each call as a whole: connecting, sending and receiving the whole answer.
  explicit UnixHttpClient(std::string socket_path,
                          std::chrono::milliseconds timeout = std::chrono::seconds(30));
  ~UnixHttpClient();
  UnixHttpClient(UnixHttpClient&&) noexcept;
  UnixHttpClient& operator=(UnixHttpClient&&) noexcept;
  UnixHttpClient(const UnixHttpClient&) = delete;
  UnixHttpClient& operator=(const UnixHttpClient&) = delete;

  // Sends `method target` (a non-empty body goes as application/json) and returns the answer,
  // whatever its status (a 404 is a response, not an error). Errors (the connection is closed):
  //   kInvalidArgument  method or target unusable ("target must start with '/'")
  //   kIoError          "cannot connect to <path>: No such file or directory" (sys_errno set),
  //                     "no complete answer from <path> within <n> ms" (ETIMEDOUT),
  //                     "<path> closed the connection without answering", ...
  // Requests are never retried (a pause must not run twice). If the server answers early and
  // closes (403, 503, 413) while the request is still being written, that answer is returned.
  Result<ClientResponse> call(std::string_view method, std::string_view target,
                              std::string_view body = {});

  // Closes the kept connection, if any.
  void close();
  const std::string& socket_path() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace memsnap::control_api
