#include "core/uffd_ops.h"

#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#include <cerrno>

namespace memsnap {
namespace {

// Newer than Debian 12's kernel headers (Linux 6.4+).
#ifndef UFFDIO_CONTINUE_MODE_WP
constexpr std::uint64_t kContinueModeWp = 1ULL << 1;
#else
constexpr std::uint64_t kContinueModeWp = UFFDIO_CONTINUE_MODE_WP;
#endif

class UffdIoctls final : public UffdOps {
 public:
  explicit UffdIoctls(int uffd) : uffd_(uffd) {}

  int copy(std::uint64_t dst, const void* src, std::uint64_t len, bool wp) override {
    uffdio_copy c{};
    c.dst = dst;
    c.src = reinterpret_cast<std::uint64_t>(src);
    c.len = len;
    c.mode = wp ? UFFDIO_COPY_MODE_WP : 0;
    return call(UFFDIO_COPY, &c);
  }
  int zeropage(std::uint64_t dst, std::uint64_t len) override {
    uffdio_zeropage z{};
    z.range.start = dst;
    z.range.len = len;
    return call(UFFDIO_ZEROPAGE, &z);
  }
  int continue_range(std::uint64_t dst, std::uint64_t len, bool wp) override {
    uffdio_continue c{};
    c.range.start = dst;
    c.range.len = len;
    c.mode = wp ? kContinueModeWp : 0;
    return call(UFFDIO_CONTINUE, &c);
  }
  int wake(std::uint64_t dst, std::uint64_t len) override {
    uffdio_range r{dst, len};
    return call(UFFDIO_WAKE, &r);
  }
  int write_protect(std::uint64_t dst, std::uint64_t len, bool wp) override {
    uffdio_writeprotect w{};
    w.range.start = dst;
    w.range.len = len;
    w.mode = wp ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
    return call(UFFDIO_WRITEPROTECT, &w);
  }

 private:
  int call(unsigned long request, void* arg) const {
    return ::ioctl(uffd_, request, arg) == 0 ? 0 : errno;
  }
  int uffd_;
};

}  // namespace

std::unique_ptr<UffdOps> make_uffd_ioctls(int uffd) { return std::make_unique<UffdIoctls>(uffd); }

}  // namespace memsnap
