#include "tools/memsnap/progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

namespace memsnap::cli {

std::string status_text(const std::string& what, std::size_t step, std::size_t steps,
                        const std::string& detail, double elapsed_seconds, std::size_t width) {
  std::string text = what;
  if (steps > 0) text += " [" + std::to_string(step) + "/" + std::to_string(steps) + "]";
  if (!detail.empty()) text += " " + detail;
  const std::string clock = " (" + std::to_string(static_cast<long>(elapsed_seconds)) + " s)";
  // Never as wide as the terminal: a wrapped line cannot be rewritten with '\r'.
  const std::size_t room = width > 1 ? width - 1 : 0;
  if (text.size() + clock.size() > room) {
    const std::size_t keep = room > clock.size() + 3 ? room - clock.size() - 3 : 0;
    text = text.substr(0, keep) + "...";
  }
  text += clock;
  return text.size() > room ? text.substr(0, room) : text;
}

StatusLine::StatusLine(std::FILE* out, bool out_is_terminal, std::chrono::milliseconds tick)
    : out_(out), shown_(out_is_terminal) {
  if (!shown_) return;
  winsize ws{};
  if (::ioctl(::fileno(out_), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) width_ = ws.ws_col;
  if (tick.count() <= 0) return;
  ticker_ = std::thread([this, tick] {
    std::unique_lock lock(mutex_);
    while (!wake_.wait_for(lock, tick, [this] { return stop_; })) {
      if (drawn_) draw();
    }
  });
}

std::unique_ptr<StatusLine> StatusLine::on_stderr(bool json) {
  return std::make_unique<StatusLine>(stderr, !json && ::isatty(STDERR_FILENO) != 0,
                                      std::chrono::seconds(1));
}

StatusLine::~StatusLine() { finish(); }

void StatusLine::update(const std::string& what, std::size_t step, std::size_t steps,
                        const std::string& detail) {
  if (!shown_) return;
  std::lock_guard lock(mutex_);
  what_ = what;
  step_ = step;
  steps_ = steps;
  detail_ = detail;
  draw();
}

void StatusLine::detail(const std::string& detail) {
  if (!shown_) return;
  std::lock_guard lock(mutex_);
  detail_ = detail;
  draw();
}

void StatusLine::draw() {
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  // "\033[K" clears what a longer previous status left to the right.
  std::fprintf(out_, "\r%s\033[K",
               status_text(what_, step_, steps_, detail_, elapsed, width_).c_str());
  std::fflush(out_);
  drawn_ = true;
}

void StatusLine::finish() {
  if (!shown_) return;
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
    if (drawn_) {
      std::fputs("\r\033[K", out_);
      std::fflush(out_);
      drawn_ = false;
    }
  }
  wake_.notify_all();
  if (ticker_.joinable()) ticker_.join();
}

}  // namespace memsnap::cli
