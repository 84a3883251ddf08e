#include <cstdio>
#include <stdexcept>

#include "tools/memsnap/cli.h"

namespace memsnap::cli {

int cmd_plugins(Args& args) {
  const bool json = args.flag("--json");
  const std::string dir = plugin_dir(args);
  const auto words = args.positional();
  if (words.size() != 1 || words[0] != "list")
    throw std::invalid_argument("usage: memsnap plugins list [--json]");
  args.expect_done();
  PluginRegistry registry;
  load_plugins(registry, dir);
  if (json) {
    // One JSON object per line and plugin, so that scripts can stream it.
    for (const auto& p : registry.plugins()) std::printf("%s\n", to_json(p).dump().c_str());
    return 0;
  }
  std::printf("plugins in %s\n", dir.c_str());
  std::printf("%-18s %-8s %-4s %-8s %s\n", "NAME", "VERSION", "ABI", "STATUS",
              "CAPABILITIES / REASON");
  for (const auto& p : registry.plugins()) {
    const bool loaded = p.state == PluginState::kLoaded;
    const std::string name =
        p.name.empty() ? "(" + p.path.substr(p.path.rfind('/') + 1) + ")" : p.name;
    std::printf("%-18s %-8s %-4u %-8s %s\n", name.c_str(),
                p.version.empty() ? "-" : p.version.c_str(), p.abi, loaded ? "loaded" : "refused",
                loaded ? capabilities_text(p.capabilities).c_str()
                       : (std::string(errc_name(p.error)) + ": " + p.reason).c_str());
  }
  return 0;
}

}  // namespace memsnap::cli
