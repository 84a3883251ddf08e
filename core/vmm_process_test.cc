// The freezer against a real multi-threaded process: a pause is only consistent if no thread of
// the VMM can write guest memory once the freeze returns.
#include "core/vmm_process.h"

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace memsnap {
namespace {

constexpr std::size_t kWriteSize = 64u << 20;

int g_memfd = -1;
char* g_buf = nullptr;

// SIGCONT is asynchronous: true once some task of pid runs again (polled for up to 2 s).
bool runs_again_within_2s(pid_t pid) {
  for (int i = 0; i < 20000; ++i) {
    if (!tasks_not_stopped(pid).empty()) return true;
    usleep(100);
  }
  return false;
}

// A "vCPU" thread that spends nearly all its time inside one long write() into a memfd: a
// syscall that SIGSTOP does not interrupt, so the thread stops only when it returns.
void* writer_thread(void*) {
  for (unsigned char gen = 1;; ++gen) {
    g_buf[0] = static_cast<char>(gen);
    if (pwrite(g_memfd, g_buf, kWriteSize, 0) < 0) _exit(3);
  }
  return nullptr;
}


TEST(FreezerTest, EveryThreadIsStoppedWhenFreezeReturns) {
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    g_memfd = memfd_create("freezer-test", 0);
    g_buf = static_cast<char*>(
        mmap(nullptr, kWriteSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (g_memfd < 0 || g_buf == MAP_FAILED) _exit(2);
    memset(g_buf, 0x5a, kWriteSize);
    pthread_t t;
    if (pthread_create(&t, nullptr, writer_thread, nullptr) != 0) _exit(2);
    const char c = 'r';
    if (write(ready[1], &c, 1) != 1) _exit(2);
    for (;;) pause();  // the leader sleeps: it stops at once
  }
  close(ready[1]);
  char c = 0;
  ASSERT_EQ(read(ready[0], &c, 1), 1);
  close(ready[0]);

  // Several rounds: each catches the writer somewhere in its 64 MiB write.
  for (int round = 0; round < 10; ++round) {
    SCOPED_TRACE(round);
    auto frozen = Freezer::freeze(child);
    ASSERT_TRUE(frozen.ok()) << frozen.error().to_string();
    const auto running = tasks_not_stopped(child);
    EXPECT_TRUE(running.empty()) << "freeze returned while task "
                                 << running.front().to_string() << " still ran";
    ASSERT_TRUE(frozen->thaw().ok());
  }
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
}

TEST(FreezerTest, KeepStoppedLeavesTheProcessStopped) {
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    for (;;) pause();
  }
  {
    auto frozen = Freezer::freeze(child);
    ASSERT_TRUE(frozen.ok()) << frozen.error().to_string();
    frozen->keep_stopped();
  }
  EXPECT_TRUE(tasks_not_stopped(child).empty());
  {
    auto frozen = Freezer::freeze(child);
    ASSERT_TRUE(frozen.ok());
  }  // destroyed without keep_stopped: continued
  EXPECT_TRUE(runs_again_within_2s(child));
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
}

pid_t sleeper() {
  const pid_t child = fork();
  if (child == 0) {
    for (;;) pause();
  }
  return child;
}

void end(pid_t child) {
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
}

// Ends (and reaps) a child when the test ends, also when an assertion returns early.
struct Reaper {
  pid_t child;
  ~Reaper() {
    if (child > 0) end(child);
  }
};

// Issue 16 item 10: a pid names whatever process holds it now. The freezer signals the process
// its pidfd pins: once that one is gone, whatever holds (or reuses) the pid is never stopped.
TEST(FreezerTest, SignalsOnlyThePinnedProcessNeverWhateverHoldsThePidNow) {
  const pid_t gone = sleeper();
  ASSERT_GT(gone, 0);
  const int pinned = static_cast<int>(syscall(SYS_pidfd_open, gone, 0));
  ASSERT_GE(pinned, 0);
  end(gone);
  // Another process stands where the pinned one was (a reused pid is the same to the kernel).
  const pid_t other = sleeper();
  ASSERT_GT(other, 0);
  Reaper reap_other{other};
  auto frozen = Freezer::freeze(other, pinned);
  ASSERT_FALSE(frozen.ok()) << "a process the pidfd does not pin was stopped";
  EXPECT_EQ(frozen.error().code, Errc::kProcessGone) << frozen.error().to_string();
  EXPECT_FALSE(tasks_not_stopped(other).empty()) << "the other process was stopped";
  close(pinned);
}

// A live pidfd of another process than the pid is a caller's mistake: refused, nothing stopped.
TEST(FreezerTest, APidfdOfAnotherProcessIsRefused) {
  const pid_t a = sleeper();
  const pid_t b = sleeper();
  Reaper reap_a{a}, reap_b{b};
  ASSERT_GT(a, 0);
  ASSERT_GT(b, 0);
  const int pidfd_a = static_cast<int>(syscall(SYS_pidfd_open, a, 0));
  ASSERT_GE(pidfd_a, 0);
  auto frozen = Freezer::freeze(b, pidfd_a);
  ASSERT_FALSE(frozen.ok());
  EXPECT_EQ(frozen.error().code, Errc::kInvalidArgument) << frozen.error().to_string();
  EXPECT_FALSE(tasks_not_stopped(a).empty());
  EXPECT_FALSE(tasks_not_stopped(b).empty());
  // Its own pidfd stops it, and the freezer keeps its own copy: closing ours changes nothing.
  const int pidfd_b = static_cast<int>(syscall(SYS_pidfd_open, b, 0));
  ASSERT_GE(pidfd_b, 0);
  {
    auto f = Freezer::freeze(b, pidfd_b);
    ASSERT_TRUE(f.ok()) << f.error().to_string();
    close(pidfd_b);
    EXPECT_TRUE(tasks_not_stopped(b).empty());
    ASSERT_TRUE(f->thaw().ok());
  }
  EXPECT_TRUE(runs_again_within_2s(b));
  close(pidfd_a);
}

}  // namespace
}  // namespace memsnap
