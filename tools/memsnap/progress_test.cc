// The status line of the long commands: its text, and that it is drawn on a terminal only.
#include "tools/memsnap/progress.h"

#include <pty.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdio>
#include <string>

namespace memsnap::cli {
namespace {

// Everything written to f so far.
std::string contents(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string out;
  for (int c; (c = std::fgetc(f)) != EOF;) out += static_cast<char>(c);
  return out;
}

TEST(StatusText, SaysWhatStepAndHowLong) {
  EXPECT_EQ(status_text("compare: memfd", 2, 3, "resumed", 12.7, 80),
            "compare: memfd [2/3] resumed (12 s)");
  EXPECT_EQ(status_text("qemu cycle", 0, 0, "", 0, 80), "qemu cycle (0 s)");
}

TEST(StatusText, NeverFillsTheTerminalWidth) {
  const std::string long_detail(200, 'x');
  const std::string t = status_text("experiment run", 5, 18, long_detail, 3, 40);
  EXPECT_EQ(t.size(), 39u) << t;
  EXPECT_EQ(t.rfind("experiment run [5/18] x", 0), 0u) << t;
  EXPECT_NE(t.find("... (3 s)"), std::string::npos) << t;
  EXPECT_LE(status_text("a", 1, 2, long_detail, 3, 5).size(), 4u);
}

TEST(StatusLine, NothingAtAllWhenNotATerminal) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    StatusLine line(f, false);
    EXPECT_FALSE(line.shown());
    line.update("compare: memfd", 1, 2, "started");
    line.detail("paused");
    line.finish();
  }
  EXPECT_EQ(contents(f), "");
  std::fclose(f);
}

TEST(StatusLine, RewritesOneLineOnATerminalAndClearsIt) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    StatusLine line(f, true);
    ASSERT_TRUE(line.shown());
    line.update("compare: memfd", 1, 2, "started");
    line.detail("paused");
  }  // the destructor clears the line
  const std::string out = contents(f);
  EXPECT_EQ(out.find('\n'), std::string::npos) << out;
  // The elapsed seconds depend on the machine's load: only the text around them is checked.
  EXPECT_EQ(out.rfind("\rcompare: memfd [1/2] started (", 0), 0u) << out;
  EXPECT_NE(out.find("\rcompare: memfd [1/2] paused ("), std::string::npos) << out;
  EXPECT_NE(out.find(" s)\033[K"), std::string::npos) << out;
  EXPECT_EQ(out.substr(out.size() - 4), "\r\033[K") << out;
  std::fclose(f);
}

// on_stderr decides by isatty(2): a terminal shows the line, a file does not, --json never.
TEST(StatusLine, OnStderrFollowsWhatStderrIs) {
  const int saved = ::dup(STDERR_FILENO);
  ASSERT_GE(saved, 0);
  int master = -1, terminal = -1;
  ASSERT_EQ(::openpty(&master, &terminal, nullptr, nullptr, nullptr), 0);
  ::dup2(terminal, STDERR_FILENO);
  const bool on_terminal = StatusLine::on_stderr(false)->shown();
  const bool on_terminal_json = StatusLine::on_stderr(true)->shown();
  std::FILE* f = std::tmpfile();
  ::dup2(::fileno(f), STDERR_FILENO);
  const bool on_file = StatusLine::on_stderr(false)->shown();
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  ::close(master);
  ::close(terminal);
  std::fclose(f);
  EXPECT_TRUE(on_terminal);
  EXPECT_FALSE(on_terminal_json);
  EXPECT_FALSE(on_file);
}

}  // namespace
}  // namespace memsnap::cli
