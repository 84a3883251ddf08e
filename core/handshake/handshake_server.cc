// memsnap's half of the handshake: the listening socket, receiving and checking the VMM's message,
// and validating its region JSON (see handshake.h).
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <functional>
#include <limits>
#include <set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/handshake/handshake.h"

#include "core/base/unix_socket.h"

namespace memsnap::handshake {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

// The VMM may send at most 2 fds. The control buffer has room for a few more so that a sender of
// 3..kControlFds fds is seen (and its fds closed) as "too many fds"; beyond that the kernel sets
// MSG_CTRUNC and closes the fds that did not fit itself, so none of them reach our fd table.
constexpr std::size_t kMaxFds = 2;
constexpr std::size_t kControlFds = 8;
constexpr int kBacklog = 8;

constexpr const char* kRegionFields[] = {"base_host_virt_addr", "size", "offset", "page_size",
                                         "page_size_kib"};

Error bad_regions(std::string message) {
  return make_error(Errc::kHandshakeBadRegions, std::move(message));
}
Error protocol(std::string message, int err = 0) {
  return make_error(Errc::kHandshakeProtocol, std::move(message), err);
}
Error io_error(const std::string& what, int err) {
  return make_error(Errc::kIoError, io::errno_message(what, err), err);
}

std::string region_name(std::size_t index) { return "region " + std::to_string(index); }

// ---- parse_regions helpers ----

bool is_known_field(const std::string& key) {
  return std::any_of(std::begin(kRegionFields), std::end(kRegionFields),
                     [&](const char* f) { return key == f; });
}

// Reads an unsigned integer field of region `index`; absent fields are reported by the caller.
Result<std::uint64_t> get_u64(const json& object, std::size_t index, const char* field) {
  const json& v = object.at(field);
  // nlohmann stores non-negative integers as number_unsigned, negative ones as number_integer
  // and anything with a fraction, an exponent or beyond 2^64-1 as number_float.
  if (!v.is_number_unsigned()) {
    return bad_regions(region_name(index) + ": field \"" + field +
                       "\" must be an unsigned integer, got " + v.dump());
  }
  return v.get<std::uint64_t>();
}

bool is_power_of_two(std::uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// Rejects duplicate keys, which nlohmann would otherwise resolve silently (last one wins).
class DuplicateKeyCheck {
 public:
  bool operator()(int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        if (keys_.empty()) ++objects_;  // not nested in another object: a region (if valid)
        keys_.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys_.empty()) keys_.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys_.empty() && !keys_.back().insert(parsed.get<std::string>()).second &&
            message_.empty()) {
          message_ = region_name(objects_ == 0 ? 0 : objects_ - 1) + ": duplicate field \"" +
                     parsed.get<std::string>() + "\"";
        }
        break;
      default:
        break;
    }
    return true;
  }
  // Empty when no object repeats a key.
  const std::string& message() const { return message_; }

 private:
  std::vector<std::set<std::string>> keys_;
  std::size_t objects_ = 0;
  std::string message_;
};

// ---- socket helpers ----

enum class Wait { kReady, kTimeout };

// Waits until fd is readable (or hung up) or the deadline passes; the last poll has timeout 0,
// so whatever is already queued at the deadline still counts.
Result<Wait> wait_readable(int fd, Clock::time_point deadline) {
  for (;;) {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
    const int ms = static_cast<int>(std::clamp<std::chrono::milliseconds::rep>(
        left.count(), 0, std::numeric_limits<int>::max()));
    pollfd p{fd, POLLIN, 0};
    const int r = ::poll(&p, 1, ms);
    if (r > 0) return Wait::kReady;
    if (r == 0) {
      if (ms == 0) return Wait::kTimeout;
      continue;  // poll rounds; re-check against the deadline
    }
    if (errno != EINTR) return io_error("poll", errno);
  }
}

void close_and_unlink(io::UniqueFd& fd, std::string& path) {
  if (fd.get() >= 0 && !path.empty()) {
    // Only a socket: if somebody replaced our file with something else, it is not ours to remove.
    struct stat st {};
    if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
  }
  fd.reset();
  path.clear();
}

std::string fd_target(int fd) {
  const std::string link = "/proc/self/fd/" + std::to_string(fd);
  char buf[PATH_MAX];
  const ssize_t n = ::readlink(link.c_str(), buf, sizeof(buf) - 1);
  if (n < 0) return {};
  return std::string(buf, static_cast<std::size_t>(n));
}

// A userfaultfd is an anonymous inode the kernel names "[userfaultfd]"; /proc/self/fd shows it as
// "anon_inode:[userfaultfd]". Names of files reachable by path always start with '/', and other
// pseudo files have their own prefix ("pipe:", "socket:"), so nothing else can show this text.
Status check_uffd(int fd) {
  const std::string target = fd_target(fd);
  if (target != "anon_inode:[userfaultfd]") {
    return make_error(
        Errc::kHandshakeBadFd,
        "fd[0] is not a userfaultfd (it is \"" +
            (target.empty() ? std::string("unknown: cannot read /proc/self/fd") : target) + "\")");
  }
  return {};
}

// A memfd shows as "/memfd:<name> (deleted)". The name alone could be faked by a file called
// "/memfd:x" on a filesystem mounted at /, so the fd must also be a regular file on shmem or
// hugetlbfs: F_GET_SEALS fails with EINVAL on every other kind of file.
Status check_memfd(int fd) {
  const std::string target = fd_target(fd);
  struct stat st {};
  const bool ok = target.rfind("/memfd:", 0) == 0 && ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
                  ::fcntl(fd, F_GET_SEALS) >= 0;
  if (!ok) {
    return make_error(
        Errc::kHandshakeBadFd,
        "fd[1] is not a memfd (it is \"" +
            (target.empty() ? std::string("unknown: cannot read /proc/self/fd") : target) + "\")");
  }
  return {};
}

// Finds where the top-level JSON value ends so that a payload the kernel hands over in several
// reads is put back together, without waiting for an end-of-file the VMM never sends. It only
// tracks strings and bracket depth; the real validation is parse_regions().
class JsonEnd {
 public:
  // Feeds bytes; true once the top-level value is complete (then further bytes are ignored).
  bool feed(const char* data, std::size_t n) {
    for (std::size_t i = 0; i < n && !done_; ++i) step(data[i]);
    return done_;
  }

 private:
  void step(char c) {
    if (!started_) {
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r') return;
      started_ = true;
      if (c == '[' || c == '{') {
        depth_ = 1;
      } else {
        done_ = true;  // not a container: parse_regions() will refuse it
      }
      return;
    }
    if (in_string_) {
      if (escape_) {
        escape_ = false;
      } else if (c == '\\') {
        escape_ = true;
      } else if (c == '"') {
        in_string_ = false;
      }
      return;
    }
    if (c == '"') {
      in_string_ = true;
    } else if (c == '[' || c == '{') {
      ++depth_;
    } else if (c == ']' || c == '}') {
      if (--depth_ == 0) done_ = true;
    }
  }

  bool started_ = false;
  bool done_ = false;
  bool in_string_ = false;
  bool escape_ = false;
  std::size_t depth_ = 0;
};

struct Message {
  std::string payload;
  std::vector<io::UniqueFd> fds;
};

// One recvmsg of at most `room` bytes into `dst`. Every fd the kernel installed is owned by
// `fds` before anything is checked, so each error return closes all of them.
// Returns the byte count (0: the peer closed) or -1 for "nothing queued" (EAGAIN).
Result<ssize_t> receive_some(int conn, char* dst, std::size_t room, bool first,
                             std::vector<io::UniqueFd>& fds) {
  iovec iov{dst, room};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kControlFds)];
  std::memset(control, 0, sizeof(control));
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  const ssize_t n = ::recvmsg(conn, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  if (n < 0) {
    const int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR) return ssize_t{-1};
    if (err == ECONNRESET) return protocol("the VMM reset the connection", err);
    return io_error("recvmsg", err);
  }

  std::size_t control_messages = 0;
  bool rights = false;
  bool other = false;
  if (msg.msg_controllen > 0) {
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      ++control_messages;
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len >= CMSG_LEN(0)) {
        rights = true;
        const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char* data = CMSG_DATA(c);
        for (std::size_t i = 0; i < count; ++i) {
          int fd = -1;
          std::memcpy(&fd, data + i * sizeof(int), sizeof(int));
          if (fd >= 0) fds.emplace_back(fd);
        }
      } else {
        other = true;
      }
    }
  }

  if ((msg.msg_flags & MSG_CTRUNC) != 0) {
    return protocol("control data truncated (MSG_CTRUNC): the VMM sent too many fds");
  }
  if ((msg.msg_flags & MSG_TRUNC) != 0) return protocol("message truncated (MSG_TRUNC)");
  if (other) return protocol("unexpected control message (not SCM_RIGHTS)");
  if (control_messages > 1) return protocol("more than one control message");
  if (rights && !first) {
    return protocol("a second control message: fds must come once, with the start of the message");
  }
  if (first && n > 0 && !rights) {
    return protocol("the message carries no SCM_RIGHTS (no userfaultfd)");
  }
  return n;
}

// Receives the VMM's message: the first bytes must carry SCM_RIGHTS; the payload is read until the
// top-level JSON value is complete, plus whatever else is already queued, and must not exceed
// max_payload. Stream sockets have no message boundaries (MSG_TRUNC never reports a longer
// message), so the buffer holds max_payload + 1 bytes: filling it means the payload is too long.
Result<Message> receive_message(int conn, std::size_t max_payload, Clock::time_point deadline,
                                std::chrono::milliseconds timeout) {
  Message m;
  std::string buf(max_payload + 1, '\0');
  std::size_t len = 0;
  JsonEnd end;
  bool complete = false;
  const auto too_long = [&] {
    return protocol("payload longer than " + std::to_string(max_payload) + " bytes");
  };

  // Until the JSON is complete: wait (within the deadline) for more.
  while (!complete) {
    if (len == buf.size()) return too_long();
    auto ready = wait_readable(conn, deadline);
    if (!ready) return ready.error();
    if (ready.value() == Wait::kTimeout) {
      return make_error(Errc::kHandshakeTimeout,
                        len == 0 ? "the VMM connected but sent nothing within " +
                                       std::to_string(timeout.count()) + " ms"
                                 : "the VMM sent an incomplete message (" + std::to_string(len) +
                                       " bytes) within " + std::to_string(timeout.count()) + " ms");
    }
    MEMSNAP_ASSIGN_OR_RETURN(
        auto got, receive_some(conn, buf.data() + len, buf.size() - len, len == 0, m.fds));
    if (got < 0) continue;
    if (got == 0) {
      return protocol(len == 0 ? "the VMM closed the connection without sending anything"
                               : "the VMM closed the connection after " + std::to_string(len) +
                                     " bytes, before the JSON was complete");
    }
    const auto n = static_cast<std::size_t>(got);
    complete = end.feed(buf.data() + len, n);
    len += n;
  }

  // Anything queued right behind the JSON belongs to the payload too (and makes it invalid); a
  // VMM sends nothing else before memsnap replies.
  for (;;) {
    if (len == buf.size()) return too_long();
    MEMSNAP_ASSIGN_OR_RETURN(auto got,
                             receive_some(conn, buf.data() + len, buf.size() - len, false, m.fds));
    if (got <= 0) break;  // nothing more queued, or the VMM closed after sending
    len += static_cast<std::size_t>(got);
  }

  buf.resize(len);
  m.payload = std::move(buf);
  return m;
}

}  // namespace

Result<std::vector<GuestRegion>> parse_regions(std::string_view text, const Expectations& expect) {
  if (expect.page_size != 0 && (!is_power_of_two(expect.page_size) || expect.page_size < 4096)) {
    return make_error(Errc::kInvalidArgument, "expected page size " +
                                                  std::to_string(expect.page_size) +
                                                  " is not a power of two >= 4096");
  }
  DuplicateKeyCheck duplicates;
  json doc;
  try {
    doc = json::parse(text.begin(), text.end(), std::ref(duplicates));
  } catch (const json::exception& e) {
    return bad_regions(std::string("the regions are not valid JSON: ") + e.what());
  }
  if (!duplicates.message().empty()) return bad_regions(duplicates.message());
  if (!doc.is_array()) return bad_regions("the regions must be a JSON array");
  if (doc.empty()) return bad_regions("the region array is empty");

  std::vector<GuestRegion> regions;
  regions.reserve(doc.size());
  for (std::size_t i = 0; i < doc.size(); ++i) {
    const json& o = doc[i];
    const std::string name = region_name(i);
    if (!o.is_object()) return bad_regions(name + ": not an object");
    for (const auto& item : o.items()) {
      if (!is_known_field(item.key())) {
        return bad_regions(name + ": unknown field \"" + item.key() + "\"");
      }
    }
    for (const char* field : {"base_host_virt_addr", "size", "offset"}) {
      if (!o.contains(field)) return bad_regions(name + ": missing field \"" + field + "\"");
    }
    const bool has_ps = o.contains("page_size");
    const bool has_kib = o.contains("page_size_kib");
    if (!has_ps && !has_kib) {
      return bad_regions(name + ": missing field \"page_size\" (or \"page_size_kib\")");
    }

    GuestRegion r;
    for (auto [field, dst] : {std::pair{"base_host_virt_addr", &r.base_host_virt_addr},
                              std::pair{"size", &r.size}, std::pair{"offset", &r.offset}}) {
      auto v = get_u64(o, i, field);
      if (!v) return v.error();
      *dst = v.value();
    }
    std::uint64_t kib_value = 0;
    if (has_kib) {
      auto v = get_u64(o, i, "page_size_kib");
      if (!v) return v.error();
      kib_value = v.value();
    }
    if (has_ps) {
      auto v = get_u64(o, i, "page_size");
      if (!v) return v.error();
      r.page_size = v.value();
      if (has_kib && kib_value != r.page_size) {
        return bad_regions(name + ": \"page_size\" " + std::to_string(r.page_size) +
                           " and \"page_size_kib\" " + std::to_string(kib_value) +
                           " disagree (both are in bytes)");
      }
    } else {
      r.page_size = kib_value;
    }
    const char* ps_field = has_ps ? "page_size" : "page_size_kib";

    if (!is_power_of_two(r.page_size) || r.page_size < 4096) {
      return bad_regions(name + ": field \"" + ps_field + "\" " + std::to_string(r.page_size) +
                         " is not a power of two >= 4096");
    }
    if (expect.page_size != 0 && r.page_size != expect.page_size) {
      return bad_regions(name + ": field \"" + ps_field + "\" " + std::to_string(r.page_size) +
                         " differs from the expected page size " +
                         std::to_string(expect.page_size));
    }
    if (!regions.empty() && r.page_size != regions.front().page_size) {
      return bad_regions(name + ": field \"" + ps_field + "\" " + std::to_string(r.page_size) +
                         " differs from region 0's " + std::to_string(regions.front().page_size));
    }
    if (r.size == 0) return bad_regions(name + ": field \"size\" is 0");
    if (r.size % r.page_size != 0) {
      return bad_regions(name + ": field \"size\" " + std::to_string(r.size) +
                         " is not a multiple of the page size " + std::to_string(r.page_size));
    }
    if (r.base_host_virt_addr % r.page_size != 0) {
      return bad_regions(name + ": field \"base_host_virt_addr\" " +
                         std::to_string(r.base_host_virt_addr) + " is not page aligned");
    }
    if (r.offset % r.page_size != 0) {
      return bad_regions(name + ": field \"offset\" " + std::to_string(r.offset) +
                         " is not page aligned");
    }
    constexpr auto kMax = std::numeric_limits<std::uint64_t>::max();
    if (r.base_host_virt_addr > kMax - r.size) {
      return bad_regions(name + ": \"base_host_virt_addr\" + \"size\" wraps around");
    }
    if (r.offset > kMax - r.size) {
      return bad_regions(name + ": \"offset\" + \"size\" wraps around");
    }
    regions.push_back(r);
  }

  // Host ranges: sorted by address, each must end before the next begins.
  std::vector<std::size_t> order(regions.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return regions[a].base_host_virt_addr < regions[b].base_host_virt_addr;
  });
  for (std::size_t k = 1; k < order.size(); ++k) {
    const GuestRegion& prev = regions[order[k - 1]];
    const GuestRegion& cur = regions[order[k]];
    if (prev.base_host_virt_addr + prev.size > cur.base_host_virt_addr) {
      return bad_regions(region_name(order[k - 1]) + " and " + region_name(order[k]) +
                         " overlap in host memory (field \"base_host_virt_addr\")");
    }
  }

  // Guest offsets: sorted, they must tile [0, total) without gaps or overlaps.
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return regions[a].offset < regions[b].offset; });
  std::uint64_t next = 0;
  for (const std::size_t i : order) {
    if (regions[i].offset != next) {
      return bad_regions(region_name(i) + ": field \"offset\" " +
                         std::to_string(regions[i].offset) + " should be " + std::to_string(next) +
                         " (guest offsets must be contiguous from 0)");
    }
    next += regions[i].size;  // cannot wrap: offset + size was checked above
  }
  if (expect.guest_size != 0 && next != expect.guest_size) {
    return bad_regions("the regions' sizes add up to " + std::to_string(next) +
                       " bytes, expected a guest of " + std::to_string(expect.guest_size));
  }

  std::vector<GuestRegion> sorted;
  sorted.reserve(regions.size());
  for (const std::size_t i : order) sorted.push_back(regions[i]);
  return sorted;
}

Result<Listener> Listener::listen(const std::string& path, mode_t mode) {
  MEMSNAP_ASSIGN_OR_RETURN(auto listening, io::listen_unix(path, mode, std::nullopt, kBacklog));
  return Listener(std::move(listening.fd), path);
}

Listener::Listener(Listener&& other) noexcept
    : fd_(std::move(other.fd_)), path_(std::move(other.path_)) {
  other.path_.clear();
}

Listener& Listener::operator=(Listener&& other) noexcept {
  if (this != &other) {
    close_and_unlink(fd_, path_);
    fd_ = std::move(other.fd_);
    path_ = std::move(other.path_);
    other.path_.clear();
  }
  return *this;
}

Listener::~Listener() { close_and_unlink(fd_, path_); }

Result<Handshake> Listener::accept(const Expectations& expect, std::chrono::milliseconds timeout) {
  if (fd_.get() < 0) return make_error(Errc::kInvalidArgument, "accept on a closed listener");
  if (expect.max_payload == 0 || expect.max_payload > (std::size_t{64} << 20)) {
    return make_error(Errc::kInvalidArgument, "max_payload must be 1 byte .. 64 MiB");
  }
  const auto deadline = Clock::now() + timeout;

  io::UniqueFd conn;
  while (conn.get() < 0) {
    auto ready = wait_readable(fd_.get(), deadline);
    if (!ready) return ready.error();
    if (ready.value() == Wait::kTimeout) {
      return make_error(Errc::kHandshakeTimeout, "no VMM connected to " + path_ + " within " +
                                                     std::to_string(timeout.count()) + " ms");
    }
    // The listening socket is non-blocking: a connection that vanished between poll and
    // accept (EAGAIN, ECONNABORTED) sends us back to waiting. The accepted socket is blocking,
    // like the VMM's end; every read below is MSG_DONTWAIT after a poll.
    const int c = ::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (c >= 0) {
      conn.reset(c);
    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED &&
               errno != EPROTO) {
      return io_error("accept " + path_, errno);
    }
  }

  MEMSNAP_ASSIGN_OR_RETURN(auto received,
                           receive_message(conn.get(), expect.max_payload, deadline, timeout));
  Message& m = received;

  if (m.fds.empty()) return protocol("the message carries no fds");
  if (m.fds.size() > kMaxFds) {
    return protocol("the message carries " + std::to_string(m.fds.size()) +
                    " fds; expected [uffd] or [uffd, memfd]");
  }
  MEMSNAP_RETURN_IF_ERROR(check_uffd(m.fds[0].get()));
  if (m.fds.size() == 2) {
    MEMSNAP_RETURN_IF_ERROR(check_memfd(m.fds[1].get()));
  } else if (expect.memfd_required) {
    return bad_regions("guest memory must be memfd-backed, but the VMM sent no memfd");
  }

  MEMSNAP_ASSIGN_OR_RETURN(auto regions, parse_regions(m.payload, expect));

  ucred cred{};
  socklen_t cred_len = sizeof(cred);
  if (::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) != 0) {
    return io_error("getsockopt(SO_PEERCRED)", errno);
  }

  Handshake h;
  h.vmm_pid = cred.pid;
  h.vmm_uid = cred.uid;
  h.vmm_gid = cred.gid;
  h.regions = std::move(regions);
  h.page_size = h.regions.front().page_size;
  for (const GuestRegion& r : h.regions) h.guest_size += r.size;
  h.uffd = std::move(m.fds[0]);
  if (m.fds.size() == 2) h.memfd = std::move(m.fds[1]);
  h.connection = std::move(conn);
  return h;
}

}  // namespace memsnap::handshake
