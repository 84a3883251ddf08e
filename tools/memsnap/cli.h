// Pieces shared by the memsnap CLI's commands.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/report_json.h"
#include "core/resume.h"

namespace memsnap::cli {

// Command-line words after the command name, with the small parsing helpers the commands share.
class Args {
 public:
  Args(int argc, char** argv, int first);
  // True if --flag is present (and consumes it).
  bool flag(const std::string& name);
  // The value after --name (consumed), or fallback.
  std::string value(const std::string& name, const std::string& fallback = "");
  // Every value of a repeatable --name.
  std::vector<std::string> values(const std::string& name);
  // Remaining words that are not options.
  std::vector<std::string> positional();
  // Throws std::invalid_argument naming anything left unconsumed.
  void expect_done();

 private:
  std::vector<std::string> words_;
  std::vector<bool> used_;
};

// "4096", "2M", "1G", "0x1000": bytes. Throws std::invalid_argument.
std::uint64_t parse_size(const std::string& text);
std::string format_bytes(double bytes);
// The directory a command works in: `keep` (created if missing), or, when empty, a new
// /var/tmp/<prefix>-XXXXXX the caller removes. Empty (after printing why) on failure.
std::string work_dir(const std::string& keep, const std::string& prefix);

// A file a command will write (--out and the like), checked before the command does any work:
// its directory must exist and be writable, and the path must not be a directory. Empty when it
// can be written, else why not (naming the path).
std::string output_path_problem(const std::string& path);
// Writes text to path, replacing it, and checks every step; false after printing
// "memsnap: cannot write PATH: why" (never a "written to" for a file that is not there).
bool write_output_file(const std::string& path, const std::string& text);

// The plugin directory: --plugin-dir, else $MEMSNAP_PLUGIN_DIR, else <exe>/../lib/memsnap/plugins.
std::string plugin_dir(Args& args);
// Loads it; exits with a message if the directory itself is unusable.
void load_plugins(PluginRegistry& registry, const std::string& dir);

std::string capabilities_text(std::uint32_t caps);

int cmd_plugins(Args& args);
int cmd_pause(Args& args);
int cmd_inspect(Args& args);
int cmd_recover(Args& args);
int cmd_compare(Args& args);
int cmd_resume(Args& args);
int cmd_cycle(Args& args);
int cmd_flags(Args& args);
int cmd_demo(Args& args);            // memsnapd + stand-ins with an A/B/C split (the main job)
int cmd_experiment_run(Args& args);  // an A/B(/C) latency experiment -> results JSON
int cmd_experiment_report(Args& args);  // its analysis (results JSON or Prometheus)
int cmd_qemu(const std::string& sub, Args& args);  // a real QEMU microVM round and round

// Client mode (cmd_client.cc): the command done by memsnapd through its control API at socket.
// Exit codes: 0 done, 1 memsnapd answered with an error, 2 usage, 3 memsnapd unreachable.
int cmd_client(const std::string& command, const std::string& socket, Args& args);

}  // namespace memsnap::cli
