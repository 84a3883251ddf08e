#include "tools/cycle/cycle.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "core/vmm_process.h"
#include "tools/guest_client/guest_client.h"

namespace memsnap {
namespace {

constexpr std::chrono::milliseconds kReadyTimeout{60000};

void say(const CycleOptions& o, const std::string& line) {
  if (o.progress) o.progress(line);
}

Error step_error(const std::string& step, const Error& e) { return e.with_context(step); }

}  // namespace

std::uint64_t CycleReport::total_mismatches() const {
  std::uint64_t sum = 0;
  for (const auto& g : generations) sum += g.mismatches;
  return sum;
}

Result<CycleReport> run_cycle(const PluginRegistry& registry, const CycleOptions& o) {
  const PluginInfo* info = registry.find(o.strategy);
  if (info == nullptr || !info->loaded()) {
    return make_error(Errc::kPluginNotLoaded, "strategy '" + o.strategy + "' is not loaded");
  }
  if (o.generations < 1) return make_error(Errc::kInvalidArgument, "generations must be >= 1");
  CycleReport report;
  report.strategy = o.strategy;
  report.backing = !o.backing.empty() ? o.backing : info->needs_memfd() ? "memfd" : "anon";
  report.thp = o.thp;
  const bool keeps_memory = info->needs_memfd() && !info->releases_memory();

  GuestOptions go;
  go.size = o.size;
  go.backing = report.backing;
  go.seed = o.seed;
  go.zero_fraction = o.zero_fraction;
  go.thp = o.thp;
  auto first = GuestProcess::spawn(go);
  if (!first.ok()) return step_error("starting the first VMM", first.error());
  std::unique_ptr<GuestProcess> guest = std::move(*first);
  if (o.thp) report.thp_used = huge_page_bytes(guest->pid()) > 0;
  say(o, "started VMM pid " + std::to_string(guest->pid()) + " with " +
             std::to_string(o.size >> 20) + " MiB of " + report.backing + " memory, filled");

  std::unique_ptr<ResumeSession> session;
  RetainedMemory retained;
  for (int g = 1; g <= o.generations; ++g) {
    CycleGeneration gen;
    gen.generation = g;

    // The memfd a memfd strategy reads: the first VMM's own, then the one the session serves.
    io::UniqueFd own_memfd;
    int memfd = -1;
    if (report.backing == "memfd") {
      if (session && session->memfd() >= 0) {
        memfd = session->memfd();
      } else {
        auto taken = take_fd_of_process(guest->pid(), guest->memfd_number());
        if (!taken.ok()) return step_error("taking the VMM's memfd", taken.error());
        own_memfd.reset(*taken);
        memfd = own_memfd.get();
      }
    }

    PauseRequest req;
    req.pid = guest->pid();
    req.regions = guest->regions();
    req.memfd = memfd;
    req.guest_size = o.size;
    req.strategy = o.strategy;
    req.freeze = true;
    req.stay_frozen = true;
    req.sync = o.sync;
    req.out_path = o.dir + "/generation-" + std::to_string(g) + ".snap";
    if (!report.chain.empty()) req.parent_path = report.chain.back();
    if (session) {
      req.dirty_source = [s = session.get()](std::string* how) {
        return s->dirty_since_resume(how);
      };
    }
    auto paused = pause(registry, req);
    if (!paused.ok()) return step_error("pause of generation " + std::to_string(g), paused.error());
    gen.pause = *paused;
    if (session) session->pause_committed();
    report.chain.push_back(req.out_path);
    say(o, "paused generation " + std::to_string(g) + " with " + paused->strategy + ": " +
               std::to_string(paused->dirty_bytes >> 10) + " KiB dirty (" +
               paused->dirty_set_source + "), " + std::to_string(paused->data_blocks) +
               " data blocks, " + std::to_string(paused->zero_blocks) + " zero blocks");

    // Keep the memory for a warm resume if the strategy keeps it and it is the whole image.
    retained = RetainedMemory{};
    const bool complete = !session || session->memfd_complete();
    if (keeps_memory && memfd >= 0 && complete) {
      retained.memfd.reset(::dup(memfd));
      retained.snapshot_id = paused->snapshot_id;
      retained.generation = paused->generation;
      retained.guest_size = o.size;
      gen.retained_memfd = retained.memfd.get() >= 0;
    }
    const std::vector<std::uint32_t> expected = guest->expected_generations();
    guest->kill();
    guest.reset();
    if (session) session->stop();
    session.reset();
    own_memfd.reset();
    say(o, "killed the VMM");

    if (o.before_resume) o.before_resume(g, report.chain);

    ResumeRequest rr;
    rr.chain = report.chain;
    rr.socket_path = o.dir + "/uffd-" + std::to_string(g) + ".sock";
    rr.strategy = o.strategy;
    rr.mode = o.mode;
    rr.retained = &retained;
    rr.verify_checksums = o.verify_checksums;
    rr.track_writes = o.track_writes;
    rr.arm_tracking_before_ready = o.arm_tracking_before_ready;
    auto prepared = ResumeSession::prepare(registry, std::move(rr));
    if (!prepared.ok())
      return step_error("resume of generation " + std::to_string(g), prepared.error());
    session = std::move(*prepared);

    GuestOptions rgo;
    rgo.size = o.size;
    rgo.backing = report.backing;
    rgo.seed = o.seed;
    rgo.handshake_socket = o.dir + "/uffd-" + std::to_string(g) + ".sock";
    rgo.no_fill = true;
    rgo.expect = expected;
    rgo.accept_memfd = true;
    rgo.thp = o.thp;  // a VMM asks for huge pages on every start, not only the first
    rgo.track_writes = o.vmm_supports_wp_async;
    auto resumed = GuestProcess::spawn(rgo);
    if (!resumed.ok()) return step_error("starting the resumed VMM", resumed.error());
    guest = std::move(*resumed);
    if (Status s = session->accept_and_serve(); !s.ok()) {
      return step_error("handshake with the resumed VMM", s.error());
    }
    if (Status s = guest->wait_ready(kReadyTimeout); !s.ok()) {
      return step_error("waiting for the resumed VMM", s.error());
    }
    gen.resume = session->report();
    say(o, "resumed VMM pid " + std::to_string(guest->pid()) + " (" +
               std::string(resume_mode_name(gen.resume.mode)) + ": " + gen.resume.mode_reason +
               ") in " + std::to_string(gen.resume.ready_seconds * 1e3) + " ms");

    const bool dirty_now = g < o.generations;
    if (dirty_now && o.dirty_first) {
      auto dirtied =
          guest->dirty(o.dirty_fraction, false, o.seed * 1000 + static_cast<std::uint64_t>(g));
      if (!dirtied.ok()) return step_error("dirtying pages", dirtied.error());
      say(o, "the guest dirtied " + std::to_string(o.dirty_fraction * 100) +
                 "% of its pages right after the resume");
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto verified = guest->command("verify");
    gen.verify_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!verified.ok()) return step_error("verify", verified.error());
    const nlohmann::json& v = *verified;
    if (!v.contains("mismatches")) {
      return make_error(Errc::kInternal, "verify: unexpected answer " + v.dump());
    }
    gen.pages = v.value("pages", 0ULL);
    gen.mismatches = v.value("mismatches", 0ULL);
    if (gen.mismatches > 0 && v.contains("first_mismatches") && !v["first_mismatches"].empty()) {
      gen.first_mismatch = v["first_mismatches"][0].dump();
    }
    if (Status s = session->serve_error(); !s.ok()) return step_error("serving faults", s.error());
    gen.faults = session->fault_stats();
    gen.huge_bytes = huge_page_bytes(guest->pid());
    say(o, "verified " + std::to_string(gen.pages) + " pages: " + std::to_string(gen.mismatches) +
               " mismatches (" + std::to_string(gen.faults.faults) + " faults served)");
    report.generations.push_back(std::move(gen));

    if (dirty_now) {
      if (!o.dirty_first) {
        auto dirtied =
            guest->dirty(o.dirty_fraction, false, o.seed * 1000 + static_cast<std::uint64_t>(g));
        if (!dirtied.ok()) return step_error("dirtying pages", dirtied.error());
        say(o, "the guest dirtied " + std::to_string(o.dirty_fraction * 100) + "% of its pages");
      }
      if (o.discard_pages > 0) {
        // A stretch in the middle of the guest, moving with the generation.
        const std::uint64_t pages = o.size / 4096;
        const std::uint64_t count = std::min(o.discard_pages, pages);
        const std::uint64_t first_page =
            (pages / 3 + static_cast<std::uint64_t>(g) * 977) % (pages - count + 1);
        auto discarded = guest->discard(first_page, count);
        if (!discarded.ok()) return step_error("discarding pages", discarded.error());
        say(o, "the guest discarded " + std::to_string(count) + " pages from page " +
                   std::to_string(first_page));
      }
    }
  }
  // The VMM goes first: a session stopped under a running VMM ends it as a VMM that would hang.
  guest->kill();
  guest.reset();
  session.reset();
  return report;
}

}  // namespace memsnap
