// memsnap: the command-line face of the framework.
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

#include <spdlog/spdlog.h>

#include "tools/memsnap/cli.h"

namespace {

void usage(std::FILE* out) {
  std::fputs(
      "usage: memsnap COMMAND [options]\n"
      "\n"
      "commands:\n"
      "  compare   pause a stand-in VMM with every strategy and compare them (the default job)\n"
      "            [--size 256M] [--dirty-fraction 0.1] [--strategies a,b] [--keep DIR] [--json]\n"
      "  plugins list [--json]\n"
      "            every plugin in the plugin directory, loaded or refused and why\n"
      "  pause     (--strategy S | --flags FILE --sandbox ID [--attr KEY=VALUE]...) --out FILE\n"
      "            (--pid P --regions ADDR:SIZE[,...] | --memfd-of-pid P [--memfd-fd N])\n"
      "            [--parent FILE] [--dirty OFF:LEN[,...]] [--option KEY=VALUE]...\n"
      "            [--allow-fallback] [--freeze] [--no-sync] [--block-size 4K|2M] [--json]\n"
      "  inspect   FILE [--no-verify] [--json]\n"
      "            header, block map summary, and a check of every checksum\n"
      "  resume    --snapshot FILE [--parent FILE]... --listen SOCKET --strategy S\n"
      "            [--mode lazy|background|eager] [--no-verify] [--no-track-writes]\n"
      "            [--timeout SECONDS] [--json]\n"
      "            serve a VMM's memory from the chain (parents base first) through the\n"
      "            Firecracker UFFD handshake until the VMM exits\n"
      "  cycle     --strategy S [--mode M] [--size 256M] [--generations 2] [--dirty-fraction 0.1]\n"
      "            [--backing anon|memfd] [--thp] [--discard-pages N] [--keep DIR]\n"
      "            [--no-sync] [--json]\n"
      "            one stand-in VMM round and round: pause, kill, resume, verify every page\n"
      "  flags eval --flags FILE --flag KEY [--type boolean|string|integer|float|object]\n"
      "            [--default JSON] [--context JSON] [--explain]\n"
      "  flags eval --flags FILE --batch [--explain]   (JSON lines on stdin, one result each)\n"
      "  flags check FILE...\n"
      "            evaluate or validate flagd-format feature-flag files (docs/flags.md)\n"
      "\n"
      "common options: --plugin-dir DIR (default: $MEMSNAP_PLUGIN_DIR, else\n"
      "                <memsnap>/../lib/memsnap/plugins), --log-level LEVEL\n",
      out);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  memsnap::cli::Args args(argc, argv, 2);
  spdlog::set_pattern("memsnap: %l: %v");
  spdlog::set_level(spdlog::level::from_str(args.value("--log-level", "warning")));
  try {
    if (command == "compare") return memsnap::cli::cmd_compare(args);
    if (command == "plugins") return memsnap::cli::cmd_plugins(args);
    if (command == "pause") return memsnap::cli::cmd_pause(args);
    if (command == "inspect") return memsnap::cli::cmd_inspect(args);
    if (command == "resume") return memsnap::cli::cmd_resume(args);
    if (command == "cycle") return memsnap::cli::cmd_cycle(args);
    if (command == "flags") return memsnap::cli::cmd_flags(args);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "memsnap %s: %s\n", command.c_str(), e.what());
    return 2;
  }
  std::fprintf(stderr, "memsnap: unknown command '%s'\n\n", command.c_str());
  usage(stderr);
  return 2;
}
