// What memsnap's benchmark executables share: a scratch directory, the plugin directory and a
// loaded plugin registry (each made once per process).
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

#include "core/plugin_host/plugin_registry.h"

namespace memsnap::bench {

// A fresh directory under $MEMSNAP_BENCH_DIR (default /var/tmp), named after `prefix`; made on
// the first call, the same one afterwards.
inline const std::string& bench_dir(const char* prefix) {
  static const std::string dir = [prefix] {
    const char* base = std::getenv("MEMSNAP_BENCH_DIR");
    std::string templ = std::string(base ? base : "/var/tmp") + "/" + prefix + "-XXXXXX";
    if (::mkdtemp(templ.data()) == nullptr) std::abort();
    return templ;
  }();
  return dir;
}

// $MEMSNAP_PLUGIN_DIR, else <exe>/../lib/memsnap/plugins.
inline std::string plugin_dir() {
  if (const char* env = std::getenv("MEMSNAP_PLUGIN_DIR")) return env;
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path().parent_path() / "lib" /
          "memsnap" / "plugins")
      .string();
}

// Every plugin of plugin_dir(), loaded once; aborts if the directory cannot be read.
inline const PluginRegistry& registry() {
  static PluginRegistry* r = [] {
    auto* reg = new PluginRegistry();
    if (!reg->load_directory(plugin_dir()).ok()) std::abort();
    return reg;
  }();
  return *r;
}

}  // namespace memsnap::bench
