// A client of QEMU's machine protocol (QMP) on its Unix socket: JSON messages, one per line;
// the greeting, qmp_capabilities, then commands answered by "return" or "error", with
// asynchronous "event" messages in between (kept, in order). A file descriptor can go along
// with a command (SCM_RIGHTS), as `getfd` needs.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/base/file_io.h"
#include "core/base/result.h"

namespace memsnap::qemu {

class QmpClient {
 public:
  // Connects to socket_path (retrying while QEMU has not created it yet, as long as alive()
  // says QEMU runs), reads the greeting and negotiates capabilities.
  static Result<QmpClient> connect(const std::string& socket_path,
                                   std::chrono::milliseconds timeout,
                                   const std::function<bool()>& alive);

  // Runs one command; its "return" value, or kInternal with QEMU's error class and description
  // (kTimeout when no answer came in time; kIoError when the connection broke).
  Result<nlohmann::json> execute(const std::string& command,
                                 const nlohmann::json& arguments = nullptr, int pass_fd = -1,
                                 std::chrono::milliseconds timeout = std::chrono::seconds(30));

  // Events received so far (each the whole message), oldest first.
  const std::vector<nlohmann::json>& events() const { return events_; }

 private:
  explicit QmpClient(io::UniqueFd fd) : fd_(std::move(fd)) {}
  Result<nlohmann::json> read_message(std::chrono::steady_clock::time_point deadline);
  Status send(const std::string& line, int pass_fd);

  io::UniqueFd fd_;
  std::string buffer_;
  std::vector<nlohmann::json> events_;
  std::uint64_t next_id_ = 1;
};

}  // namespace memsnap::qemu
