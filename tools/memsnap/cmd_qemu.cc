// memsnap qemu cycle: a real Linux microVM under QEMU, paused and resumed with a strategy, its
// guest checking its own memory after every resume (docs/qemu.md).
#include <cstdio>
#include <filesystem>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "core/strategy_selection/strategy_selection.h"
#include "flags/flag_store.h"
#include "tools/memsnap/checks.h"
#include "tools/memsnap/cli.h"
#include "tools/memsnap/progress.h"
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

// The test guest checks guest_mib MiB of its memory_mib: refused when that cannot boot (the
// guest's kernel would hang or panic, or its checker be killed, after a long silent wait).
void check_guest_fits(std::uint64_t memory_mib, std::uint64_t guest_mib) {
  const std::uint64_t most = qemu::largest_guest_mib(memory_mib);
  if (guest_mib <= most) return;
  std::uint64_t needed = qemu::kSmallestGuestMemoryMib;
  while (qemu::largest_guest_mib(needed) < guest_mib) ++needed;
  const std::string fits =
      most == 0 ? "the test guest does not boot in " + std::to_string(memory_mib) +
                      " MiB at all (it needs " + std::to_string(qemu::kSmallestGuestMemoryMib) +
                      " MiB or more)"
                : "beside the checked memory the test guest's kernel needs about 72 MiB plus "
                  "1/16 of the memory, so --guest-mib is at most " +
                      std::to_string(most) + " here";
  throw std::invalid_argument("--guest-mib " + std::to_string(guest_mib) +
                              " does not fit in --memory " + std::to_string(memory_mib) +
                              "M: " + fits + "; --guest-mib " + std::to_string(guest_mib) +
                              " needs --memory " + std::to_string(needed) + "M or more");
}

struct QemuArgs {
  qemu::CycleOptions cycle;
  std::string flags_path, sandbox_id, keep, plugins;
  bool json = false;
};

// Reads and checks every option; nothing is started.
QemuArgs parse_qemu_args(Args& args) {
  std::error_code ec;
  const auto exe_dir = std::filesystem::read_symlink("/proc/self/exe", ec).parent_path();
  const std::string guest_dir = (exe_dir.parent_path() / "guest").string();
  QemuArgs a;
  qemu::CycleOptions& o = a.cycle;
  o.strategy = args.value("--strategy");
  a.flags_path = args.value("--flags");
  const std::string sandbox_given = args.value("--sandbox");
  a.sandbox_id = sandbox_given.empty() ? "qemu-1" : sandbox_given;
  o.machine.kernel = args.value("--kernel", guest_dir + "/vmlinux");
  o.machine.initrd = args.value("--initrd", guest_dir + "/initramfs.cpio.gz");
  o.machine.memory_bytes = parse_size(args.value("--memory", "256M"));
  o.machine.accel = args.value("--accel", "tcg");
  o.machine.binary = args.value("--qemu", "qemu-system-x86_64");
  const std::string ram = args.value("--ram", "memsnap");
  const long guest_mib = parse_integer("--guest-mib", args.value("--guest-mib", "64"), 1, 1 << 20);
  const long dirty_pct = parse_integer("--dirty-pct", args.value("--dirty-pct", "5"), 0, 100);
  o.generations =
      static_cast<int>(parse_integer("--generations", args.value("--generations", "2"), 1, 1000));
  o.allow_fallback = args.flag("--allow-fallback");
  o.sync = !args.flag("--no-sync");
  o.reference = args.flag("--reference");
  const std::string mode = args.value("--mode", "copy");
  if (mode != "copy" && mode != "handover") throw std::invalid_argument("--mode is copy or handover");
  o.handover = mode == "handover";
  a.keep = args.value("--keep");
  a.json = args.flag("--json");
  a.plugins = plugin_dir(args);
  args.expect_done();
  if (o.strategy.empty() == a.flags_path.empty()) {
    throw std::invalid_argument("give one of --strategy S or --flags FILE");
  }
  if (!sandbox_given.empty() && a.flags_path.empty()) {
    throw std::invalid_argument("--sandbox goes with --flags (the flag evaluation's key)");
  }
  if (ram != "memsnap" && ram != "qemu") throw std::invalid_argument("--ram is memsnap or qemu");
  o.machine.memsnap_owns_ram = ram == "memsnap";
  check_guest_fits(o.machine.memory_bytes >> 20, static_cast<std::uint64_t>(guest_mib));
  for (const auto& [option, path] :
       {std::pair{"--kernel", o.machine.kernel}, std::pair{"--initrd", o.machine.initrd}}) {
    if (!std::filesystem::is_regular_file(path, ec)) {
      throw std::invalid_argument(std::string(option) + ": no file " + path +
                                  " (the test guest is built by: cmake --build build/release "
                                  "--target memsnap_qemu_guest)");
    }
  }
  o.machine.append = qemu::default_append("memsnap.mib=" + std::to_string(guest_mib) +
                                          " memsnap.dirty_pct=" + std::to_string(dirty_pct));
  return a;
}

// The strategy --strategy names (it must be loaded), or the one the --flags file picks for the
// sandbox; false after saying why there is none. Before any QEMU starts.
bool choose_strategy(QemuArgs& a, const PluginRegistry& registry) {
  qemu::CycleOptions& o = a.cycle;
  if (a.flags_path.empty()) {
    require_loaded_strategies(registry, a.plugins, "--strategy", {o.strategy});
    return true;
  }
  std::string error;
  auto store = flags::FlagStore::open(a.flags_path, {}, &error);
  if (!store) {
    std::fprintf(stderr, "memsnap qemu: %s\n", error.c_str());
    return false;
  }
  SandboxAttributes sandbox;
  sandbox.id = a.sandbox_id;
  sandbox.vmm = "qemu";
  sandbox.memory_mib = o.machine.memory_bytes >> 20;
  sandbox.has_memfd = true;  // memsnap's memfd, or QEMU's taken with pidfd_getfd
  const StrategyChoice choice = StrategySelector(*store, registry).select(sandbox);
  o.strategy = choice.strategy;
  if (!a.json) {  // with --json, stderr has errors only (docs/qemu.md); the JSON names it
    std::fprintf(stderr, "flag %s for sandbox %s: %s%s%s\n", choice.resolution.flag.c_str(),
                 a.sandbox_id.c_str(), choice.strategy.c_str(),
                 choice.fell_back ? "; fallback: " : "", choice.fallback_reason.c_str());
  }
  if (registry.find(o.strategy) == nullptr) {
    std::fprintf(stderr, "memsnap qemu: the flag picks %s, which is not loaded from %s\n",
                 o.strategy.c_str(), a.plugins.c_str());
    return false;
  }
  return true;
}

void print_json_report(const qemu::CycleReport& r) {
  nlohmann::json gens = nlohmann::json::array();
  for (const auto& g : r.generations) {
    gens.push_back({{"generation", g.generation},
                    {"pause", to_json(g.pause.memory)},
                    {"pause_ms", g.pause.wall_seconds * 1e3},
                    {"answered_ms", g.pause.handover_seconds * 1e3},
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
                                     {"mode", r.handover ? "handover" : "copy"},
                                     {"accel", r.accel},
                                     {"ram", r.memsnap_owns_ram ? "memsnap" : "qemu"},
                                     {"memory_bytes", r.memory_bytes},
                                     {"boot_seconds", r.boot_seconds},
                                     {"generations", gens},
                                     {"reference", reference_json(r)},
                                     {"intact", r.intact()}}
                          .dump()
                          .c_str());
}

void print_text_report(const qemu::CycleReport& r) {
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
    std::printf("gen %d  pause answered in %.1f ms, durable in %.1f ms (%s; %s of memory, %s "
                "device state)\n",
                g.generation, g.pause.handover_seconds * 1e3, g.pause.wall_seconds * 1e3,
                phases_text(g.pause.phases).c_str(),
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

}  // namespace

int cmd_qemu(const std::string& sub, Args& args) {
  if (sub != "cycle") throw std::invalid_argument("qemu cycle [options] (memsnap qemu cycle --help)");
  QemuArgs a = parse_qemu_args(args);
  PluginRegistry registry;
  load_plugins(registry, a.plugins);
  if (!choose_strategy(a, registry)) return 1;

  const bool temporary = a.keep.empty();
  const std::string dir = work_dir(a.keep, "memsnap-qemu");
  if (dir.empty()) return 1;
  qemu::CycleOptions& o = a.cycle;
  o.dir = dir;
  o.machine.work_dir = dir;
  // On a terminal one status line, step by step; in a pipe a line per step; nothing with --json.
  const auto status = StatusLine::on_stderr(a.json);
  const int steps = qemu::progress_steps(o);
  int step = 0;
  o.progress = [&](const std::string& line) {
    if (status->shown()) {
      status->update("qemu cycle", static_cast<std::size_t>(++step),
                     static_cast<std::size_t>(steps), line);
    } else if (!a.json) {
      std::fprintf(stderr, "  %s\n", line.c_str());
    }
  };
  auto result = qemu::run_cycle(registry, o);
  status->finish();
  if (temporary) std::filesystem::remove_all(dir);
  if (!result.ok()) {
    std::fprintf(stderr, "memsnap qemu cycle: %s\n", result.error().to_string().c_str());
    return 1;
  }
  if (a.json) {
    print_json_report(*result);
  } else {
    print_text_report(*result);
  }
  return result->intact() ? 0 : 1;
}

}  // namespace memsnap::cli
