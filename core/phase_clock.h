// Times consecutive phases of one operation (a pause, a resume) on the calling thread, wall and
// thread CPU, the same way for every strategy.
#pragma once

#include <time.h>

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "core/pause.h"

namespace memsnap {

inline double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

class PhaseClock {
 public:
  explicit PhaseClock(std::vector<PhaseTiming>& out) : out_(out) {}
  ~PhaseClock() { stop(); }
  PhaseClock(const PhaseClock&) = delete;
  PhaseClock& operator=(const PhaseClock&) = delete;

  // Ends the running phase, if any, and starts `name`.
  void start(std::string name) {
    stop();
    name_ = std::move(name);
    wall_start_ = std::chrono::steady_clock::now();
    cpu_start_ = thread_cpu_seconds();
  }
  void stop() {
    if (name_.empty()) return;
    const std::chrono::duration<double> wall = std::chrono::steady_clock::now() - wall_start_;
    out_.push_back({std::move(name_), wall.count(), thread_cpu_seconds() - cpu_start_});
    name_.clear();
  }

 private:
  std::vector<PhaseTiming>& out_;
  std::string name_;
  std::chrono::steady_clock::time_point wall_start_;
  double cpu_start_ = 0;
};

}  // namespace memsnap
