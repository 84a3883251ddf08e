#include "tools/guest_client/guest_client.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>

#include "core/pattern/pattern.h"
#include "core/snapshot/snapshot_chain.h"

extern char** environ;

namespace memsnap {

std::string default_guest_binary() {
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (const auto& dir : {self.parent_path(), self.parent_path().parent_path() / "bin"}) {
      if (std::filesystem::exists(dir / "memsnap-guest")) return (dir / "memsnap-guest").string();
    }
  }
  if (const char* bin = std::getenv("MEMSNAP_BIN_DIR")) return std::string(bin) + "/memsnap-guest";
  return "memsnap-guest";
}

namespace {

// A temporary file holding the --expect table; removed when this goes out of scope (the guest
// has read it by the time it prints its layout).
class ExpectFile {
 public:
  ExpectFile() = default;
  ExpectFile(const ExpectFile&) = delete;
  ExpectFile& operator=(const ExpectFile&) = delete;
  ~ExpectFile() {
    if (!path_.empty()) unlink(path_.c_str());
  }

  Status write(const std::vector<std::uint32_t>& generations) {
    const char* dir = std::getenv("TMPDIR");
    std::string tmpl =
        std::string(dir != nullptr && *dir != '\0' ? dir : "/tmp") + "/memsnap-guest-expect-XXXXXX";
    const int fd = mkstemp(tmpl.data());
    if (fd < 0) return make_error(Errc::kIoError, "mkstemp " + tmpl, errno);
    path_ = tmpl;
    std::vector<unsigned char> bytes(generations.size() * 4);
    for (std::size_t i = 0; i < generations.size(); ++i) {
      for (int b = 0; b < 4; ++b) {
        bytes[4 * i + b] = static_cast<unsigned char>(generations[i] >> (8 * b));
      }
    }
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        const int err = errno;
        close(fd);
        return make_error(Errc::kIoError, "write " + path_, err);
      }
      done += static_cast<std::size_t>(n);
    }
    close(fd);
    return Status();
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace

Result<std::unique_ptr<GuestProcess>> GuestProcess::spawn(const GuestOptions& o) {
  const std::string binary = o.binary.empty() ? default_guest_binary() : o.binary;
  const std::uint64_t pages = o.size / 4096;
  if (!o.expect.empty() && (!o.no_fill || o.expect.size() != pages)) {
    return make_error(Errc::kInvalidArgument,
                      "GuestOptions::expect needs no_fill and one entry per 4 KiB page (" +
                          std::to_string(pages) + "), has " + std::to_string(o.expect.size()));
  }
  if (o.accept_memfd && o.handshake_socket.empty()) {
    return make_error(Errc::kInvalidArgument, "GuestOptions::accept_memfd needs handshake_socket");
  }
  std::vector<std::string> args = {binary,
                                   "--size",
                                   std::to_string(o.size),
                                   "--backing",
                                   o.backing,
                                   "--regions",
                                   std::to_string(o.regions),
                                   "--seed",
                                   std::to_string(o.seed),
                                   "--zero-fraction",
                                   std::to_string(o.zero_fraction)};
  if (o.thp) args.push_back("--thp");
  if (o.no_fill) args.push_back("--no-fill");
  ExpectFile expect_file;
  if (!o.expect.empty()) {
    MEMSNAP_RETURN_IF_ERROR(expect_file.write(o.expect));
    args.push_back("--expect");
    args.push_back(expect_file.path());
  }
  if (!o.handshake_socket.empty()) {
    args.push_back("--handshake");
    args.push_back(o.handshake_socket);
    if (o.accept_memfd) args.push_back("--accept-memfd");
    if (!o.track_writes) args.push_back("--no-track-writes");
    if (o.track_writes && o.write_faults) {
      args.push_back("--track-writes");
      args.push_back("sync");
    }
    if (o.ack != "ok") {
      args.push_back("--ack");
      args.push_back(o.ack);
    }
    if (o.stray_page) args.push_back("--stray-page");
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  int in_pipe[2], out_pipe[2];
  if (pipe2(in_pipe, O_CLOEXEC) != 0) return make_error(Errc::kIoError, "pipe", errno);
  if (pipe2(out_pipe, O_CLOEXEC) != 0) {
    close(in_pipe[0]);
    close(in_pipe[1]);
    return make_error(Errc::kIoError, "pipe", errno);
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in_pipe[0], 0);
  posix_spawn_file_actions_adddup2(&actions, out_pipe[1], 1);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, binary.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(in_pipe[0]);
  close(out_pipe[1]);
  if (rc != 0) {
    close(in_pipe[1]);
    close(out_pipe[0]);
    return make_error(Errc::kIoError, "cannot start " + binary + ": " + std::strerror(rc), rc);
  }
  std::unique_ptr<GuestProcess> g(new GuestProcess());
  g->pid_ = pid;
  g->to_guest_ = in_pipe[1];
  g->from_guest_ = out_pipe[0];
  MEMSNAP_ASSIGN_OR_RETURN(auto layout, g->read_answer(-1));
  try {
    g->guest_size_ = layout["guest_size"].get<std::uint64_t>();
    g->seed_ = layout["seed"].get<std::uint64_t>();
    g->memfd_number_ = layout["memfd_fd"].get<int>();
    g->uffd_ = layout.value("uffd", false);
    g->wp_async_ = layout.value("wp_async", false);
    g->write_faults_ = layout.value("write_faults", false);
    for (const auto& r : layout["regions"]) {
      g->regions_.push_back({r["guest_offset"].get<std::uint64_t>(),
                             r["host_addr"].get<std::uint64_t>(), r["size"].get<std::uint64_t>()});
    }
  } catch (const std::exception& e) {
    return make_error(Errc::kInternal,
                      std::string("unexpected layout from memsnap-guest: ") + e.what());
  }
  // Without a handshake the guest reads commands right away.
  g->ready_ = o.handshake_socket.empty();
  if (o.no_fill) {
    g->expected_ = o.expect.empty() ? std::vector<std::uint32_t>(pages, 0) : o.expect;
  } else {
    g->expected_.assign(pages, 1);
    for (std::uint64_t p : pattern::never_written_pages(pages, o.zero_fraction, o.seed)) {
      g->expected_[p] = 0;
    }
  }
  return g;
}

GuestProcess::~GuestProcess() {
  if (pid_ > 0) {
    (void)command("exit");
    int status = 0;
    for (int i = 0; i < 200; ++i) {
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    kill();
  }
  if (to_guest_ >= 0) close(to_guest_);
  if (from_guest_ >= 0) close(from_guest_);
}

void GuestProcess::kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  ::kill(pid_, SIGCONT);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

Status GuestProcess::send_line(const std::string& line) {
  if (pid_ <= 0) return make_error(Errc::kProcessGone, "memsnap-guest is not running");
  const std::string msg = line + "\n";
  // A guest that died (killed, or ended with its handler) closed the pipe: that is EPIPE here,
  // never a SIGPIPE that kills the caller. SIGPIPE is blocked around the write and a pending one
  // taken back.
  sigset_t pipe_signal, old_mask;
  sigemptyset(&pipe_signal);
  sigaddset(&pipe_signal, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_signal, &old_mask);
  const ssize_t n = write(to_guest_, msg.data(), msg.size());
  const int err = errno;
  if (n < 0 && err == EPIPE) {
    const timespec now{0, 0};
    (void)sigtimedwait(&pipe_signal, nullptr, &now);
  }
  pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
  if (n != static_cast<ssize_t>(msg.size())) {
    return make_error(err == EPIPE ? Errc::kProcessGone : Errc::kIoError,
                      "cannot write to memsnap-guest", err);
  }
  return Status();
}

Result<nlohmann::json> GuestProcess::read_answer(int timeout_ms) {
  if (pid_ <= 0) return make_error(Errc::kProcessGone, "memsnap-guest is not running");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  std::size_t eol;
  while ((eol = buffered_.find('\n')) == std::string::npos) {
    int wait = -1;
    if (timeout_ms >= 0) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      wait = static_cast<int>(std::max<std::int64_t>(0, left.count()));
    }
    pollfd p{from_guest_, POLLIN, 0};
    const int r = poll(&p, 1, wait);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return make_error(Errc::kIoError, "poll on memsnap-guest's output", errno);
    if (r == 0) {
      return make_error(Errc::kHandshakeTimeout, "memsnap-guest did not answer within " +
                                                     std::to_string(timeout_ms) + " ms");
    }
    char buf[65536];
    const ssize_t n = read(from_guest_, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return make_error(Errc::kIoError, "cannot read from memsnap-guest", errno);
    if (n == 0) return make_error(Errc::kProcessGone, "memsnap-guest closed its output");
    buffered_.append(buf, static_cast<std::size_t>(n));
  }
  const std::string reply = buffered_.substr(0, eol);
  buffered_.erase(0, eol + 1);
  auto j = nlohmann::json::parse(reply, nullptr, false);
  if (j.is_discarded()) return make_error(Errc::kInternal, "memsnap-guest said: " + reply);
  if (j.contains("error")) return make_error(Errc::kInvalidArgument, j["error"].get<std::string>());
  return j;
}

void GuestProcess::take_ping(const nlohmann::json& j) {
  ready_ = true;
  uffd_ = j.value("uffd", uffd_);
  wp_async_ = j.value("wp_async", wp_async_);
  write_faults_ = j.value("write_faults", write_faults_);
  memfd_from_memsnap_ = j.value("memfd_from_memsnap", false);
  memfd_number_ = j.value("memfd_fd", memfd_number_);
}

Status GuestProcess::drain_pending() {
  while (pending_pings_ > 0) {
    MEMSNAP_ASSIGN_OR_RETURN(auto j, read_answer(-1));
    --pending_pings_;
    take_ping(j);
  }
  return Status();
}

Status GuestProcess::wait_ready(std::chrono::milliseconds timeout) {
  if (pending_pings_ == 0) {
    if (auto s = send_line("ping"); !s.ok()) return s;
    ++pending_pings_;
  }
  while (pending_pings_ > 0) {
    auto j = read_answer(static_cast<int>(timeout.count()));
    if (!j.ok()) {
      if (j.error().code == Errc::kHandshakeTimeout) {
        return make_error(Errc::kHandshakeTimeout,
                          "memsnap-guest is not ready after " + std::to_string(timeout.count()) +
                              " ms (handshake not accepted, or memsnap's reply not received)");
      }
      return std::move(j).error();
    }
    --pending_pings_;
    take_ping(*j);
  }
  return Status();
}

Result<nlohmann::json> GuestProcess::command(const std::string& line) {
  if (line == "exit") {
    MEMSNAP_RETURN_IF_ERROR(send_line(line));
    return nlohmann::json{};
  }
  MEMSNAP_RETURN_IF_ERROR(drain_pending());
  if (!line.empty()) {
    MEMSNAP_RETURN_IF_ERROR(send_line(line));
  }
  return read_answer(-1);
}

Result<std::vector<plugin::ByteRange>> GuestProcess::dirty(double fraction, bool sequential,
                                                           std::uint64_t seed) {
  MEMSNAP_ASSIGN_OR_RETURN(
      auto j, command("dirty " + std::to_string(fraction) +
                      (sequential ? " sequential " : " random ") + std::to_string(seed)));
  const auto generation = j["generation"].get<std::uint32_t>();
  std::vector<plugin::ByteRange> ranges;
  for (const auto& r : j["dirty"]) {
    const plugin::ByteRange range{r[0].get<std::uint64_t>(), r[1].get<std::uint64_t>()};
    for (std::uint64_t off = range.offset; off < range.offset + range.length; off += 4096) {
      expected_[off / 4096] = generation;
    }
    ranges.push_back(range);
  }
  return ranges;
}

Status GuestProcess::write_loop(std::uint64_t first_page, std::uint64_t count) {
  MEMSNAP_ASSIGN_OR_RETURN(
      auto j, command("write-loop " + std::to_string(first_page) + " " + std::to_string(count)));
  if (!j.value("writing", false)) {
    return make_error(Errc::kInvalidArgument, "write-loop: " + j.dump());
  }
  loop_first_ = first_page;
  loop_count_ = count;
  loop_stride_ = j.value("stride", std::uint64_t{1});
  return {};
}

Result<std::uint64_t> GuestProcess::write_rounds() {
  MEMSNAP_ASSIGN_OR_RETURN(auto j, command("write-status"));
  return j.value("rounds", std::uint64_t{0});
}

Result<nlohmann::json> GuestProcess::write_stop() {
  MEMSNAP_ASSIGN_OR_RETURN(auto j, command("write-stop"));
  if (!j.contains("generation"))
    return make_error(Errc::kInvalidArgument, "write-stop: " + j.dump());
  const auto gen = j["generation"].get<std::uint64_t>();
  const auto pos = j["position"].get<std::uint64_t>();
  const auto base = j["before"].get<std::uint64_t>();
  for (std::uint64_t i = 0; i < loop_count_; ++i) {
    const std::uint64_t page = write_loop_page(i);
    if (i < pos) {
      expected_[page] = static_cast<std::uint32_t>(gen);
    } else if (gen - 1 > base) {
      expected_[page] = static_cast<std::uint32_t>(gen - 1);
    }
  }
  return j;
}

Result<std::uint64_t> GuestProcess::verify() {
  MEMSNAP_ASSIGN_OR_RETURN(auto j, command("verify"));
  return j["mismatches"].get<std::uint64_t>();
}

Result<std::uint64_t> GuestProcess::discard(std::uint64_t first_page, std::uint64_t count) {
  MEMSNAP_ASSIGN_OR_RETURN(
      auto j, command("discard " + std::to_string(first_page) + " " + std::to_string(count)));
  const auto n = j["discarded"].get<std::uint64_t>();
  std::fill(expected_.begin() + static_cast<std::ptrdiff_t>(first_page),
            expected_.begin() + static_cast<std::ptrdiff_t>(first_page + n), 0U);
  return n;
}

Result<ChainCheck> check_chain_against_pattern(const SnapshotChain& chain, std::uint64_t seed,
                                               const std::vector<std::uint32_t>& expected) {
  constexpr std::uint64_t kPage = 4096;
  constexpr std::uint64_t kWindow = 4 << 20;
  std::vector<char> buf(kWindow);
  ChainCheck out;
  const std::uint64_t guest = expected.size() * kPage;
  for (std::uint64_t off = 0; off < guest; off += kWindow) {
    const std::uint64_t n = std::min(kWindow, guest - off);
    MEMSNAP_RETURN_IF_ERROR(chain.read(off, n, buf.data()));
    for (std::uint64_t p = 0; p < n / kPage; ++p) {
      const std::uint64_t page = off / kPage + p;
      ++out.pages;
      const auto c = pattern::check_page(buf.data() + p * kPage, kPage, seed, page, expected[page]);
      if (c.ok) continue;
      if (out.mismatches++ == 0) {
        out.first_mismatch = "page " + std::to_string(page) + " should hold generation " +
                             std::to_string(expected[page]) + " but holds page " +
                             std::to_string(c.found_page) + " generation " +
                             std::to_string(c.found_generation);
      }
    }
  }
  return out;
}

}  // namespace memsnap
