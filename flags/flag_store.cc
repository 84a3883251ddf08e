#include "flags/flag_store.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include <spdlog/spdlog.h>

namespace memsnap::flags {

FlagStore::FlagStore(std::string path, Options options)
    : path_(std::move(path)), options_(options) {}

FlagStore::FlagStore(std::shared_ptr<const FlagSet> flags) {
  publish(std::move(flags));
  stats_.generation = 1;
}

void FlagStore::publish(std::shared_ptr<const FlagSet> next) {
  {
    std::lock_guard<std::mutex> lock(current_mu_);
    current_.swap(next);
  }
  // `next` now holds the previous set; it is released here, outside the lock.
}

FlagStore::~FlagStore() { stop_watching(); }

std::unique_ptr<FlagStore> FlagStore::open(const std::string& path, const Options& options,
                                           std::string* error) {
  std::unique_ptr<FlagStore> store(new FlagStore(path, options));
  LoadResult r;
  try {
    r = load_flag_source(path, options.load);
  } catch (const std::exception& e) {
    if (error != nullptr) *error = path + ": cannot load: " + e.what();
    return nullptr;
  }
  if (!r.ok()) {
    if (error != nullptr) *error = r.error_text();
    return nullptr;
  }
  store->last_attempt_hash_ = r.flags->content_hash();
  store->publish(std::move(r.flags));
  store->stats_.generation = 1;
  return store;
}

bool FlagStore::reload() {
  if (path_.empty()) return true;
  std::lock_guard<std::mutex> one_at_a_time(reload_mu_);
  // Nothing escapes a reload (the watcher thread would terminate the process): a source that
  // cannot even be loaded is a failed reload like any other, and the last good set stays.
  LoadResult r;
  try {
    r = load_flag_source(path_, options_.load);
  } catch (const std::exception& e) {
    r = LoadResult{};
    r.diagnostics.push_back(
        {Diagnostic::Severity::kError, path_, 0, 0, std::string("cannot load: ") + e.what()});
  }
  if (!r.ok()) {
    const std::string text = r.error_text();
    std::uint64_t generation = 0;
    {
      std::lock_guard<std::mutex> lock(stats_mu_);
      ++stats_.reloads_failed;
      stats_.last_error = text;
      generation = stats_.generation;
    }
    spdlog::warn("flags: reload of {} failed, keeping generation {}: {}", path_, generation, text);
    return false;
  }
  const std::uint64_t hash = r.flags->content_hash();
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    const auto current = snapshot();
    if (current != nullptr && current->content_hash() == hash) {
      ++stats_.reloads_unchanged;
      stats_.last_error.clear();  // the source is good again (e.g. a bad edit reverted)
      last_attempt_hash_ = hash;
      return true;
    }
  }
  const std::size_t count = r.flags->size();
  publish(std::move(r.flags));
  std::uint64_t generation = 0;
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.reloads_ok;
    stats_.last_error.clear();
    generation = ++stats_.generation;
    last_attempt_hash_ = hash;
  }
  spdlog::info("flags: loaded {} ({} flags), generation {}", path_, count, generation);
  return true;
}

ReloadStats FlagStore::stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return stats_;
}

bool FlagStore::watch(std::string* error) {
  if (watcher_.joinable()) return true;
  if (path_.empty()) {
    if (error != nullptr) *error = "no source to watch";
    return false;
  }
  namespace fs = std::filesystem;
  std::error_code ec;
  // A directory source is watched itself; a file through its directory, which sees renames onto
  // it and ConfigMap "..data" symlink swaps.
  const std::string dir = fs::is_directory(path_, ec)
                              ? path_
                              : fs::absolute(fs::path(path_), ec).parent_path().string();
  inotify_fd_ = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (inotify_fd_ < 0) {
    if (error != nullptr) *error = std::string("inotify_init1: ") + std::strerror(errno);
    return false;
  }
  constexpr std::uint32_t kMask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE |
                                  IN_DELETE | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF;
  if (inotify_add_watch(inotify_fd_, dir.c_str(), kMask) < 0) {
    if (error != nullptr) *error = "inotify_add_watch " + dir + ": " + std::strerror(errno);
    ::close(inotify_fd_);
    inotify_fd_ = -1;
    return false;
  }
  stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) {
    if (error != nullptr) *error = std::string("eventfd: ") + std::strerror(errno);
    ::close(inotify_fd_);
    inotify_fd_ = -1;
    return false;
  }
  watcher_ = std::thread([this] { watch_loop(); });
  return true;
}

void FlagStore::stop_watching() {
  if (watcher_.joinable()) {
    const std::uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = ::write(stop_fd_, &one, sizeof(one));
    watcher_.join();
  }
  if (inotify_fd_ >= 0) ::close(inotify_fd_);
  if (stop_fd_ >= 0) ::close(stop_fd_);
  inotify_fd_ = stop_fd_ = -1;
}

void FlagStore::watch_loop() {
  alignas(struct inotify_event) char buf[16384];
  auto drain = [&] {
    while (::read(inotify_fd_, buf, sizeof(buf)) > 0) {
    }
  };
  for (;;) {
    pollfd fds[2] = {{inotify_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("flags: watcher poll failed: {}", std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    drain();
    // Coalesce the burst of events one save makes, but never wait forever under a steady stream.
    const auto deadline = std::chrono::steady_clock::now() + 20 * options_.debounce;
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd again[2] = {{inotify_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
      const int n = ::poll(again, 2, static_cast<int>(options_.debounce.count()));
      if (n <= 0) break;
      if (again[1].revents != 0) return;
      drain();
    }
    reload();
  }
}

}  // namespace memsnap::flags
