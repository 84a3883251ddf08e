// memsnapd's registration of a running VMM, end to end against the real daemon: who may register
// which process (the caller must own it), what fd may back its memory (a writable memfd, taken
// once and kept), what regions it may name (mapped in the VMM), how many sandboxes there may be
// (a configured cap, one per VMM), who may act on a sandbox afterwards (its owner or root), and
// where a resume's handshake socket may go (a name in the configured handshake directory).
//
// The stand-in VMMs here are small forked "holders": a process that holds a memfd mapped shared
// (or some other file) at a known fd number, optionally as another uid, and does what it is told
// through a pipe. Callers other than root are forked children that drop to that uid and make one
// API call. Needs root (as CI runs it); skipped otherwise.
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/unmapped_address.h"
#include "tools/control_api/http_client.h"
#include "tools/fleet/fleet.h"

namespace memsnap::fleet {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::uint64_t kSize = 4ULL << 20;
constexpr uid_t kNobody = 65534;
constexpr uid_t kOther = 65533;

// Reads exactly n bytes (false on EOF or error).
bool read_all(int fd, void* buf, std::size_t n) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t r = ::read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

// What a holder process holds at fd_number.
enum class Holding {
  kMemfd,          // a memfd of kSize, mapped shared, filled with 0x5a
  kReadOnlyMemfd,  // the same memfd, but fd_number is a read-only reopen of it
  kTmpfsFile,      // a regular file on tmpfs (/dev/shm): S_ISREG, the right size, no memfd
  kFileReadOnly,   // `path`, opened read-only
};

// A process holding something at a fixed fd number. On command ('s') it replaces that fd with
// `swap_path` opened read-write (the fd number now names another file).
class Holder {
 public:
  static constexpr int kFd = 40;

  Holder(Holding what, uid_t uid, const std::string& path = "", const std::string& swap_path = "") {
    int ready[2], cmd[2];
    if (::pipe2(ready, O_CLOEXEC) != 0 || ::pipe2(cmd, O_CLOEXEC) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(ready[0]);
      ::close(cmd[1]);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      std::uint64_t addr = 0;
      int fd = -1;
      if (what == Holding::kFileReadOnly) {
        fd = ::open(path.c_str(), O_RDONLY);
      } else if (what == Holding::kTmpfsFile) {
        const std::string shm = "/dev/shm/memsnap-reg-test-" + std::to_string(::getpid());
        fd = ::open(shm.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
        ::unlink(shm.c_str());
        if (fd >= 0 && ::ftruncate(fd, kSize) != 0) _exit(3);
      } else {
        fd = ::memfd_create("guest", 0);
        if (fd < 0 || ::ftruncate(fd, kSize) != 0) _exit(3);
      }
      if (fd < 0) _exit(2);
      void* map = ::mmap(nullptr, kSize, PROT_READ | (what == Holding::kFileReadOnly ? 0 : PROT_WRITE),
                         MAP_SHARED, fd, 0);
      if (map == MAP_FAILED) {
        map = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (map == MAP_FAILED) _exit(4);
      }
      if (what != Holding::kFileReadOnly) std::memset(map, 0x5a, kSize);
      addr = reinterpret_cast<std::uint64_t>(map);
      if (what == Holding::kReadOnlyMemfd) {
        const std::string self = "/proc/self/fd/" + std::to_string(fd);
        const int ro = ::open(self.c_str(), O_RDONLY);
        if (ro < 0) _exit(5);
        fd = ro;
      }
      if (::dup2(fd, kFd) != kFd) _exit(6);
      if (uid != 0) {
        if (::setgroups(0, nullptr) != 0 || ::setgid(uid) != 0 || ::setuid(uid) != 0) _exit(7);
        ::prctl(PR_SET_DUMPABLE, 1);
      }
      if (::write(ready[1], &addr, sizeof(addr)) != sizeof(addr)) _exit(8);
      char c = 0;
      while (::read(cmd[0], &c, 1) == 1) {
        if (c == 's') {
          const int other = ::open(swap_path.c_str(), O_RDWR);
          if (other < 0 || ::dup2(other, kFd) != kFd) _exit(9);
          ::close(other);
          if (::write(ready[1], &addr, sizeof(addr)) != sizeof(addr)) _exit(8);
        }
      }
      _exit(0);
    }
    ::close(ready[1]);
    ::close(cmd[0]);
    ready_ = ready[0];
    cmd_ = cmd[1];
    if (pid_ > 0 && !read_all(ready_, &addr_, sizeof(addr_))) addr_ = 0;
  }
  ~Holder() {
    if (cmd_ >= 0) ::close(cmd_);
    if (ready_ >= 0) ::close(ready_);
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  Holder(const Holder&) = delete;
  Holder& operator=(const Holder&) = delete;

  bool ok() const { return pid_ > 0 && addr_ != 0; }
  pid_t pid() const { return pid_; }
  std::uint64_t addr() const { return addr_; }
  // Replaces fd kFd with swap_path; true once done.
  bool swap() {
    std::uint64_t again = 0;
    return ::write(cmd_, "s", 1) == 1 && read_all(ready_, &again, sizeof(again));
  }
  // A registration body for this holder.
  json body(const std::string& id, bool with_fd = true) const {
    json b = {{"id", id},
              {"vmm_pid", pid_},
              {"regions", json::array({{{"guest_offset", 0}, {"host_addr", addr_}, {"size", kSize}}})}};
    if (with_fd) b["memfd_fd"] = kFd;
    return b;
  }

 private:
  pid_t pid_ = -1;
  int ready_ = -1, cmd_ = -1;
  std::uint64_t addr_ = 0;
};

class RegistrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (stand-ins and callers of other uids)";
    char templ[] = "/var/tmp/memsnapd-reg-test-XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
    ASSERT_EQ(::chmod(dir_.c_str(), 0711), 0);  // other uids must reach the control socket
  }
  void start(std::vector<std::string> overrides = {}) {
    DaemonOptions o;
    o.dir = dir_;
    o.metrics = true;
    o.overrides = {"control.mode=\"0666\"", "control.allowed_uids=[65534,65533]",
                   "limits.handshake_timeout_ms=2000"};
    o.overrides.insert(o.overrides.end(), overrides.begin(), overrides.end());
    auto d = Daemon::start(o);
    if (!d.ok()) {
      std::ifstream log(dir_ + "/memsnapd.log");
      std::cerr << "---- memsnapd log ----\n" << log.rdbuf() << "\n";
    }
    ASSERT_TRUE(d.ok()) << d.error().to_string();
    daemon_ = std::move(*d);
  }
  void TearDown() override {
    if (daemon_) {
      if (HasFailure()) {
        std::ifstream log(daemon_->log_path());
        std::cerr << "---- memsnapd log ----\n" << log.rdbuf() << "\n";
      }
      daemon_.reset();
    }
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  // One call as root.
  Answer call(const std::string& method, const std::string& target, const json& body = nullptr) {
    auto a = daemon_->call(method, target, body);
    EXPECT_TRUE(a.ok()) << a.error().to_string();
    return a.ok() ? *a : Answer{};
  }

  // One call as uid (a forked child that drops to it first).
  Answer call_as(uid_t uid, const std::string& method, const std::string& target,
                 const json& body = nullptr) {
    int out[2];
    if (::pipe(out) != 0) return {};
    const pid_t child = ::fork();
    if (child == 0) {
      ::close(out[0]);
      if (::setgroups(0, nullptr) != 0 || ::setgid(uid) != 0 || ::setuid(uid) != 0) _exit(10);
      control_api::UnixHttpClient client(daemon_->socket(), std::chrono::seconds(60));
      auto r = client.call(method, target, body.is_null() ? std::string() : body.dump());
      std::string text = r.ok() ? std::to_string(r->status) + "\n" + r->body : "0\n";
      const char* p = text.data();
      std::size_t left = text.size();
      while (left > 0) {
        const ssize_t n = ::write(out[1], p, left);
        if (n <= 0) _exit(11);
        p += n;
        left -= static_cast<std::size_t>(n);
      }
      _exit(0);
    }
    ::close(out[1]);
    std::string text;
    char buf[4096];
    for (ssize_t n; (n = ::read(out[0], buf, sizeof(buf))) > 0;) text.append(buf, n);
    ::close(out[0]);
    int status = 0;
    ::waitpid(child, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "caller as uid " << uid;
    Answer a;
    const auto nl = text.find('\n');
    if (nl == std::string::npos) return a;
    a.status = std::stoi(text.substr(0, nl));
    a.body = json::parse(text.substr(nl + 1), nullptr, false);
    return a;
  }

  static std::string code_of(const Answer& a) {
    if (!a.body.is_object() || !a.body.contains("error")) return "";
    return a.body["error"].value("code", "");
  }

  std::string dir_;
  std::unique_ptr<Daemon> daemon_;
};

// Issue 26 item 1: the caller registered a root-owned process holding a root-owned file
// read-only; a hole_punch pause then zeroed the file.
TEST_F(RegistrationTest, ACallerMayRegisterOnlyAProcessItOwns) {
  ASSERT_NO_FATAL_FAILURE(start());
  const std::string secret = dir_ + "/secret";
  {
    std::ofstream(secret) << std::string(kSize, 's');
    ASSERT_EQ(::chmod(secret.c_str(), 0644), 0);
  }
  Holder root_proc(Holding::kFileReadOnly, 0, secret);
  ASSERT_TRUE(root_proc.ok());
  for (bool with_fd : {true, false}) {
    SCOPED_TRACE(with_fd ? "with memfd_fd" : "regions only (process_vm_readv)");
    const Answer a = call_as(kNobody, "POST", "/v1/sandboxes", root_proc.body("stolen", with_fd));
    EXPECT_EQ(a.status, 403) << a.body.dump();
    EXPECT_EQ(code_of(a), "forbidden") << a.body.dump();
  }
  EXPECT_EQ(call("GET", "/v1/sandboxes").body["sandboxes"].size(), 0u);
  // Nothing touched the file.
  struct stat st {};
  ASSERT_EQ(::stat(secret.c_str(), &st), 0);
  EXPECT_EQ(static_cast<std::uint64_t>(st.st_size), kSize);
  EXPECT_GT(st.st_blocks, 0);
  // Its owner may (and root may register anyone's).
  Holder own(Holding::kMemfd, kNobody);
  ASSERT_TRUE(own.ok());
  const Answer mine = call_as(kNobody, "POST", "/v1/sandboxes", own.body("mine"));
  EXPECT_EQ(mine.status, 201) << mine.body.dump();
  EXPECT_EQ(mine.body["owner_uid"], kNobody);
}

// Issue 26 item 1: the fd must be a memfd (not any regular file) and writable where it is.
TEST_F(RegistrationTest, TheFdMustBeAWritableMemfd) {
  ASSERT_NO_FATAL_FAILURE(start());
  Holder tmpfs(Holding::kTmpfsFile, 0);
  Holder read_only(Holding::kReadOnlyMemfd, 0);
  ASSERT_TRUE(tmpfs.ok() && read_only.ok());
  const Answer a = call("POST", "/v1/sandboxes", tmpfs.body("tmpfs"));
  EXPECT_EQ(a.status, 400) << a.body.dump();
  EXPECT_NE(a.body.dump().find("not a memfd"), std::string::npos) << a.body.dump();
  const Answer b = call("POST", "/v1/sandboxes", read_only.body("ro"));
  EXPECT_EQ(b.status, 400) << b.body.dump();
  EXPECT_NE(b.body.dump().find("read-only"), std::string::npos) << b.body.dump();
  // memfd_fd is an fd number: 2^32 + n is not n.
  json wide = read_only.body("wide");
  wide["memfd_fd"] = (1ULL << 32) + Holder::kFd;
  const Answer c = call("POST", "/v1/sandboxes", wide);
  EXPECT_EQ(c.status, 400) << c.body.dump();
  EXPECT_EQ(code_of(c), "invalid_argument");
  EXPECT_EQ(call("GET", "/v1/sandboxes").body["sandboxes"].size(), 0u);
}

// Issue 26 item 1: each sandbox has an owner; only it and root may act on it.
TEST_F(RegistrationTest, OnlyTheOwnerOrRootMayActOnASandbox) {
  ASSERT_NO_FATAL_FAILURE(start());
  Holder vmm(Holding::kMemfd, kNobody);
  ASSERT_TRUE(vmm.ok());
  ASSERT_EQ(call_as(kNobody, "POST", "/v1/sandboxes", vmm.body("sb")).status, 201);
  for (const auto& [method, target] :
       std::vector<std::pair<std::string, std::string>>{{"GET", "/v1/sandboxes/sb"},
                                                        {"GET", "/v1/sandboxes/sb/strategy"},
                                                        {"POST", "/v1/sandboxes/sb/pause"},
                                                        {"POST", "/v1/sandboxes/sb/resume"},
                                                        {"DELETE", "/v1/sandboxes/sb"}}) {
    SCOPED_TRACE(method + " " + target);
    json body = nullptr;
    if (method == "POST") body = json::object();
    if (target.find("resume") != std::string::npos) body["handshake_socket"] = "x.uffd";
    const Answer a = call_as(kOther, method, target, body);
    EXPECT_EQ(a.status, 403) << a.body.dump();
    EXPECT_EQ(code_of(a), "forbidden") << a.body.dump();
  }
  ASSERT_EQ(call("GET", "/v1/sandboxes/sb").status, 200) << "another uid removed the sandbox";
  EXPECT_EQ(call_as(kOther, "GET", "/v1/sandboxes").body["sandboxes"].size(), 0u);
  EXPECT_EQ(call_as(kNobody, "GET", "/v1/sandboxes").body["sandboxes"].size(), 1u);
  // Registering paused snapshot chains is root's (the files are root's).
  const Answer chain = call_as(kNobody, "POST", "/v1/sandboxes",
                               {{"id", "c"}, {"snapshots", {"x.snap"}}, {"strategy", "memfd"}});
  EXPECT_EQ(chain.status, 403) << chain.body.dump();
  // The owner pauses it; root sees it; still running -> paused, nothing else changed.
  const Answer paused =
      call_as(kNobody, "POST", "/v1/sandboxes/sb/pause", {{"strategy", "memfd"}});
  EXPECT_EQ(paused.status, 200) << paused.body.dump();
  const Answer seen = call("GET", "/v1/sandboxes/sb");
  EXPECT_EQ(seen.body["state"], "paused");
  EXPECT_EQ(seen.body["owner_uid"], kNobody);
  EXPECT_EQ(call("DELETE", "/v1/sandboxes/sb").status, 200);
}

// Issue 16 item 10: the memfd is taken once, at registration; a VMM that later puts another file
// at that fd number does not make a hole_punch pause punch that file.
TEST_F(RegistrationTest, TheMemfdIsTakenOnceAndAReusedFdNumberChangesNothing) {
  ASSERT_NO_FATAL_FAILURE(start());
  const std::string other = dir_ + "/other-file";
  {
    std::ofstream(other) << std::string(kSize, 'o');
  }
  Holder vmm(Holding::kMemfd, 0, "", other);
  ASSERT_TRUE(vmm.ok());
  ASSERT_EQ(call("POST", "/v1/sandboxes", vmm.body("sb")).status, 201);
  ASSERT_TRUE(vmm.swap());
  const Answer paused = call("POST", "/v1/sandboxes/sb/pause", {{"strategy", "hole_punch"}});
  EXPECT_EQ(paused.status, 200) << paused.body.dump();
  std::ifstream in(other);
  const std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(content, std::string(kSize, 'o')) << "the file now at the fd number was punched";
  if (paused.status == 200) {
    EXPECT_EQ(paused.body["zero_blocks"], 0) << "the memfd (all 0x5a) was not what was exported";
  }
}

// Issue 26 item 9: one registration per VMM.
TEST_F(RegistrationTest, OneRegistrationPerVmm) {
  ASSERT_NO_FATAL_FAILURE(start());
  Holder a(Holding::kMemfd, 0);
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(call("POST", "/v1/sandboxes", a.body("a")).status, 201);
  for (bool with_fd : {true, false}) {
    const Answer twice = call("POST", "/v1/sandboxes", a.body("a-again", with_fd));
    EXPECT_EQ(twice.status, 409) << twice.body.dump();
    EXPECT_EQ(code_of(twice), "already_exists");
    EXPECT_NE(twice.body.dump().find("sandbox a"), std::string::npos) << twice.body.dump();
  }
  EXPECT_EQ(call("GET", "/v1/sandboxes").body["sandboxes"].size(), 1u);
  // Once removed, it may be registered again.
  ASSERT_EQ(call("DELETE", "/v1/sandboxes/a").status, 200);
  EXPECT_EQ(call("POST", "/v1/sandboxes", a.body("a-again")).status, 201);
}

// Issue 26 item 9: a configured cap on sandboxes, and state counts that follow every change.
TEST_F(RegistrationTest, ACapOnSandboxes) {
  ASSERT_NO_FATAL_FAILURE(start({"limits.max_sandboxes=2"}));
  Holder a(Holding::kMemfd, 0), b(Holding::kMemfd, 0), c(Holding::kMemfd, 0);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  ASSERT_EQ(call("POST", "/v1/sandboxes", a.body("a")).status, 201);
  ASSERT_EQ(call("POST", "/v1/sandboxes", b.body("b")).status, 201);
  const Answer full = call("POST", "/v1/sandboxes", c.body("c"));
  EXPECT_EQ(full.status, 429) << full.body.dump();
  EXPECT_EQ(code_of(full), "limit_reached");
  EXPECT_EQ(call("GET", "/v1/sandboxes").body["sandboxes"].size(), 2u);
  // A removed sandbox frees its place (and its VMM may be registered again).
  ASSERT_EQ(call("DELETE", "/v1/sandboxes/a").status, 200);
  EXPECT_EQ(call("POST", "/v1/sandboxes", c.body("c")).status, 201);
  // The by-state gauge follows every change.
  ASSERT_EQ(call("POST", "/v1/sandboxes/b/pause", {{"strategy", "memfd"}}).status, 200);
  auto text = daemon_->scrape();
  ASSERT_TRUE(text.ok()) << text.error().to_string();
  EXPECT_NE(text->find("memsnap_sandboxes{state=\"running\"} 1"), std::string::npos) << *text;
  EXPECT_NE(text->find("memsnap_sandboxes{state=\"paused\"} 1"), std::string::npos) << *text;
}

// Issue 16 item 11: a region that is not mapped in the VMM is refused at registration (it would
// export as zeros).
TEST_F(RegistrationTest, RegionsNotMappedInTheVmmAreRefused) {
  ASSERT_NO_FATAL_FAILURE(start());
  Holder vmm(Holding::kMemfd, 0);
  ASSERT_TRUE(vmm.ok());
  json unmapped = vmm.body("unmapped", false);
  const std::uint64_t nowhere = memsnap::testing::unmapped_address(vmm.pid(), kSize);
  ASSERT_NE(nowhere, 0u);
  unmapped["regions"][0]["host_addr"] = nowhere;
  json overhanging = vmm.body("overhanging", false);
  overhanging["regions"][0]["size"] = kSize * 64;
  for (const json& body : {unmapped, overhanging}) {
    const Answer a = call("POST", "/v1/sandboxes", body);
    EXPECT_EQ(a.status, 400) << a.body.dump();
    EXPECT_NE(a.body.dump().find("not mapped"), std::string::npos) << a.body.dump();
  }
  EXPECT_EQ(call("POST", "/v1/sandboxes", vmm.body("fine", false)).status, 201);
}

// Issue 16 item 7 / issue 26 item 3: the handshake socket is a name in the handshake directory;
// memsnapd never creates, chmods or deletes a socket anywhere else.
TEST_F(RegistrationTest, TheHandshakeSocketIsConfinedToTheHandshakeDirectory) {
  ASSERT_NO_FATAL_FAILURE(start());
  Holder vmm(Holding::kMemfd, 0);
  ASSERT_TRUE(vmm.ok());
  ASSERT_EQ(call("POST", "/v1/sandboxes", vmm.body("sb")).status, 201);
  ASSERT_EQ(call("POST", "/v1/sandboxes/sb/pause", {{"strategy", "memfd"}}).status, 200);
  // A stale socket in a root-only directory elsewhere.
  const std::string private_dir = dir_ + "-private";
  ASSERT_EQ(::mkdir(private_dir.c_str(), 0700), 0);
  const std::string stale = private_dir + "/stale.sock";
  {
    const int s = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, stale.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ::close(s);
  }
  for (const std::string& path :
       {stale, dir_ + "/sub/x.sock", dir_ + "/../x.sock", std::string("/tmp/x.sock"),
        std::string(".hidden.sock")}) {
    SCOPED_TRACE(path);
    const Answer a = call("POST", "/v1/sandboxes/sb/resume", {{"handshake_socket", path}});
    EXPECT_EQ(a.status, 400) << a.body.dump();
    EXPECT_EQ(code_of(a), "path_not_allowed") << a.body.dump();
    EXPECT_EQ(call("GET", "/v1/sandboxes/sb").body["state"], "paused");
  }
  EXPECT_TRUE(fs::exists(fs::symlink_status(stale))) << "memsnapd deleted a socket outside";
  fs::remove_all(private_dir);
  // A bare name goes into the directory, as does a path naming the directory itself.
  const Answer ok = call("POST", "/v1/sandboxes/sb/resume", {{"handshake_socket", "sb-1.uffd"}});
  EXPECT_EQ(ok.status, 202) << ok.body.dump();
  EXPECT_EQ(ok.body["handshake_socket"], dir_ + "/sb-1.uffd");
}

// memsnapd refuses a handshake directory others could write to (they could swap its entries).
TEST_F(RegistrationTest, AHandshakeDirectoryOthersMayWriteIsRefusedAtStart) {
  DaemonOptions o;
  o.dir = dir_;
  o.metrics = false;
  o.start_timeout = std::chrono::seconds(20);
  // memsnapd creates a missing one (0755) and uses it.
  o.overrides = {"control.handshake_directory=" + dir_ + "/made"};
  {
    auto d = Daemon::start(o);
    ASSERT_TRUE(d.ok()) << d.error().to_string();
    auto health = (*d)->call("GET", "/v1/health");
    ASSERT_TRUE(health.ok());
    EXPECT_EQ(health->body["handshake_dir"], dir_ + "/made");
  }
  struct stat st {};
  ASSERT_EQ(::lstat((dir_ + "/made").c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0755u);
  const std::string open_dir = dir_ + "/open";
  ASSERT_EQ(::mkdir(open_dir.c_str(), 0777), 0);
  ASSERT_EQ(::chmod(open_dir.c_str(), 0777), 0);
  o.overrides = {"control.handshake_directory=" + open_dir};
  o.start_timeout = std::chrono::seconds(5);
  auto d = Daemon::start(o);
  EXPECT_FALSE(d.ok());
  std::ifstream log(dir_ + "/memsnapd.log");
  const std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("writable by nobody else"), std::string::npos) << text;
  // A directory of its own, but inside one others may write to (and rename it in).
  const std::string inner = open_dir + "/inner";
  ASSERT_EQ(::mkdir(inner.c_str(), 0755), 0);
  o.overrides = {"control.handshake_directory=" + inner};
  auto d2 = Daemon::start(o);
  EXPECT_FALSE(d2.ok());
  std::ifstream log2(dir_ + "/memsnapd.log");
  const std::string text2((std::istreambuf_iterator<char>(log2)), std::istreambuf_iterator<char>());
  EXPECT_NE(text2.find("which others may change"), std::string::npos) << text2;
}

}  // namespace
}  // namespace memsnap::fleet
