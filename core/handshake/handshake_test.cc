// The server end of the UFFD handshake against real sockets, a real userfaultfd and a real memfd,
// with well-formed and hostile clients. Every test checks that the process holds exactly the
// fds it held before (see HandshakeTest::TearDown).
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/handshake/handshake.h"

namespace memsnap::handshake {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kBaseA = 0x7f0000000000;
constexpr std::uint64_t kBaseB = 0x7f1000000000;
constexpr milliseconds kPatience{5000};  // for clients that have already sent everything

std::size_t count_open_fds() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

io::UniqueFd make_uffd() {
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd < 0) {
    // Fall back to /dev/userfaultfd (the syscall may be restricted).
    io::UniqueFd dev(::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
    if (dev.get() >= 0) fd = ::ioctl(dev.get(), USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
  }
  return io::UniqueFd(fd);
}

io::UniqueFd make_memfd(std::uint64_t size) {
  io::UniqueFd fd(::memfd_create("memsnap-test-guest", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (fd.get() >= 0 && ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) fd.reset();
  return fd;
}

bool same_file(int a, int b) {
  struct stat sa {};
  struct stat sb {};
  return ::fstat(a, &sa) == 0 && ::fstat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

std::string region_json(std::uint64_t base, std::uint64_t size, std::uint64_t offset,
                        std::uint64_t page = kPage) {
  return "{\"base_host_virt_addr\":" + std::to_string(base) + ",\"size\":" + std::to_string(size) +
         ",\"offset\":" + std::to_string(offset) + ",\"page_size\":" + std::to_string(page) +
         ",\"page_size_kib\":" + std::to_string(page) + "}";
}

std::string array_of(const std::vector<std::string>& items) {
  std::string s = "[";
  for (std::size_t i = 0; i < items.size(); ++i) s += (i ? "," : "") + items[i];
  return s + "]";
}

// Two regions given in reverse guest order: 8 KiB at offset 8 KiB, then 8 KiB at offset 0.
std::string two_regions() {
  return array_of({region_json(kBaseB, 2 * kPage, 2 * kPage), region_json(kBaseA, 2 * kPage, 0)});
}

// A raw VMM end, so that the tests can also send what no well-behaved VMM would.
io::UniqueFd raw_connect(const std::string& path, bool nonblocking = false) {
  io::UniqueFd fd(
      ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  if (fd.get() < 0 ||
      ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    return io::UniqueFd();
  }
  return fd;
}

// One sendmsg of payload with fds (none: no control message at all). Returns bytes sent.
ssize_t raw_send(int sock, const std::string& payload, const std::vector<int>& fds) {
  iovec iov{const_cast<char*>(payload.data()), payload.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<std::uint64_t> control((CMSG_SPACE(sizeof(int) * fds.size()) + 7) / 8);
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  return ::sendmsg(sock, &msg, MSG_NOSIGNAL);
}

io::UniqueFd connect_send(const std::string& path, const std::string& payload,
                          const std::vector<int>& fds) {
  io::UniqueFd c = raw_connect(path);
  if (c.get() >= 0 && raw_send(c.get(), payload, fds) != static_cast<ssize_t>(payload.size())) {
    c.reset();
  }
  return c;
}

// True when the peer of `client` has closed the connection.
bool peer_closed(int client) {
  pollfd p{client, POLLIN, 0};
  if (::poll(&p, 1, 1000) != 1) return false;
  char byte;
  const ssize_t n = ::recv(client, &byte, 1, MSG_DONTWAIT);
  // A server that closes with unread data queued resets the connection instead of a clean EOF.
  return n == 0 || (n < 0 && errno == ECONNRESET);
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "memsnap-handshake-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

class HandshakeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    sock_path_ = (dir_.path() / "vmm.sock").string();
    auto l = Listener::listen(sock_path_);
    ASSERT_TRUE(l.ok()) << l.error().to_string();
    listener_ = std::make_unique<Listener>(std::move(l).value());
    uffd_ = make_uffd();
    ASSERT_GE(uffd_.get(), 0) << "userfaultfd: " << std::strerror(errno);
    memfd_ = make_memfd(4 * kPage);
    ASSERT_GE(memfd_.get(), 0);
    expect_.page_size = kPage;
    fds_before_ = count_open_fds();
  }
  void TearDown() override {
    // Every test's locals are gone by now: the server must not have kept anything.
    EXPECT_EQ(count_open_fds(), fds_before_) << "fds leaked";
  }

  // Sends payload with fds, keeps the client open (like Firecracker), returns accept's result.
  Result<Handshake> exchange(const std::string& payload, const std::vector<int>& fds) {
    io::UniqueFd client = connect_send(sock_path_, payload, fds);
    EXPECT_GE(client.get(), 0);
    return listener_->accept(expect_, kPatience);
  }

  Errc code_of(const Result<Handshake>& r) { return r.ok() ? Errc::kOk : r.error().code; }

  TempDir dir_;
  std::string sock_path_;
  std::unique_ptr<Listener> listener_;
  io::UniqueFd uffd_;
  io::UniqueFd memfd_;
  Expectations expect_;
  std::size_t fds_before_ = 0;
};

// ---- parse_regions ----

TEST(ParseRegions, FirecrackerPayloadSortedByOffset) {
  Expectations e;
  e.page_size = kPage;
  e.guest_size = 4 * kPage;
  auto r = parse_regions(two_regions(), e);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  ASSERT_EQ(r.value().size(), 2u);
  EXPECT_EQ(r.value()[0], (GuestRegion{kBaseA, 2 * kPage, 0, kPage}));
  EXPECT_EQ(r.value()[1], (GuestRegion{kBaseB, 2 * kPage, 2 * kPage, kPage}));
}

TEST(ParseRegions, EitherPageSizeFieldIsAccepted) {
  const Expectations e;  // any page size
  const std::string only_kib =
      R"([{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size_kib":2097152}])";
  auto a = parse_regions(only_kib, e);
  ASSERT_TRUE(a.ok()) << a.error().to_string();
  EXPECT_EQ(a.value()[0].page_size, 2097152u);
  const std::string only_ps =
      R"([{"base_host_virt_addr":8192,"size":4096,"offset":0,"page_size":4096}])";
  auto b = parse_regions(only_ps, e);
  ASSERT_TRUE(b.ok()) << b.error().to_string();
  EXPECT_EQ(b.value()[0].page_size, 4096u);
  auto both = parse_regions(array_of({region_json(kBaseA, kPage, 0)}), e);
  ASSERT_TRUE(both.ok()) << both.error().to_string();
}

TEST(ParseRegions, SerializeRoundTrip) {
  const std::vector<GuestRegion> in = {{kBaseA, 2 * kPage, 0, kPage},
                                       {kBaseB, 6 * kPage, 2 * kPage, kPage}};
  auto r = parse_regions(serialize_regions(in), Expectations{});
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r.value(), in);
}

struct BadCase {
  const char* name;
  std::string json;
  std::string needle;  // the message must name this (region and/or field)
  std::uint64_t guest_size = 0;
};

TEST(ParseRegions, RefusesEveryMalformedOrMisfittingDescription) {
  const std::string ok0 = region_json(kBaseA, 2 * kPage, 0);
  const std::string fields = R"("base_host_virt_addr":8192,"offset":0,"page_size":4096)";
  const std::vector<BadCase> cases = {
      {"not json", "[{", "not valid JSON"},
      {"truncated", two_regions().substr(0, 40), "not valid JSON"},
      {"trailing garbage", two_regions() + "x", "not valid JSON"},
      {"object", R"({"size":4096})", "array"},
      {"number", "42", "array"},
      {"null", "null", "array"},
      {"empty array", "[]", "empty"},
      {"element not object", "[" + ok0 + ",7]", "region 1: not an object"},
      {"unknown field", R"([{"size":4096,"evil":1,)" + fields + "}]",
       "region 0: unknown field \"evil\""},
      {"duplicate field", R"([{"size":4096,"size":8192,)" + fields + "}]",
       "region 0: duplicate field \"size\""},
      {"missing size", "[" + ok0 + R"(,{"base_host_virt_addr":0,"offset":8192,"page_size":4096}])",
       "region 1: missing field \"size\""},
      {"missing base", R"([{"size":4096,"offset":0,"page_size":4096}])", "\"base_host_virt_addr\""},
      {"missing offset", R"([{"size":4096,"base_host_virt_addr":0,"page_size":4096}])",
       "\"offset\""},
      {"missing page size", R"([{"size":4096,"base_host_virt_addr":0,"offset":0}])",
       "\"page_size\""},
      {"negative", R"([{"size":-4096,)" + fields + "}]",
       "region 0: field \"size\" must be an unsigned"},
      {"float", R"([{"size":4096.0,)" + fields + "}]", "\"size\" must be an unsigned"},
      {"exponent", R"([{"size":4e3,)" + fields + "}]", "\"size\" must be an unsigned"},
      {"string number", R"([{"size":"4096",)" + fields + "}]", "\"size\" must be an unsigned"},
      {"bool", R"([{"size":true,)" + fields + "}]", "\"size\" must be an unsigned"},
      {"beyond u64", R"([{"size":18446744073709551616,)" + fields + "}]",
       "\"size\" must be an unsigned"},
      {"page sizes disagree",
       R"([{"base_host_virt_addr":0,"size":8192,"offset":0,"page_size":4096,"page_size_kib":8192}])",
       "disagree"},
      {"page size not power of two", array_of({region_json(0, 12288, 0, 12288)}), "power of two"},
      {"page size below 4096", array_of({region_json(0, 4096, 0, 2048)}), "\"page_size\" 2048"},
      {"page size 0", array_of({region_json(0, 4096, 0, 0)}), "power of two"},
      {"page size not expected", array_of({region_json(0, 16384, 0, 8192)}), "expected page size"},
      {"size 0", array_of({region_json(0, 0, 0)}), "region 0: field \"size\" is 0"},
      {"size not page multiple", array_of({ok0, region_json(kBaseB, 5000, 2 * kPage)}),
       "region 1: field \"size\""},
      {"base unaligned", array_of({ok0, region_json(kBaseB + 512, kPage, 2 * kPage)}),
       "region 1: field \"base_host_virt_addr\""},
      {"offset unaligned", array_of({ok0, region_json(kBaseB, kPage, 2 * kPage + 1)}),
       "region 1: field \"offset\""},
      {"host overlap",
       array_of({region_json(kBaseA, 4 * kPage, 0), region_json(kBaseA + kPage, kPage, 4 * kPage)}),
       "overlap in host memory"},
      {"host identical",
       array_of({region_json(kBaseA, kPage, 0), region_json(kBaseA, kPage, kPage)}), "overlap"},
      {"host wraps", array_of({region_json(0xFFFFFFFFFFFFF000, 2 * kPage, 0)}), "wraps"},
      {"offset wraps", array_of({region_json(kBaseA, 2 * kPage, 0xFFFFFFFFFFFFF000)}), "wraps"},
      {"guest gap", array_of({ok0, region_json(kBaseB, kPage, 3 * kPage)}),
       "region 1: field \"offset\""},
      {"guest not from 0", array_of({region_json(kBaseA, kPage, kPage)}), "contiguous from 0"},
      {"guest overlap", array_of({ok0, region_json(kBaseB, kPage, kPage)}),
       "region 1: field \"offset\""},
      {"total != guest size", two_regions(), "expected a guest of", 8 * kPage},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.name);
    Expectations e;
    e.page_size = c.name == std::string("page size not expected") ? 16384 : 0;
    e.guest_size = c.guest_size;
    auto r = parse_regions(c.json, e);
    ASSERT_FALSE(r.ok()) << c.json;
    EXPECT_EQ(r.error().code, Errc::kHandshakeBadRegions) << r.error().to_string();
    EXPECT_NE(r.error().message.find(c.needle), std::string::npos) << r.error().message;
  }
}

TEST(ParseRegions, MixedPageSizesAreRefused) {
  auto r = parse_regions(
      array_of({region_json(0, 2 << 20, 0, 2 << 20), region_json(kBaseA, kPage, 2 << 20)}), {});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("region 1"), std::string::npos) << r.error().message;
}

// ---- Listener: the socket file ----

TEST_F(HandshakeTest, SocketFileIsAPrivateSocket) {
  struct stat st {};
  ASSERT_EQ(::lstat(sock_path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(listener_->path(), sock_path_);
  EXPECT_TRUE((::fcntl(listener_->fd(), F_GETFD) & FD_CLOEXEC) != 0);
}

TEST_F(HandshakeTest, ModeIsExactWhateverTheUmask) {
  const std::string path = (dir_.path() / "group.sock").string();
  const mode_t old = ::umask(0077);  // would strip the group bits we ask for
  auto l = Listener::listen(path, 0660);
  ::umask(old);
  ASSERT_TRUE(l.ok()) << l.error().to_string();
  struct stat st {};
  ASSERT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0660u);
}

TEST_F(HandshakeTest, StaleSocketFileIsReplaced) {
  const std::string path = (dir_.path() / "stale.sock").string();
  {
    // A socket file left behind by a process that died: bound, nobody listening.
    io::UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    ASSERT_EQ(::bind(s.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)), 0);
    ASSERT_EQ(::chmod(path.c_str(), 0777), 0);
  }
  auto l = Listener::listen(path);
  ASSERT_TRUE(l.ok()) << l.error().to_string();
  struct stat st {};
  ASSERT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  io::UniqueFd client = connect_send(path, two_regions(), {uffd_.get()});
  ASSERT_GE(client.get(), 0);
  auto h = l.value().accept(expect_, kPatience);
  EXPECT_TRUE(h.ok()) << h.error().to_string();
}

TEST_F(HandshakeTest, LiveSocketIsNotStolen) {
  auto second = Listener::listen(sock_path_);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code, Errc::kInvalidArgument);
  // The probe connection is the only thing the first listener saw; it still works.
  EXPECT_EQ(code_of(listener_->accept(expect_, milliseconds(1000))), Errc::kHandshakeProtocol);
  io::UniqueFd client = connect_send(sock_path_, two_regions(), {uffd_.get()});
  EXPECT_EQ(code_of(listener_->accept(expect_, kPatience)), Errc::kOk);
}

TEST_F(HandshakeTest, OtherFilesAreRefusedAndKept) {
  const std::string file = (dir_.path() / "regular").string();
  std::ofstream(file) << "keep me";
  auto a = Listener::listen(file);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.error().code, Errc::kInvalidArgument);
  EXPECT_TRUE(fs::is_regular_file(file));

  const std::string link = (dir_.path() / "link").string();
  fs::create_symlink(sock_path_, link);
  auto b = Listener::listen(link);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.error().code, Errc::kInvalidArgument);
  EXPECT_TRUE(fs::is_symlink(link));

  auto c = Listener::listen(dir_.path().string());
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().code, Errc::kInvalidArgument);

  auto d = Listener::listen(std::string(200, 'x'));
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error().code, Errc::kInvalidArgument);
}

TEST_F(HandshakeTest, DestructorAndMovesRemoveTheFileOnce) {
  const std::string p1 = (dir_.path() / "one.sock").string();
  const std::string p2 = (dir_.path() / "two.sock").string();
  {
    auto l = Listener::listen(p1);
    ASSERT_TRUE(l.ok());
    Listener moved(std::move(l).value());  // the moved-from listener must not remove the file
    EXPECT_TRUE(fs::exists(p1));
    EXPECT_EQ(moved.path(), p1);
    auto other = Listener::listen(p2);
    ASSERT_TRUE(other.ok());
    moved = std::move(other).value();  // drops one.sock
    EXPECT_FALSE(fs::exists(p1));
    EXPECT_TRUE(fs::exists(p2));
  }
  EXPECT_FALSE(fs::exists(p2));
  listener_.reset();
  EXPECT_FALSE(fs::exists(sock_path_));
  --fds_before_;  // the fixture's own listening socket is gone too
}

// ---- accept: well-formed VMMs ----

TEST_F(HandshakeTest, UffdOnly) {
  expect_.guest_size = 4 * kPage;
  auto client = connect_and_send(
      sock_path_, {{kBaseB, 2 * kPage, 2 * kPage, kPage}, {kBaseA, 2 * kPage, 0, kPage}},
      uffd_.get(), -1);
  ASSERT_TRUE(client.ok()) << client.error().to_string();
  auto r = listener_->accept(expect_, kPatience);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  const Handshake& h = r.value();
  EXPECT_EQ(h.vmm_pid, ::getpid());
  EXPECT_EQ(h.vmm_uid, ::getuid());
  EXPECT_EQ(h.vmm_gid, ::getgid());
  EXPECT_EQ(h.page_size, kPage);
  EXPECT_EQ(h.guest_size, 4 * kPage);
  ASSERT_EQ(h.regions.size(), 2u);
  EXPECT_EQ(h.regions[0], (GuestRegion{kBaseA, 2 * kPage, 0, kPage}));
  EXPECT_EQ(h.regions[1], (GuestRegion{kBaseB, 2 * kPage, 2 * kPage, kPage}));
  EXPECT_TRUE(same_file(h.uffd.get(), uffd_.get()));
  EXPECT_NE(h.uffd.get(), uffd_.get());
  EXPECT_TRUE((::fcntl(h.uffd.get(), F_GETFD) & FD_CLOEXEC) != 0);  // MSG_CMSG_CLOEXEC
  EXPECT_EQ(h.memfd.get(), -1);
  // The connection stays usable for the reply.
  ASSERT_EQ(::write(h.connection.get(), "r", 1), 1);
  char byte = 0;
  EXPECT_EQ(::read(client.value().get(), &byte, 1), 1);
  EXPECT_EQ(byte, 'r');
}

TEST_F(HandshakeTest, UffdAndMemfdFromAnotherProcess) {
  expect_.memfd_required = true;
  const std::string payload = two_regions();
  int go[2];
  ASSERT_EQ(::pipe2(go, O_CLOEXEC), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(go[1]);
    io::UniqueFd c = connect_send(sock_path_, payload, {uffd_.get(), memfd_.get()});
    char byte;
    if (c.get() >= 0) (void)::read(go[0], &byte, 1);  // keep the connection until told
    ::_exit(c.get() >= 0 ? 0 : 1);
  }
  ::close(go[0]);
  auto r = listener_->accept(expect_, kPatience);
  ::close(go[1]);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r.value().vmm_pid, child);
  EXPECT_TRUE(same_file(r.value().uffd.get(), uffd_.get()));
  EXPECT_TRUE(same_file(r.value().memfd.get(), memfd_.get()));
  EXPECT_EQ(r.value().regions.front().offset, 0u);
}

TEST_F(HandshakeTest, PageSizeFieldVariants) {
  const std::string kib_only =
      R"([{"base_host_virt_addr":8192,"size":8192,"offset":0,"page_size_kib":4096}])";
  EXPECT_EQ(code_of(exchange(kib_only, {uffd_.get()})), Errc::kOk);
  EXPECT_EQ(code_of(exchange(array_of({region_json(kBaseA, kPage, 0)}), {uffd_.get()})), Errc::kOk);
  const std::string disagree =
      R"([{"base_host_virt_addr":8192,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4}])";
  EXPECT_EQ(code_of(exchange(disagree, {uffd_.get()})), Errc::kHandshakeBadRegions);
}

TEST_F(HandshakeTest, PayloadSpanningSeveralReads) {
  // ~60 KiB of valid JSON in one sendmsg: the kernel queues it as more than one skb and a
  // recvmsg that receives fds stops after the first, so the server must read on.
  std::vector<std::string> items;
  for (std::uint64_t i = 0; i < 480; ++i)
    items.push_back(region_json(kBaseA + i * kPage, kPage, i * kPage));
  const std::string payload = array_of(items);
  ASSERT_GT(payload.size(), 40000u);
  ASSERT_LT(payload.size(), expect_.max_payload);
  auto r = exchange(payload, {uffd_.get(), memfd_.get()});
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r.value().regions.size(), 480u);

  // And a VMM that writes its message in two pieces, the fds with the first.
  io::UniqueFd client = raw_connect(sock_path_);
  const std::string small = two_regions();
  ASSERT_EQ(raw_send(client.get(), small.substr(0, 30), {uffd_.get()}), 30);
  ASSERT_EQ(raw_send(client.get(), small.substr(30), {}), static_cast<ssize_t>(small.size() - 30));
  EXPECT_EQ(code_of(listener_->accept(expect_, kPatience)), Errc::kOk);
}

// ---- accept: hostile or broken VMMs ----

TEST_F(HandshakeTest, NobodyConnects) {
  const auto start = std::chrono::steady_clock::now();
  auto r = listener_->accept(expect_, milliseconds(100));
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(code_of(r), Errc::kHandshakeTimeout);
  EXPECT_GE(took, milliseconds(100));
  EXPECT_LT(took, milliseconds(2000));
}

TEST_F(HandshakeTest, ConnectsAndNeverWrites) {
  io::UniqueFd client = raw_connect(sock_path_);
  ASSERT_GE(client.get(), 0);
  EXPECT_EQ(code_of(listener_->accept(expect_, milliseconds(100))), Errc::kHandshakeTimeout);
  EXPECT_TRUE(peer_closed(client.get())) << "the server kept the silent connection";
}

TEST_F(HandshakeTest, TruncatedJsonThenSilence) {
  io::UniqueFd client = connect_send(sock_path_, two_regions().substr(0, 50), {uffd_.get()});
  EXPECT_EQ(code_of(listener_->accept(expect_, milliseconds(100))), Errc::kHandshakeTimeout);
  EXPECT_TRUE(peer_closed(client.get()));
}

TEST_F(HandshakeTest, TruncatedJsonThenClose) {
  connect_send(sock_path_, two_regions().substr(0, 50), {uffd_.get()}).reset();
  EXPECT_EQ(code_of(listener_->accept(expect_, kPatience)), Errc::kHandshakeProtocol);
}

TEST_F(HandshakeTest, ConnectsAndCloses) {
  raw_connect(sock_path_).reset();
  EXPECT_EQ(code_of(listener_->accept(expect_, kPatience)), Errc::kHandshakeProtocol);
}

TEST_F(HandshakeTest, MalformedJson) {
  EXPECT_EQ(code_of(exchange("[{\"size\":}]", {uffd_.get()})), Errc::kHandshakeBadRegions);
}

TEST_F(HandshakeTest, OneMebibytePayload) {
  io::UniqueFd client = raw_connect(sock_path_, /*nonblocking=*/true);
  ASSERT_GE(client.get(), 0);
  std::string huge = "[" + std::string(1 << 20, ' ') + "]";
  // Non-blocking: the kernel takes what fits in the socket buffer, well over max_payload.
  ASSERT_GT(raw_send(client.get(), huge, {uffd_.get(), memfd_.get()}),
            static_cast<ssize_t>(expect_.max_payload));
  auto r = listener_->accept(expect_, kPatience);
  EXPECT_EQ(code_of(r), Errc::kHandshakeProtocol);
  EXPECT_TRUE(peer_closed(client.get()));
}

TEST_F(HandshakeTest, NoFds) {
  EXPECT_EQ(code_of(exchange(two_regions(), {})), Errc::kHandshakeProtocol);
}

TEST_F(HandshakeTest, ThreeFds) {
  io::UniqueFd extra = make_memfd(kPage);
  EXPECT_EQ(code_of(exchange(two_regions(), {uffd_.get(), memfd_.get(), extra.get()})),
            Errc::kHandshakeProtocol);
}

TEST_F(HandshakeTest, ManyFdsTruncateTheControlData) {
  const std::vector<int> twenty(20, memfd_.get());
  EXPECT_EQ(code_of(exchange(two_regions(), twenty)), Errc::kHandshakeProtocol);
}

TEST_F(HandshakeTest, SecondControlMessage) {
  io::UniqueFd client = raw_connect(sock_path_);
  const std::string payload = two_regions();
  ASSERT_EQ(raw_send(client.get(), payload.substr(0, 30), {uffd_.get()}), 30);
  ASSERT_GT(raw_send(client.get(), payload.substr(30), {memfd_.get()}), 0);
  EXPECT_EQ(code_of(listener_->accept(expect_, kPatience)), Errc::kHandshakeProtocol);
}

TEST_F(HandshakeTest, UffdSlotHoldsSomethingElse) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  io::UniqueFd rd(p[0]);
  io::UniqueFd wr(p[1]);
  io::UniqueFd devnull(::open("/dev/null", O_RDWR | O_CLOEXEC));
  io::UniqueFd fake(::open(sock_path_.c_str(), O_PATH | O_CLOEXEC));
  for (int not_uffd : {rd.get(), devnull.get(), memfd_.get(), fake.get()}) {
    EXPECT_EQ(code_of(exchange(two_regions(), {not_uffd})), Errc::kHandshakeBadFd);
    EXPECT_EQ(code_of(exchange(two_regions(), {not_uffd, memfd_.get()})), Errc::kHandshakeBadFd);
  }
}

TEST_F(HandshakeTest, MemfdSlotHoldsSomethingElse) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  io::UniqueFd rd(p[0]);
  io::UniqueFd wr(p[1]);
  const std::string file = (dir_.path() / "memfd:lookalike").string();
  io::UniqueFd regular(::open(file.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600));
  io::UniqueFd shm(::open("/dev/shm", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));  // shmem, no memfd
  std::vector<int> others = {rd.get(), regular.get(), uffd_.get()};
  if (shm.get() >= 0) others.push_back(shm.get());
  for (int not_memfd : others) {
    EXPECT_EQ(code_of(exchange(two_regions(), {uffd_.get(), not_memfd})), Errc::kHandshakeBadFd);
  }
}

TEST_F(HandshakeTest, RegionsThatDoNotFit) {
  const std::string ok0 = region_json(kBaseA, 2 * kPage, 0);
  EXPECT_EQ(code_of(exchange(array_of({region_json(kBaseA, 4 * 8192, 0, 8192)}), {uffd_.get()})),
            Errc::kHandshakeBadRegions);  // wrong page size
  EXPECT_EQ(code_of(exchange(array_of({ok0, region_json(kBaseA + kPage, kPage, 2 * kPage)}),
                             {uffd_.get()})),
            Errc::kHandshakeBadRegions);  // host overlap
  EXPECT_EQ(
      code_of(exchange(array_of({ok0, region_json(kBaseB, kPage, 4 * kPage)}), {uffd_.get()})),
      Errc::kHandshakeBadRegions);  // guest gap
  expect_.guest_size = 8 * kPage;
  EXPECT_EQ(code_of(exchange(two_regions(), {uffd_.get(), memfd_.get()})),
            Errc::kHandshakeBadRegions);  // total != guest size
  expect_.guest_size = 0;
  expect_.memfd_required = true;
  EXPECT_EQ(code_of(exchange(two_regions(), {uffd_.get()})), Errc::kHandshakeBadRegions);
}

// ---- 10,000 hostile attempts: no fd may stay behind ----

TEST_F(HandshakeTest, TenThousandHostileAttemptsLeakNothing) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  io::UniqueFd rd(p[0]);
  io::UniqueFd wr(p[1]);
  io::UniqueFd devnull(::open("/dev/null", O_RDWR | O_CLOEXEC));
  const std::string good = two_regions();
  const std::string ok0 = region_json(kBaseA, 2 * kPage, 0);
  const std::string overlap = array_of({ok0, region_json(kBaseA + kPage, kPage, 2 * kPage)});
  const std::string gap = array_of({ok0, region_json(kBaseB, kPage, 4 * kPage)});
  const std::string wrong_page = array_of({region_json(kBaseA, 4 * 8192, 0, 8192)});
  const std::string huge = "[" + std::string(1 << 20, ' ') + "]";
  const int u = uffd_.get();
  const int m = memfd_.get();
  const std::vector<int> twenty(20, m);
  const milliseconds quick(2);

  struct Kind {
    const char* name;
    Errc want;
  };
  const Kind kinds[] = {
      {"truncated json, close", Errc::kHandshakeProtocol},
      {"truncated json, silence", Errc::kHandshakeTimeout},
      {"1 MiB payload", Errc::kHandshakeProtocol},
      {"0 fds", Errc::kHandshakeProtocol},
      {"3 fds", Errc::kHandshakeProtocol},
      {"20 fds", Errc::kHandshakeProtocol},
      {"pipe as uffd", Errc::kHandshakeBadFd},
      {"/dev/null as uffd", Errc::kHandshakeBadFd},
      {"pipe as memfd", Errc::kHandshakeBadFd},
      {"wrong page size", Errc::kHandshakeBadRegions},
      {"host overlap", Errc::kHandshakeBadRegions},
      {"guest gap", Errc::kHandshakeBadRegions},
      {"malformed json", Errc::kHandshakeBadRegions},
      {"never writes", Errc::kHandshakeTimeout},
      {"connects and closes", Errc::kHandshakeProtocol},
      {"second control message", Errc::kHandshakeProtocol},
  };
  constexpr std::size_t kKinds = sizeof(kinds) / sizeof(kinds[0]);

  const std::size_t before = count_open_fds();
  const auto start = std::chrono::steady_clock::now();
  std::size_t wrong = 0;
  std::string first_wrong;
  for (std::size_t i = 0; i < 10000; ++i) {
    const std::size_t k = i % kKinds;
    milliseconds timeout = kPatience;
    io::UniqueFd client;
    switch (k) {
      case 0:
        connect_send(sock_path_, good.substr(0, 50), {u, m}).reset();
        break;
      case 1:
        client = connect_send(sock_path_, good.substr(0, 50), {u, m});
        timeout = quick;
        break;
      case 2:
        client = raw_connect(sock_path_, true);
        (void)raw_send(client.get(), huge, {u, m});
        break;
      case 3:
        client = connect_send(sock_path_, good, {});
        break;
      case 4:
        client = connect_send(sock_path_, good, {u, m, m});
        break;
      case 5:
        client = connect_send(sock_path_, good, twenty);
        break;
      case 6:
        client = connect_send(sock_path_, good, {rd.get(), m});
        break;
      case 7:
        client = connect_send(sock_path_, good, {devnull.get()});
        break;
      case 8:
        client = connect_send(sock_path_, good, {u, wr.get()});
        break;
      case 9:
        client = connect_send(sock_path_, wrong_page, {u, m});
        break;
      case 10:
        client = connect_send(sock_path_, overlap, {u, m});
        break;
      case 11:
        client = connect_send(sock_path_, gap, {u});
        break;
      case 12:
        client = connect_send(sock_path_, "[{\"size\":}]", {u, m});
        break;
      case 13:
        client = raw_connect(sock_path_);
        timeout = quick;
        break;
      case 14:
        raw_connect(sock_path_).reset();
        break;
      case 15:
        client = raw_connect(sock_path_);
        (void)raw_send(client.get(), good.substr(0, 30), {u});
        (void)raw_send(client.get(), good.substr(30), {m, m});
        break;
    }
    auto r = listener_->accept(expect_, timeout);
    const Errc got = code_of(r);
    if (got != kinds[k].want) {
      if (wrong++ == 0) {
        first_wrong = std::string(kinds[k].name) + ": " +
                      (r.ok() ? std::string("ok") : r.error().to_string());
      }
    }
  }
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(wrong, 0u) << "first: " << first_wrong;
  EXPECT_EQ(count_open_fds(), before);
  EXPECT_LT(took, std::chrono::seconds(60));
  std::printf("10000 hostile attempts in %.2f s\n", std::chrono::duration<double>(took).count());
}

}  // namespace
}  // namespace memsnap::handshake
