#include "tools/guest_client/guest_client.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>

#include "core/pattern.h"
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

Result<std::unique_ptr<GuestProcess>> GuestProcess::spawn(const GuestOptions& o) {
  const std::string binary = o.binary.empty() ? default_guest_binary() : o.binary;
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
  g->from_guest_ = fdopen(out_pipe[0], "r");
  auto layout = g->command("");
  if (!layout.ok()) return std::move(layout).error();
  try {
    g->guest_size_ = (*layout)["guest_size"].get<std::uint64_t>();
    g->seed_ = (*layout)["seed"].get<std::uint64_t>();
    g->memfd_number_ = (*layout)["memfd_fd"].get<int>();
    for (const auto& r : (*layout)["regions"]) {
      g->regions_.push_back({r["guest_offset"].get<std::uint64_t>(),
                             r["host_addr"].get<std::uint64_t>(), r["size"].get<std::uint64_t>()});
    }
  } catch (const std::exception& e) {
    return make_error(Errc::kInternal,
                      std::string("unexpected layout from memsnap-guest: ") + e.what());
  }
  const std::uint64_t pages = g->guest_size_ / 4096;
  g->expected_.assign(pages, 1);
  for (std::uint64_t p : pattern::never_written_pages(pages, o.zero_fraction, o.seed)) {
    g->expected_[p] = 0;
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
  if (from_guest_ != nullptr) std::fclose(from_guest_);
}

void GuestProcess::kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  ::kill(pid_, SIGCONT);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

Result<nlohmann::json> GuestProcess::command(const std::string& line) {
  if (pid_ <= 0) return make_error(Errc::kProcessGone, "memsnap-guest is not running");
  if (!line.empty()) {
    const std::string msg = line + "\n";
    if (write(to_guest_, msg.data(), msg.size()) != static_cast<ssize_t>(msg.size())) {
      return make_error(Errc::kIoError, "cannot write to memsnap-guest", errno);
    }
    if (line == "exit") return nlohmann::json{};
  }
  std::string reply;
  char buf[65536];
  while (std::fgets(buf, sizeof(buf), from_guest_) != nullptr) {
    reply += buf;
    if (!reply.empty() && reply.back() == '\n') break;
  }
  if (reply.empty()) return make_error(Errc::kProcessGone, "memsnap-guest closed its output");
  auto j = nlohmann::json::parse(reply, nullptr, false);
  if (j.is_discarded()) return make_error(Errc::kInternal, "memsnap-guest said: " + reply);
  if (j.contains("error")) return make_error(Errc::kInvalidArgument, j["error"].get<std::string>());
  return j;
}

Result<std::vector<plugin::ByteRange>> GuestProcess::dirty(double fraction, bool sequential,
                                                           std::uint64_t seed) {
  auto j = command("dirty " + std::to_string(fraction) +
                   (sequential ? " sequential " : " random ") + std::to_string(seed));
  if (!j.ok()) return std::move(j).error();
  const auto generation = (*j)["generation"].get<std::uint32_t>();
  std::vector<plugin::ByteRange> ranges;
  for (const auto& r : (*j)["dirty"]) {
    const plugin::ByteRange range{r[0].get<std::uint64_t>(), r[1].get<std::uint64_t>()};
    for (std::uint64_t off = range.offset; off < range.offset + range.length; off += 4096) {
      expected_[off / 4096] = generation;
    }
    ranges.push_back(range);
  }
  return ranges;
}

Result<std::uint64_t> GuestProcess::verify() {
  auto j = command("verify");
  if (!j.ok()) return std::move(j).error();
  return (*j)["mismatches"].get<std::uint64_t>();
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
    if (auto s = chain.read(off, n, buf.data()); !s.ok()) return std::move(s).error();
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
