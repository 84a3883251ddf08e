// memsnap: the command-line face of the framework.
#include <cstdio>
#include <cstdlib>
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
      "  demo      the main job: memsnapd on built-in defaults, stand-in sandboxes split across\n"
      "            the strategies by a flag, paused and resumed through its API, compared\n"
      "            [--sandboxes 6] [--rounds 3] [--size 64M] [--dirty 0.1] [--flags FILE]\n"
      "            [--keep DIR] [--json]\n"
      "  experiment run   an A/B(/C) latency experiment through memsnapd: N stand-ins assigned by\n"
      "            a flag with the arms' weights, K interleaved pause/resume cycles each\n"
      "            [--arms process_vm_readv=1,memfd=1,hole_punch=1] [--sandboxes 6] [--cycles 4]\n"
      "            [--size 64M] [--backing memfd|anon] [--dirty 0.1] [--pattern random|sequential]\n"
      "            [--thp] [--seed 1] [--out experiment-results.json] [--keep DIR] [--metrics-port P]\n"
      "  experiment report (RESULTS.json | --prometheus http://HOST:PORT [--window 1h])\n"
      "            [--baseline process_vm_readv] [--arms a=1,b=1] [--alpha 0.05]\n"
      "            [--warmup 1]  (cycles left out: the first pause is a full one)\n"
      "            [--out PREFIX] [--json]\n"
      "            per strategy p50/p90/p99 with bootstrap 95% intervals, each arm against the\n"
      "            baseline (ratio, Mann-Whitney U), a sample-ratio-mismatch check, verdicts;\n"
      "            writes PREFIX.md, PREFIX.json and PREFIX.svg\n"
      "  compare   pause a stand-in VMM with every strategy and compare them, in process\n"
      "            [--size 256M] [--dirty-fraction 0.1] [--strategies a,b] [--keep DIR] [--json]\n"
      "  plugins list [--json]\n"
      "            every plugin in the plugin directory, loaded or refused and why\n"
      "  pause     (--strategy S | --flags FILE --sandbox ID [--attr KEY=VALUE]...) --out FILE\n"
      "            (--pid P --regions ADDR:SIZE[,...] | --memfd-of-pid P [--memfd-fd N])\n"
      "            [--parent FILE] [--dirty OFF:LEN[,...]] [--option KEY=VALUE]...\n"
      "            [--allow-fallback] [--freeze | --stop] [--no-sync] [--block-size 4K|2M]\n"
      "            [--json]   (--freeze: stopped for the export, continued after; --stop:\n"
      "            stopped and left stopped, as strategies that release memory need)\n"
      "  inspect   FILE [--no-verify] [--json]\n"
      "            header, block map summary, and a check of every checksum\n"
      "  recover   TEMPORARY-FILE --memfd-of-pid PID [--memfd-fd N] [--remove]\n"
      "            writes guest memory a failed or killed pause released back into the VMM's\n"
      "            memfd, from the temporary file and its recovery journal\n"
      "  resume    --snapshot FILE [--parent FILE]... --listen SOCKET --strategy S\n"
      "            [--mode lazy|background|eager] [--no-verify] [--no-track-writes]\n"
      "            [--timeout SECONDS] [--json]\n"
      "            serve a VMM's memory from the chain (parents base first) through the\n"
      "            Firecracker UFFD handshake until the VMM exits\n"
      "  cycle     --strategy S [--mode M] [--size 256M] [--generations 2] [--dirty-fraction 0.1]\n"
      "            [--backing anon|memfd] [--thp] [--discard-pages N] [--keep DIR]\n"
      "            [--no-sync] [--no-track-writes] [--json]\n"
      "            one stand-in VMM round and round: pause, kill, resume, verify every page\n"
      "  qemu cycle (--strategy S | --flags FILE [--sandbox ID]) [--memory 256M]\n"
      "            [--ram memsnap|qemu] [--generations 2] [--guest-mib 64] [--dirty-pct 5]\n"
      "            [--accel tcg|kvm] [--kernel F] [--initrd F] [--reference] [--keep DIR]\n"
      "            [--json]   (--reference: also time QEMU's own migrate to a file and back)\n"
      "            a real Linux microVM under QEMU: boot, then pause (base, then diffs), end\n"
      "            it, resume a new QEMU from the chain; the guest checks its own memory\n"
      "  flags eval --flags FILE --flag KEY [--type boolean|string|integer|float|object]\n"
      "            [--default JSON] [--context JSON] [--explain]\n"
      "  flags eval --flags FILE --batch [--explain]   (JSON lines on stdin, one result each)\n"
      "  flags check FILE...\n"
      "            evaluate or validate flagd-format feature-flag files (docs/flags.md)\n"
      "\n"
      "common options: --plugin-dir DIR (default: $MEMSNAP_PLUGIN_DIR, else\n"
      "                <memsnap>/../lib/memsnap/plugins), --log-level LEVEL\n"
      "\n"
      "client mode: memsnap --socket PATH COMMAND ... asks memsnapd (its control API on the Unix\n"
      "socket PATH, docs/api.md) to do the work. $MEMSNAP_SOCKET is the default PATH; --socket ''\n"
      "forces local mode (pause and resume exist in both modes):\n"
      "  health | config | sandboxes\n"
      "  sandbox ID [--wait-while STATE [--timeout-ms N]]\n"
      "  register --id ID (--pid PID --region OFF:ADDR:SIZE... [--memfd-fd N] [--guest-size S]\n"
      "            | --snapshot PATH... --strategy NAME) [--attr KEY=VALUE]...\n"
      "  pause ID [--output PATH] [--parent latest|none|PATH] [--strategy NAME]\n"
      "            [--after stop|continue] [--dirty OFF:LEN[,...]] [--no-sync]\n"
      "  resume ID --handshake-socket PATH [--mode lazy|background|eager|warm]\n"
      "            [--no-track-writes] [--wait [--timeout-ms N]]\n"
      "            memsnapd listens on PATH; start the VMM; --wait then waits until it is running\n"
      "  strategy ID     which strategy the next pause would use, and why\n"
      "  unregister ID [--force]   forget the sandbox (its snapshots stay); --force also for\n"
      "            one that runs on memory memsnapd serves (its VMM is then ended)\n"
      "  every one takes --json: print memsnapd's JSON answer as is.\n"
      "  errors: 'memsnap: <code>: <message>' on stderr; exit 1 when memsnapd answered with an\n"
      "  error, 2 on a usage error, 3 when memsnapd cannot be reached (no socket, no answer)\n",
      out);
}

}  // namespace

int main(int argc, char** argv) {
  // Global options, before the command: --socket PATH (client mode), default $MEMSNAP_SOCKET.
  int first = 1;
  std::string socket;
  bool socket_given = false;
  while (first < argc && std::strncmp(argv[first], "--socket", 8) == 0) {
    const std::string a = argv[first];
    if (a == "--socket" && first + 1 < argc) {
      socket = argv[first + 1];
      first += 2;
    } else if (a.rfind("--socket=", 0) == 0) {
      socket = a.substr(9);
      first += 1;
    } else {
      std::fprintf(stderr, "memsnap: --socket needs a PATH\n");
      return 2;
    }
    socket_given = true;
  }
  if (!socket_given) {
    if (const char* env = std::getenv("MEMSNAP_SOCKET")) socket = env;
  }
  if (first >= argc || std::strcmp(argv[first], "--help") == 0 ||
      std::strcmp(argv[first], "-h") == 0) {
    usage(first >= argc ? stderr : stdout);
    return first >= argc ? 2 : 0;
  }
  const std::string command = argv[first];
  memsnap::cli::Args args(argc, argv, first + 1);
  spdlog::set_pattern("memsnap: %l: %v");
  try {
    spdlog::set_level(spdlog::level::from_str(args.value("--log-level", "warning")));
    // pause and resume also exist locally; every other client command only talks to memsnapd.
    const bool client_only =
        memsnap::cli::is_client_command(command) && command != "pause" && command != "resume";
    if (!socket.empty() && memsnap::cli::is_client_command(command)) {
      return memsnap::cli::cmd_client(command, socket, args);
    }
    if (client_only) {
      throw std::invalid_argument(
          "talks to memsnapd: give its socket with --socket PATH (before the command) or "
          "$MEMSNAP_SOCKET");
    }
    if (socket_given && !socket.empty()) {
      throw std::invalid_argument(
          "has no client mode (--socket goes with health, config, "
          "sandboxes, sandbox, register, pause, resume, strategy, "
          "unregister)");
    }
    if (command == "compare") return memsnap::cli::cmd_compare(args);
    if (command == "plugins") return memsnap::cli::cmd_plugins(args);
    if (command == "pause") return memsnap::cli::cmd_pause(args);
    if (command == "inspect") return memsnap::cli::cmd_inspect(args);
    if (command == "recover") return memsnap::cli::cmd_recover(args);
    if (command == "resume") return memsnap::cli::cmd_resume(args);
    if (command == "cycle") return memsnap::cli::cmd_cycle(args);
    if (command == "flags") return memsnap::cli::cmd_flags(args);
    if (command == "demo") return memsnap::cli::cmd_demo(args);
    if (command == "experiment") {
      // The subcommand is the word right after "experiment"; the rest are its arguments.
      const std::string sub = first + 1 < argc ? argv[first + 1] : "";
      memsnap::cli::Args rest(argc, argv, first + 2);
      if (sub == "run") return memsnap::cli::cmd_experiment_run(rest);
      if (sub == "report") return memsnap::cli::cmd_experiment_report(rest);
      throw std::invalid_argument("experiment run|report [options] (see --help)");
    }
    if (command == "qemu") {
      const std::string sub = first + 1 < argc ? argv[first + 1] : "";
      memsnap::cli::Args rest(argc, argv, first + 2);
      return memsnap::cli::cmd_qemu(sub, rest);
    }
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "memsnap %s: %s\n", command.c_str(), e.what());
    return 2;
  }
  std::fprintf(stderr, "memsnap: unknown command '%s'\n\n", command.c_str());
  usage(stderr);
  return 2;
}
