// The Firecracker-compatible UFFD handshake, both ends.
//
// Wire format (Firecracker's UFFD memory backend): the VMM connects to a Unix stream socket and
// sends ONE message. Its payload is a JSON array of
//   {"base_host_virt_addr": u64, "size": u64, "offset": u64, "page_size": u64,
//    "page_size_kib": u64}
// objects, one per guest memory region. `offset` is the region's offset in guest memory
// (cumulative over the regions), `page_size_kib` is in fact bytes and deprecated (either field
// is accepted; when both are present they must agree). The message carries a single SCM_RIGHTS
// control message with [uffd], or [uffd, memfd] when guest memory is memfd-backed. The VMM never
// closes the socket afterwards.
//
// memsnap extension (optional, ignored by a VMM that does not know it, such as Firecracker which
// never reads the socket): after a handshake, memsnap sends exactly one reply on the same
// connection,
//   {"memsnap_resume":{"memfd":false}}
// or, when it hands guest memory back as a memfd (warm resume, or a cold memfd filled
// eagerly),
//   {"memsnap_resume":{"memfd":true,"size":N,"generation":G,"arm_writes":B}}   + SCM_RIGHTS [memfd]
// arm_writes true asks the VMM to write-protect the new mappings (UFFDIO_WRITEPROTECT) before it
// acks, so the guest's first write is already tracked; false (or absent) means memsnap arms them
// itself after the ack, while the guest runs (see ResumeRequest::arm_tracking_before_ready).
// A VMM that maps a memfd handed to it answers {"memsnap_mapped":true} once it has mapped it over
// its guest regions and registered its userfaultfd on the new mappings.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/file_io.h"
#include "core/base/result.h"

namespace memsnap::handshake {

// One guest memory region as the VMM describes it.
struct GuestRegion {
  std::uint64_t base_host_virt_addr = 0;
  std::uint64_t size = 0;
  std::uint64_t offset = 0;  // in guest memory
  std::uint64_t page_size = 0;

  bool operator==(const GuestRegion&) const = default;
};

// What the server checks the VMM's description against.
struct Expectations {
  std::uint64_t page_size = 0;   // must equal every region's page size (the snapshot's block
                                 // size); 0: any power of two >= 4096
  std::uint64_t guest_size = 0;  // the regions' sizes must add up to it; 0: any
  bool memfd_required = false;   // refuse [uffd] alone
  std::size_t max_payload = 64 * 1024;  // longer payloads are refused (kHandshakeProtocol)
};

// A completed handshake. Owns every fd it holds.
struct Handshake {
  io::UniqueFd connection;  // kept open (the VMM never closes it); replies go here
  io::UniqueFd uffd;
  io::UniqueFd memfd;  // -1 when guest memory is anonymous
  pid_t vmm_pid = -1;  // from SO_PEERCRED
  uid_t vmm_uid = 0;
  gid_t vmm_gid = 0;
  std::vector<GuestRegion> regions;  // sorted by offset, disjoint, contiguous from 0
  std::uint64_t page_size = 0;
  std::uint64_t guest_size = 0;  // sum of region sizes
};

// Parses and validates the JSON payload. Strict: an array of objects with exactly the known
// fields, unsigned integers only, page size a power of two (and == expectations.page_size when
// set), sizes and addresses multiples of the page size and non-zero, host ranges not
// overlapping and not wrapping, guest offsets contiguous from 0 in some order (offset is
// cumulative), total == expectations.guest_size when set. Returns regions sorted by offset.
// kHandshakeBadRegions with a message naming the region and the field.
Result<std::vector<GuestRegion>> parse_regions(std::string_view json, const Expectations& expect);

// The JSON payload exactly as Firecracker writes it (both page_size and page_size_kib).
std::string serialize_regions(const std::vector<GuestRegion>& regions);

// A listening Unix stream socket for one sandbox's handshake. Move-only; the destructor closes
// it and removes the socket file.
class Listener {
 public:
  // Creates the socket at `path` with `mode` (0600 by default; the mode is set before anyone
  // can connect). A stale socket file at path is replaced; any other kind of file is refused
  // (kInvalidArgument).
  static Result<Listener> listen(const std::string& path, mode_t mode = 0600);

  Listener(Listener&& other) noexcept;
  Listener& operator=(Listener&& other) noexcept;
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  ~Listener();

  // Waits up to `timeout` in total for a VMM to connect and send its message, receives it and
  // validates it. On any error every received fd is closed and the connection is dropped:
  //   kHandshakeTimeout     nobody connected, or the peer connected and sent nothing in time
  //   kHandshakeProtocol    MSG_TRUNC / MSG_CTRUNC, payload too long, peer closed early, no
  //                         SCM_RIGHTS, 0 fds or more than 2 fds, a second control message
  //   kHandshakeBadFd       fd[0] is not a userfaultfd, or fd[1] is not a memfd
  //   kHandshakeBadRegions  parse_regions() refused the JSON, or memfd_required and no memfd
  Result<Handshake> accept(const Expectations& expect, std::chrono::milliseconds timeout);

  int fd() const { return fd_.get(); }
  const std::string& path() const { return path_; }

 private:
  Listener(io::UniqueFd fd, std::string path) : fd_(std::move(fd)), path_(std::move(path)) {}
  io::UniqueFd fd_;
  std::string path_;
};

// ---- The VMM side (memsnap-guest and tests use it) ----

// Connects to path and sends the handshake: serialize_regions(regions) with [uffd] or
// [uffd, memfd] (memfd < 0: none) in one message. Returns the connected socket, which the caller
// keeps open like Firecracker does.
Result<io::UniqueFd> connect_and_send(const std::string& path,
                                      const std::vector<GuestRegion>& regions, int uffd,
                                      int memfd);

// ---- The memsnap extension ----

struct ResumeReply {
  bool has_memfd = false;
  std::uint64_t size = 0;
  std::uint64_t generation = 0;
  bool arm_writes = false;  // write-protect the new mappings before acking
  io::UniqueFd memfd;       // set when has_memfd
};

// memsnap -> VMM. `memfd` is only borrowed (it is duplicated into the message).
Status send_reply(int connection, bool has_memfd, int memfd, std::uint64_t size,
                  std::uint64_t generation, bool arm_writes = false);
// VMM side: waits up to timeout for the reply.
Result<ResumeReply> receive_reply(int connection, std::chrono::milliseconds timeout);
// VMM -> memsnap, after mapping a handed memfd: {"memsnap_mapped":true}
Status send_mapped_ack(int connection);
Status wait_mapped_ack(int connection, std::chrono::milliseconds timeout);

}  // namespace memsnap::handshake
