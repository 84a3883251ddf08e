// Helpers shared by the metrics tests: a reader for the text exposition format (enough for what
// prometheus-cpp writes), promtool lookup and running a command with its output captured.
#pragma once

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace memsnap::metrics::testing {

struct Sample {
  std::string name;  // as exposed: memsnap_x_bucket, memsnap_x_total, ...
  std::map<std::string, std::string> labels;
  double value = 0;
};

struct Exposition {
  std::vector<Sample> samples;
  std::map<std::string, std::string> help;  // family -> HELP text
  std::map<std::string, std::string> type;  // family -> TYPE

  // The value of the one sample with this name and exactly these labels.
  std::optional<double> value(const std::string& name,
                              const std::map<std::string, std::string>& labels) const {
    for (const Sample& s : samples) {
      if (s.name == name && s.labels == labels) return s.value;
    }
    return std::nullopt;
  }
};

inline Exposition parse_exposition(const std::string& text) {
  Exposition out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) {
      const std::string rest = line.substr(7);
      const auto sp = rest.find(' ');
      auto& dest = line[2] == 'H' ? out.help : out.type;
      dest[rest.substr(0, sp)] = sp == std::string::npos ? "" : rest.substr(sp + 1);
      continue;
    }
    if (line[0] == '#') continue;
    Sample s;
    std::size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    s.name = line.substr(0, i);
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        const auto eq = line.find('=', i);
        std::string key = line.substr(i, eq - i);
        i = eq + 2;  // past ="
        std::string value;
        while (i < line.size() && line[i] != '"') {
          if (line[i] == '\\' && i + 1 < line.size()) {
            ++i;
            value += line[i] == 'n' ? '\n' : line[i];
          } else {
            value += line[i];
          }
          ++i;
        }
        ++i;  // closing quote
        if (i < line.size() && line[i] == ',') ++i;
        s.labels.emplace(std::move(key), std::move(value));
      }
      ++i;  // '}'
    }
    s.value = std::strtod(line.c_str() + i, nullptr);
    out.samples.push_back(std::move(s));
  }
  return out;
}

inline std::string read_text_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline bool is_executable(const std::string& path) {
  struct stat st {};
  return !path.empty() && ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
         ::access(path.c_str(), X_OK) == 0;
}

// $MEMSNAP_PROMTOOL, else the one CMake found, else promtool on PATH; "" when there is none.
// MEMSNAP_PROMTOOL=none pretends there is none (to exercise the skips).
inline std::string find_promtool() {
  if (const char* env = std::getenv("MEMSNAP_PROMTOOL"); env != nullptr && *env != '\0') {
    return std::string(env) == "none" ? std::string() : std::string(env);
  }
#ifdef MEMSNAP_PROMTOOL_PATH
  if (is_executable(MEMSNAP_PROMTOOL_PATH)) return MEMSNAP_PROMTOOL_PATH;
#endif
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path != nullptr ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    if (!dir.empty() && is_executable(dir + "/promtool")) return dir + "/promtool";
  }
  return {};
}

inline std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (const char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

// Runs argv (quoted, no shell expansion of its words) with stdin from stdin_path if given.
inline CommandResult run_command(const std::vector<std::string>& argv,
                                 const std::string& stdin_path = {}) {
  std::string cmd;
  for (const std::string& a : argv) cmd += shell_quote(a) + " ";
  cmd += stdin_path.empty() ? "</dev/null" : "<" + shell_quote(stdin_path);
  cmd += " 2>&1";
  CommandResult r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int status = ::pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace memsnap::metrics::testing
