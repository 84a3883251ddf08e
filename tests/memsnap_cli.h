// Runs the memsnap binary the way an operator's script does, for the end-to-end CLI tests.
#pragma once

#include <fcntl.h>
#include <pty.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace memsnap::testing {

struct CommandResult {
  int exit_code = -1;
  std::string out;
};

// $MEMSNAP_BIN_DIR/memsnap, else <test>/../bin/memsnap.
inline std::string memsnap_binary() {
  if (const char* bin = std::getenv("MEMSNAP_BIN_DIR")) return std::string(bin) + "/memsnap";
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path().parent_path() / "bin" /
          "memsnap")
      .string();
}

// The plugin directory memsnap loads by default: $MEMSNAP_PLUGIN_DIR, else the build's.
inline std::string plugin_directory() {
  if (const char* dir = std::getenv("MEMSNAP_PLUGIN_DIR"); dir != nullptr && *dir != '\0') {
    return dir;
  }
  return (std::filesystem::path(memsnap_binary()).parent_path().parent_path() / "lib" / "memsnap" /
          "plugins")
      .string();
}

// Runs a shell command line; its stdout (the command line decides where stderr goes).
inline CommandResult run_shell(const std::string& command_line) {
  CommandResult r;
  std::FILE* p = popen(command_line.c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  while (std::fgets(buf, sizeof(buf), p) != nullptr) r.out += buf;
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// Runs `memsnap args` in a shell (so tests can pipe stdin); its stdout, plus stderr when
// with_stderr (folded in), else stderr is discarded.
inline CommandResult run_memsnap(const std::string& args, bool with_stderr) {
  return run_shell(memsnap_binary() + " " + args + (with_stderr ? " 2>&1" : " 2>/dev/null"));
}

// Runs `memsnap args` with its stderr on a pseudo-terminal (raw: no "\n" -> "\r\n") and its
// stdout discarded; returns what it wrote to the terminal, '\r' included.
inline std::string run_memsnap_on_a_terminal(const std::string& args) {
  const std::string cmd = memsnap_binary() + " " + args;
  termios raw{};
  cfmakeraw(&raw);
  int terminal = -1;
  const pid_t pid = forkpty(&terminal, nullptr, &raw, nullptr);
  if (pid < 0) return {};
  if (pid == 0) {
    const int null = ::open("/dev/null", O_WRONLY);
    if (null >= 0) ::dup2(null, STDOUT_FILENO);
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  std::string out;
  char buf[4096];
  for (;;) {
    // Bounded: a command that never ends must fail the test, not hang it until ctest's timeout.
    pollfd readable{terminal, POLLIN, 0};
    if (::poll(&readable, 1, 120000) == 0) {
      ::kill(pid, SIGKILL);
      out += "\n[the command wrote nothing for 120 s and was killed]";
      break;
    }
    const ssize_t n = ::read(terminal, buf, sizeof(buf));
    if (n > 0) {
      out.append(buf, static_cast<std::size_t>(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      break;  // EIO once the child and everything it started have closed the terminal
    }
  }
  ::close(terminal);
  ::waitpid(pid, nullptr, 0);
  return out;
}

}  // namespace memsnap::testing
