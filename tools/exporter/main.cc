// memsnap-exporter: the background export of one handover pause (issue 19). memsnapd answers the
// pause once the VMM is stopped and starts this process, in its own session, with the memfd
// behind guest memory as fd 3 and a socket to memsnapd as fd 4 (tools/exporter/export_protocol.h).
// It loads the strategy's plugin itself, runs the ordinary pause pipeline (memsnap::pause) into
// the snapshot, and reports progress and the outcome to memsnapd. It outlives memsnapd: if
// memsnapd dies, it still commits the snapshot; if an attempt fails, it keeps the memory and runs
// again on "retry" -- or on its own, every retry interval, once memsnapd is gone -- until the
// snapshot is durable, or until "release". Nothing is reported durable unless memsnap::pause
// returned ok.
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "core/base/file_io.h"
#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "tools/exporter/export_protocol.h"
#include "tools/exporter/log_format.h"

namespace memsnap::exporter {
namespace {

constexpr auto kProgressEvery = std::chrono::milliseconds(100);

double process_cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// The socket to memsnapd: events out, the request and commands in, one a line. Once memsnapd is
// gone (EOF, or a write refused), it stays gone: events are dropped and no command comes.
class Channel {
 public:
  explicit Channel(int fd) : fd_(fd) {}
  bool peer_gone() const { return gone_; }
  int fd() const { return fd_; }

  void send(const ExportEvent& event) {
    if (gone_) return;
    const std::string line = encode_event(event) + "\n";
    for (std::size_t off = 0; off < line.size();) {
      const ssize_t n = ::send(fd_, line.data() + off, line.size() - off, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        lost("writing to it failed: " + std::string(std::strerror(errno)));
        return;
      }
      off += std::size_t(n);
    }
  }

  // A complete line if one is buffered, else reads once (blocking only if block). nullopt with
  // nothing buffered: no line yet (or the peer is gone, then peer_gone()).
  std::optional<std::string> next_line(bool block) {
    for (;;) {
      if (const auto nl = buffer_.find('\n'); nl != std::string::npos) {
        std::string line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        return line;
      }
      if (gone_) return std::nullopt;
      char chunk[4096];
      const ssize_t n = ::recv(fd_, chunk, sizeof chunk, block ? 0 : MSG_DONTWAIT);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return std::nullopt;
      if (n <= 0) {
        lost(n == 0 ? "it closed its end"
                    : "reading from it failed: " + std::string(std::strerror(errno)));
        return std::nullopt;
      }
      buffer_.append(chunk, std::size_t(n));
    }
  }

 private:
  void lost(const std::string& why) {
    if (gone_) return;
    gone_ = true;
    spdlog::warn("memsnapd is gone ({}); the export goes on without it", why);
  }

  int fd_;
  bool gone_ = false;
  std::string buffer_;
};

class Exporter {
 public:
  Exporter(ExporterRequest request, Channel& channel)
      : request_(std::move(request)), channel_(channel) {
    request_.pause.progress_bytes = &done_;
    request_.pause.total_bytes = &total_;
  }

  // Attempts until durable (0) or released (kExitReleased).
  int run() {
    for (;;) {
      ++attempt_;
      done_.store(0, std::memory_order_relaxed);
      if (attempt_ > 1) send(EventKind::kRetrying);
      spdlog::info("export attempt {}: {} with strategy {}", attempt_, request_.pause.out_path,
                   request_.pause.strategy);
      auto result = run_attempt();
      if (result.ok()) {
        spdlog::info("snapshot {} is durable: {} dirty bytes in {:.3f} s (attempt {})",
                     result->snapshot_path, result->dirty_bytes, result->wall_seconds, attempt_);
        // Let go of the memory before saying so: memsnapd counts it as no longer held the
        // moment it hears durable, and this process's exit may take a while (a sanitizer's).
        let_go_of_the_memory();
        ExportEvent e = event(EventKind::kDurable);
        e.report = std::move(*result);
        channel_.send(e);
        return kExitDurable;
      }
      const Error error = std::move(result).error();
      // kDataAtRisk: the strategy released memory it could not put back; the memfd no longer
      // holds the guest, so running again would commit holes. The kept file and the memfd
      // stay where they are for `memsnap recover`.
      const bool retryable = error.code != Errc::kDataAtRisk;
      spdlog::error("export attempt {} of {} failed: {}; the guest memory stays held (pid {}){}",
                    attempt_, request_.pause.out_path, error.to_string(), ::getpid(),
                    retryable ? "" : "; it cannot be retried, only released");
      ExportEvent e = event(EventKind::kFailed);
      e.error = error;
      e.retryable = retryable;
      channel_.send(e);
      if (!wait_for_retry(retryable)) {
        spdlog::warn("export of {} released: the guest memory is let go", request_.pause.out_path);
        let_go_of_the_memory();
        send(EventKind::kReleased);
        return kExitReleased;
      }
    }
  }

 private:
  ExportEvent event(EventKind kind) const {
    ExportEvent e;
    e.kind = kind;
    e.attempt = attempt_;
    e.bytes_done = done_.load(std::memory_order_relaxed);
    e.bytes_total = total_.load(std::memory_order_relaxed);
    e.cpu_seconds = process_cpu_seconds();
    return e;
  }
  void send(EventKind kind) { channel_.send(event(kind)); }

  // Closes this process's reference to the guest memfd (no mapping of it outlives an attempt).
  void let_go_of_the_memory() {
    if (request_.pause.memfd < 0) return;
    ::close(request_.pause.memfd);
    request_.pause.memfd = -1;
  }

  // Plugins are loaded by the first attempt that gets them all; a failure to load one is an
  // attempt's failure like any other (the memory stays held; the file may be fixed).
  Status load_plugins() {
    if (plugins_loaded_) return {};
    registry_ = PluginRegistry();
    for (const auto& path : request_.plugins) {
      if (auto r = registry_.load_file(path); !r.ok()) {
        return std::move(r).error().with_context("loading plugin " + path);
      }
    }
    plugins_loaded_ = true;
    return {};
  }

  // One memsnap::pause on a worker thread, while this one reports progress and reads commands.
  Result<PauseReport> run_attempt() {
    MEMSNAP_RETURN_IF_ERROR(load_plugins());
    const io::UniqueFd finished(::eventfd(0, EFD_CLOEXEC));
    if (finished.get() < 0) {
      return make_error(Errc::kIoError, io::errno_message("eventfd", errno), errno);
    }
    Result<PauseReport> result = make_error(Errc::kInternal, "not run");
    std::thread worker([&] {
      result = memsnap::pause(registry_, request_.pause);
      const std::uint64_t one = 1;
      [[maybe_unused]] const ssize_t n = ::write(finished.get(), &one, sizeof one);
    });
    std::uint64_t sent_done = ~0ULL, sent_total = ~0ULL;
    for (;;) {
      pollfd fds[2] = {{finished.get(), POLLIN, 0}, {channel_.fd(), POLLIN, 0}};
      const int n = ::poll(fds, channel_.peer_gone() ? 1 : 2, int(kProgressEvery.count()));
      if (n > 0 && (fds[0].revents & POLLIN) != 0) break;
      if (n > 0 && !channel_.peer_gone() && fds[1].revents != 0) {
        while (auto line = channel_.next_line(false)) {
          spdlog::warn("ignoring \"{}\" from memsnapd: the export is running", *line);
        }
      }
      const auto done = done_.load(std::memory_order_relaxed);
      const auto total = total_.load(std::memory_order_relaxed);
      if (done != sent_done || total != sent_total) {
        send(EventKind::kProgress);
        sent_done = done;
        sent_total = total;
      }
    }
    worker.join();
    return result;
  }

  // After a failure: true to run again, false when released. While memsnapd is there, waits for
  // its command; once it is gone, waits one retry interval (or forever if not retryable).
  bool wait_for_retry(bool retryable) {
    while (!channel_.peer_gone()) {
      auto line = channel_.next_line(true);
      if (!line) continue;  // the peer is gone now
      if (*line == "release") return false;
      if (*line == "retry" && retryable) return true;
      spdlog::warn("ignoring \"{}\" from memsnapd: the export has failed{}", *line,
                   retryable ? "" : " and cannot be retried");
    }
    if (!retryable) {
      spdlog::critical(
          "export of {} failed with data at risk and memsnapd is gone: holding the guest memory "
          "(fd 3 of pid {}) until this process is killed",
          request_.pause.out_path, ::getpid());
      for (;;) ::pause();
    }
    spdlog::warn("retrying the export of {} in {} ms on its own (memsnapd is gone)",
                 request_.pause.out_path, request_.retry_interval.count());
    std::this_thread::sleep_for(request_.retry_interval);
    return true;
  }

  ExporterRequest request_;
  Channel& channel_;
  PluginRegistry registry_;
  bool plugins_loaded_ = false;
  int attempt_ = 0;
  std::atomic<std::uint64_t> done_{0};
  std::atomic<std::uint64_t> total_{0};
};

int run(int argc, char** argv) {
  if (argc > 1) {
    std::fprintf(stderr,
                 "usage: memsnap-exporter (started by memsnapd: fd 3 the guest memfd, fd 4 the "
                 "socket to memsnapd; see tools/exporter/export_protocol.h)\n");
    return std::strcmp(argv[1], "--help") == 0 ? 0 : 2;
  }
  // memsnapd may be gone by the time anything is written to it.
  ::signal(SIGPIPE, SIG_IGN);
  // memsnapd's logging.format and logging.level (tools/exporter/log_format.h).
  const char* format = std::getenv(kLogFormatEnv);
  const char* level = std::getenv(kLogLevelEnv);
  auto logger = spdlog::stderr_color_mt("memsnap-exporter");
  logger->set_formatter(log_formatter(format != nullptr && std::strcmp(format, "json") == 0,
                                      "memsnap-exporter[%P]", "memsnap-exporter"));
  if (level != nullptr && *level != '\0') {
    const auto parsed = spdlog::level::from_str(level);
    // from_str gives off for a name it does not know: an unknown level is not silence.
    if (parsed != spdlog::level::off || std::strcmp(level, "off") == 0) logger->set_level(parsed);
  }
  spdlog::set_default_logger(logger);
  // Only what memsnapd meant to give: no stray descriptor of another sandbox is held.
  ::close_range(kChannelFd + 1, ~0U, 0);

  Channel channel(kChannelFd);
  auto first = channel.next_line(true);
  if (!first) {
    spdlog::error("no export request on fd {}", kChannelFd);
    return kExitStartup;
  }
  Result<ExporterRequest> request = make_error(Errc::kInvalidArgument, "unparsed");
  try {
    request = request_from_json(nlohmann::json::parse(*first));
  } catch (const nlohmann::json::exception& e) {
    request = make_error(Errc::kInvalidArgument, std::string("not JSON: ") + e.what());
  }
  if (!request.ok()) {
    spdlog::error("bad export request: {}", request.error().to_string());
    ExportEvent e;
    e.kind = EventKind::kFailed;
    e.error = request.error();
    e.retryable = false;
    channel.send(e);
    return kExitStartup;
  }
  Exporter exporter(std::move(*request), channel);
  return exporter.run();
}

}  // namespace
}  // namespace memsnap::exporter

int main(int argc, char** argv) { return memsnap::exporter::run(argc, argv); }
