// The freezer against a real multi-threaded process: a pause is only consistent if no thread of
// the VMM can write guest memory once the freeze returns.
#include "core/vmm_process.h"

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
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

// A "vCPU" thread that spends nearly all its time inside one long write() into a memfd: a
// syscall that SIGSTOP does not interrupt, so the thread stops only when it returns.
void* writer_thread(void*) {
  for (unsigned char gen = 1;; ++gen) {
    g_buf[0] = static_cast<char>(gen);
    if (pwrite(g_memfd, g_buf, kWriteSize, 0) < 0) _exit(3);
  }
  return nullptr;
}

// Every task of pid that is not stopped, as "tid:state".
std::vector<std::string> tasks_not_stopped(pid_t pid) {
  std::vector<std::string> out;
  for (const auto& e :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task")) {
    std::ifstream in(e.path() / "stat");
    std::string line;
    if (!std::getline(in, line)) continue;
    const char s = line[line.rfind(')') + 2];
    if (s != 'T' && s != 't') out.push_back(e.path().filename().string() + ":" + s);
  }
  return out;
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
    EXPECT_TRUE(running.empty()) << "freeze returned while task " << running.front()
                                 << " still ran";
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
  bool continued = false;
  for (int i = 0; i < 20000 && !continued; ++i) {
    continued = !tasks_not_stopped(child).empty();
    if (!continued) usleep(100);
  }
  EXPECT_TRUE(continued);
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
}

}  // namespace
}  // namespace memsnap
