#include "tools/qemu/qmp.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "core/base/unix_socket.h"

namespace memsnap::qemu {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

int remaining_ms(Clock::time_point deadline) {
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(std::min<long long>(left, 1000));
}

}  // namespace

Result<QmpClient> QmpClient::connect(const std::string& socket_path,
                                     std::chrono::milliseconds timeout,
                                     const std::function<bool()>& alive) {
  sockaddr_un addr{};
  if (socket_path.size() >= sizeof(addr.sun_path)) {
    return make_error(Errc::kInvalidArgument, "QMP socket path too long: " + socket_path);
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    io::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (fd.get() < 0) {
      const int err = errno;
      return make_error(Errc::kIoError, std::string("socket: ") + std::strerror(err), err);
    }
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      QmpClient client(std::move(fd));
      MEMSNAP_ASSIGN_OR_RETURN(auto greeting, client.read_message(deadline));
      if (!greeting.contains("QMP")) {
        return make_error(Errc::kInternal, "not a QMP greeting: " + greeting.dump());
      }
      MEMSNAP_RETURN_IF_ERROR(client.execute(
          "qmp_capabilities", nullptr, -1,
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now() +
                                                                std::chrono::seconds(1))));
      return client;
    }
    const int err = errno;
    if (err != ENOENT && err != ECONNREFUSED) {
      return make_error(Errc::kIoError, "connect " + socket_path + ": " + std::strerror(err), err);
    }
    if (!alive()) {
      return make_error(Errc::kProcessGone, "QEMU exited before its QMP socket " + socket_path +
                                                " accepted a connection");
    }
    if (Clock::now() >= deadline) {
      return make_error(Errc::kTimeout, "QMP socket " + socket_path + " did not accept within " +
                                            std::to_string(timeout.count()) + " ms");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

Status QmpClient::send(const std::string& line, int pass_fd) {
  return io::send_with_fds(
      fd_.get(), line, pass_fd >= 0 ? std::span<const int>(&pass_fd, 1) : std::span<const int>(),
      "QMP send");
}

Result<json> QmpClient::read_message(Clock::time_point deadline) {
  for (;;) {
    const std::size_t nl = buffer_.find('\n');
    if (nl != std::string::npos) {
      const std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      if (line.find_first_not_of(" \r\t") == std::string::npos) continue;
      json message = json::parse(line, nullptr, false);
      if (message.is_discarded() || !message.is_object()) {
        return make_error(Errc::kInternal, "QMP sent what is not a JSON object: " + line);
      }
      return message;
    }
    pollfd p{fd_.get(), POLLIN, 0};
    const int ready = ::poll(&p, 1, remaining_ms(deadline));
    if (ready < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      return make_error(Errc::kIoError, std::string("QMP poll: ") + std::strerror(err), err);
    }
    if (ready == 0) {
      if (Clock::now() >= deadline) {
        return make_error(Errc::kTimeout, "QMP: no answer in time");
      }
      continue;
    }
    char chunk[65536];
    const ssize_t n = ::read(fd_.get(), chunk, sizeof(chunk));
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      const int err = errno;
      return make_error(Errc::kIoError, std::string("QMP read: ") + std::strerror(err), err);
    }
    if (n == 0) return make_error(Errc::kIoError, "QMP: QEMU closed the connection");
    buffer_.append(chunk, static_cast<std::size_t>(n));
  }
}

Result<json> QmpClient::execute(const std::string& command, const json& arguments, int pass_fd,
                                std::chrono::milliseconds timeout) {
  const std::uint64_t id = next_id_++;
  json request = {{"execute", command}, {"id", id}};
  if (!arguments.is_null()) request["arguments"] = arguments;
  if (Status s = send(request.dump() + "\n", pass_fd); !s.ok()) return s.error();
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    auto message = read_message(deadline);
    if (!message.ok()) return std::move(message).error().with_context(command);
    if (message->contains("event")) {
      events_.push_back(std::move(*message));
      continue;
    }
    if (message->value("id", json()) != json(id)) continue;  // an answer to someone else
    if (message->contains("error")) {
      const json& e = (*message)["error"];
      return make_error(Errc::kInternal, "QEMU refused " + command + ": " +
                                             e.value("class", std::string("?")) + ": " +
                                             e.value("desc", std::string("?")));
    }
    return message->value("return", json::object());
  }
}

}  // namespace memsnap::qemu
