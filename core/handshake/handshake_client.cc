// The VMM's half of the handshake and the memsnap reply extension (see handshake.h).
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/base/unix_socket.h"
#include "core/handshake/handshake.h"

namespace memsnap::handshake {
namespace {

using nlohmann::json;

constexpr std::size_t kMaxReply = 4096;

Result<io::UniqueFd> connect_unix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return make_error(Errc::kInvalidArgument, "socket path too long: " + path);
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  io::UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return make_error(Errc::kIoError, io::errno_message("socket", errno), errno);
  if (connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("connect " + path, err), err);
  }
  return fd;
}

// Waits for one message (at most kMaxReply bytes, at most one fd) within timeout.
struct Received {
  std::string payload;
  io::UniqueFd fd;
};
Result<Received> receive_one(int sock, std::chrono::milliseconds timeout) {
  pollfd p{sock, POLLIN, 0};
  for (;;) {
    const int r = poll(&p, 1, static_cast<int>(timeout.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return make_error(Errc::kIoError, io::errno_message("poll", errno), errno);
    if (r == 0) return make_error(Errc::kHandshakeTimeout, "no reply within the timeout");
    break;
  }
  std::string buf(kMaxReply, '\0');
  iovec iov{buf.data(), buf.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n;
  do {
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return make_error(Errc::kIoError, io::errno_message("recvmsg", errno), errno);
  // Take ownership of every fd before judging the message, so each is closed on any error.
  std::vector<io::UniqueFd> fds;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      fds.emplace_back(fd);
    }
  }
  if (n == 0) return make_error(Errc::kHandshakeProtocol, "peer closed the connection");
  if ((msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) != 0) {
    return make_error(Errc::kHandshakeProtocol, "reply truncated");
  }
  if (fds.size() > 1) return make_error(Errc::kHandshakeProtocol, "reply carries several fds");
  Received out;
  out.payload.assign(buf.data(), static_cast<std::size_t>(n));
  if (!fds.empty()) out.fd = std::move(fds.front());
  return out;
}

}  // namespace

std::string serialize_regions(const std::vector<GuestRegion>& regions) {
  json array = json::array();
  for (const GuestRegion& r : regions) {
    // Firecracker's field order; page_size_kib repeats page_size (it is bytes, deprecated).
    json o = json::object();
    o["base_host_virt_addr"] = r.base_host_virt_addr;
    o["size"] = r.size;
    o["offset"] = r.offset;
    o["page_size"] = r.page_size;
    o["page_size_kib"] = r.page_size;
    array.push_back(std::move(o));
  }
  return array.dump();
}

Result<io::UniqueFd> connect_and_send(const std::string& path,
                                      const std::vector<GuestRegion>& regions, int uffd,
                                      int memfd) {
  if (uffd < 0) return make_error(Errc::kInvalidArgument, "connect_and_send needs a uffd");
  auto sock = connect_unix(path);
  if (!sock) return sock.error();
  const int fds[2] = {uffd, memfd};
  const Status sent =
      io::send_with_fds(sock.value().get(), serialize_regions(regions),
                        std::span<const int>(fds, memfd >= 0 ? 2 : 1), "sendmsg (handshake)");
  if (!sent) return sent.error();
  return std::move(sock.value());
}

Status send_reply(int connection, bool has_memfd, int memfd, std::uint64_t size,
                  std::uint64_t generation, bool arm_writes) {
  json body = {{"memfd", has_memfd}};
  if (has_memfd) {
    if (memfd < 0) return make_error(Errc::kInvalidArgument, "send_reply: memfd missing");
    body["size"] = size;
    body["generation"] = generation;
    body["arm_writes"] = arm_writes;
  }
  const std::string payload = json{{"memsnap_resume", body}}.dump();
  return io::send_with_fds(connection, payload, std::span<const int>(&memfd, has_memfd ? 1 : 0),
                           "sendmsg (reply)");
}

Result<ResumeReply> receive_reply(int connection, std::chrono::milliseconds timeout) {
  auto got = receive_one(connection, timeout);
  if (!got) return got.error();
  const json j = json::parse(got.value().payload, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("memsnap_resume") || !j["memsnap_resume"].is_object()) {
    return make_error(Errc::kHandshakeProtocol, "not a memsnap_resume reply");
  }
  const json& body = j["memsnap_resume"];
  ResumeReply reply;
  if (!body.contains("memfd") || !body["memfd"].is_boolean()) {
    return make_error(Errc::kHandshakeProtocol, "memsnap_resume.memfd must be a boolean");
  }
  reply.has_memfd = body["memfd"].get<bool>();
  if (reply.has_memfd) {
    if (got.value().fd.get() < 0) {
      return make_error(Errc::kHandshakeProtocol, "reply says memfd but carries no fd");
    }
    if (!body.contains("size") || !body["size"].is_number_unsigned() ||
        !body.contains("generation") || !body["generation"].is_number_unsigned()) {
      return make_error(Errc::kHandshakeProtocol, "reply lacks size or generation");
    }
    reply.size = body["size"].get<std::uint64_t>();
    reply.generation = body["generation"].get<std::uint64_t>();
    if (body.contains("arm_writes")) {
      if (!body["arm_writes"].is_boolean()) {
        return make_error(Errc::kHandshakeProtocol, "memsnap_resume.arm_writes must be a boolean");
      }
      reply.arm_writes = body["arm_writes"].get<bool>();
    }
    reply.memfd = std::move(got.value().fd);
  } else if (got.value().fd.get() >= 0) {
    return make_error(Errc::kHandshakeProtocol, "reply carries an fd it does not announce");
  }
  return reply;
}

Status send_mapped_ack(int connection) {
  return io::send_with_fds(connection, json{{"memsnap_mapped", true}}.dump(), {},
                           "sendmsg (mapped ack)");
}

Status wait_mapped_ack(int connection, std::chrono::milliseconds timeout) {
  auto got = receive_one(connection, timeout);
  if (!got) return got.error();
  if (got.value().fd.get() >= 0) {
    return make_error(Errc::kHandshakeProtocol, "mapped ack carries an fd");
  }
  const json j = json::parse(got.value().payload, nullptr, false);
  if (!j.is_object() || j.value("memsnap_mapped", false) != true) {
    return make_error(Errc::kHandshakeProtocol,
                      "expected {\"memsnap_mapped\":true}, got " + got.value().payload);
  }
  return Status();
}

}  // namespace memsnap::handshake
