// A one-line status for the long commands (compare, experiment run, qemu cycle): rewritten in
// place with '\r' on a terminal, so an operator sees what runs and how far it is; nothing at all
// when the stream is not a terminal (a pipe, a file) or the command prints --json.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace memsnap::cli {

// "what [step/steps] detail (elapsed s)", cut to fit in `width` columns ([step/steps] left out
// when steps is 0).
std::string status_text(const std::string& what, std::size_t step, std::size_t steps,
                        const std::string& detail, double elapsed_seconds, std::size_t width);

class StatusLine {
 public:
  // Draws on out only when out_is_terminal. tick > 0: also redraws that often (the elapsed time
  // moves while one step takes long, e.g. a VM booting).
  StatusLine(std::FILE* out, bool out_is_terminal,
             std::chrono::milliseconds tick = std::chrono::milliseconds(0));
  // On stderr, when it is a terminal and the command does not print JSON; redrawn every second.
  static std::unique_ptr<StatusLine> on_stderr(bool json);
  ~StatusLine();
  StatusLine(const StatusLine&) = delete;
  StatusLine& operator=(const StatusLine&) = delete;

  bool shown() const noexcept { return shown_; }
  // Step `step` of `steps` (1-based; steps 0 when unknown) of `what` is running.
  void update(const std::string& what, std::size_t step, std::size_t steps,
              const std::string& detail = "");
  // The same step, a new detail.
  void detail(const std::string& detail);
  // Clears the line, so what is printed next starts at column 0. Idempotent.
  void finish();

 private:
  void draw();  // with mutex_ held

  std::FILE* out_;
  const bool shown_;
  std::size_t width_ = 80;
  const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  bool drawn_ = false;
  std::string what_, detail_;
  std::size_t step_ = 0, steps_ = 0;
  std::thread ticker_;
};

}  // namespace memsnap::cli
