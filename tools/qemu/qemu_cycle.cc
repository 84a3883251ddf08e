#include "tools/qemu/qemu_cycle.h"

#include <filesystem>
#include <sstream>
#include <thread>

#include "core/phase_clock.h"

namespace memsnap::qemu {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double total(const std::vector<PhaseTiming>& phases) {
  double sum = 0;
  for (const PhaseTiming& p : phases) sum += p.wall_seconds;
  return sum;
}

// QEMU's own save of the whole VM to a file and its load into a new QEMU (then ended).
Result<ReferenceReport> measure_reference(QemuVm& vm, const Machine& machine,
                                          const std::string& dir) {
  ReferenceReport ref;
  const std::string path = dir + "/qemu-migrate.state";
  {
    PhaseClock clock(ref.save_phases);
    clock.start("stop");
    if (Status s = vm.stop(); !s.ok()) return s.error();
    clock.start("migrate");
    if (Status s = vm.migrate_to_file(path); !s.ok()) return s.error();
  }
  if (Status s = vm.run(); !s.ok()) return s.error();
  std::error_code ec;
  ref.bytes = std::filesystem::file_size(path, ec);
  io::UniqueFd ram;
  if (machine.memsnap_owns_ram) {
    MEMSNAP_ASSIGN_OR_RETURN(auto fd, create_guest_ram(machine.memory_bytes));
    ram = std::move(fd);
  }
  {
    PhaseClock clock(ref.load_phases);
    clock.start("start");
    MEMSNAP_ASSIGN_OR_RETURN(auto incoming, QemuVm::start(machine, std::move(ram), true));
    clock.start("migrate_incoming");
    if (Status s = incoming->load_from_file(path); !s.ok()) return s.error();
    clock.stop();
    incoming->terminate();
  }
  std::filesystem::remove(path, ec);
  ref.save_seconds = total(ref.save_phases);
  ref.load_seconds = total(ref.load_phases);
  return ref;
}

}  // namespace

CheckLine parse_check_line(const std::string& line) {
  CheckLine c;
  c.text = line;
  const auto at = line.find("MEMSNAP-CHECK ");
  if (at == std::string::npos) return c;
  std::istringstream words(line.substr(at + 14));
  std::string kind;
  words >> kind;
  if (kind == "ready") {
    c.kind = CheckLine::Kind::kReady;
  } else if (kind == "ok") {
    c.kind = CheckLine::Kind::kOk;
  } else if (kind == "BAD") {
    c.kind = CheckLine::Kind::kBad;
  } else {
    return c;
  }
  for (std::string word; words >> word;) {
    const auto eq = word.find('=');
    if (eq == std::string::npos) continue;
    const std::string key = word.substr(0, eq);
    std::uint64_t value = 0;
    try {
      value = std::stoull(word.substr(eq + 1), nullptr, 0);
    } catch (const std::exception&) {
      continue;
    }
    if (key == "round") c.round = value;
    if (key == "pages") c.pages = value;
    if (key == "gens") c.gens = value;
    if (key == "first_pfn") c.first_pfn = value;
  }
  return c;
}

int progress_steps(const CycleOptions& o) {
  // run_cycle's say(): booting, booted, [reference], then per generation paused, resumed, checked.
  return 2 + (o.reference ? 1 : 0) + 3 * o.generations;
}

std::uint64_t largest_guest_mib(std::uint64_t memory_mib) {
  if (memory_mib < kSmallestGuestMemoryMib) return 0;
  const std::uint64_t overhead = 72 + memory_mib / 16;
  return memory_mib > overhead ? memory_mib - overhead : 0;
}

std::string check_failure_text(const std::vector<std::string>& console,
                               const std::string& qemu_state, const std::string& qemu_output) {
  std::string out;
  if (console.empty()) {
    out =
        "the guest printed nothing on its console (its kernel did not get as far as the "
        "checker: too little memory for it, or a kernel that does not boot on this machine)";
  } else {
    out = "its console ends with \"" + console.back() + "\"";
    for (const std::string& line : console) {
      if (line.find("Kernel panic") != std::string::npos) {
        out += "; the guest kernel panicked: \"" + line + "\"";
        break;
      }
    }
  }
  return out + "; QEMU " + qemu_state + ", its output: " + qemu_output;
}

bool CycleReport::intact() const {
  for (const GenerationReport& g : generations) {
    if (!g.bad_lines.empty() || g.round_after <= g.round_before) return false;
  }
  return !generations.empty();
}

Result<CheckLine> wait_for_ok_rounds(QemuVm& vm, std::size_t skip, int count,
                                     std::chrono::milliseconds timeout,
                                     std::vector<std::string>* bad_lines) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    const std::vector<std::string> lines = vm.console_lines();
    int seen = 0;
    for (std::size_t i = skip; i < lines.size(); ++i) {
      const CheckLine c = parse_check_line(lines[i]);
      if (c.kind == CheckLine::Kind::kBad || (c.kind == CheckLine::Kind::kReady && skip > 0)) {
        if (bad_lines != nullptr) bad_lines->push_back(c.text);
        return c;
      }
      if (c.kind == CheckLine::Kind::kOk && ++seen == count) return c;
    }
    if (!vm.alive()) {
      return make_error(
          Errc::kProcessGone,
          "QEMU ended before the guest reported " + std::to_string(count) +
              " intact round(s): " + check_failure_text(lines, vm.state_text(), vm.log_tail()));
    }
    if (Clock::now() >= deadline) {
      return make_error(Errc::kTimeout,
                        "the guest reported " + std::to_string(seen) + " of " +
                            std::to_string(count) + " intact round(s) in " +
                            std::to_string(timeout.count()) +
                            " ms: " + check_failure_text(lines, vm.state_text(), vm.log_tail()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Result<CycleReport> run_cycle(const PluginRegistry& registry, const CycleOptions& o) {
  auto say = [&](const std::string& s) {
    if (o.progress) o.progress(s);
  };
  CycleReport report;
  report.strategy = o.strategy;
  report.accel = o.machine.accel;
  report.memsnap_owns_ram = o.machine.memsnap_owns_ram;
  report.handover = o.handover;
  report.memory_bytes = o.machine.memory_bytes;

  io::UniqueFd ram;
  if (o.machine.memsnap_owns_ram) {
    MEMSNAP_ASSIGN_OR_RETURN(auto fd, create_guest_ram(o.machine.memory_bytes));
    ram = std::move(fd);
  }
  const auto boot_start = Clock::now();
  say("booting QEMU (" + o.machine.accel + ", " + std::to_string(o.machine.memory_bytes >> 20) +
      " MiB, RAM owned by " + (o.machine.memsnap_owns_ram ? "memsnap" : "QEMU") + ")");
  MEMSNAP_ASSIGN_OR_RETURN(auto started, QemuVm::start(o.machine, std::move(ram), false));
  std::unique_ptr<VmmAdapter> vmm = std::move(started);
  auto* vm = static_cast<QemuVm*>(vmm.get());
  std::vector<std::string> boot_bad;
  MEMSNAP_ASSIGN_OR_RETURN(auto first, wait_for_ok_rounds(*vm, 0, 1, o.boot_timeout, &boot_bad));
  if (first.kind != CheckLine::Kind::kOk) {
    return make_error(Errc::kInternal, "the guest's first check failed: " + first.text);
  }
  report.boot_seconds = seconds_since(boot_start);
  say("booted in " + std::to_string(report.boot_seconds) + " s: " + first.text);

  if (o.reference) {
    MEMSNAP_ASSIGN_OR_RETURN(auto ref, measure_reference(*vm, o.machine, o.dir));
    report.reference = ref;
    say("QEMU's own migration to a file: save " + std::to_string(ref.save_seconds * 1e3) +
        " ms, load " + std::to_string(ref.load_seconds * 1e3) + " ms, " +
        std::to_string(ref.bytes >> 10) + " KiB");
  }

  Launcher launcher(o.machine);
  RetainedMemory kept;
  std::vector<std::string> chain;
  for (int g = 1; g <= o.generations; ++g) {
    GenerationReport gen;
    gen.generation = g;
    // The newest round the guest finished before the pause.
    CheckLine last;
    for (const std::string& line : vm->console_lines()) {
      const CheckLine c = parse_check_line(line);
      if (c.kind == CheckLine::Kind::kOk) last = c;
    }
    gen.round_before = last.round;
    gen.gens_before = last.gens;

    VmmPauseRequest p;
    p.out_path = o.dir + "/generation-" + std::to_string(g) + ".snap";
    p.parent_chain = chain;
    p.strategy = o.strategy;
    p.allow_fallback = o.allow_fallback;
    p.sync = o.sync;
    if (o.handover) {
      // Answered at the handover; QEMU ends at once, as an orchestrator may, and the export runs
      // on from the held memfd. The resume below starts once it is durable.
      MEMSNAP_ASSIGN_OR_RETURN(auto handed, handover_vmm(registry, *vmm, p));
      const double answered = handed.report.handover_seconds;
      say("generation " + std::to_string(g) + ": handed over in " +
          std::to_string(answered * 1e3) + " ms; exporting in the background");
      auto exported = std::async(std::launch::async, [&registry, h = std::move(handed)]() mutable {
        return finish_handover(registry, std::move(h));
      });
      vmm->terminate();
      kept.memfd = vmm->release_ram();
      auto durable = exported.get();
      if (!durable.ok()) return std::move(durable).error();
      gen.pause = std::move(*durable);
    } else {
      MEMSNAP_ASSIGN_OR_RETURN(auto paused, pause_vmm(registry, *vmm, p));
      gen.pause = std::move(paused);
      // The paused VM ends; memory a memfd strategy left in place is kept for a warm resume.
      vmm->terminate();
      kept.memfd = vmm->release_ram();
    }
    say("generation " + std::to_string(g) + ": paused with " + gen.pause.memory.strategy +
        ", answered in " + std::to_string(gen.pause.handover_seconds * 1e3) + " ms, durable in " +
        std::to_string(gen.pause.wall_seconds * 1e3) + " ms (" +
        std::to_string(gen.pause.memory.data_bytes >> 10) + " KiB of memory, " +
        std::to_string(gen.pause.device_state_bytes >> 10) + " KiB of device state)");
    kept.snapshot_id = gen.pause.memory.snapshot_id;
    kept.generation = gen.pause.memory.generation;
    kept.guest_size = gen.pause.memory.guest_size;
    vmm.reset();
    chain.push_back(p.out_path);

    VmmResumeRequest r;
    r.chain = chain;
    r.strategy = gen.pause.memory.strategy;
    r.retained = &kept;
    MEMSNAP_ASSIGN_OR_RETURN(auto resumed, resume_vmm(registry, launcher, r));
    gen.resume_mode = resumed.mode;
    gen.resume_reason = resumed.mode_reason;
    gen.resume_phases = resumed.phases;
    gen.resume_seconds = resumed.wall_seconds;
    gen.resume_bytes = resumed.bytes;
    vmm = std::move(resumed.vmm);
    vm = static_cast<QemuVm*>(vmm.get());
    say("generation " + std::to_string(g) + ": resumed (" + gen.resume_mode + ") in " +
        std::to_string(gen.resume_seconds * 1e3) + " ms; waiting for the guest's check");
    MEMSNAP_ASSIGN_OR_RETURN(auto after, wait_for_ok_rounds(*vm, 0, o.rounds_after_resume,
                                                            o.round_timeout, &gen.bad_lines));
    if (after.kind == CheckLine::Kind::kOk) {
      gen.round_after = after.round;
      gen.gens_after = after.gens;
    }
    say("generation " + std::to_string(g) + ": " + after.text);
    report.generations.push_back(std::move(gen));
  }
  vmm->terminate();
  return report;
}

}  // namespace memsnap::qemu
