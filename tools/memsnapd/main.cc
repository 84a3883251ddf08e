// memsnapd: the host daemon. Loads the strategy plugins, watches the flag file, serves the
// control API on a Unix socket and Prometheus metrics on loopback.
//
//   memsnapd [--config FILE] [--set section.key=value]... [--print-config]
//
// With no file it runs on built-in defaults (config/memsnapd.yaml lists them). Its options,
// signals and exit codes are the table in program() (--help, the man page). Signals:
//   SIGHUP   re-reads the config file (and --set): applies logging, flags, limits and the
//            fallback strategy; keys that need a restart are logged and left as they were
//   SIGTERM  drain: no new pause or resume; memsnapd waits up to drain.timeout_ms for those in
//   SIGINT   flight, then removes the socket and exits once they have ended (nothing is ever
//            aborted): 0, or 1 if they outlasted drain.timeout_ms
#include <grp.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "config/daemon_config.h"
#include "core/metrics/host_metrics.h"
#include "core/metrics/metrics_endpoint.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/snapshot/recovery_journal.h"
#include "flags/flag_store.h"
#include "tools/cli_spec/command_table.h"
#include "tools/control_api/http_server.h"
#include "tools/exporter/log_format.h"
#include "tools/memsnapd/control_routes.h"
#include "tools/memsnapd/exporter_client.h"
#include "tools/memsnapd/sandbox_service.h"

namespace memsnap::daemon {
namespace {

namespace fs = std::filesystem;

// memsnapd's command line as a table (tools/cli_spec): its checks, --help and man page.
const cli_spec::Program& program() {
  static const cli_spec::Program p = [] {
    using cli_spec::Option;
    using cli_spec::ValueKind;
    cli_spec::Program prog;
    prog.name = "memsnapd";
    prog.man_section = 8;
    prog.summary = "the memsnap host daemon: pauses and resumes sandboxes for an orchestrator";
    prog.synopsis = "[--config FILE] [--set SECTION.KEY=VALUE]... [--print-config]";
    prog.description =
        "One memsnapd per host. It loads the strategy plugins, watches the flag file that "
        "chooses a strategy for each sandbox, serves the control API (HTTP/JSON on a Unix "
        "socket, docs/api.md) and Prometheus metrics on loopback. With no --config it runs on "
        "built-in defaults (config/memsnapd.yaml lists them).";
    prog.options = {
        Option{.name = "--config", .kind = ValueKind::kPath, .placeholder = "FILE",
               .help = "the YAML configuration", .default_text = "built-in defaults"},
        Option{.name = "--set", .kind = ValueKind::kKeyValue, .placeholder = "SECTION.KEY=VALUE",
               .help = "override one key, e.g. --set limits.max_concurrent_pauses=2",
               .repeatable = true},
        Option{.name = "--print-config", .help = "print the effective configuration and exit"},
        Option{.name = "--version", .help = "print the version and the plugin ABI, and exit"},
        Option{.name = "--man", .help = "print this manual page (troff) and exit"},
        Option{.name = "--help", .help = "this help (also -h)"},
    };
    prog.sections = {
        {"signals",
         "SIGHUP re-reads the config file (and --set): applies logging, flags, limits and the "
         "fallback strategy; keys that need a restart are logged and left as they were.\n\n"
         "SIGTERM and SIGINT drain: no new pause or resume is accepted; memsnapd waits up to "
         "drain.timeout_ms for those in flight, then removes the socket and exits once they "
         "have ended. Nothing is ever aborted. On exit, a VMM memsnapd resumed whose memory is "
         "whole in its memfd is left running (its memory unregistered from its userfaultfd); "
         "one served lazily is ended, since its next fault would wait forever, and so is a VMM a "
         "pause left stopped (its memory is in the snapshot)."},
        {"exit status",
         "0: stopped cleanly. 1: work in flight outlasted drain.timeout_ms, or memsnapd could "
         "not start. 2: a usage or configuration error, nothing was started."},
        {"see also", "memsnap(1); docs/api.md, docs/metrics.md, config/memsnapd.yaml."},
    };
    return prog;
  }();
  return p;
}

void apply_logging(const config::LoggingConfig& logging) {
  const bool json = logging.format == config::LogFormat::kJson;
  spdlog::set_formatter(exporter::log_formatter(json, "memsnapd"));
  spdlog::set_level(spdlog::level::from_str(std::string(config::to_string(logging.level))));
  // The background exporters started from now on log the same way.
  set_exporter_logging(json, std::string(config::to_string(logging.level)));
}

std::string default_plugin_dir() {
  std::error_code ec;
  const auto self = fs::read_symlink("/proc/self/exe", ec);
  return (self.parent_path().parent_path() / "lib" / "memsnap" / "plugins").string();
}

// Temporary snapshot files left by a memsnapd that died mid-pause (.<name>.tmp.<pid>.<rand>):
// never visible as snapshots, removed here when their writer is gone -- unless a recovery journal
// (<temp>.recovery, core/snapshot/recovery_journal.h) lies beside one: its pause released guest
// memory, and the file may be the only copy of it. Those are kept, loudly, for `memsnap recover`.
void remove_stale_temporaries(const std::string& dir) {
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const auto tmp = name.find(".tmp.");
    if (name.empty() || name[0] != '.' || tmp == std::string::npos) continue;
    const pid_t pid = static_cast<pid_t>(std::atoi(name.c_str() + tmp + 5));
    if (pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM)) continue;
    const std::string suffix = kRecoveryJournalSuffix;
    const bool is_journal = name.size() > suffix.size() &&
                            name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    if (is_journal) continue;  // kept with its temporary file
    std::error_code exists_ec;
    if (fs::exists(it->path().string() + suffix, exists_ec)) {
      spdlog::critical(
          "kept {}: a dead memsnapd's pause released guest memory into it and it may be the only "
          "copy; write it back into the VMM's memfd with `memsnap recover {} --memfd-of-pid PID`",
          it->path().string(), it->path().string());
      continue;
    }
    std::error_code rm;
    if (fs::remove(it->path(), rm)) {
      spdlog::warn("removed a temporary snapshot file left by a dead memsnapd: {}",
                   it->path().string());
    }
  }
}

ServiceSettings settings_of(const config::DaemonConfig& c) {
  ServiceSettings s;
  s.max_concurrent_pauses = c.limits.max_concurrent_pauses;
  s.max_concurrent_resumes = c.limits.max_concurrent_resumes;
  s.handshake_timeout = c.limits.handshake_timeout;
  s.reader_limits.max_guest_size = c.limits.max_guest_size;
  s.max_sandboxes = static_cast<std::size_t>(c.limits.max_sandboxes);
  s.fallback_strategy = c.strategy.fallback;
  s.allow_fallback = c.strategy.allow_fallback;
  s.strategy_flag = c.flags.strategy_flag;
  s.pause_mode_flag = c.flags.pause_mode_flag;
  s.max_background_exports = static_cast<std::size_t>(c.limits.max_background_exports);
  s.max_export_backlog_bytes = c.limits.max_export_backlog_bytes;
  s.durable_write = c.snapshots.durable_write == config::DurableWrite::kDirect
                        ? DataWrite::kDirect
                        : DataWrite::kBuffered;
  return s;
}

// Opens and watches the flag file; null when there is none (or on error, with *error set).
std::shared_ptr<flags::FlagStore> open_flags(const std::string& path, std::string* error) {
  if (path.empty()) return nullptr;
  std::unique_ptr<flags::FlagStore> store = flags::FlagStore::open(path, {}, error);
  if (!store) return nullptr;
  std::string watch_error;
  if (!store->watch(&watch_error)) {
    spdlog::warn("flags: {} is not watched ({}); send SIGHUP after editing it", path,
                 watch_error);
  }
  return std::shared_ptr<flags::FlagStore>(std::move(store));
}

config::LoadResult load(const std::string& path, const std::vector<std::string>& overrides) {
  config::LoadResult base;
  if (path.empty()) {
    base.config = config::DaemonConfig{};
  } else {
    base = config::load_file(path);
  }
  if (!base.ok()) return base;
  return config::apply_overrides(*base.config, overrides);
}

// The command line, checked against program(): what to run with, or the exit code of a
// command line that ends here (--help, --version, --man: 0; a usage error: 2).
struct CommandLine {
  std::string config_path;
  std::vector<std::string> overrides;
  bool print_config = false;
  std::optional<int> exit_code;
};

CommandLine parse_args(int argc, char** argv) {
  CommandLine out;
  const std::vector<std::string> words(argv + 1, argv + argc);
  const cli_spec::Command whole{.name = "", .options = program().options};
  const auto checked = cli_spec::check(whole, words);
  if (checked.help) {
    std::fputs(cli_spec::overview(program()).c_str(), stdout);
    out.exit_code = 0;
    return out;
  }
  if (!checked.error.empty()) {
    std::fprintf(stderr, "memsnapd: %s (memsnapd --help)\n", checked.error.c_str());
    out.exit_code = 2;
    return out;
  }
  for (std::size_t i = 0; i < words.size(); ++i) {
    const std::string& a = words[i];
    const auto eq = a.find('=');
    const std::string name = a.substr(0, a.rfind("--", 0) == 0 ? eq : std::string::npos);
    const bool inline_value = name.size() != a.size();
    auto value = [&] { return inline_value ? a.substr(eq + 1) : words[++i]; };
    if (name == "--config") {
      out.config_path = value();
    } else if (name == "--set") {
      out.overrides.push_back(value());
    } else if (name == "--print-config") {
      out.print_config = true;
    } else if (name == "--version") {
      std::printf("memsnapd %s (plugin ABI %u)\n", MEMSNAP_VERSION,
                  static_cast<unsigned>(plugin::kAbiVersion));
      out.exit_code = 0;
    } else if (name == "--man") {
      std::fputs(cli_spec::man_page(program(), MEMSNAP_VERSION).c_str(), stdout);
      out.exit_code = 0;
    }
    if (out.exit_code) return out;
  }
  return out;
}

int run(int argc, char** argv) {
  const CommandLine command_line = parse_args(argc, argv);
  if (command_line.exit_code) return *command_line.exit_code;
  const std::string& config_path = command_line.config_path;
  const std::vector<std::string>& overrides = command_line.overrides;
  const bool print_config = command_line.print_config;
  config::LoadResult loaded = load(config_path, overrides);
  if (!loaded.ok()) {
    std::fprintf(stderr, "memsnapd: configuration refused:\n%s\n", loaded.error_text().c_str());
    return 2;
  }
  config::DaemonConfig cfg = *loaded.config;
  if (print_config) {
    std::fputs(config::to_yaml(cfg).c_str(), stdout);
    return 0;
  }
  apply_logging(cfg.logging);

  // Signals are taken by the main thread only (sigtimedwait below): block them before any
  // thread starts, so every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  for (int s : {SIGHUP, SIGTERM, SIGINT}) sigaddset(&signals, s);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  // Before any thread: the guardian that ends lazily served VMMs if memsnapd dies.
  auto guard = VmmGuard::start();
  if (!guard.ok()) {
    spdlog::critical("cannot start the VMM guardian: {}", guard.error().to_string());
    return 1;
  }

  const std::string plugin_dir =
      cfg.plugins.directory.empty() ? default_plugin_dir() : cfg.plugins.directory;
  PluginRegistry registry;
  if (Status s = registry.load_directory(plugin_dir); !s.ok()) {
    spdlog::critical("cannot load plugins from {}: {}", plugin_dir, s.error().to_string());
    return 1;
  }
  metrics::HostMetricsOptions mo;
  mo.sandbox_states = sandbox_state_names();
  for (const auto& p : registry.plugins()) {
    if (p.loaded()) mo.strategies.push_back(p.name);
  }
  metrics::HostMetrics metrics(mo);
  for (const auto& p : registry.plugins()) {
    metrics::PluginStatus ps;
    ps.name = p.name.empty() ? fs::path(p.path).stem().string() : p.name;
    ps.version = p.version;
    ps.abi = p.abi;
    ps.experimental = (p.capabilities & plugin::kCapExperimental) != 0;
    ps.loaded = p.loaded();
    ps.failure_reason = p.loaded() ? "" : std::string(errc_name(p.error));
    metrics.record_plugin_load(ps);
    if (p.loaded()) {
      spdlog::info("plugin {} {} loaded from {}", p.name, p.version, p.path);
    } else {
      spdlog::warn("plugin {} refused: {}: {}", p.path, errc_name(p.error), p.reason);
    }
  }
  if (registry.find(cfg.strategy.fallback) == nullptr) {
    spdlog::critical("the fallback strategy {} is not a loaded plugin (plugins: {})",
                     cfg.strategy.fallback, plugin_dir);
    return 1;
  }

  ServiceOptions so;
  so.snapshot_dir = cfg.snapshots.directory;
  so.handshake_dir = cfg.control.handshake_directory;
  so.state_dir = cfg.state.directory;
  so.settings = settings_of(cfg);
  so.guard = guard->get();
  auto created = SandboxService::create(registry, metrics, so);
  if (!created.ok()) {
    spdlog::critical("{}", created.error().to_string());
    return 1;
  }
  std::unique_ptr<SandboxService> service = std::move(*created);
  remove_stale_temporaries(cfg.snapshots.directory);

  std::string flags_error;
  auto flag_store = open_flags(cfg.flags.file, &flags_error);
  if (!cfg.flags.file.empty() && !flag_store) {
    spdlog::critical("cannot load the flag file {}: {}", cfg.flags.file, flags_error);
    return 1;
  }
  service->set_flags(flag_store);

  std::unique_ptr<metrics::MetricsEndpoint> endpoint;
  if (!cfg.metrics.listen.empty()) {
    const auto colon = cfg.metrics.listen.rfind(':');
    metrics::EndpointOptions eo;
    eo.address = cfg.metrics.listen.substr(0, colon);
    if (eo.address.size() > 2 && eo.address.front() == '[') {
      eo.address = eo.address.substr(1, eo.address.size() - 2);
    }
    if (eo.address == "localhost") eo.address = "127.0.0.1";
    eo.port = static_cast<std::uint16_t>(std::stoi(cfg.metrics.listen.substr(colon + 1)));
    std::string error;
    endpoint = metrics::MetricsEndpoint::start(metrics, eo, &error);
    if (!endpoint) {
      spdlog::critical("cannot serve metrics on {}: {}", cfg.metrics.listen, error);
      return 1;
    }
  }

  control_api::ServerOptions sopt;
  sopt.socket_path = cfg.control.socket;
  sopt.mode = static_cast<mode_t>(cfg.control.mode);
  if (!cfg.control.group.empty()) {
    const group* g = ::getgrnam(cfg.control.group.c_str());
    if (g == nullptr) {
      spdlog::critical("control.group: no group named {}", cfg.control.group);
      return 1;
    }
    sopt.group = g->gr_gid;
    // The group owns the socket so that its members may connect: let them past the peer check
    // (primary or supplementary members: SO_PEERGROUPS).
    sopt.allowed_gids.push_back(g->gr_gid);
  }
  for (auto uid : cfg.control.allowed_uids) sopt.allowed_uids.push_back(static_cast<uid_t>(uid));
  sopt.max_body_bytes = cfg.control.max_request_bytes;
  std::error_code ec;
  fs::create_directories(fs::path(cfg.control.socket).parent_path(), ec);
  control_api::HttpServer server(sopt);
  RouteHooks hooks;
  std::mutex cfg_mu;  // cfg changes on SIGHUP while GET /v1/config reads it
  hooks.config = [&cfg, &cfg_mu] {
    std::lock_guard lock(cfg_mu);
    return nlohmann::json{{"yaml", config::to_yaml(cfg)}};
  };
  add_routes(server, *service, metrics, hooks);
  if (Status s = server.start(); !s.ok()) {
    spdlog::critical("cannot serve the control API: {}", s.error().to_string());
    return 1;
  }
  spdlog::info("memsnapd {} ready: control API on {} (mode {:04o}), metrics on {}, snapshots in {}, "
               "flags {}",
               MEMSNAP_VERSION, cfg.control.socket, cfg.control.mode,
               endpoint ? endpoint->url() : std::string("(off)"), cfg.snapshots.directory,
               cfg.flags.file.empty() ? std::string("(none: every sandbox gets ") +
                                            cfg.strategy.fallback + ")"
                                      : cfg.flags.file);

  int exit_code = 0;
  for (;;) {
    const timespec tick{1, 0};
    const int sig = ::sigtimedwait(&signals, nullptr, &tick);
    service->poll();
    if (sig < 0) continue;
    if (sig == SIGHUP) {
      config::LoadResult again = load(config_path, overrides);
      if (!again.ok()) {
        spdlog::error("SIGHUP: configuration refused, the running one stays:\n{}",
                      again.error_text());
        continue;
      }
      const config::DaemonConfig next = *again.config;
      for (const auto& key : config::restart_required_changes(cfg, next)) {
        spdlog::warn("SIGHUP: {} changed; it takes effect only after a restart", key);
      }
      for (const auto& key : config::changed_keys(cfg, next)) spdlog::info("SIGHUP: {} changed", key);
      apply_logging(next.logging);
      if (next.flags.file != cfg.flags.file) {
        std::string error;
        auto store = open_flags(next.flags.file, &error);
        if (!next.flags.file.empty() && !store) {
          spdlog::error("SIGHUP: cannot load the flag file {}: {}; the old one stays",
                        next.flags.file, error);
          metrics.record_flag_reload(false);
        } else {
          service->set_flags(store);
          metrics.record_flag_reload(true);
        }
      } else if (flag_store) {
        flag_store->reload();
      }
      service->update_settings(settings_of(next));
      // Keep the keys that need a restart as they are running.
      config::DaemonConfig applied = next;
      applied.plugins = cfg.plugins;
      applied.snapshots = cfg.snapshots;
      applied.control = cfg.control;
      applied.metrics = cfg.metrics;
      std::lock_guard lock(cfg_mu);
      cfg = applied;
      continue;
    }
    spdlog::info("{}: draining (up to {} ms)", sig == SIGTERM ? "SIGTERM" : "SIGINT",
                 cfg.drain.timeout.count());
    if (!service->drain(cfg.drain.timeout)) {
      spdlog::error("drain timed out after {} ms with pauses or resumes still running; memsnapd "
                    "waits for them to end before it exits (a pause still commits or fails as a "
                    "whole; nothing partial is ever visible)",
                    cfg.drain.timeout.count());
      exit_code = 1;
    }
    break;
  }
  server.stop();
  service.reset();
  spdlog::info("memsnapd stopped");
  return exit_code;
}

}  // namespace
}  // namespace memsnap::daemon

int main(int argc, char** argv) { return memsnap::daemon::run(argc, argv); }
