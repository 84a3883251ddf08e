// The userfaultfd ioctls FaultServer resolves faults with, behind an interface so that tests can
// make them fail on purpose (EINVAL for a write-protect mode, EEXIST, EAGAIN, ESRCH, EIO, ...).
// Every call returns 0 or the errno of the failed ioctl.
#pragma once

#include <cstdint>
#include <memory>

namespace memsnap {

class UffdOps {
 public:
  virtual ~UffdOps() = default;
  // UFFDIO_COPY of len bytes from src to dst, with UFFDIO_COPY_MODE_WP when wp.
  virtual int copy(std::uint64_t dst, const void* src, std::uint64_t len, bool wp) = 0;
  // UFFDIO_ZEROPAGE over [dst, dst + len).
  virtual int zeropage(std::uint64_t dst, std::uint64_t len) = 0;
  // UFFDIO_CONTINUE over [dst, dst + len), with UFFDIO_CONTINUE_MODE_WP when wp.
  virtual int continue_range(std::uint64_t dst, std::uint64_t len, bool wp) = 0;
  // UFFDIO_WAKE over [dst, dst + len).
  virtual int wake(std::uint64_t dst, std::uint64_t len) = 0;
  // UFFDIO_WRITEPROTECT over [dst, dst + len): protect (wp) or make writable again and wake
  // whoever waits on a write-protect fault there (!wp).
  virtual int write_protect(std::uint64_t dst, std::uint64_t len, bool wp) = 0;
};

// The real ioctls on uffd (borrowed: it must outlive the returned object).
std::unique_ptr<UffdOps> make_uffd_ioctls(int uffd);

}  // namespace memsnap
