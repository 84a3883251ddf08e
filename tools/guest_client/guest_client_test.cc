// memsnap-guest resumed like Firecracker with the UFFD memory backend, driven by GuestProcess:
// the test accepts the handshake itself and serves the guest's faults with a minimal handler
// (UFFDIO_COPY of the pattern page each page should hold). The real handler is core/resume.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/handshake/handshake.h"
#include "core/pattern/pattern.h"
#include "tools/guest_client/guest_client.h"

// PAGEMAP_SCAN (Linux 6.7) is newer than the build's kernel headers.
#ifndef PAGEMAP_SCAN
struct page_region {
  __u64 start;
  __u64 end;
  __u64 categories;
};
struct pm_scan_arg {
  __u64 size;
  __u64 flags;
  __u64 start;
  __u64 end;
  __u64 walk_end;
  __u64 vec;
  __u64 vec_len;
  __u64 max_pages;
  __u64 category_inverted;
  __u64 category_mask;
  __u64 category_anyof_mask;
  __u64 return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WRITTEN (1 << 1)
#endif

namespace memsnap {
namespace {

using namespace std::chrono_literals;
constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kGuest = 8ULL << 20;
constexpr std::uint64_t kPages = kGuest / kPage;
constexpr std::uint64_t kSeed = 77;

// Generation 0..3, a fifth of the pages never written: what a snapshot chain would hold.
std::vector<std::uint32_t> expected_table() {
  std::vector<std::uint32_t> e(kPages);
  for (std::uint64_t p = 0; p < kPages; ++p) {
    e[p] = p % 5 == 0 ? 0 : static_cast<std::uint32_t>(1 + p % 3);
  }
  return e;
}

std::set<std::uint64_t> pages_of(const std::vector<plugin::ByteRange>& ranges) {
  std::set<std::uint64_t> out;
  for (const auto& r : ranges) {
    for (std::uint64_t off = r.offset; off < r.offset + r.length; off += kPage) {
      out.insert(off / kPage);
    }
  }
  return out;
}

// Serves one guest's userfaultfd on a thread: MISSING faults get the pattern page of the
// generation the page should hold (UFFDIO_COPY); UFFD_EVENT_REMOVE makes the removed pages
// zero. `wrong_page`, when set, is served one generation off on purpose.
class MiniHandler {
 public:
  MiniHandler(int uffd, std::vector<handshake::GuestRegion> regions,
              std::vector<std::uint32_t> generations,
              std::optional<std::uint64_t> wrong_page = std::nullopt)
      : uffd_(uffd),
        regions_(std::move(regions)),
        gens_(std::move(generations)),
        wrong_page_(wrong_page),
        stop_(eventfd(0, EFD_CLOEXEC)) {
    thread_ = std::thread([this] { run(); });
  }
  ~MiniHandler() {
    const std::uint64_t one = 1;
    (void)!write(stop_, &one, sizeof(one));
    thread_.join();
    close(stop_);
  }
  MiniHandler(const MiniHandler&) = delete;
  MiniHandler& operator=(const MiniHandler&) = delete;

  std::uint64_t faults() const { return faults_.load(); }
  std::uint64_t removes() const { return removes_.load(); }
  // The kernel lets the guest's madvise return once the handler has *read* the REMOVE event,
  // which can be before this thread counted it: wait for the count (up to 10 s).
  std::uint64_t wait_for_removes(std::uint64_t at_least) const {
    for (int i = 0; i < 10000 && removes_.load() < at_least; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return removes_.load();
  }
  std::uint64_t errors() const { return errors_.load(); }

 private:
  std::optional<std::uint64_t> page_of(std::uint64_t addr) const {
    for (const auto& r : regions_) {
      if (addr >= r.base_host_virt_addr && addr < r.base_host_virt_addr + r.size) {
        return (addr - r.base_host_virt_addr + r.offset) / kPage;
      }
    }
    return std::nullopt;
  }

  void serve(const uffd_msg& msg, char* buf) {
    const std::uint64_t addr = msg.arg.pagefault.address & ~(kPage - 1);
    const auto page = page_of(addr);
    if (!page || (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0) {
      ++errors_;  // nothing here should raise a minor fault or fault outside guest memory
      return;
    }
    std::uint64_t gen = gens_[*page];
    if (wrong_page_ == page) ++gen;
    if (gen == 0) {
      std::memset(buf, 0, kPage);
    } else {
      pattern::fill_page(buf, kPage, kSeed, *page, gen);
    }
    uffdio_copy copy{};
    copy.dst = addr;
    copy.src = reinterpret_cast<std::uint64_t>(buf);
    copy.len = kPage;
    ++faults_;  // before the copy wakes the guest, so its next answer sees the count
    if (ioctl(uffd_, UFFDIO_COPY, &copy) != 0 && errno != EEXIST) ++errors_;
  }

  void run() {
    alignas(4096) char buf[kPage];
    pollfd fds[2] = {{uffd_, POLLIN, 0}, {stop_, POLLIN, 0}};
    for (;;) {
      if (poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        ++errors_;
        return;
      }
      if ((fds[1].revents & POLLIN) != 0) return;
      uffd_msg msg;
      const ssize_t n = read(uffd_, &msg, sizeof(msg));
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (n != static_cast<ssize_t>(sizeof(msg))) {
        ++errors_;
        return;
      }
      if (msg.event == UFFD_EVENT_PAGEFAULT) {
        serve(msg, buf);
      } else if (msg.event == UFFD_EVENT_REMOVE) {
        for (std::uint64_t a = msg.arg.remove.start; a < msg.arg.remove.end; a += kPage) {
          if (const auto page = page_of(a)) gens_[*page] = 0;
        }
        ++removes_;
      } else {
        ++errors_;
      }
    }
  }

  int uffd_;
  std::vector<handshake::GuestRegion> regions_;
  std::vector<std::uint32_t> gens_;  // only the handler thread touches it once started
  std::optional<std::uint64_t> wrong_page_;
  int stop_;
  std::atomic<std::uint64_t> faults_{0}, removes_{0}, errors_{0};
  std::thread thread_;
};

// Write-protects all of guest memory through the guest's userfaultfd (the arming memsnap does
// after a resume).
void arm_write_tracking(int uffd, const std::vector<handshake::GuestRegion>& regions) {
  for (const auto& r : regions) {
    uffdio_writeprotect wp{};
    wp.range.start = r.base_host_virt_addr;
    wp.range.len = r.size;
    wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
    ASSERT_EQ(ioctl(uffd, UFFDIO_WRITEPROTECT, &wp), 0) << std::strerror(errno);
  }
}

// Pages written since arming, from the guest's /proc/PID/pagemap (PAGEMAP_SCAN; it refuses a
// range that is not registered for asynchronous write-protect, so this also proves WP_ASYNC).
std::set<std::uint64_t> written_pages(pid_t pid,
                                      const std::vector<handshake::GuestRegion>& regions) {
  std::set<std::uint64_t> out;
  const int pm = open(("/proc/" + std::to_string(pid) + "/pagemap").c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(pm, 0);
  if (pm < 0) return out;
  std::vector<page_region> vec(256);
  for (const auto& r : regions) {
    std::uint64_t cur = r.base_host_virt_addr;
    const std::uint64_t end = r.base_host_virt_addr + r.size;
    while (cur < end) {
      pm_scan_arg arg{};
      arg.size = sizeof(arg);
      arg.flags = PM_SCAN_CHECK_WPASYNC;
      arg.start = cur;
      arg.end = end;
      arg.vec = reinterpret_cast<std::uint64_t>(vec.data());
      arg.vec_len = vec.size();
      arg.category_mask = PAGE_IS_WRITTEN;
      arg.return_mask = PAGE_IS_WRITTEN;
      const long n = ioctl(pm, PAGEMAP_SCAN, &arg);
      EXPECT_GE(n, 0) << "PAGEMAP_SCAN: " << std::strerror(errno);
      if (n < 0) break;
      for (long i = 0; i < n; ++i) {
        for (std::uint64_t a = vec[i].start; a < vec[i].end; a += kPage) {
          out.insert((a - r.base_host_virt_addr + r.offset) / kPage);
        }
      }
      // Complete when fewer regions than fit came back (walk_end is stale otherwise).
      if (static_cast<std::uint64_t>(n) < vec.size()) break;
      cur = vec[n - 1].end;
    }
  }
  close(pm);
  return out;
}

bool userfaultfd_available() {
  const int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev < 0) return false;
  close(dev);
  return true;
}

class GuestResumeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!userfaultfd_available()) GTEST_SKIP() << "/dev/userfaultfd is not accessible";
    char templ[] = "/tmp/memsnap-gct-XXXXXX";
    ASSERT_NE(mkdtemp(templ), nullptr);
    dir_ = templ;
    auto l = handshake::Listener::listen(dir_ + "/uffd.sock");
    ASSERT_TRUE(l.ok()) << l.error().to_string();
    listener_.emplace(std::move(*l));
  }
  void TearDown() override {
    listener_.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  GuestOptions resumed(const std::string& backing, int regions) const {
    GuestOptions o;
    o.size = kGuest;
    o.backing = backing;
    o.regions = regions;
    o.seed = kSeed;
    o.handshake_socket = listener_->path();
    o.no_fill = true;
    o.expect = expected_table();
    return o;
  }

  // Spawns the guest and accepts its handshake, checking what it described.
  std::unique_ptr<GuestProcess> spawn_and_accept(const GuestOptions& o, handshake::Handshake* hs) {
    auto g = GuestProcess::spawn(o);
    EXPECT_TRUE(g.ok()) << g.error().to_string();
    if (!g.ok()) return nullptr;
    handshake::Expectations ex;
    ex.page_size = kPage;
    ex.guest_size = kGuest;
    auto h = listener_->accept(ex, 10s);
    EXPECT_TRUE(h.ok()) << h.error().to_string();
    if (!h.ok()) return nullptr;
    *hs = std::move(*h);
    EXPECT_EQ(hs->vmm_pid, (*g)->pid());
    EXPECT_EQ(hs->memfd.get() >= 0, o.backing == "memfd");
    EXPECT_EQ(hs->regions.size(), (*g)->regions().size());
    for (std::size_t i = 0; i < std::min(hs->regions.size(), (*g)->regions().size()); ++i) {
      EXPECT_EQ(hs->regions[i].base_host_virt_addr, (*g)->regions()[i].host_addr);
      EXPECT_EQ(hs->regions[i].offset, (*g)->regions()[i].guest_offset);
      EXPECT_EQ(hs->regions[i].size, (*g)->regions()[i].size);
      EXPECT_EQ(hs->regions[i].page_size, kPage);
    }
    EXPECT_TRUE((*g)->uffd());
    EXPECT_EQ((*g)->expected_generations(), o.expect);
    return std::move(*g);
  }

  std::string dir_;
  std::optional<handshake::Listener> listener_;
};

struct Shape {
  std::string backing;
  int regions;
  bool thp;
};

void PrintTo(const Shape& s, std::ostream* os) {
  *os << s.backing << " x" << s.regions << (s.thp ? " thp" : "");
}

class GuestResumeShapeTest : public GuestResumeTest, public ::testing::WithParamInterface<Shape> {};

// Every page is served lazily, writes are tracked, and discarded pages come back as zeros.
TEST_P(GuestResumeShapeTest, ServedLazilyVerifiesTracksWritesAndDiscards) {
  auto o = resumed(GetParam().backing, GetParam().regions);
  o.thp = GetParam().thp;
  handshake::Handshake hs;
  auto guest = spawn_and_accept(o, &hs);
  ASSERT_NE(guest, nullptr);
  MiniHandler handler(hs.uffd.get(), hs.regions, o.expect);
  ASSERT_TRUE(guest->wait_ready(10s).ok());
  EXPECT_TRUE(guest->wp_async()) << "the kernel refused UFFD_FEATURE_WP_ASYNC";
  EXPECT_FALSE(guest->memfd_from_memsnap());

  auto bad = guest->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0U);
  EXPECT_EQ(handler.faults(), kPages);  // one MISSING fault per page, the first touch
  EXPECT_EQ(handler.errors(), 0U);

  if (guest->wp_async()) {
    arm_write_tracking(hs.uffd.get(), hs.regions);
    auto dirty = guest->dirty(0.03, false, 5);
    ASSERT_TRUE(dirty.ok()) << dirty.error().to_string();
    EXPECT_EQ(written_pages(guest->pid(), hs.regions), pages_of(*dirty));
  }

  // Across a region boundary when there are several (the first region is the largest).
  const auto r = static_cast<std::uint64_t>(o.regions);
  const std::uint64_t boundary = r > 1 ? kPages / r + (kPages % r != 0 ? 1 : 0) : kPages / 2;
  const std::uint64_t first = boundary - 6;
  auto discarded = guest->discard(first, 12);
  ASSERT_TRUE(discarded.ok()) << discarded.error().to_string();
  EXPECT_EQ(*discarded, 12U);
  EXPECT_GE(handler.wait_for_removes(1), 1U);
  for (std::uint64_t p = first; p < first + 12; ++p)
    EXPECT_EQ(guest->expected_generations()[p], 0U);
  const std::uint64_t before = handler.faults();
  bad = guest->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0U);
  EXPECT_EQ(handler.faults() - before, 12U);  // the discarded pages fault again
  EXPECT_EQ(handler.errors(), 0U);
  guest.reset();
}

INSTANTIATE_TEST_SUITE_P(Shapes, GuestResumeShapeTest,
                         ::testing::Values(Shape{"anon", 1, false}, Shape{"memfd", 1, false},
                                           Shape{"anon", 3, false}, Shape{"memfd", 3, false},
                                           Shape{"anon", 1, true}),
                         [](const ::testing::TestParamInfo<Shape>& p) {
                           return p.param.backing + "_" + std::to_string(p.param.regions) +
                                  (p.param.thp ? "_thp" : "");
                         });

class GuestResumeBackingTest : public GuestResumeTest,
                               public ::testing::WithParamInterface<std::string> {};

// The check can fail: one page served with the wrong generation is exactly one mismatch.
TEST_P(GuestResumeBackingTest, WrongPageIsExactlyOneMismatch) {
  const auto o = resumed(GetParam(), 1);
  handshake::Handshake hs;
  auto guest = spawn_and_accept(o, &hs);
  ASSERT_NE(guest, nullptr);
  MiniHandler handler(hs.uffd.get(), hs.regions, o.expect, /*wrong_page=*/1234);
  ASSERT_TRUE(guest->wait_ready(10s).ok());
  auto bad = guest->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 1U);
  auto j = guest->command("verify");
  ASSERT_TRUE(j.ok());
  EXPECT_EQ((*j)["first_mismatches"][0]["page"], 1234);
  guest.reset();
}

// memsnap hands guest memory over as a memfd: the guest maps it at the same addresses, keeps
// write tracking on it, and needs no fault served.
TEST_P(GuestResumeBackingTest, AcceptsMemfdFromMemsnap) {
  auto o = resumed(GetParam(), 2);
  o.accept_memfd = true;
  handshake::Handshake hs;
  auto guest = spawn_and_accept(o, &hs);
  ASSERT_NE(guest, nullptr);

  const int memfd = memfd_create("memsnap-test-resume", MFD_CLOEXEC);
  ASSERT_GE(memfd, 0);
  ASSERT_EQ(ftruncate(memfd, kGuest), 0);
  auto* mem =
      static_cast<char*>(mmap(nullptr, kGuest, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0));
  ASSERT_NE(mem, MAP_FAILED);
  for (std::uint64_t p = 0; p < kPages; ++p) {
    if (o.expect[p] != 0) pattern::fill_page(mem + p * kPage, kPage, kSeed, p, o.expect[p]);
  }
  ASSERT_TRUE(handshake::send_reply(hs.connection.get(), true, memfd, kGuest, 3).ok());
  const auto ack = handshake::wait_mapped_ack(hs.connection.get(), 10s);
  ASSERT_TRUE(ack.ok()) << ack.error().to_string();
  MiniHandler handler(hs.uffd.get(), hs.regions, o.expect);  // for UFFD_EVENT_REMOVE
  ASSERT_TRUE(guest->wait_ready(10s).ok());
  EXPECT_TRUE(guest->memfd_from_memsnap());
  EXPECT_TRUE(guest->wp_async());
  ASSERT_GE(guest->memfd_number(), 0);
  std::error_code ec;
  const auto link = std::filesystem::read_symlink(
      "/proc/" + std::to_string(guest->pid()) + "/fd/" + std::to_string(guest->memfd_number()), ec);
  EXPECT_NE(link.string().find("memsnap-test-resume"), std::string::npos) << link;

  auto bad = guest->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0U);

  if (guest->wp_async()) {
    arm_write_tracking(hs.uffd.get(), hs.regions);
    auto dirty = guest->dirty(0.02, false, 9);
    ASSERT_TRUE(dirty.ok()) << dirty.error().to_string();
    EXPECT_EQ(written_pages(guest->pid(), hs.regions), pages_of(*dirty));
  }
  auto discarded = guest->discard(kPages / 2 - 2, 4);  // across the region boundary
  ASSERT_TRUE(discarded.ok()) << discarded.error().to_string();
  bad = guest->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0U);
  EXPECT_EQ(handler.faults(), 0U);
  EXPECT_GE(handler.wait_for_removes(1), 1U);
  EXPECT_EQ(handler.errors(), 0U);

  // The guest's memory is our memfd: its writes and its discards show here.
  std::uint64_t differ = 0;
  for (std::uint64_t p = 0; p < kPages; ++p) {
    if (!pattern::check_page(mem + p * kPage, kPage, kSeed, p, guest->expected_generations()[p])
             .ok) {
      ++differ;
    }
  }
  EXPECT_EQ(differ, 0U);
  guest.reset();
  munmap(mem, kGuest);
  close(memfd);
}

INSTANTIATE_TEST_SUITE_P(Backings, GuestResumeBackingTest, ::testing::Values("anon", "memfd"));

// A reply without a memfd: the guest goes on with its own memory, served lazily. Until the reply
// comes, it is not ready, and the ping that timed out is not mistaken for a later answer.
TEST_F(GuestResumeTest, ReplyWithoutMemfdAndNotReadyBeforeIt) {
  auto o = resumed("memfd", 1);
  o.accept_memfd = true;
  handshake::Handshake hs;
  auto guest = spawn_and_accept(o, &hs);
  ASSERT_NE(guest, nullptr);
  const auto early = guest->wait_ready(300ms);
  ASSERT_FALSE(early.ok());
  EXPECT_EQ(early.error().code, Errc::kHandshakeTimeout);
  EXPECT_FALSE(guest->ready());
  ASSERT_TRUE(handshake::send_reply(hs.connection.get(), false, -1, 0, 0).ok());
  MiniHandler handler(hs.uffd.get(), hs.regions, o.expect);
  ASSERT_TRUE(guest->wait_ready(10s).ok());
  EXPECT_TRUE(guest->ready());
  EXPECT_FALSE(guest->memfd_from_memsnap());
  auto bad = guest->verify();
  ASSERT_TRUE(bad.ok()) << bad.error().to_string();
  EXPECT_EQ(*bad, 0U);
  EXPECT_EQ(handler.faults(), kPages);
  guest.reset();
}

TEST_F(GuestResumeTest, NoTrackWritesRegistersWithoutWriteProtect) {
  auto o = resumed("anon", 1);
  o.track_writes = false;
  handshake::Handshake hs;
  auto guest = spawn_and_accept(o, &hs);
  ASSERT_NE(guest, nullptr);
  EXPECT_FALSE(guest->wp_async());
  MiniHandler handler(hs.uffd.get(), hs.regions, o.expect);
  ASSERT_TRUE(guest->wait_ready(10s).ok());
  EXPECT_FALSE(guest->wp_async());
  auto bad = guest->verify();
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(*bad, 0U);
  guest.reset();
}

TEST(GuestClientTest, ExpectNeedsNoFillAndOneEntryPerPage) {
  GuestOptions o;
  o.size = kGuest;
  o.expect = expected_table();
  auto g = GuestProcess::spawn(o);
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.error().code, Errc::kInvalidArgument);
  o.no_fill = true;
  o.expect.pop_back();
  g = GuestProcess::spawn(o);
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.error().code, Errc::kInvalidArgument);
}

// Without a handshake: a filled guest is ready at once; a --no-fill one holds what --expect says
// only where that is zero, and discard works on plain memory too.
TEST(GuestClientTest, PlainGuestReadyDiscardAndNoFill) {
  GuestOptions o;
  o.size = kGuest;
  o.seed = kSeed;
  o.zero_fraction = 0.1;
  auto g = GuestProcess::spawn(o);
  ASSERT_TRUE(g.ok()) << g.error().to_string();
  EXPECT_TRUE((*g)->ready());
  EXPECT_FALSE((*g)->uffd());
  ASSERT_TRUE((*g)->wait_ready(10s).ok());
  EXPECT_FALSE((*g)->wp_async());
  auto d = (*g)->discard(10, 5);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(*d, 5U);
  auto bad = (*g)->verify();
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(*bad, 0U);
  EXPECT_FALSE((*g)->discard(kPages - 1, 2).ok());

  GuestOptions n;
  n.size = kGuest;
  n.backing = "anon";
  n.seed = kSeed;
  n.no_fill = true;
  n.expect = expected_table();
  auto h = GuestProcess::spawn(n);
  ASSERT_TRUE(h.ok()) << h.error().to_string();
  auto layout_generation = (*h)->command("ping");
  ASSERT_TRUE(layout_generation.ok());
  EXPECT_EQ((*layout_generation)["generation"], 3);
  bad = (*h)->verify();
  ASSERT_TRUE(bad.ok());
  const auto table = expected_table();
  EXPECT_EQ(*bad, static_cast<std::uint64_t>(std::count_if(
                      table.begin(), table.end(), [](std::uint32_t gen) { return gen != 0; })));
  auto dirty = (*h)->dirty(1.0, true, 1);
  ASSERT_TRUE(dirty.ok());
  EXPECT_EQ((*h)->expected_generations()[0], 4U);  // the counter continues from max(expect)
  bad = (*h)->verify();
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(*bad, 0U);
}

}  // namespace
}  // namespace memsnap
