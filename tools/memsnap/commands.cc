// memsnap's command line, as one table (tools/cli_spec): what every command accepts, checked
// before it runs, and its --help and man page.
#include "tools/memsnap/commands.h"

namespace memsnap::cli {
namespace {

using cli_spec::Command;
using cli_spec::Mode;
using cli_spec::Option;
using cli_spec::ValueKind;

Option flag(std::string name, std::string help) {
  return {.name = std::move(name), .help = std::move(help)};
}
Option text(std::string name, std::string placeholder, std::string help, std::string def = "") {
  return {.name = std::move(name), .kind = ValueKind::kText, .placeholder = std::move(placeholder),
          .help = std::move(help), .default_text = std::move(def)};
}
Option path(std::string name, std::string placeholder, std::string help, std::string def = "") {
  Option o = text(std::move(name), std::move(placeholder), std::move(help), std::move(def));
  o.kind = ValueKind::kPath;
  return o;
}
Option size(std::string name, std::string help, std::string def, double min = 1) {
  return {.name = std::move(name), .kind = ValueKind::kSize, .placeholder = "BYTES",
          .help = std::move(help), .default_text = std::move(def), .min = min};
}
// A guest's memory size: whole pages.
Option guest_size(std::string name, std::string help, std::string def, double min = 4096) {
  Option o = size(std::move(name), std::move(help), std::move(def), min);
  o.multiple_of = 4096;
  return o;
}
Option integer(std::string name, std::string help, std::string def, double min, double max = 0) {
  return {.name = std::move(name), .kind = ValueKind::kInteger, .placeholder = "N",
          .help = std::move(help), .default_text = std::move(def), .min = min, .max = max};
}
// A process id: positive, at most the kernel's pid_max limit (2^22).
Option pid(std::string name, std::string help) {
  return integer(std::move(name), std::move(help), "", 1, 4194304);
}
Option number(std::string name, std::string placeholder, std::string help, std::string def,
              double min, double max = 0) {
  return {.name = std::move(name), .kind = ValueKind::kNumber,
          .placeholder = std::move(placeholder), .help = std::move(help),
          .default_text = std::move(def), .min = min, .max = max};
}
Option fraction(std::string name, std::string help, std::string def) {
  return {.name = std::move(name), .kind = ValueKind::kFraction, .placeholder = "FRACTION",
          .help = std::move(help), .default_text = std::move(def)};
}
Option choice(std::string name, std::vector<std::string> choices, std::string help,
              std::string def = "") {
  return {.name = std::move(name), .kind = ValueKind::kChoice, .help = std::move(help),
          .default_text = std::move(def), .choices = std::move(choices)};
}
Option repeatable(Option o) {
  o.repeatable = true;
  return o;
}
Option required(Option o) {
  o.required = true;
  return o;
}

const std::vector<std::string> kLogLevels = {"trace", "debug",    "info", "warning",
                                             "error", "critical", "off"};

Option log_level() {
  return choice("--log-level", kLogLevels, "how much memsnap logs on stderr", "warning");
}
Option plugin_dir() {
  return path("--plugin-dir", "DIR", "the strategy plugins",
              "$MEMSNAP_PLUGIN_DIR, else <memsnap>/../lib/memsnap/plugins");
}
Option json() { return flag("--json", "print the result as JSON on stdout"); }
Option keep() {
  return path("--keep", "DIR",
              "work in DIR and keep what is written there (default: a temporary directory under "
              "/var/tmp, removed at the end)");
}

// Appends the options every local command takes.
Command local(Command c, bool uses_plugins) {
  c.mode = Mode::kLocal;
  if (uses_plugins) c.options.push_back(plugin_dir());
  c.options.push_back(log_level());
  return c;
}

Command client(Command c) {
  c.mode = Mode::kClient;
  c.options.push_back(flag("--json", "print memsnapd's JSON answer as it is"));
  return c;
}

cli_spec::Positional one_id() { return {.name = "ID", .min = 1, .max = 1, .help = "a sandbox"}; }

std::vector<Command> main_commands() {
  std::vector<Command> out;
  out.push_back(local(
      {.name = "demo",
       .summary = "the main job: memsnapd on built-in defaults, stand-in sandboxes split across "
                  "the strategies and pause modes by flags, paused and resumed through its API, "
                  "compared",
       .description =
           "Starts memsnapd, registers the stand-ins, pauses and resumes each of them `--rounds` "
           "times through the control API, verifies every page, and prints a per-strategy and "
           "pause mode comparison. Every pause prints when it was answered and when its snapshot "
           "was durable (a handover pause answers first and is waited for before the resume). "
           "memsnapd and its socket live until the demo ends.",
       .options = {integer("--sandboxes", "stand-in sandboxes", "6", 1, 1000),
                   integer("--rounds", "pause/resume rounds of each", "3", 1, 10000),
                   guest_size("--size", "guest memory of each stand-in", "64M"),
                   fraction("--dirty", "the fraction of pages each round writes", "0.1"),
                   path("--flags", "FILE", "the flag file that splits the sandboxes",
                        "even splits across the strategies and the pause modes"),
                   keep(), json()}},
      false));
  out.push_back(local(
      {.name = "experiment run",
       .summary = "an A/B(/C) latency experiment through memsnapd: stand-ins assigned to arms "
                  "by a flag, interleaved pause/resume cycles; writes the results JSON",
       .description =
           "--split strategy: the arms are export strategies (the memory-export-strategy flag), "
           "every pause in copy mode. --split pause-mode: the arms are pause modes (the "
           "pause-mode flag: copy, handover), every sandbox on the --strategy; each pause "
           "records when it was answered and when it was durable (a handover pause is waited "
           "for before the resume).",
       .options = {choice("--split", {"strategy", "pause-mode"}, "what the arms are",
                          "strategy"),
                   text("--arms", "NAME=WEIGHT,...", "the arms (strategies or pause modes) and "
                        "their weights",
                        "process_vm_readv=1,memfd=1,hole_punch=1; copy=1,handover=1 with --split "
                        "pause-mode"),
                   text("--strategy", "S", "the strategy of every sandbox, with --split "
                        "pause-mode", "memfd"),
                   integer("--sandboxes", "stand-in sandboxes", "6", 1, 10000),
                   integer("--cycles", "pause/resume cycles of each", "4", 1, 100000),
                   guest_size("--size", "guest memory of each stand-in", "64M"),
                   choice("--backing", {"memfd", "anon"}, "what backs guest memory", "memfd"),
                   fraction("--dirty", "the fraction of pages each cycle writes", "0.1"),
                   choice("--pattern", {"random", "sequential"}, "which pages are written",
                          "random"),
                   flag("--thp", "back guest memory with transparent huge pages"),
                   integer("--seed", "the seed of the assignment and the writes", "1", 0),
                   path("--out", "FILE", "the results", "experiment-results.json"), keep(),
                   integer("--metrics-port", "serve memsnapd's metrics on this loopback port",
                           "0: none", 0, 65535)}},
      false));
  out.push_back(local(
      {.name = "experiment report",
       .summary = "the analysis of an experiment: per arm p50/p90/p99 with bootstrap 95% "
                  "intervals, each arm against the baseline, sample-ratio check, verdicts",
       .synopsis = "(RESULTS.json | --prometheus URL [--window 1h] [--split S]) [options]",
       .description = "Writes PREFIX.md, PREFIX.json and PREFIX.svg with --out.",
       .options = {text("--prometheus", "URL", "read the samples from a Prometheus server"),
                   text("--window", "DURATION", "how far back, with --prometheus", "1h"),
                   choice("--split", {"strategy", "pause-mode"},
                          "what the arms are, with --prometheus: strategies (pause and resume "
                          "latency) or pause modes (answered and durable latency)", "strategy"),
                   text("--baseline", "ARM", "the arm the others are compared with",
                        "process_vm_readv; copy for a pause-mode split"),
                   text("--arms", "NAME=WEIGHT,...", "the planned split (for the sample-ratio "
                        "check)", "the results' own"),
                   number("--alpha", "P", "the significance level", "0.05", 0, 0.5),
                   integer("--warmup", "cycles left out of each sandbox (the first pause is a "
                           "full one)", "1", 0),
                   path("--out", "PREFIX", "write PREFIX.md, PREFIX.json and PREFIX.svg"),
                   json()},
       .positional = {.name = "RESULTS.json", .min = 0, .max = 1,
                      .help = "the file experiment run wrote"}},
      false));
  out.push_back(local(
      {.name = "compare",
       .summary = "pause a stand-in VMM with every strategy and compare them, in this process",
       .options = {guest_size("--size", "guest memory of the stand-in", "256M"),
                   fraction("--dirty-fraction", "the fraction of pages written before the diff",
                            "0.1"),
                   text("--strategies", "A,B,...", "the strategies to compare",
                        "every loaded one"),
                   flag("--no-sync", "do not fsync the snapshots (faster, not crash-safe)"),
                   keep(), json()}},
      true));
  out.push_back(local({.name = "plugins list",
                       .summary = "every plugin in the plugin directory, loaded or refused and "
                                  "why",
                       .options = {json()}},
                      true));
  return out;
}

Command pause_command() {
  return local(
      {.name = "pause",
       .summary = "export a running VMM's guest memory into a snapshot file",
       .synopsis = "(--strategy S | --flags FILE --sandbox ID) --out FILE (--pid P --regions "
                   "ADDR:SIZE[,...] | --memfd-of-pid P [--memfd-fd N]) [options]",
       .description =
           "The VMM is stopped (SIGSTOP) for the copy and continued after it, so the snapshot is "
           "one consistent moment of its memory; --stop leaves it stopped, as strategies that "
           "release memory need; --no-freeze copies while it runs (a torn copy unless the VMM "
           "is stopped some other way).",
       .options = {text("--strategy", "S", "the strategy"),
                   path("--flags", "FILE", "choose the strategy by this flag file"),
                   text("--sandbox", "ID", "the targeting key of the flag evaluation"),
                   repeatable(cli_spec::Option{.name = "--attr", .kind = ValueKind::kKeyValue,
                                               .placeholder = "KEY=VALUE",
                                               .help = "a context attribute of the flag "
                                                       "evaluation"}),
                   required(path("--out", "FILE", "the snapshot")),
                   pid("--pid", "the VMM, read through its address space"),
                   text("--regions", "ADDR:SIZE[,...]", "its guest memory, in guest order"),
                   pid("--memfd-of-pid", "the VMM, read through the memfd behind its memory"),
                   integer("--memfd-fd", "the memfd's fd number in the VMM", "the only memfd",
                           0),
                   path("--parent", "FILE", "write a diff against this snapshot"),
                   text("--dirty", "OFF:LEN[,...]", "the ranges written since the parent",
                        "tracked, else all"),
                   repeatable(cli_spec::Option{.name = "--option", .kind = ValueKind::kKeyValue,
                                               .placeholder = "KEY=VALUE",
                                               .help = "a strategy option"}),
                   flag("--allow-fallback",
                        "use the fallback strategy if the chosen one cannot pause this VMM"),
                   flag("--freeze", "stop the VMM for the copy, continue it after (the default)"),
                   flag("--no-freeze", "copy while the VMM runs"),
                   flag("--stop", "stop the VMM for the copy and leave it stopped"),
                   flag("--no-sync", "do not fsync the snapshot"),
                   choice("--block-size", {"4K", "2M", "4096", "2097152"},
                          "the snapshot's block size", "4K"),
                   json()}},
      true);
}

std::vector<Command> file_commands() {
  std::vector<Command> out;
  out.push_back(pause_command());
  out.push_back(local({.name = "inspect",
                       .summary = "a snapshot's header, block map summary, and a check of every "
                                  "checksum",
                       .options = {flag("--no-verify", "do not read the data to check its "
                                                       "checksums"),
                                   json()},
                       .positional = {.name = "FILE", .min = 1, .max = 1, .help = "a snapshot"}},
                      false));
  out.push_back(local(
      {.name = "recover",
       .summary = "write guest memory a failed or killed pause released back into the VMM's "
                  "memfd, from the temporary file and its recovery journal",
       .options = {required(pid("--memfd-of-pid", "the VMM")),
                   integer("--memfd-fd", "the memfd's fd number in the VMM", "the only memfd",
                           0),
                   flag("--remove", "remove the temporary file and journal once written back")},
       .positional = {.name = "TEMPORARY-FILE", .min = 1, .max = 1,
                      .help = "the pause's temporary file (.NAME.tmp.PID.*)"}},
      false));
  out.push_back(local(
      {.name = "resume",
       .summary = "serve a VMM's memory from a snapshot chain through the Firecracker UFFD "
                  "handshake until the VMM exits",
       .options = {required(path("--snapshot", "FILE", "the newest snapshot of the chain")),
                   repeatable(path("--parent", "FILE", "its parents, base first")),
                   required(path("--listen", "SOCKET",
                                 "the handshake socket the VMM connects "
                                 "to")),
                   text("--strategy", "S",
                        "the strategy that wrote the chain (format 1 snapshots only: newer ones "
                        "record it)",
                        "the one the snapshot records"),
                   choice("--mode", {"lazy", "background", "eager", "warm"},
                          "how memory comes back (warm needs memsnapd: it keeps the memfd)",
                          "lazy"),
                   flag("--no-verify", "do not check checksums"),
                   flag("--no-track-writes", "do not track writes for the next diff"),
                   number("--timeout", "SECONDS", "how long to wait for the VMM", "60", 0, 86400),
                   json()}},
      true));
  return out;
}

std::vector<Command> round_commands() {
  std::vector<Command> out;
  out.push_back(local(
      {.name = "cycle",
       .summary = "one stand-in VMM round and round: pause, kill, resume, verify every page",
       .options = {required(text("--strategy", "S", "the strategy")),
                   choice("--mode", {"lazy", "background", "eager", "warm"},
                          "how memory comes back", "what the strategy calls for"),
                   guest_size("--size", "guest memory", "256M"),
                   integer("--generations", "pauses: the base, then diffs", "2", 1, 1000),
                   fraction("--dirty-fraction", "the fraction of pages written between pauses",
                            "0.1"),
                   choice("--backing", {"anon", "memfd"}, "what backs guest memory",
                          "what the strategy needs"),
                   flag("--thp", "back guest memory with transparent huge pages"),
                   integer("--discard-pages", "pages the guest discards (MADV_REMOVE) each round",
                           "0", 0),
                   flag("--no-sync", "do not fsync the snapshots"),
                   flag("--no-verify", "do not check checksums on resume"),
                   flag("--no-track-writes", "do not track writes (every diff is full)"), keep(),
                   json()}},
      true));
  out.push_back(local(
      {.name = "qemu cycle",
       .summary = "a real Linux microVM under QEMU: boot, pause (base, then diffs), end it, "
                  "resume a new QEMU from the chain; the guest checks its own memory",
       .synopsis = "(--strategy S | --flags FILE [--sandbox ID]) [options]",
       .options = {text("--strategy", "S", "the strategy"),
                   path("--flags", "FILE", "choose the strategy by this flag file"),
                   text("--sandbox", "ID", "the targeting key of the flag evaluation", "qemu-1"),
                   size("--memory", "guest RAM", "256M", 16 << 20),
                   choice("--ram", {"memsnap", "qemu"}, "who maps guest RAM", "memsnap"),
                   integer("--generations", "pauses: the base, then diffs", "2", 1, 1000),
                   integer("--guest-mib", "MiB the guest fills and checks", "64", 1, 1 << 20),
                   integer("--dirty-pct", "the percentage of it rewritten between pauses", "5", 0,
                           100),
                   choice("--accel", {"tcg", "kvm"}, "QEMU's accelerator", "tcg"),
                   path("--kernel", "FILE", "the guest kernel", "the build's"),
                   path("--initrd", "FILE", "the guest initramfs", "the build's"),
                   path("--qemu", "BINARY", "QEMU", "qemu-system-x86_64"),
                   flag("--allow-fallback", "use the fallback strategy when the chosen one "
                                            "cannot"),
                   flag("--no-sync", "do not fsync the snapshots"),
                   flag("--reference", "also time QEMU's own migrate to a file and back"),
                   choice("--mode", {"copy", "handover"},
                          "copy: answer when durable; handover: answer once QEMU is stopped, its "
                          "device state saved and its RAM held, then export in the background",
                          "copy"),
                   keep(), json()}},
      true));
  out.push_back(local(
      {.name = "flags eval",
       .summary = "evaluate a flag of a flagd-format flag file (docs/flags.md)",
       .synopsis = "--flags FILE (--flag KEY | --batch) [options]",
       .description = "With --batch: JSON lines on stdin (flag, type, default, context), one "
                      "result each on stdout.",
       .options = {required(path("--flags", "FILE|DIR", "the flag file(s)")),
                   text("--flag", "KEY", "the flag to evaluate"),
                   flag("--batch", "evaluate JSON lines from stdin"),
                   choice("--type", {"boolean", "string", "integer", "float", "object"},
                          "the type the caller expects", "the flag's"),
                   cli_spec::Option{.name = "--default", .kind = ValueKind::kJson,
                                    .placeholder = "JSON", .help = "the caller's default value"},
                   cli_spec::Option{.name = "--context", .kind = ValueKind::kJson,
                                    .placeholder = "JSON", .help = "the evaluation context"},
                   flag("--explain", "say which rule decided")}},
      false));
  out.push_back(local({.name = "flags check",
                       .summary = "validate flagd-format flag files",
                       .description =
                           "The strategy flag's variants are held against the strategy plugins: "
                           "a variant naming none of them is a warning (listing the loaded "
                           "ones), an error with --plugins.",
                       .options = {path("--plugins", "DIR",
                                        "the plugins the variants must name; a variant naming "
                                        "none is an error (exit 1)"),
                                   text("--strategy-flag", "KEY",
                                        "the flag that picks strategies (memsnapd's "
                                        "flags.strategy_flag)",
                                        "memory-export-strategy")},
                       .positional = {.name = "FILE", .min = 1, .max = -1,
                                      .help = "flag files"}},
                      true));
  return out;
}

std::vector<Command> client_commands() {
  std::vector<Command> out;
  out.push_back(client({.name = "health", .summary = "memsnapd's state, flags and limits"}));
  out.push_back(client({.name = "config", .summary = "memsnapd's effective configuration"}));
  out.push_back(client({.name = "sandboxes", .summary = "every sandbox you may see"}));
  out.push_back(client(
      {.name = "sandbox",
       .summary = "one sandbox's state, snapshots and last operation",
       .options = {choice("--wait-while",
                          {"running", "pausing", "paused", "resuming", "failed", "exporting",
                           "export_failed"},
                          "wait until the sandbox leaves this state (exporting: until the "
                          "snapshot of a handover pause is durable, or its export failed)"),
                   integer("--timeout-ms", "how long --wait-while waits", "30000", 0, 600000)},
       .positional = one_id()}));
  out.push_back(client(
      {.name = "register",
       .summary = "register a running VMM, or a paused sandbox's snapshot chain",
       .synopsis = "--id ID (--pid PID --region OFF:ADDR:SIZE... [--memfd-fd N] [--guest-size "
                   "S] | --snapshot PATH... [--strategy NAME]) [--attr KEY=VALUE]...",
       .options = {required(text("--id", "ID", "the sandbox's name")), pid("--pid", "the VMM"),
                   repeatable(text("--region", "OFF:ADDR:SIZE", "a guest memory region")),
                   integer("--memfd-fd", "the memfd behind guest memory, in the VMM", "", 0),
                   size("--guest-size", "the guest's memory size", "the regions' sum"),
                   repeatable(path("--snapshot", "PATH", "a snapshot of the chain, base first")),
                   text("--strategy", "NAME",
                        "the strategy that wrote the chain (format 1 snapshots only: newer ones "
                        "record it)"),
                   repeatable(cli_spec::Option{.name = "--attr",
                                               .kind = ValueKind::kKeyValue,
                                               .placeholder = "KEY=VALUE",
                                               .help = "a flag-evaluation attribute"})}}));
  out.push_back(client(
      {.name = "pause",
       .summary = "memsnapd pauses the sandbox (the strategy from the flag)",
       .options = {path("--output", "PATH", "the snapshot", "memsnapd's name for it"),
                   text("--parent", "latest|none|PATH", "the parent of the diff (none: a new base)",
                        "a diff of the latest when writes are tracked, else a base"),
                   text("--strategy", "NAME", "force a strategy"),
                   choice("--after", {"stop", "continue"}, "the VMM after the pause", "stop"),
                   choice("--mode", {"copy", "handover", "live"},
                          "answer when durable (copy) or once memsnapd holds the memory "
                          "(handover: the export runs in the background)",
                          "the pause-mode flag's, else copy"),
                   flag("--wait-durable", "with handover: wait until the snapshot is durable"),
                   text("--dirty", "OFF:LEN[,...]", "the ranges written since the parent"),
                   flag("--no-sync", "do not fsync the snapshot")},
       .positional = one_id()}));
  out.push_back(client(
      {.name = "export-retry",
       .summary = "try a failed background export again (its memory is still held)",
       .positional = one_id()}));
  out.push_back(
      client({.name = "resume",
              .summary = "memsnapd listens on PATH and serves the new VMM's memory; start the VMM",
              .options = {required(path("--handshake-socket", "PATH", "where the VMM connects")),
                          choice("--mode", {"lazy", "background", "eager", "warm"},
                                 "how memory comes back", "memsnapd's"),
                          flag("--no-track-writes", "do not track writes for the next diff"),
                          choice("--map-ahead", {"yes", "no"},
                                 "background: the fill also maps each page it writes into the VMM "
                                 "(default: yes before durable, else no)",
                                 ""),
                          flag("--wait", "wait until the VMM runs"),
                          integer("--timeout-ms", "how long --wait waits", "60000", 0, 600000)},
              .positional = one_id()}));
  out.push_back(client({.name = "strategy",
                        .summary = "which strategy the next pause would use, and why",
                        .positional = one_id()}));
  out.push_back(client(
      {.name = "unregister",
       .summary = "forget the sandbox (its snapshots stay)",
       .options = {flag("--force", "also for one that runs on memory memsnapd serves (its VMM is "
                                   "then ended)")},
       .positional = one_id()}));
  return out;
}

}  // namespace

const cli_spec::Program& program() {
  static const cli_spec::Program p = [] {
    cli_spec::Program prog;
    prog.name = "memsnap";
    prog.summary = "move microVM guest memory into snapshots and back";
    prog.synopsis = "[--socket PATH] COMMAND [options]";
    prog.description =
        "memsnap pauses a sandbox's VMM into a chain of snapshot files (a base, then diffs) "
        "with a strategy plugin, and resumes a new VMM from the chain through userfaultfd. "
        "Local commands do the work in this process; with --socket (or $MEMSNAP_SOCKET) "
        "pause, resume and the client commands ask memsnapd to.";
    prog.options = {
        path("--socket", "PATH", "memsnapd's control socket: client mode",
             "$MEMSNAP_SOCKET; '' forces local mode"),
        flag("--version", "print memsnap's version and the plugin ABI it loads"),
        flag("--man", "print this manual page (troff)"),
        flag("--help", "this overview; COMMAND --help shows a command's options"),
    };
    for (auto* group : {main_commands, file_commands, round_commands, client_commands}) {
      for (auto& c : group()) prog.commands.push_back(std::move(c));
    }
    prog.sections = {
        {"exit status",
         "0: done. 1: the work failed (memsnapd answered with an error, a check failed). 2: a "
         "usage error, nothing was done. 3: memsnapd could not be reached."},
        {"environment",
         "MEMSNAP_SOCKET: memsnapd's socket (client mode). MEMSNAP_PLUGIN_DIR: the strategy "
         "plugins."},
        {"see also", "memsnapd(8); docs/api.md, docs/flags.md, docs/snapshot-format.md."},
    };
    return prog;
  }();
  return p;
}

}  // namespace memsnap::cli
