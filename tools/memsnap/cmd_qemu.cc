// memsnap qemu cycle: a real Linux microVM under QEMU, paused and resumed with a strategy, its
// guest checking its own memory after every resume (docs/qemu.md).
#include <cstdio>
#include <filesystem>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "core/strategy_selection/strategy_selection.h"
#include "flags/flag_store.h"
#include "tools/memsnap/cli.h"
#include "tools/qemu/qemu_cycle.h"

namespace memsnap::cli {
namespace {

nlohmann::json phases_json(const std::vector<PhaseTiming>& phases) {
  nlohmann::json out = nlohmann::json::object();
  for (const PhaseTiming& p : phases) out[p.name] = p.wall_seconds * 1e3;
  return out;
}

std::string phases_text(const std::vector<PhaseTiming>& phases) {
  std::string out;
  char buf[64];
  for (const PhaseTiming& p : phases) {
    std::snprintf(buf, sizeof(buf), "%s%s %.1f", out.empty() ? "" : ", ", p.name.c_str(),
                  p.wall_seconds * 1e3);
    out += buf;
  }
  return out;
}

nlohmann::json reference_json(const qemu::CycleReport& r) {
  if (!r.reference) return nullptr;
  return {{"bytes", r.reference->bytes},
          {"save_ms", r.reference->save_seconds * 1e3},
          {"save_phases_ms", phases_json(r.reference->save_phases)},
          {"load_ms", r.reference->load_seconds * 1e3},
          {"load_phases_ms", phases_json(r.reference->load_phases)}};
}

}  // namespace

int cmd_qemu(const std::string& sub, Args& args) {
  if (sub != "cycle") throw std::invalid_argument("qemu cycle [options] (see --help)");
  std::error_code ec;
  const auto exe_dir = std::filesystem::read_symlink("/proc/self/exe", ec).parent_path();
  const std::string guest_dir = (exe_dir.parent_path() / "guest").string();
  qemu::CycleOptions o;
  o.strategy = args.value("--strategy");
  const std::string flags_path = args.value("--flags");
  const std::string sandbox_id = args.value("--sandbox", "qemu-1");
  o.machine.kernel = args.value("--kernel", guest_dir + "/vmlinux");
  o.machine.initrd = args.value("--initrd", guest_dir + "/initramfs.cpio.gz");
  o.machine.memory_bytes = parse_size(args.value("--memory", "256M"));
  o.machine.accel = args.value("--accel", "tcg");
  o.machine.binary = args.value("--qemu", "qemu-system-x86_64");
  const std::string ram = args.value("--ram", "memsnap");
  const std::string guest_mib = args.value("--guest-mib", "64");
  const std::string dirty_pct = args.value("--dirty-pct", "5");
  o.generations = std::stoi(args.value("--generations", "2"));
  o.allow_fallback = args.flag("--allow-fallback");
  o.sync = !args.flag("--no-sync");
  o.reference = args.flag("--reference");
  std::string keep = args.value("--keep");
  const bool json = args.flag("--json");
  const std::string plugins = plugin_dir(args);
  args.expect_done();
  if (o.strategy.empty() == flags_path.empty()) {
    throw std::invalid_argument("give one of --strategy S or --flags FILE");
  }
  if (ram != "memsnap" && ram != "qemu") throw std::invalid_argument("--ram is memsnap or qemu");
  if (o.generations < 1) throw std::invalid_argument("--generations must be at least 1");
  o.machine.memsnap_owns_ram = ram == "memsnap";
  o.machine.append =
      qemu::default_append("memsnap.mib=" + guest_mib + " memsnap.dirty_pct=" + dirty_pct);

  PluginRegistry registry;
  load_plugins(registry, plugins);
  if (!flags_path.empty()) {
    std::string error;
    auto store = flags::FlagStore::open(flags_path, {}, &error);
    if (!store) {
      std::fprintf(stderr, "memsnap qemu: %s\n", error.c_str());
      return 1;
    }
    SandboxAttributes sandbox;
    sandbox.id = sandbox_id;
    sandbox.vmm = "qemu";
    sandbox.memory_mib = o.machine.memory_bytes >> 20;
    sandbox.has_memfd = true;  // memsnap's memfd, or QEMU's taken with pidfd_getfd
    const StrategyChoice choice = StrategySelector(*store, registry).select(sandbox);
    o.strategy = choice.strategy;
    std::fprintf(stderr, "flag %s for sandbox %s: %s%s%s\n", choice.resolution.flag.c_str(),
                 sandbox_id.c_str(), choice.strategy.c_str(),
                 choice.fell_back ? "; fallback: " : "", choice.fallback_reason.c_str());
  }

  const bool temporary = keep.empty();
  keep = work_dir(keep, "memsnap-qemu");
  if (keep.empty()) return 1;
  o.dir = keep;
  o.machine.work_dir = keep;
  o.progress = [](const std::string& line) { std::fprintf(stderr, "  %s\n", line.c_str()); };
  auto result = qemu::run_cycle(registry, o);
  if (temporary) std::filesystem::remove_all(keep);
  if (!result.ok()) {
    std::fprintf(stderr, "memsnap qemu cycle: %s\n", result.error().to_string().c_str());
    return 1;
  }
  const qemu::CycleReport& r = *result;
  if (json) {
    nlohmann::json gens = nlohmann::json::array();
    for (const auto& g : r.generations) {
      gens.push_back({{"generation", g.generation},
                      {"pause", to_json(g.pause.memory)},
                      {"pause_ms", g.pause.wall_seconds * 1e3},
                      {"pause_phases_ms", phases_json(g.pause.phases)},
                      {"device_state_bytes", g.pause.device_state_bytes},
                      {"resume_mode", g.resume_mode},
                      {"resume_reason", g.resume_reason},
                      {"resume_ms", g.resume_seconds * 1e3},
                      {"resume_phases_ms", phases_json(g.resume_phases)},
                      {"resume_bytes", g.resume_bytes},
                      {"round_before", g.round_before},
                      {"round_after", g.round_after},
                      {"bad_lines", g.bad_lines}});
    }
    std::printf("%s\n", nlohmann::json{{"strategy", r.strategy},
                                       {"accel", r.accel},
                                       {"ram", r.memsnap_owns_ram ? "memsnap" : "qemu"},
                                       {"memory_bytes", r.memory_bytes},
                                       {"boot_seconds", r.boot_seconds},
                                       {"generations", gens},
                                       {"reference", reference_json(r)},
                                       {"intact", r.intact()}}
                            .dump()
                            .c_str());
  } else {
    std::printf("\nQEMU microVM (%s, %s, RAM owned by %s), strategy %s; booted in %.1f s\n",
                r.accel.c_str(), format_bytes(double(r.memory_bytes)).c_str(),
                r.memsnap_owns_ram ? "memsnap" : "QEMU", r.strategy.c_str(), r.boot_seconds);
    if (r.reference) {
      std::printf(
          "QEMU's own migrate to a file (the reference): save %.1f ms (%s), load %.1f ms "
          "(%s), %s\n",
          r.reference->save_seconds * 1e3, phases_text(r.reference->save_phases).c_str(),
          r.reference->load_seconds * 1e3, phases_text(r.reference->load_phases).c_str(),
          format_bytes(double(r.reference->bytes)).c_str());
    }
    for (const auto& g : r.generations) {
      std::printf("gen %d  pause %.1f ms (%s; %s of memory, %s device state)\n", g.generation,
                  g.pause.wall_seconds * 1e3, phases_text(g.pause.phases).c_str(),
                  format_bytes(double(g.pause.memory.data_bytes)).c_str(),
                  format_bytes(double(g.pause.device_state_bytes)).c_str());
      std::printf("       resume %.1f ms, %s (%s)\n", g.resume_seconds * 1e3, g.resume_mode.c_str(),
                  phases_text(g.resume_phases).c_str());
      std::printf("       guest check: round %llu before the pause, round %llu after: %s\n",
                  static_cast<unsigned long long>(g.round_before),
                  static_cast<unsigned long long>(g.round_after),
                  g.bad_lines.empty() ? "every page intact" : g.bad_lines.front().c_str());
    }
    std::printf("%s\n", r.intact() ? "the guest found its memory intact after every resume"
                                   : "THE GUEST FOUND ITS MEMORY DAMAGED");
  }
  return r.intact() ? 0 : 1;
}

}  // namespace memsnap::cli
