// memsnap: the command-line face of the framework.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "tools/memsnap/cli.h"
#include "tools/memsnap/commands.h"

namespace {

namespace spec = memsnap::cli_spec;

// "has no client mode (--socket goes with health, config, ...)": the client commands of the table.
std::string no_client_mode() {
  std::string names;
  for (const auto& c : memsnap::cli::program().commands) {
    if (c.mode == spec::Mode::kClient) names += (names.empty() ? "" : ", ") + c.name;
  }
  return "has no client mode (--socket goes with " + names + ")";
}

// A refusal, on stderr; with --json among the words also as a JSON document on stdout, as every
// other answer of a command asked for JSON.
void refuse(const std::string& command, const std::string& why,
            const std::vector<std::string>& words, const std::string& hint = "") {
  std::fprintf(stderr, "memsnap %s: %s%s\n", command.c_str(), why.c_str(), hint.c_str());
  if (std::find(words.begin(), words.end(), "--json") != words.end()) {
    const nlohmann::json error = {{"error", {{"code", "invalid_argument"}, {"message", why}}}};
    std::printf("%s\n", error.dump().c_str());
  }
}

// `memsnap experiment` and the like: a group named without (or with an unknown) subcommand. The
// exit code after printing the problem, or -1 after printing the group's help.
int group_usage(const std::string& group, const std::vector<std::string>& words, bool help) {
  const auto subs = spec::subcommands(memsnap::cli::program(), group);
  std::string list;
  for (const auto& s : subs) list += (list.empty() ? "" : ", ") + s;
  if (help) {
    std::printf("memsnap %s: one of %s\n", group.c_str(), list.c_str());
    for (const auto& c : memsnap::cli::program().commands) {
      if (c.name.rfind(group + " ", 0) == 0) std::printf("  %-20s %s\n", c.name.c_str(), c.summary.c_str());
    }
    std::printf("memsnap %s SUBCOMMAND --help shows its options\n", group.c_str());
    return -1;  // help printed: exit 0
  }
  if (words.size() < 2) {
    std::fprintf(stderr, "memsnap %s: needs a subcommand: %s (memsnap %s %s --help)\n",
                 group.c_str(), list.c_str(), group.c_str(), subs.front().c_str());
    return 2;
  }
  const std::string near = spec::closest(words[1], subs);
  std::fprintf(stderr, "memsnap %s: unknown subcommand '%s'%s; one of %s\n", group.c_str(),
               words[1].c_str(), near.empty() ? "" : (" (did you mean " + near + "?)").c_str(),
               list.c_str());
  return 2;
}

int unknown_command(const std::string& word) {
  std::vector<std::string> names;
  for (const auto& c : memsnap::cli::program().commands) names.push_back(c.name.substr(0, c.name.find(' ')));
  const std::string near = spec::closest(word, names);
  std::fprintf(stderr, "memsnap: unknown command '%s'%s; memsnap --help lists the commands\n",
               word.c_str(), near.empty() ? "" : (" (did you mean " + near + "?)").c_str());
  return 2;
}

// Every form of a command (local and client) for its --help.
std::vector<const spec::Command*> forms_of(const std::string& name) {
  std::vector<const spec::Command*> out;
  for (const auto& c : memsnap::cli::program().commands) {
    if (c.name == name) out.push_back(&c);
  }
  return out;
}

// "--name=value" as two words, the form Args reads.
std::vector<std::string> split_assignments(const std::vector<std::string>& words) {
  std::vector<std::string> out;
  for (const auto& w : words) {
    const auto eq = w.find('=');
    if (w.rfind("--", 0) == 0 && eq != std::string::npos) {
      out.push_back(w.substr(0, eq));
      out.push_back(w.substr(eq + 1));
    } else {
      out.push_back(w);
    }
  }
  return out;
}

// The command line checked against the table: 0 to go on (command and its words set), -1 after
// printing help, else the exit code after printing the problem.
int resolve(const std::vector<std::string>& words, bool client, bool socket_given,
            const spec::Command** command, int* used) {
  const auto& prog = memsnap::cli::program();
  const auto mode = client ? spec::Mode::kClient : spec::Mode::kLocal;
  *command = spec::find_command(prog, words, mode, used);
  if (*command == nullptr) {
    const auto other = client ? spec::Mode::kLocal : spec::Mode::kClient;
    int other_used = 0;
    if (const auto* c = spec::find_command(prog, words, other, &other_used)) {
      std::fprintf(stderr, "memsnap %s: %s\n", c->name.c_str(),
                   client ? no_client_mode().c_str()
                          : "talks to memsnapd: give its socket with --socket PATH (before the "
                            "command) or $MEMSNAP_SOCKET");
      return 2;
    }
    if (!spec::subcommands(prog, words[0]).empty()) {
      const bool help = words.size() >= 2 && (words[1] == "--help" || words[1] == "-h");
      return group_usage(words[0], words, help);
    }
    return unknown_command(words[0]);
  }
  if (socket_given && !client) {
    std::fprintf(stderr, "memsnap %s: %s\n", (*command)->name.c_str(), no_client_mode().c_str());
    return 2;
  }
  const std::vector<std::string> rest(words.begin() + *used, words.end());
  const auto checked = spec::check(**command, rest);
  if (checked.help) {
    std::fputs(spec::help_text(prog, forms_of((*command)->name)).c_str(), stdout);
    return -1;
  }
  if (!checked.error.empty()) {
    refuse((*command)->name, checked.error, rest, " (memsnap " + (*command)->name + " --help)");
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Global options, before the command: --socket PATH (client mode), default $MEMSNAP_SOCKET.
  int first = 1;
  std::string socket;
  bool socket_given = false;
  while (first < argc && (std::strcmp(argv[first], "--socket") == 0 ||
                          std::strncmp(argv[first], "--socket=", 9) == 0)) {
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
  const auto& prog = memsnap::cli::program();
  if (first >= argc) {
    std::fputs(spec::overview(prog).c_str(), stderr);
    return 2;
  }
  const std::string head = argv[first];
  if (head == "--help" || head == "-h") {
    std::fputs(spec::overview(prog).c_str(), stdout);
    return 0;
  }
  if (head == "--version") {
    std::printf("memsnap %s (plugin ABI %u)\n", MEMSNAP_VERSION,
                static_cast<unsigned>(memsnap::plugin::kAbiVersion));
    return 0;
  }
  if (head == "--man") {
    std::fputs(spec::man_page(prog, MEMSNAP_VERSION).c_str(), stdout);
    return 0;
  }
  const std::vector<std::string> words = split_assignments({argv + first, argv + argc});
  int client_used = 0;
  const bool client =
      !socket.empty() &&
      spec::find_command(prog, words, spec::Mode::kClient, &client_used) != nullptr;
  const spec::Command* command = nullptr;
  int used = 0;
  const bool explicit_socket = socket_given && !socket.empty();
  if (const int rc = resolve(words, client, explicit_socket, &command, &used); rc != 0) {
    return rc < 0 ? 0 : rc;
  }

  // Args reads the checked words (the sub-word of plugins and flags is theirs to read).
  std::vector<char*> checked_argv{argv[0]};
  for (const auto& w : words) checked_argv.push_back(const_cast<char*>(w.c_str()));
  const int n = static_cast<int>(checked_argv.size());
  const bool group = used == 2 && (head == "experiment" || head == "qemu");
  memsnap::cli::Args args(n, checked_argv.data(), group ? 3 : 2);
  spdlog::set_pattern("memsnap: %l: %v");
  try {
    spdlog::set_level(spdlog::level::from_str(args.value("--log-level", "warning")));
    if (client) return memsnap::cli::cmd_client(head, socket, args);
    if (head == "compare") return memsnap::cli::cmd_compare(args);
    if (head == "plugins") return memsnap::cli::cmd_plugins(args);
    if (head == "pause") return memsnap::cli::cmd_pause(args);
    if (head == "inspect") return memsnap::cli::cmd_inspect(args);
    if (head == "recover") return memsnap::cli::cmd_recover(args);
    if (head == "resume") return memsnap::cli::cmd_resume(args);
    if (head == "cycle") return memsnap::cli::cmd_cycle(args);
    if (head == "flags") return memsnap::cli::cmd_flags(args);
    if (head == "demo") return memsnap::cli::cmd_demo(args);
    if (command->name == "experiment run") return memsnap::cli::cmd_experiment_run(args);
    if (command->name == "experiment report") return memsnap::cli::cmd_experiment_report(args);
    if (command->name == "qemu cycle") return memsnap::cli::cmd_qemu("cycle", args);
  } catch (const std::invalid_argument& e) {
    refuse(command->name, e.what(), words);
    return 2;
  } catch (const std::out_of_range& e) {  // a number the table let through and stoi did not
    refuse(command->name, std::string("a number out of range (") + e.what() + ")", words);
    return 2;
  }
  std::fprintf(stderr, "memsnap: %s has no implementation (a table entry without a command)\n",
               command->name.c_str());
  return 1;
}
