#include "tools/memsnap/cli.h"

#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "tools/cli_spec/command_table.h"

namespace memsnap::cli {

Args::Args(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) words_.emplace_back(argv[i]);
  used_.assign(words_.size(), false);
}

bool Args::flag(const std::string& name) {
  bool found = false;
  for (std::size_t i = 0; i < words_.size(); ++i) {
    if (!used_[i] && words_[i] == name) used_[i] = found = true;
  }
  return found;
}

std::string Args::value(const std::string& name, const std::string& fallback) {
  auto all = values(name);
  if (all.size() > 1) throw std::invalid_argument(name + " given more than once");
  return all.empty() ? fallback : all.front();
}

std::vector<std::string> Args::values(const std::string& name) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < words_.size(); ++i) {
    if (used_[i] || words_[i] != name) continue;
    if (i + 1 >= words_.size()) throw std::invalid_argument(name + " needs a value");
    used_[i] = used_[i + 1] = true;
    out.push_back(words_[i + 1]);
  }
  return out;
}

std::vector<std::string> Args::positional() {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < words_.size(); ++i) {
    if (!used_[i] && words_[i].rfind("--", 0) != 0) {
      used_[i] = true;
      out.push_back(words_[i]);
    }
  }
  return out;
}

void Args::expect_done() {
  for (std::size_t i = 0; i < words_.size(); ++i) {
    if (!used_[i]) throw std::invalid_argument("unexpected argument '" + words_[i] + "'");
  }
}

std::uint64_t parse_size(const std::string& text) {
  const auto v = cli_spec::parse_size(text);
  if (!v) throw std::invalid_argument("'" + text + "' is not a size (like 4096, 64K, 2M, 1G)");
  return *v;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return buf;
}

std::string work_dir(const std::string& keep, const std::string& prefix) {
  if (!keep.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(keep, ec);
    if (ec) {
      std::fprintf(stderr, "memsnap: cannot create %s: %s\n", keep.c_str(), ec.message().c_str());
      return {};
    }
    return keep;
  }
  std::string templ = "/var/tmp/" + prefix + "-XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) {
    std::perror("mkdtemp");
    return {};
  }
  return templ;
}

std::string output_path_problem(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.empty()) return "an empty output path";
  std::error_code ec;
  if (fs::is_directory(path, ec)) return "cannot write " + path + ": it is a directory";
  const fs::path dir = fs::path(path).has_parent_path() ? fs::path(path).parent_path() : ".";
  if (!fs::is_directory(dir, ec)) {
    return "cannot write " + path + ": " + dir.string() + " is not an existing directory";
  }
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    return "cannot write " + path + ": " + dir.string() + ": " + std::strerror(errno);
  }
  if (fs::exists(path, ec) && ::access(path.c_str(), W_OK) != 0) {
    return "cannot write " + path + ": " + std::strerror(errno);
  }
  return {};
}

bool write_output_file(const std::string& path, const std::string& text) {
  errno = 0;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (out) out.write(text.data(), static_cast<std::streamsize>(text.size()));
  if (out) out.close();
  if (out) return true;
  const int err = errno;
  std::fprintf(stderr, "memsnap: cannot write %s%s%s\n", path.c_str(), err != 0 ? ": " : "",
               err != 0 ? std::strerror(err) : "");
  return false;
}

std::string plugin_dir(Args& args) {
  std::string dir = args.value("--plugin-dir");
  if (!dir.empty()) return dir;
  if (const char* env = std::getenv("MEMSNAP_PLUGIN_DIR"); env != nullptr && *env != '\0')
    return env;
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  return (self.parent_path().parent_path() / "lib" / "memsnap" / "plugins").string();
}

void load_plugins(PluginRegistry& registry, const std::string& dir) {
  if (auto s = registry.load_directory(dir); !s.ok()) {
    std::fprintf(stderr, "memsnap: cannot load plugins from %s: %s\n", dir.c_str(),
                 s.error().to_string().c_str());
    std::exit(1);
  }
  // A wrong directory is otherwise only noticed later, as "strategy 'x' is not loaded".
  const auto& seen = registry.plugins();
  if (std::none_of(seen.begin(), seen.end(), [](const PluginInfo& p) { return p.loaded(); })) {
    std::fprintf(stderr,
                 "memsnap: warning: no strategy plugin loaded from %s (%zu refused); set "
                 "--plugin-dir or MEMSNAP_PLUGIN_DIR\n",
                 dir.c_str(), seen.size());
  }
}

std::string capabilities_text(std::uint32_t caps) {
  std::string out;
  auto add = [&](std::uint32_t bit, const char* name) {
    if ((caps & bit) == 0) return;
    if (!out.empty()) out += ",";
    out += name;
  };
  add(plugin::kCapNeedsPid, "needs-pid");
  add(plugin::kCapNeedsMemfd, "needs-memfd");
  add(plugin::kCapReleasesMemory, "releases-memory");
  add(plugin::kCapExperimental, "experimental");
  return out;
}

}  // namespace memsnap::cli
