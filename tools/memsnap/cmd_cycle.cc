// memsnap cycle: one stand-in VMM round and round (pause, kill, resume, verify every page), so a
// newcomer can watch a sandbox go out to a snapshot and come back, and see what each step cost.
#include <cstdio>
#include <filesystem>
#include <stdexcept>

#include "tools/cycle/cycle.h"
#include "tools/memsnap/checks.h"
#include "tools/memsnap/cli.h"

namespace memsnap::cli {

int cmd_cycle(Args& args) {
  CycleOptions o;
  o.strategy = args.value("--strategy");
  const std::string mode = args.value("--mode");
  o.size = parse_size(args.value("--size", "256M"));
  o.generations = std::stoi(args.value("--generations", "2"));
  o.dirty_fraction = parse_fraction("--dirty-fraction", args.value("--dirty-fraction", "0.1"));
  o.backing = args.value("--backing");
  o.discard_pages = std::stoull(args.value("--discard-pages", "0"));  // checked by the table
  o.thp = args.flag("--thp");
  o.sync = !args.flag("--no-sync");
  o.verify_checksums = !args.flag("--no-verify");
  // Neither side arms write protection: the next pause copies every populated page.
  o.track_writes = o.vmm_supports_wp_async = !args.flag("--no-track-writes");
  std::string keep = args.value("--keep");
  const bool json = args.flag("--json");
  const std::string plugins = plugin_dir(args);
  args.expect_done();
  if (o.strategy.empty()) throw std::invalid_argument("--strategy is required");
  if (o.size == 0 || o.size % 4096 != 0) {
    throw std::invalid_argument("--size must be a positive multiple of 4 KiB");
  }
  if (!o.backing.empty() && o.backing != "anon" && o.backing != "memfd") {
    throw std::invalid_argument("--backing is anon or memfd");
  }
  if (!mode.empty()) {
    auto m = parse_resume_mode(mode);
    if (!m.ok()) throw std::invalid_argument(m.error().message);
    o.mode = *m;
  }
  // The strategy is checked before anything is created (a --keep directory included).
  PluginRegistry registry;
  load_plugins(registry, plugins);
  require_loaded_strategies(registry, plugins, "--strategy", {o.strategy});
  const bool temporary = keep.empty();
  keep = work_dir(keep, "memsnap-cycle");
  if (keep.empty()) return 1;
  o.dir = keep;
  o.progress = [](const std::string& line) { std::fprintf(stderr, "  %s\n", line.c_str()); };

  auto result = run_cycle(registry, o);
  if (temporary) std::filesystem::remove_all(keep);
  if (!result.ok()) {
    std::fprintf(stderr, "memsnap cycle: %s\n", result.error().to_string().c_str());
    return 1;
  }
  const CycleReport& r = *result;
  if (json) {
    nlohmann::json gens = nlohmann::json::array();
    for (const auto& g : r.generations) {
      gens.push_back({{"generation", g.generation},
                      {"pause", to_json(g.pause)},
                      {"resume", to_json(g.resume)},
                      {"faults", to_json(g.faults)},
                      {"retained_memfd", g.retained_memfd},
                      {"pages", g.pages},
                      {"mismatches", g.mismatches},
                      {"first_mismatch", g.first_mismatch},
                      {"verify_seconds", g.verify_seconds},
                      {"huge_bytes", g.huge_bytes}});
    }
    std::printf("%s\n", nlohmann::json{{"strategy", r.strategy},
                                       {"backing", r.backing},
                                       {"thp", r.thp},
                                       {"thp_used", r.thp_used},
                                       {"generations", gens},
                                       {"mismatches", r.total_mismatches()}}
                            .dump()
                            .c_str());
  } else {
    std::printf("\n%s, %s guest memory (%s)%s\n", r.strategy.c_str(),
                format_bytes(double(o.size)).c_str(), r.backing.c_str(),
                r.thp ? (r.thp_used ? ", THP" : ", THP asked for but not given") : "");
    std::printf("%-4s %-10s %-9s %-11s %-9s %-10s %-10s %-10s %s\n", "gen", "dirty", "pause ms",
                "resume", "ready ms", "faults", "us/fault", "verify ms", "mismatches");
    for (const auto& g : r.generations) {
      std::printf("%-4d %-10s %-9.1f %-11s %-9.3f %-10llu %-10.1f %-10.1f %llu\n", g.generation,
                  format_bytes(double(g.pause.dirty_bytes)).c_str(), g.pause.wall_seconds * 1e3,
                  std::string(resume_mode_name(g.resume.mode)).c_str(),
                  g.resume.ready_seconds * 1e3, static_cast<unsigned long long>(g.faults.faults),
                  g.faults.faults ? g.faults.service_seconds / double(g.faults.faults) * 1e6 : 0.0,
                  g.verify_seconds * 1e3, static_cast<unsigned long long>(g.mismatches));
      if (r.thp) {
        std::printf("     mapped with 2 MiB pages after the resume: %s\n",
                    format_bytes(double(g.huge_bytes)).c_str());
      }
      if (!g.first_mismatch.empty())
        std::printf("     first bad page: %s\n", g.first_mismatch.c_str());
    }
    std::printf("%s\n", r.total_mismatches() == 0 ? "every page came back intact"
                                                  : "MEMORY WAS LOST OR CORRUPTED");
  }
  return r.total_mismatches() == 0 ? 0 : 1;
}

}  // namespace memsnap::cli
