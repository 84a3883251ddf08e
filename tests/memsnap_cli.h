// Runs the memsnap binary the way an operator's script does, for the end-to-end CLI tests.
#pragma once

#include <sys/wait.h>

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

}  // namespace memsnap::testing
