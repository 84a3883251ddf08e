// FaultServer and SnapshotChain::flatten() in one process: a real userfaultfd over this test's
// own memory, real snapshot files.
#include "core/fault_server.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "core/dirty_set.h"
#include "core/live_image.h"
#include "core/snapshot/snapshot_writer.h"

namespace memsnap {
namespace {

constexpr std::uint64_t kBlock = 4096;
constexpr std::uint64_t kBlocks = 8;

// Block b of generation g: every byte (b * 16 + g), never zero.
std::vector<std::uint8_t> image_of(std::uint64_t g, const std::vector<bool>& zero) {
  std::vector<std::uint8_t> img(kBlocks * kBlock, 0);
  for (std::uint64_t b = 0; b < kBlocks; ++b) {
    if (!zero[b]) std::memset(&img[b * kBlock], static_cast<int>(b * 16 + g), kBlock);
  }
  return img;
}

SnapshotId write(const std::string& path, std::uint64_t generation, SnapshotId parent,
                 const std::vector<std::uint8_t>& img, std::vector<plugin::ByteRange> dirty) {
  SnapshotParams p;
  p.guest_size = kBlocks * kBlock;
  p.generation = generation;
  p.parent_id = parent;
  p.sync_on_commit = false;
  auto w = SnapshotWriter::create(path, p, dirty);
  EXPECT_TRUE(w.ok()) << w.error().to_string();
  for (const auto& r : dirty) {
    plugin::Chunk c{r.offset, &img[r.offset], r.length};
    EXPECT_TRUE((*w)->write(&c, 1).ok());
  }
  EXPECT_TRUE((*w)->commit().ok());
  auto reader = SnapshotReader::open(path);
  EXPECT_TRUE(reader.ok());
  return (*reader)->header().snapshot_id;
}

class FaultServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/var/tmp/memsnap-fault-server-XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
    // Base: blocks 0-3 data, 4-7 never written (zero). Diff: block 5 written, block 1 written.
    std::vector<bool> zero(kBlocks, false);
    for (std::uint64_t b = 4; b < 8; ++b) zero[b] = true;
    const SnapshotId base = write(dir_ + "/base.snap", 1, {}, image_of(1, zero), {{0, 8 * kBlock}});
    zero.assign(kBlocks, false);
    write(dir_ + "/diff.snap", 2, base, image_of(2, zero),
          {{kBlock, kBlock}, {5 * kBlock, kBlock}});
    auto chain = SnapshotChain::open({dir_ + "/base.snap", dir_ + "/diff.snap"});
    ASSERT_TRUE(chain.ok()) << chain.error().to_string();
    chain_ = std::make_shared<const SnapshotChain>(std::move(*chain));
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // What block b must read as through the chain.
  static int expected_byte(std::uint64_t b) {
    if (b == 1 || b == 5) return static_cast<int>(b * 16 + 2);  // the diff
    if (b < 4) return static_cast<int>(b * 16 + 1);             // the base
    return 0;                                                   // never written
  }

  // A userfaultfd (with UFFD_EVENT_REMOVE) over kBlocks fresh anonymous pages of this process,
  // and the guest region they are (guest offset 0).
  static void register_memory(int* uffd_out, void** mem_out, plugin::Region* region) {
    int uffd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    if (uffd < 0) {
      const int dev = ::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
      ASSERT_GE(dev, 0) << "no userfaultfd on this machine";
      uffd = ::ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
      ::close(dev);
    }
    ASSERT_GE(uffd, 0);
    uffdio_api api{};
    api.api = UFFD_API;
    api.features = UFFD_FEATURE_EVENT_REMOVE;
    ASSERT_EQ(::ioctl(uffd, UFFDIO_API, &api), 0);
    void* mem = ::mmap(nullptr, kBlocks * kBlock, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(mem, MAP_FAILED);
    uffdio_register reg{};
    reg.range.start = reinterpret_cast<std::uint64_t>(mem);
    reg.range.len = kBlocks * kBlock;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    ASSERT_EQ(::ioctl(uffd, UFFDIO_REGISTER, &reg), 0);
    *uffd_out = uffd;
    *mem_out = mem;
    region->guest_offset = 0;
    region->host_addr = reinterpret_cast<std::uint64_t>(mem);
    region->size = kBlocks * kBlock;
  }

  std::string dir_;
  std::shared_ptr<const SnapshotChain> chain_;
};

TEST_F(FaultServerTest, FlattenResolvesEachBlockToTheNewestLayer) {
  // The diff's block 5 lies inside a ZERO run of the base: flattening must split that run.
  const std::vector<ChainExtent> x = chain_->flatten();
  std::vector<int> layer_of(kBlocks, -1);
  std::vector<bool> zero(kBlocks, false);
  std::uint64_t next = 0;
  for (const auto& e : x) {
    ASSERT_EQ(e.first_block, next) << "extents must be sorted and contiguous";
    for (std::uint64_t b = e.first_block; b < e.first_block + e.block_count; ++b) {
      layer_of[b] = static_cast<int>(e.layer);
      zero[b] = e.kind == RunKind::kZero;
    }
    next = e.first_block + e.block_count;
  }
  ASSERT_EQ(next, kBlocks);
  for (std::uint64_t b = 0; b < kBlocks; ++b) {
    SCOPED_TRACE(b);
    EXPECT_EQ(zero[b], expected_byte(b) == 0);
    if (b == 1 || b == 5) {
      EXPECT_EQ(layer_of[b], 1);
    } else if (b < 4) {
      EXPECT_EQ(layer_of[b], 0);
    }
  }
}

TEST_F(FaultServerTest, ServesEveryFaultFromTheChainAndZerosAfterARemove) {
  int uffd = -1;
  void* mem = nullptr;
  plugin::Region region{};
  ASSERT_NO_FATAL_FAILURE(register_memory(&uffd, &mem, &region));
  auto server = FaultServer::start(uffd, {region}, chain_, {});
  ASSERT_TRUE(server.ok()) << server.error().to_string();

  const auto* bytes = static_cast<const volatile std::uint8_t*>(mem);
  for (std::uint64_t b = 0; b < kBlocks; ++b) {
    EXPECT_EQ(bytes[b * kBlock + 7], expected_byte(b)) << "block " << b;
  }
  // The guest gives block 2 back; its next touch must read zeros, not the snapshot's bytes.
  ASSERT_EQ(::madvise(static_cast<char*>(mem) + 2 * kBlock, kBlock, MADV_DONTNEED), 0);
  EXPECT_EQ(bytes[2 * kBlock + 7], 0);

  const FaultStats s = (*server)->stats(/*settle=*/true);
  EXPECT_EQ(s.faults, kBlocks + 1);
  EXPECT_EQ(s.copies, 5u);     // blocks 0-3, and 5 from the diff
  EXPECT_EQ(s.zeropages, 4u);  // 4, 6, 7, and block 2 after its removal
  EXPECT_EQ(s.remove_events, 1u);
  auto discarded = (*server)->discarded(true);
  ASSERT_TRUE(discarded.ok()) << discarded.error().to_string();
  ASSERT_EQ(discarded->size(), 1u);
  EXPECT_EQ((*discarded)[0].offset, 2 * kBlock);
  EXPECT_EQ((*discarded)[0].length, kBlock);
  EXPECT_TRUE((*server)->error().ok());
  (*server)->stop();
  ::munmap(mem, kBlocks * kBlock);
  ::close(uffd);
}

// A resume before durable (issue 19): the memory held for the export overrides the chain where
// the pending snapshot's ranges say, a hole in it is zero there, and without a chain everything
// else is zero.
TEST_F(FaultServerTest, HeldMemoryOverridesTheChainInItsRangesAndItsHolesReadAsZero) {
  io::UniqueFd held(::memfd_create("held", MFD_CLOEXEC));
  ASSERT_GE(held.get(), 0);
  ASSERT_EQ(::ftruncate(held.get(), kBlocks * kBlock), 0);
  const std::vector<std::uint8_t> page(kBlock, 0xee);
  for (std::uint64_t b : {1, 6}) {
    ASSERT_EQ(::pwrite(held.get(), page.data(), kBlock, static_cast<off_t>(b * kBlock)),
              static_cast<ssize_t>(kBlock));
  }
  for (const bool with_chain : {true, false}) {
    SCOPED_TRACE(with_chain ? "over the chain" : "no parent");
    int uffd = -1;
    void* mem = nullptr;
    plugin::Region region{};
    ASSERT_NO_FATAL_FAILURE(register_memory(&uffd, &mem, &region));
    FaultServerOptions options;
    options.overlay.memfd = held.get();
    options.overlay.guest_size = kBlocks * kBlock;
    options.overlay.block_size = kBlock;
    options.overlay.ranges = {{kBlock, 2 * kBlock}, {6 * kBlock, kBlock}};  // blocks 1-2, 6
    auto populated = populated_ranges_of_memfd(held.get(), kBlocks * kBlock, kBlock);
    ASSERT_TRUE(populated.ok());
    options.overlay.populated = *populated;
    auto server = FaultServer::start(uffd, {region}, with_chain ? chain_ : nullptr, options);
    ASSERT_TRUE(server.ok()) << server.error().to_string();
    const auto* bytes = static_cast<const volatile std::uint8_t*>(mem);
    for (std::uint64_t b = 0; b < kBlocks; ++b) {
      const int want = b == 1 || b == 6 ? 0xee : b == 2 ? 0 : with_chain ? expected_byte(b) : 0;
      EXPECT_EQ(bytes[b * kBlock + 7], want) << "block " << b;
    }
    EXPECT_TRUE((*server)->error().ok());
    (*server)->stop();
    ::munmap(mem, kBlocks * kBlock);
    ::close(uffd);
  }
  struct stat st {};
  ASSERT_EQ(::fstat(held.get(), &st), 0);
  EXPECT_EQ(st.st_blocks * 512, 2 * kBlock)
      << "serving the hole allocated a page in the held memory";
}

// Issue 16 (the property test's seed 127): a VMM's discard returns as soon as the serving thread
// has *read* its UFFD_EVENT_REMOVE, not once it has handled it. A pause that froze the VMM right
// after such a discard must still see the range: discarded() waits until the serving thread has
// handled every message it read. Here the thread is held between its read and its handling,
// the way a loaded host may deschedule it.
TEST_F(FaultServerTest, ADiscardThatReturnedIsReportedEvenIfItsEventIsNotHandledYet) {
  int uffd = -1;
  void* mem = nullptr;
  plugin::Region region{};
  ASSERT_NO_FATAL_FAILURE(register_memory(&uffd, &mem, &region));
  FaultServerOptions options;
  std::atomic<bool> hold{false};
  options.after_read_for_testing = [&hold] {
    if (hold.exchange(false)) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  };
  auto server = FaultServer::start(uffd, {region}, chain_, options);
  ASSERT_TRUE(server.ok()) << server.error().to_string();
  const auto* bytes = static_cast<const volatile std::uint8_t*>(mem);
  EXPECT_EQ(bytes[3 * kBlock], expected_byte(3));

  hold = true;
  ASSERT_EQ(::madvise(static_cast<char*>(mem) + 3 * kBlock, kBlock, MADV_DONTNEED), 0);
  auto discarded = (*server)->discarded(true);
  ASSERT_TRUE(discarded.ok()) << discarded.error().to_string();
  ASSERT_EQ(discarded->size(), 1u) << "a discard that had returned was not reported";
  EXPECT_EQ((*discarded)[0].offset, 3 * kBlock);
  EXPECT_EQ((*discarded)[0].length, kBlock);
  (*server)->stop();
  ::munmap(mem, kBlocks * kBlock);
  ::close(uffd);
}

// ---- The serve path against a UffdOps that fails on purpose ----
//
// The server reads fabricated uffd messages from a pipe instead of a userfaultfd, and its
// ioctls go to FakeUffd, which records them and answers what the test's rule says. No page is
// ever installed, so no thread of the test blocks on a fault.

struct Call {
  std::string op;  // "copy", "zeropage", "continue", "wake"
  std::uint64_t block = 0;
  bool wp = false;
  bool zeros = false;  // copy: from a block of zeros (not the snapshot's bytes)
  int result = 0;
  std::uint64_t blocks = 1;  // continue: how many blocks from `block`
  bool operator==(const Call&) const = default;
};

std::ostream& operator<<(std::ostream& os, const Call& c) {
  return os << c.op << "(block " << c.block
            << (c.blocks != 1 ? " x" + std::to_string(c.blocks) : "") << (c.wp ? ", wp" : "")
            << (c.zeros ? ", zeros" : "") << ") -> " << c.result;
}

class FakeUffd final : public UffdOps {
 public:
  FakeUffd(std::uint64_t base, std::function<int(const Call&)> rule)
      : base_(base), rule_(std::move(rule)) {}

  int copy(std::uint64_t dst, const void* src, std::uint64_t, bool wp) override {
    // Every data block of the fixture's chain is nonzero; the zero source reads as zeros.
    return record({"copy", block_of(dst), wp, *static_cast<const std::uint8_t*>(src) == 0, 0});
  }
  int zeropage(std::uint64_t dst, std::uint64_t) override {
    return record({"zeropage", block_of(dst), false, false, 0});
  }
  int continue_range(std::uint64_t dst, std::uint64_t len, bool wp) override {
    return record({"continue", block_of(dst), wp, false, 0, len / kBlock});
  }
  int wake(std::uint64_t dst, std::uint64_t) override {
    return record({"wake", block_of(dst), false, false, 0});
  }
  int write_protect(std::uint64_t dst, std::uint64_t len, bool wp) override {
    return record({"write_protect", block_of(dst), wp, false, 0, len / kBlock});
  }

  // Waits (generously: a loaded host is slow, and nothing here is timed) for n calls.
  bool wait_for_calls(std::size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::minutes(2), [&] { return calls_.size() >= n; });
  }
  std::vector<Call> calls() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }

 private:
  std::uint64_t block_of(std::uint64_t dst) const { return (dst - base_) / kBlock; }
  int record(Call c) {
    c.result = rule_(c);
    {
      std::lock_guard<std::mutex> lock(mu_);
      calls_.push_back(c);
    }
    cv_.notify_all();
    return c.result;
  }

  std::uint64_t base_;
  std::function<int(const Call&)> rule_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Call> calls_;
};

class FaultServePathTest : public FaultServerTest {
 protected:
  static constexpr std::uint64_t kBase = 0x7f0000000000;  // the "guest" region's host address

  void TearDown() override {
    reset();
    FaultServerTest::TearDown();
  }

  // Ends the server and its pipe, so that start() can begin another.
  void reset() {
    if (server_) server_->stop();
    server_.reset();
    fake_.reset();
    for (int& fd : pipe_) {
      if (fd >= 0) ::close(fd);
      fd = -1;
    }
    on_error_calls_ = 0;
  }

  // Starts a server whose ioctls answer rule(call) (0: success, else that errno).
  void start(std::function<int(const Call&)> rule, FaultServerOptions options = {}) {
    ASSERT_EQ(::pipe2(pipe_, O_CLOEXEC), 0);
    fake_ = std::make_shared<FakeUffd>(kBase, std::move(rule));
    options.uffd_ops = fake_;
    options.on_error = [this](const Error&) { ++on_error_calls_; };
    plugin::Region region{};
    region.guest_offset = 0;
    region.host_addr = kBase;
    region.size = kBlocks * kBlock;
    auto s = FaultServer::start(pipe_[0], {region}, chain_, std::move(options));
    ASSERT_TRUE(s.ok()) << s.error().to_string();
    server_ = std::move(*s);
  }

  // A page fault on block b, as the kernel would report it.
  void fault(std::uint64_t b, bool minor = false) {
    uffd_msg m{};
    m.event = UFFD_EVENT_PAGEFAULT;
    m.arg.pagefault.address = kBase + b * kBlock + 123;
    m.arg.pagefault.flags = minor ? UFFD_PAGEFAULT_FLAG_MINOR : 0;
    ASSERT_EQ(::write(pipe_[1], &m, sizeof(m)), static_cast<ssize_t>(sizeof(m)));
  }

  // Waits for n ioctls, then stops the server (it finishes its batch and publishes everything).
  FaultStats finish(std::size_t n) {
    EXPECT_TRUE(fake_->wait_for_calls(n)) << "the server made fewer than " << n << " ioctls";
    server_->stop();
    return server_->stats();
  }

  int pipe_[2] = {-1, -1};
  std::shared_ptr<FakeUffd> fake_;
  std::unique_ptr<FaultServer> server_;
  std::atomic<int> on_error_calls_{0};
};

TEST_F(FaultServePathTest, ACopyRefusedWithWriteProtectIsRetriedWithoutItOnce) {
  FaultServerOptions options;
  options.write_protect = true;
  // A range not registered for WP: every write-protecting copy fails with EINVAL.
  ASSERT_NO_FATAL_FAILURE(start([](const Call& c) { return c.wp ? EINVAL : 0; }, options));
  fault(0);  // data
  fault(2);  // data
  fault(4);  // zero: copied in (write tracking), no longer write-protected
  const FaultStats s = finish(4);
  const std::vector<Call> expected = {{"copy", 0, true, false, EINVAL},
                                      {"copy", 0, false, false, 0},
                                      {"copy", 2, false, false, 0},
                                      {"copy", 4, false, true, 0}};
  EXPECT_EQ(fake_->calls(), expected);
  EXPECT_EQ(s.copy_wp_downgrades, 1u);
  EXPECT_EQ(s.continue_wp_downgrades, 0u);
  EXPECT_EQ(s.zeropage_downgrades, 0u);
  EXPECT_EQ(s.faults, 3u);
  EXPECT_EQ(s.copies, 2u);
  EXPECT_EQ(s.zeropages, 1u);
  EXPECT_TRUE(server_->error().ok());
}

TEST_F(FaultServePathTest, AContinueRefusedWithWriteProtectIsRetriedWithoutItOnce) {
  FaultServerOptions options;
  options.write_protect = true;
  // A kernel without UFFDIO_CONTINUE_MODE_WP; copies may still write-protect.
  ASSERT_NO_FATAL_FAILURE(
      start([](const Call& c) { return c.op == "continue" && c.wp ? EINVAL : 0; }, options));
  fault(0, /*minor=*/true);
  fault(2);  // MISSING: still a write-protected copy
  fault(4, /*minor=*/true);
  const FaultStats s = finish(4);
  const std::vector<Call> expected = {{"continue", 0, true, false, EINVAL},
                                      {"continue", 0, false, false, 0},
                                      {"copy", 2, true, false, 0},
                                      {"continue", 4, false, false, 0}};
  EXPECT_EQ(fake_->calls(), expected);
  EXPECT_EQ(s.continue_wp_downgrades, 1u);
  EXPECT_EQ(s.copy_wp_downgrades, 0u);
  EXPECT_EQ(s.zeropage_downgrades, 0u);
  EXPECT_EQ(s.minor_faults, 2u);
  EXPECT_EQ(s.continues, 2u);
  EXPECT_EQ(s.copies, 1u);
  EXPECT_TRUE(server_->error().ok());
}

// A live pause's begin (ResumeSession::begin_live) hands the server its image, then protects
// the dirty set: from the moment set_live() returns, a page may be made writable only after its
// block was preserved. A write-protect fault whose resolution began before set_live() (it found
// no image) must therefore end before set_live() returns; else its un-protect lands after the
// protection, and the guest's writes to that block go unseen through the export.
TEST_F(FaultServePathTest, SetLiveWaitsForAWriteFaultThatFoundNoImageToBeResolved) {
  std::mutex m;
  std::condition_variable cv;
  bool entered = false;
  std::atomic<bool> set_live_returned{false};
  std::atomic<bool> unprotected_after_set_live{false};
  FaultServerOptions options;
  options.write_faults = true;
  ASSERT_NO_FATAL_FAILURE(start(
      [&](const Call& c) {
        if (c.op != "write_protect" || c.wp) return 0;
        {
          std::lock_guard<std::mutex> lock(m);
          entered = true;
        }
        cv.notify_all();
        // Give set_live() every chance to return while this un-protect is in flight: if it can,
        // it does within this wait (the test thread calls it at once).
        std::unique_lock<std::mutex> lock(m);
        cv.wait_for(lock, std::chrono::seconds(1), [&] { return set_live_returned.load(); });
        if (set_live_returned) unprotected_after_set_live = true;
        return 0;
      },
      options));
  uffd_msg msg{};
  msg.event = UFFD_EVENT_PAGEFAULT;
  msg.arg.pagefault.address = kBase + 3 * kBlock;
  msg.arg.pagefault.flags = UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_WRITE;
  ASSERT_EQ(::write(pipe_[1], &msg, sizeof(msg)), static_cast<ssize_t>(sizeof(msg)));
  {
    std::unique_lock<std::mutex> lock(m);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::minutes(2), [&] { return entered; }));
  }
  const int memfd = ::memfd_create("live-test", MFD_CLOEXEC);
  ASSERT_GE(memfd, 0);
  ASSERT_EQ(::ftruncate(memfd, kBlocks * kBlock), 0);
  auto image = LiveImage::create(memfd, kBlocks * kBlock, kBlock, {{0, kBlocks * kBlock}});
  ::close(memfd);
  ASSERT_TRUE(image.ok()) << image.error().to_string();
  server_->set_live(*image);
  {
    std::lock_guard<std::mutex> lock(m);
    set_live_returned = true;
  }
  cv.notify_all();
  ASSERT_TRUE(fake_->wait_for_calls(1));
  server_->stop();
  EXPECT_FALSE(unprotected_after_set_live)
      << "a page was made writable after set_live() returned, its block not preserved";
  EXPECT_EQ(server_->stats().write_faults, 1u);
}

// A write-protect fault whose un-protect meets EAGAIN is retried after the next read, and counted
// once, when it is resolved.
TEST_F(FaultServePathTest, AWriteFaultRetriedAfterEagainIsCountedOnce) {
  std::atomic<int> unprotects{0};
  FaultServerOptions options;
  options.write_faults = true;
  ASSERT_NO_FATAL_FAILURE(start(
      [&](const Call& c) {
        if (c.op != "write_protect" || c.wp) return 0;
        return unprotects++ == 0 ? EAGAIN : 0;
      },
      options));
  for (std::uint64_t b : {2, 5}) {
    uffd_msg msg{};
    msg.event = UFFD_EVENT_PAGEFAULT;
    msg.arg.pagefault.address = kBase + b * kBlock;
    msg.arg.pagefault.flags = UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_WRITE;
    ASSERT_EQ(::write(pipe_[1], &msg, sizeof(msg)), static_cast<ssize_t>(sizeof(msg)));
  }
  const FaultStats s = finish(3);
  const std::vector<Call> expected = {{"write_protect", 2, false, false, EAGAIN},
                                      {"write_protect", 5, false, false, 0},
                                      {"write_protect", 2, false, false, 0}};
  std::vector<Call> calls = fake_->calls();
  std::sort(calls.begin() + 1, calls.end(),
            [](const Call& a, const Call& b) { return a.block > b.block; });
  EXPECT_EQ(calls, expected);
  EXPECT_EQ(s.write_faults, 2u);
  EXPECT_TRUE(server_->error().ok());
}

TEST_F(FaultServePathTest, AZeroPageRefusedWithEexistSwitchesToCopyingZerosOnce) {
  // Only a write-protect marker in the page table: UFFDIO_ZEROPAGE answers EEXIST.
  ASSERT_NO_FATAL_FAILURE(start([](const Call& c) { return c.op == "zeropage" ? EEXIST : 0; }));
  fault(4);
  fault(6);
  fault(0);  // data: an ordinary copy
  const FaultStats s = finish(4);
  const std::vector<Call> expected = {{"zeropage", 4, false, false, EEXIST},
                                      {"copy", 4, false, true, 0},
                                      {"copy", 6, false, true, 0},
                                      {"copy", 0, false, false, 0}};
  EXPECT_EQ(fake_->calls(), expected);
  EXPECT_EQ(s.zeropage_downgrades, 1u);
  EXPECT_EQ(s.copy_wp_downgrades, 0u);
  EXPECT_EQ(s.zeropages, 2u);
  EXPECT_EQ(s.copies, 1u);
  EXPECT_EQ(s.eexist, 0u) << "the refused zero page is retried, not woken";
  EXPECT_TRUE(server_->error().ok());
}

TEST_F(FaultServePathTest, EexistWakesTheFaultAndTheBlockCountsAsServed) {
  int copies = 0;
  ASSERT_NO_FATAL_FAILURE(
      start([&copies](const Call& c) { return c.op == "copy" && copies++ == 0 ? EEXIST : 0; }));
  fault(0);
  fault(0);  // missing again after being served: zeros, never the snapshot's bytes
  const FaultStats s = finish(3);
  const std::vector<Call> expected = {
      {"copy", 0, false, false, EEXIST}, {"wake", 0, false, false, 0}, {"zeropage", 0}};
  EXPECT_EQ(fake_->calls(), expected);
  EXPECT_EQ(s.eexist, 1u);
  EXPECT_EQ(s.zeropage_downgrades, 0u);
  EXPECT_TRUE(server_->error().ok());
}

TEST_F(FaultServePathTest, EagainIsServedAgain) {
  int copies = 0;
  ASSERT_NO_FATAL_FAILURE(start([&copies](const Call&) { return copies++ == 0 ? EAGAIN : 0; }));
  fault(1);
  const FaultStats s = finish(2);
  const std::vector<Call> expected = {{"copy", 1, false, false, EAGAIN}, {"copy", 1}};
  EXPECT_EQ(fake_->calls(), expected);
  EXPECT_EQ(s.eagain_retries, 1u);
  EXPECT_EQ(s.copies, 1u);
  EXPECT_FALSE(s.vmm_gone);
  EXPECT_TRUE(server_->error().ok());
}

TEST_F(FaultServePathTest, EsrchMeansTheVmmIsGone) {
  ASSERT_NO_FATAL_FAILURE(start([](const Call&) { return ESRCH; }));
  fault(3);
  const FaultStats s = finish(1);
  EXPECT_TRUE(s.vmm_gone);
  EXPECT_EQ(s.copies, 0u);
  EXPECT_TRUE(server_->error().ok()) << "a VMM that went away is not an error";
  EXPECT_EQ(on_error_calls_.load(), 0);
}

TEST_F(FaultServePathTest, AnyOtherErrnoStopsServingWithTheIoctlAndGuestOffset) {
  struct Case {
    std::uint64_t block;
    bool minor;
    int err;
    std::string message;
  };
  const Case cases[] = {
      {2, false, EIO, "UFFDIO_COPY at guest offset 8192: "},
      {6, false, ENOMEM, "UFFDIO_ZEROPAGE at guest offset 24576: "},
      {3, true, EFAULT, "UFFDIO_CONTINUE at guest offset 12288: "},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.message);
    reset();  // the previous case's server
    const int err = c.err;
    ASSERT_NO_FATAL_FAILURE(start([err](const Call&) { return err; }));
    fault(c.block, c.minor);
    const FaultStats s = finish(1);
    const Status st = server_->error();
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().code, Errc::kResumeFailed);
    EXPECT_EQ(st.error().sys_errno, c.err);
    EXPECT_EQ(st.error().message, c.message + std::strerror(c.err));
    EXPECT_EQ(on_error_calls_.load(), 1);
    EXPECT_FALSE(s.vmm_gone);
  }
}

// map_filled: the fill maps each run it wrote into the VMM with one UFFDIO_CONTINUE; a run the
// kernel refuses because a page of it is mapped already goes page by page, and that page is
// left as it is.
TEST_F(FaultServePathTest, TheFillMapsWhatItWroteAndGoesPageByPageWhereAFaultWasFirst) {
  io::UniqueFd memfd(::memfd_create("fill", MFD_CLOEXEC));
  ASSERT_GE(memfd.get(), 0);
  ASSERT_EQ(::ftruncate(memfd.get(), kBlocks * kBlock), 0);
  FaultServerOptions options;
  options.fill_memfd = memfd.get();
  options.map_filled = true;
  options.fill_chunk_bytes = kBlocks * kBlock;
  ASSERT_NO_FATAL_FAILURE(start(
      [](const Call& c) {
        return c.op == "continue" && (c.blocks > 1 || c.block == 2) ? EEXIST : 0;
      },
      options));
  ASSERT_TRUE(server_->wait_filled(std::chrono::minutes(2)).ok());
  const FaultStats s = finish(6);
  // The chain's data runs, as the fill writes them: 0, 1 (the diff), 2-3, 5 (the diff).
  const std::vector<Call> expected = {
      {"continue", 0, false, false, 0},         {"continue", 1, false, false, 0},
      {"continue", 2, false, false, EEXIST, 2}, {"continue", 2, false, false, EEXIST},
      {"continue", 3, false, false, 0},         {"continue", 5, false, false, 0}};
  EXPECT_EQ(fake_->calls(), expected);
  EXPECT_EQ(s.filled_bytes, 5 * kBlock);
  EXPECT_EQ(s.mapped_ahead_bytes, 4 * kBlock);
  EXPECT_TRUE(server_->error().ok());
}

}  // namespace
}  // namespace memsnap
