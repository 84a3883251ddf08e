// The live flag set of a process: an immutable FlagSet snapshot, swapped atomically when its
// source (a file or a directory of files) changes on disk.
//
// Readers call snapshot() and evaluate against what they got; a reload builds the next FlagSet
// off to the side and swaps it in, so an evaluation in progress is never blocked and never sees
// a half-built set. The current pointer is guarded by a mutex held only to copy or swap a
// shared_ptr (never while parsing, never while destroying an old set), not by
// std::atomic<std::shared_ptr>: libstdc++ 12's load() releases its internal lock with relaxed
// ordering, which is a data race by the memory model and is reported by TSan. A source
// that fails to read, parse or validate (strict: one bad flag rejects the file) keeps the last
// good snapshot; the failure is logged (spdlog, warn, with file:line:col) and counted.
//
// Watching uses inotify on the directory that holds the source (or the source directory itself),
// so it survives editors that write a temporary file and rename it over the original, and
// Kubernetes ConfigMap volumes, where the visible file is a symlink through "..data" and an
// update swaps that symlink with a rename.
//
// Thread-safety: every public method may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "flags/flag_set.h"

namespace memsnap::flags {

struct ReloadStats {
  std::uint64_t generation = 0;  // bumped on every snapshot swapped in (the first load is 1)
  std::uint64_t reloads_ok = 0;         // re-reads that swapped in a new snapshot
  std::uint64_t reloads_failed = 0;
  std::uint64_t reloads_unchanged = 0;  // re-reads of what was already loaded: no reload
  // Why the source as it is on disk now is not in force ("file:line:col: message" of the last
  // re-read, when it failed); empty when it is (the first load, or any re-read that succeeded,
  // changed or not, clears it). reloads_failed keeps the count of past failures.
  std::string last_error;
};

class FlagStore {
 public:
  struct Options {
    LoadOptions load{.strict = true};
    // Quiet time after the last inotify event before reloading: coalesces the several events
    // of one save.
    std::chrono::milliseconds debounce{10};
  };

  // Loads path (file or directory) once. Null, with the diagnostics in *error, if that fails.
  static std::unique_ptr<FlagStore> open(const std::string& path, const Options& options,
                                         std::string* error);
  // A store around a fixed set (no source, no reloads): for tests and embedders.
  explicit FlagStore(std::shared_ptr<const FlagSet> flags);
  ~FlagStore();
  FlagStore(const FlagStore&) = delete;
  FlagStore& operator=(const FlagStore&) = delete;

  [[nodiscard]] std::shared_ptr<const FlagSet> snapshot() const noexcept {
    std::lock_guard<std::mutex> lock(current_mu_);
    return current_;
  }

  // Re-reads the source now. True if a new snapshot was swapped in or the content was unchanged;
  // false (last good snapshot kept, error counted and logged) if it failed.
  bool reload();

  // Starts the watcher thread. False (with a message) if inotify cannot watch the source.
  bool watch(std::string* error);
  void stop_watching();

  [[nodiscard]] ReloadStats stats() const;
  [[nodiscard]] const std::string& path() const noexcept { return path_; }

 private:
  FlagStore(std::string path, Options options);
  void watch_loop();

  std::string path_;
  Options options_;
  // Swaps in a new set; the old one is released after the lock (its destruction can be long).
  void publish(std::shared_ptr<const FlagSet> next);

  mutable std::mutex current_mu_;
  std::shared_ptr<const FlagSet> current_;

  mutable std::mutex stats_mu_;  // guards stats_ and last_attempt_hash_; never held by readers
  ReloadStats stats_;
  std::uint64_t last_attempt_hash_ = 0;
  std::mutex reload_mu_;  // one reload at a time

  int inotify_fd_ = -1;
  int stop_fd_ = -1;  // eventfd that wakes the watcher to stop
  std::thread watcher_;
};

}  // namespace memsnap::flags
