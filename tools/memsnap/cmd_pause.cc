#include <unistd.h>

#include <cstdio>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "core/strategy_selection/strategy_selection.h"
#include "core/vmm_process.h"
#include "tools/memsnap/cli.h"

namespace memsnap::cli {
namespace {

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, sep)) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// "ADDR:SIZE,ADDR:SIZE": guest offsets follow one another in the order given.
std::vector<plugin::Region> parse_regions(const std::string& text) {
  std::vector<plugin::Region> regions;
  std::uint64_t guest_offset = 0;
  for (const auto& item : split(text, ',')) {
    const auto parts = split(item, ':');
    if (parts.size() != 2) throw std::invalid_argument("--regions takes ADDR:SIZE[,ADDR:SIZE...]");
    const std::uint64_t size = parse_size(parts[1]);
    regions.push_back({guest_offset, parse_size(parts[0]), size});
    guest_offset += size;
  }
  return regions;
}

std::vector<plugin::ByteRange> parse_ranges(const std::string& text) {
  std::vector<plugin::ByteRange> ranges;
  for (const auto& item : split(text, ',')) {
    const auto parts = split(item, ':');
    if (parts.size() != 2) throw std::invalid_argument("--dirty takes OFFSET:LENGTH[,...]");
    ranges.push_back({parse_size(parts[0]), parse_size(parts[1])});
  }
  return ranges;
}

void print_report(const PauseReport& r) {
  if (!r.fallback_reason.empty()) {
    std::printf("FALLBACK: %s -> %s (%s)\n", r.requested_strategy.c_str(), r.strategy.c_str(),
                r.fallback_reason.c_str());
  }
  std::printf("snapshot %s (generation %llu, id %s%s%s)\n", r.snapshot_path.c_str(),
              static_cast<unsigned long long>(r.generation), r.snapshot_id.c_str(),
              r.parent_id.empty() ? "" : ", parent ", r.parent_id.c_str());
  std::printf(
      "strategy %s: %s dirty of %s guest; %llu data blocks, %llu zero blocks, %llu "
      "inherited; %s released\n",
      r.strategy.c_str(), format_bytes(double(r.dirty_bytes)).c_str(),
      format_bytes(double(r.guest_size)).c_str(), static_cast<unsigned long long>(r.data_blocks),
      static_cast<unsigned long long>(r.zero_blocks),
      static_cast<unsigned long long>(r.parent_blocks),
      format_bytes(double(r.export_stats.bytes_released)).c_str());
  std::printf("total %.1f ms wall, %.1f ms CPU;", r.wall_seconds * 1e3, r.cpu_seconds * 1e3);
  for (const auto& p : r.phases) std::printf(" %s %.2f ms", p.name.c_str(), p.wall_seconds * 1e3);
  std::printf("\n");
}

// --attr KEY=VALUE for the flag context: team, template, vmm, vmm_version, kernel_version,
// memory_mib, hugepages (true/false), host.
SandboxAttributes parse_sandbox(const std::string& id, const std::vector<std::string>& attrs) {
  SandboxAttributes s;
  s.id = id;
  for (const auto& a : attrs) {
    const auto eq = a.find('=');
    if (eq == std::string::npos) throw std::invalid_argument("--attr takes KEY=VALUE");
    const std::string key = a.substr(0, eq), value = a.substr(eq + 1);
    if (key == "team") {
      s.team = value;
    } else if (key == "template") {
      s.template_name = value;
    } else if (key == "vmm") {
      s.vmm = value;
    } else if (key == "vmm_version") {
      s.vmm_version = value;
    } else if (key == "kernel_version") {
      s.kernel_version = value;
    } else if (key == "memory_mib") {
      s.memory_mib = std::stoull(value);
    } else if (key == "hugepages") {
      s.hugepages = value == "true" || value == "1";
    } else if (key == "host") {
      s.host = value;
    } else {
      throw std::invalid_argument("unknown --attr key '" + key +
                                  "' (team, template, vmm, vmm_version, kernel_version, "
                                  "memory_mib, hugepages, host)");
    }
  }
  return s;
}

}  // namespace

int cmd_pause(Args& args) {
  PauseRequest req;
  req.strategy = args.value("--strategy");
  req.out_path = args.value("--out");
  req.parent_path = args.value("--parent");
  // Without --strategy, the sandbox's strategy comes from the feature flag
  // memory-export-strategy in --flags, evaluated for --sandbox with its --attr attributes.
  const std::string flags_path = args.value("--flags");
  const std::string sandbox_id = args.value("--sandbox");
  const std::vector<std::string> attrs = args.values("--attr");
  if ((req.strategy.empty() && flags_path.empty()) || req.out_path.empty()) {
    throw std::invalid_argument("--out and one of --strategy or --flags are required");
  }
  if (!flags_path.empty() && sandbox_id.empty()) {
    throw std::invalid_argument("--flags needs --sandbox ID (the targeting key)");
  }
  const std::string pid_text = args.value("--pid");
  const std::string regions_text = args.value("--regions");
  const std::string memfd_pid_text = args.value("--memfd-of-pid");
  const std::string memfd_fd_text = args.value("--memfd-fd");
  const std::string dirty_text = args.value("--dirty");
  // Options that mean something only beside another are refused alone, never ignored.
  if (flags_path.empty() && (!sandbox_id.empty() || !attrs.empty())) {
    throw std::invalid_argument("--sandbox and --attr go with --flags (the flag evaluation)");
  }
  if (!flags_path.empty() && !req.strategy.empty()) {
    throw std::invalid_argument("give one of --strategy and --flags");
  }
  if (!memfd_fd_text.empty() && memfd_pid_text.empty()) {
    throw std::invalid_argument("--memfd-fd goes with --memfd-of-pid");
  }
  for (const auto& opt : args.values("--option")) {
    const auto eq = opt.find('=');
    if (eq == std::string::npos) throw std::invalid_argument("--option takes KEY=VALUE");
    req.strategy_options.emplace_back(opt.substr(0, eq), opt.substr(eq + 1));
  }
  req.allow_fallback = args.flag("--allow-fallback");
  // The VMM is stopped for the export and continued after it (--freeze, the default: a copy of
  // one moment, never torn); --stop leaves it stopped (a paused sandbox; strategies that release
  // memory refuse anything else); --no-freeze copies while it runs.
  const bool stop = args.flag("--stop");
  const bool freeze = args.flag("--freeze");
  const bool no_freeze = args.flag("--no-freeze");
  if (no_freeze && (stop || freeze)) {
    throw std::invalid_argument("--no-freeze contradicts " +
                                std::string(stop ? "--stop" : "--freeze"));
  }
  req.freeze = !no_freeze;
  req.stay_frozen = stop;
  req.sync = !args.flag("--no-sync");
  req.block_size = static_cast<std::uint32_t>(parse_size(args.value("--block-size", "4096")));
  const bool json = args.flag("--json");
  const std::string dir = plugin_dir(args);
  args.expect_done();

  if (!pid_text.empty()) req.pid = static_cast<pid_t>(std::stol(pid_text));
  if (!regions_text.empty()) req.regions = parse_regions(regions_text);
  if (!dirty_text.empty()) req.dirty = parse_ranges(dirty_text);

  int memfd = -1;
  if (!memfd_pid_text.empty()) {
    const pid_t vmm = static_cast<pid_t>(std::stol(memfd_pid_text));
    if (req.pid > 0 && req.pid != vmm)
      throw std::invalid_argument("--pid and --memfd-of-pid differ");
    req.pid = vmm;
    auto memfds = find_memfds_of_process(vmm, std::nullopt);
    if (!memfds.ok()) {
      std::fprintf(stderr, "memsnap pause: %s\n", memfds.error().to_string().c_str());
      return 1;
    }
    const ProcessMemfd* chosen = nullptr;
    for (const auto& m : *memfds) {
      if (memfd_fd_text.empty() || m.fd_number == std::stoi(memfd_fd_text)) {
        if (chosen != nullptr) {
          throw std::invalid_argument("process " + memfd_pid_text +
                                      " holds several memfds; pick one with --memfd-fd");
        }
        chosen = &m;
      }
    }
    if (chosen == nullptr) {
      std::fprintf(stderr, "memsnap pause: no memfd found in process %d\n", vmm);
      return 1;
    }
    auto fd = take_fd_of_process(vmm, chosen->fd_number);
    if (!fd.ok()) {
      std::fprintf(stderr, "memsnap pause: %s\n", fd.error().to_string().c_str());
      return 1;
    }
    memfd = *fd;
    req.memfd = memfd;
    if (req.regions.empty()) req.regions = chosen->mappings;
  }

  PluginRegistry registry;
  load_plugins(registry, dir);
  std::optional<StrategyChoice> choice;
  if (!flags_path.empty()) {
    std::string error;
    auto store = flags::FlagStore::open(flags_path, {}, &error);
    if (!store) {
      if (memfd >= 0) close(memfd);
      std::fprintf(stderr, "memsnap pause: %s\n", error.c_str());
      return 1;
    }
    SandboxAttributes sandbox = parse_sandbox(sandbox_id, attrs);
    sandbox.has_memfd = req.memfd >= 0;
    sandbox.has_pid = req.pid > 0 && !req.regions.empty();
    choice = StrategySelector(*store, registry).select(sandbox);
    if (req.strategy.empty()) {
      req.strategy = choice->strategy;
    } else if (!json) {
      std::printf("strategy %s forced with --strategy (the flag would pick %s)\n",
                  req.strategy.c_str(), choice->strategy.c_str());
    }
    if (!json) {
      std::printf("flag %s for sandbox %s: variant %s, reason %s -> %s%s%s\n",
                  choice->resolution.flag.c_str(), sandbox_id.c_str(),
                  choice->resolution.variant.value_or("(none)").c_str(),
                  std::string(flags::reason_name(choice->resolution.reason)).c_str(),
                  choice->strategy.c_str(), choice->fell_back ? "; FALLBACK: " : "",
                  choice->fallback_reason.c_str());
    }
  }
  auto report = pause(registry, req);
  if (memfd >= 0) close(memfd);
  if (!report.ok()) {
    if (json) {
      std::printf("%s\n", nlohmann::json{{"error",
                                          {{"code", errc_name(report.error().code)},
                                           {"message", report.error().message}}}}
                              .dump()
                              .c_str());
    }
    std::fprintf(stderr, "memsnap pause: %s\n", report.error().to_string().c_str());
    return 1;
  }
  if (json) {
    nlohmann::json out = to_json(*report);
    if (choice) {
      out["selection"] = {
          {"flag", choice->resolution.flag},
          {"sandbox", sandbox_id},
          {"variant", choice->resolution.variant ? nlohmann::json(*choice->resolution.variant)
                                                 : nlohmann::json(nullptr)},
          {"reason", flags::reason_name(choice->resolution.reason)},
          {"requested", choice->requested},
          {"selected", choice->strategy},
          {"fallback",
           choice->fell_back ? nlohmann::json(choice->fallback_reason) : nlohmann::json(nullptr)}};
    }
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    print_report(*report);
  }
  return 0;
}

}  // namespace memsnap::cli
