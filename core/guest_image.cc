#include "core/guest_image.h"

#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "core/base/file_io.h"

namespace memsnap {
namespace {

constexpr std::size_t kChunk = 4 * 1024 * 1024;

// Moves guest bytes [offset, offset+length) between buf and the VMM's address space, region by
// region; a partial transfer continues where it stopped.
Status access_process(const GuestMemoryAccess& m, std::uint64_t offset, std::uint64_t length,
                      std::uint8_t* buf, bool write) {
  while (length > 0) {
    const auto it = std::find_if(m.regions.begin(), m.regions.end(), [&](const plugin::Region& r) {
      return offset >= r.guest_offset && offset < r.guest_offset + r.size;
    });
    if (it == m.regions.end()) {
      return make_error(Errc::kBadAddress, "guest offset " + std::to_string(offset) +
                                               " is in no region of process " +
                                               std::to_string(m.pid));
    }
    const std::uint64_t n = std::min(length, it->guest_offset + it->size - offset);
    iovec local{buf, n};
    iovec remote{reinterpret_cast<void*>(it->host_addr + (offset - it->guest_offset)), n};
    const ssize_t done = write ? ::process_vm_writev(m.pid, &local, 1, &remote, 1, 0)
                               : ::process_vm_readv(m.pid, &local, 1, &remote, 1, 0);
    if (done < 0) {
      const int err = errno;
      if (err == EINTR || err == EAGAIN) continue;
      const Errc code = err == ESRCH    ? Errc::kProcessGone
                        : err == EFAULT ? Errc::kBadAddress
                                        : Errc::kIoError;
      return make_error(code,
                        std::string(write ? "process_vm_writev" : "process_vm_readv") + " pid " +
                            std::to_string(m.pid) + ": " + std::strerror(err),
                        err);
    }
    if (done == 0) {
      return make_error(Errc::kBadAddress, "process " + std::to_string(m.pid) +
                                               " moved no byte at guest offset " +
                                               std::to_string(offset));
    }
    offset += static_cast<std::uint64_t>(done);
    length -= static_cast<std::uint64_t>(done);
    buf += done;
  }
  return {};
}

Status read_guest(const GuestMemoryAccess& m, std::uint64_t offset, std::uint64_t length,
                  std::uint8_t* buf) {
  if (m.memfd >= 0) return io::pread_exact(m.memfd, buf, length, offset, "guest memfd");
  return access_process(m, offset, length, buf, false);
}

Status write_guest(const GuestMemoryAccess& m, std::uint64_t offset, std::uint64_t length,
                   const std::uint8_t* buf) {
  if (m.memfd >= 0) return io::pwrite_all(m.memfd, buf, length, offset, "guest memfd");
  return access_process(m, offset, length, const_cast<std::uint8_t*>(buf), true);
}

Status check_sizes(const SnapshotChain& chain, const GuestMemoryAccess& m) {
  if (m.guest_size != chain.guest_size()) {
    return make_error(Errc::kInvalidArgument, "the VMM has " + std::to_string(m.guest_size) +
                                                  " bytes of guest memory, the snapshot " +
                                                  std::to_string(chain.guest_size()));
  }
  if (m.memfd < 0 && m.pid <= 0) {
    return make_error(Errc::kInvalidArgument, "no memfd and no pid to reach guest memory");
  }
  return {};
}

}  // namespace

Result<std::uint64_t> fill_memfd(const SnapshotChain& chain, int memfd) {
  std::vector<std::uint8_t> buffer(kChunk);
  std::uint64_t copied = 0;
  const std::uint64_t bs = chain.block_size();
  for (const ChainExtent& x : chain.flatten()) {
    if (x.kind != RunKind::kData) continue;
    const SnapshotReader& layer = chain.layer(x.layer);
    for (std::uint64_t done = 0; done < x.block_count * bs;) {
      const std::uint64_t n = std::min<std::uint64_t>(buffer.size(), x.block_count * bs - done);
      if (Status s =
              io::pread_exact(layer.fd(), buffer.data(), n, x.file_offset + done, layer.path());
          !s.ok()) {
        return s.error();
      }
      if (Status s = io::pwrite_all(memfd, buffer.data(), n, x.first_block * bs + done, "memfd");
          !s.ok()) {
        return s.error();
      }
      done += n;
      copied += n;
    }
  }
  return copied;
}

Result<std::uint64_t> write_guest_image(const SnapshotChain& chain,
                                        const GuestMemoryAccess& memory) {
  if (Status s = check_sizes(chain, memory); !s.ok()) return s.error();
  std::vector<std::uint8_t> buffer(kChunk);
  std::uint64_t written = 0;
  const std::uint64_t bs = chain.block_size();
  for (const ChainExtent& x : chain.flatten()) {
    const std::uint64_t begin = x.first_block * bs;
    const std::uint64_t end = begin + x.block_count * bs;
    if (x.kind == RunKind::kZero) std::memset(buffer.data(), 0, buffer.size());
    for (std::uint64_t at = begin; at < end;) {
      const std::uint64_t n = std::min<std::uint64_t>(buffer.size(), end - at);
      if (x.kind == RunKind::kData) {
        const SnapshotReader& layer = chain.layer(x.layer);
        if (Status s = io::pread_exact(layer.fd(), buffer.data(), n, x.file_offset + (at - begin),
                                       layer.path());
            !s.ok()) {
          return s.error();
        }
      }
      if (Status s = write_guest(memory, at, n, buffer.data()); !s.ok()) return s.error();
      at += n;
      written += n;
    }
  }
  return written;
}

Result<std::vector<plugin::ByteRange>> changed_ranges(const SnapshotChain& chain,
                                                      const GuestMemoryAccess& memory) {
  if (Status s = check_sizes(chain, memory); !s.ok()) return s.error();
  std::vector<std::uint8_t> guest(kChunk);
  std::vector<std::uint8_t> image(kChunk);
  const std::uint64_t bs = chain.block_size();
  std::vector<plugin::ByteRange> out;
  for (std::uint64_t at = 0; at < chain.guest_size();) {
    const std::uint64_t n = std::min<std::uint64_t>(kChunk, chain.guest_size() - at);
    if (Status s = read_guest(memory, at, n, guest.data()); !s.ok()) return s.error();
    if (Status s = chain.read(at, n, image.data()); !s.ok()) return s.error();
    for (std::uint64_t b = 0; b < n; b += bs) {
      if (std::memcmp(guest.data() + b, image.data() + b, bs) == 0) continue;
      if (!out.empty() && out.back().offset + out.back().length == at + b) {
        out.back().length += bs;
      } else {
        out.push_back({at + b, bs});
      }
    }
    at += n;
  }
  return out;
}

}  // namespace memsnap
