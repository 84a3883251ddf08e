#include "core/vmm_pause.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include <spdlog/spdlog.h>

#include "core/phase_clock.h"
#include "core/snapshot/snapshot_chain.h"

namespace memsnap {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

Status fsync_path(const std::string& path) {
  io::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0 || ::fsync(fd.get()) != 0) {
    const int err = errno;
    return make_error(Errc::kIoError, "fsync " + path + ": " + std::strerror(err), err);
  }
  return {};
}

// A failed pause lets the guest run again: its memory is intact (the pipeline writes back what
// a releasing strategy had already released).
void run_again_after_failure(VmmAdapter& vmm) {
  if (Status s = vmm.run(); !s.ok()) {
    spdlog::error("pause of {} pid {} failed and the guest could not run again: {}", vmm.kind(),
                  vmm.pid(), s.error().to_string());
  }
}

}  // namespace

std::string device_state_path(const std::string& snapshot_path) {
  constexpr std::string_view kExt = ".snap";
  if (snapshot_path.size() > kExt.size() &&
      snapshot_path.compare(snapshot_path.size() - kExt.size(), kExt.size(), kExt) == 0) {
    return snapshot_path.substr(0, snapshot_path.size() - kExt.size()) + ".vmstate";
  }
  return snapshot_path + ".vmstate";
}

namespace {

// The handover moment of a VMM pause, shared by pause_vmm and handover_vmm: the checks, the
// parent chain opened, the guest stopped, its device state committed, its memory described.
struct Stopped {
  VmmPauseReport rep;
  std::vector<PhaseTiming> before;  // stop, device_state
  std::shared_ptr<const SnapshotChain> parent;
  GuestMemoryAccess memory;
};

Result<Stopped> stop_and_save(const PluginRegistry& registry, VmmAdapter& vmm,
                              const VmmPauseRequest& request) {
  Stopped out;
  VmmPauseReport& rep = out.rep;
  rep.device_state_path = device_state_path(request.out_path);
  if (request.out_path.empty()) {
    return make_error(Errc::kInvalidArgument, "no output path for the snapshot");
  }
  if (exists(request.out_path) || exists(rep.device_state_path)) {
    return make_error(Errc::kAlreadyExists, "\"" + request.out_path + "\" or its device state " +
                                                "exists: snapshots are never overwritten");
  }
  if (request.run_after) {
    const PluginInfo* info = registry.find(request.strategy);
    if (info != nullptr && info->releases_memory()) {
      return make_error(Errc::kInvalidArgument,
                        request.strategy +
                            " releases guest memory as it exports it: the guest "
                            "cannot run after the pause");
    }
  }
  // A diff's parent chain is opened before the guest stops (header and map only: the diff reads
  // the parent's bytes and exports every block that differs, so a damaged parent block is
  // written again rather than trusted).
  if (!request.parent_chain.empty()) {
    MEMSNAP_ASSIGN_OR_RETURN(auto chain,
                             SnapshotChain::open(request.parent_chain, Verify::kHeaderAndMap));
    out.parent = std::make_shared<const SnapshotChain>(std::move(chain));
  }

  PhaseClock clock(out.before);
  clock.start("stop");
  if (Status s = vmm.stop(); !s.ok()) return s.error();
  auto fail = [&](Error e) -> Error {
    run_again_after_failure(vmm);
    return e;
  };

  clock.start("device_state");
  const std::string temp = rep.device_state_path + ".tmp." + std::to_string(::getpid());
  if (Status s = vmm.save_device_state(temp); !s.ok()) {
    ::unlink(temp.c_str());
    return fail(s.error());
  }
  struct stat st {};
  if (::stat(temp.c_str(), &st) != 0) {
    return fail(make_error(Errc::kIoError, "the VMM wrote no device state to " + temp));
  }
  rep.device_state_bytes = static_cast<std::uint64_t>(st.st_size);
  if (request.sync) {
    if (Status s = fsync_path(temp); !s.ok()) {
      ::unlink(temp.c_str());
      return fail(s.error());
    }
  }
  if (::rename(temp.c_str(), rep.device_state_path.c_str()) != 0) {
    const int err = errno;
    ::unlink(temp.c_str());
    return fail(make_error(Errc::kIoError, "rename " + temp + ": " + std::strerror(err), err));
  }
  auto memory = vmm.guest_memory();
  clock.stop();
  if (!memory.ok()) {
    ::unlink(rep.device_state_path.c_str());
    return fail(std::move(memory).error());
  }
  out.memory = std::move(*memory);
  return out;
}

// The pipeline's request for a stopped VMM's memory (the diff's dirty set: what differs from
// the parent chain, found in the pipeline's dirty_set phase).
PauseRequest export_request(const VmmPauseRequest& request, const Stopped& stopped) {
  PauseRequest p;
  p.pid = stopped.memory.pid;
  p.regions = stopped.memory.regions;
  p.memfd = stopped.memory.memfd;
  p.guest_size = stopped.memory.guest_size;
  p.strategy = request.strategy;
  p.strategy_options = request.strategy_options;
  p.allow_fallback = request.allow_fallback;
  p.fallback_strategy = request.fallback_strategy;
  p.out_path = request.out_path;
  p.sync = request.sync;
  p.freeze = false;  // the adapter stopped the guest
  // ...and keeps it stopped unless it is to run after the pause (a memory-releasing strategy with
  // run_after was refused above; the pipeline refuses it too).
  p.stay_frozen = !request.run_after;
  if (stopped.parent) {
    p.parent_path = request.parent_chain.back();
    p.dirty_source = [parent = stopped.parent, access = stopped.memory](std::string* how) {
      *how = "content compared with the parent chain";
      return changed_ranges(*parent, access);
    };
  }
  return p;
}

void complete(VmmPauseReport& rep, std::vector<PhaseTiming> before,
              std::vector<PhaseTiming> after, std::chrono::steady_clock::time_point t0) {
  rep.phases = std::move(before);
  for (const PhaseTiming& t : rep.memory.phases) rep.phases.push_back(t);
  for (PhaseTiming& t : after) rep.phases.push_back(std::move(t));
  rep.wall_seconds = seconds_since(t0);
}

}  // namespace

Result<VmmPauseReport> pause_vmm(const PluginRegistry& registry, VmmAdapter& vmm,
                                 const VmmPauseRequest& request) {
  const auto t0 = std::chrono::steady_clock::now();
  MEMSNAP_ASSIGN_OR_RETURN(Stopped stopped, stop_and_save(registry, vmm, request));
  VmmPauseReport& rep = stopped.rep;
  // From here a failure lets the guest run again (its memory is intact: the pipeline writes back
  // what a releasing strategy had already released).
  auto paused = pause(registry, export_request(request, stopped));
  if (!paused.ok()) {
    ::unlink(rep.device_state_path.c_str());
    run_again_after_failure(vmm);
    return std::move(paused).error();
  }
  rep.memory = std::move(*paused);

  std::vector<PhaseTiming> after;
  PhaseClock tail(after);
  if (request.run_after) {
    tail.start("run");
    if (Status s = vmm.run(); !s.ok()) return s.error();
  }
  tail.stop();
  rep.handover_seconds = seconds_since(t0);
  complete(rep, std::move(stopped.before), std::move(after), t0);
  return rep;
}

Result<VmmHandover> handover_vmm(const PluginRegistry& registry, VmmAdapter& vmm,
                                 const VmmPauseRequest& request) {
  const auto t0 = std::chrono::steady_clock::now();
  const PluginInfo* info = registry.find(request.strategy);
  if (info == nullptr || !info->needs_memfd() || request.run_after) {
    return make_error(Errc::kUnsupported,
                      "a handover needs a strategy that exports from the memfd (not " +
                          request.strategy + ") and a VMM that stays stopped");
  }
  MEMSNAP_ASSIGN_OR_RETURN(Stopped stopped, stop_and_save(registry, vmm, request));
  if (stopped.memory.memfd < 0) {
    ::unlink(stopped.rep.device_state_path.c_str());
    run_again_after_failure(vmm);
    return make_error(Errc::kUnsupported,
                      "a handover needs the VMM's RAM in a memfd memsnap can hold");
  }
  VmmHandover h;
  h.memfd.reset(::fcntl(stopped.memory.memfd, F_DUPFD_CLOEXEC, 0));
  if (h.memfd.get() < 0) {
    const int err = errno;
    ::unlink(stopped.rep.device_state_path.c_str());
    run_again_after_failure(vmm);
    return make_error(Errc::kIoError, std::string("dup of the guest memfd: ") + std::strerror(err),
                      err);
  }
  // Memory nobody changes any more: no process to read, no freeze; the held memfd only.
  stopped.memory.pid = -1;
  stopped.memory.regions.clear();
  stopped.memory.memfd = h.memfd.get();
  h.request = export_request(request, stopped);
  h.request.stay_frozen = false;
  h.report = std::move(stopped.rep);
  h.report.handover_seconds = seconds_since(t0);
  h.before = std::move(stopped.before);
  h.parent = std::move(stopped.parent);
  h.started = t0;
  return h;
}

Result<VmmPauseReport> finish_handover(const PluginRegistry& registry, VmmHandover handover) {
  auto paused = pause(registry, handover.request);
  if (!paused.ok()) {
    // The VMM may be gone: the device state stays only with the memory it belongs to.
    ::unlink(handover.report.device_state_path.c_str());
    return std::move(paused).error();
  }
  VmmPauseReport rep = std::move(handover.report);
  rep.memory = std::move(*paused);
  complete(rep, std::move(handover.before), {}, handover.started);
  return rep;
}

Result<VmmResumeReport> resume_vmm(const PluginRegistry& registry, VmmLauncher& launcher,
                                   const VmmResumeRequest& request) {
  const auto t0 = std::chrono::steady_clock::now();
  VmmResumeReport rep;
  PhaseClock clock(rep.phases);

  // Every checksum is checked before a VMM even starts: a damaged snapshot never runs.
  clock.start("open");
  MEMSNAP_ASSIGN_OR_RETURN(auto opened, SnapshotChain::open(request.chain, request.verify));
  const SnapshotChain chain = std::move(opened);
  rep.snapshot_id = to_hex(chain.newest().header().snapshot_id);
  rep.generation = chain.newest().header().generation;
  const std::string device = device_state_path(request.chain.back());
  if (!exists(device)) {
    return make_error(Errc::kNotFound,
                      "no device state " + device + " beside the snapshot " + request.chain.back());
  }
  if (chain.guest_size() != launcher.guest_size()) {
    return make_error(Errc::kInvalidArgument,
                      "the snapshot holds " + std::to_string(chain.guest_size()) +
                          " bytes of guest memory, the VMM is configured with " +
                          std::to_string(launcher.guest_size()));
  }

  const PluginInfo* info = registry.find(request.strategy);
  RetainedMemory* kept = request.retained;
  io::UniqueFd ram;
  if (!launcher.memsnap_owns_ram()) {
    rep.mode = "write";
    rep.mode_reason = "the VMM allocates its own RAM: the image is written into it";
  } else if (info != nullptr && info->needs_memfd() && !info->releases_memory() &&
             kept != nullptr && kept->memfd.get() >= 0 && kept->snapshot_id == rep.snapshot_id &&
             kept->guest_size == chain.guest_size()) {
    rep.mode = "warm";
    rep.mode_reason = "the memfd kept from the pause holds snapshot " + rep.snapshot_id;
    ram = std::move(kept->memfd);
  } else {
    rep.mode = "fill";
    rep.mode_reason = info != nullptr && info->releases_memory()
                          ? request.strategy + " released the memory it paused: cold fill"
                          : "no memfd kept that holds snapshot " + rep.snapshot_id + ": cold fill";
    ram.reset(::memfd_create("memsnap-guest", MFD_CLOEXEC));
    if (ram.get() < 0 || ::ftruncate(ram.get(), static_cast<off_t>(chain.guest_size())) != 0) {
      const int err = errno;
      return make_error(Errc::kIoError, std::string("memfd for guest RAM: ") + std::strerror(err),
                        err);
    }
    // Filled before the VMM starts: fresh, so zero blocks stay holes (a VMM started to receive
    // does not write guest RAM).
    clock.start("restore");
    MEMSNAP_ASSIGN_OR_RETURN(auto copied, fill_memfd(chain, ram.get()));
    rep.bytes = copied;
  }

  clock.start("start");
  MEMSNAP_ASSIGN_OR_RETURN(auto started, launcher.start_incoming(std::move(ram)));
  std::unique_ptr<VmmAdapter> vmm = std::move(started);
  auto fail = [&](Error e) -> Result<VmmResumeReport> {
    vmm->terminate();
    if (rep.mode == "warm") kept->memfd = vmm->release_ram();  // still the paused image
    return e;
  };

  if (rep.mode == "write") {
    // The VMM's own RAM exists only now; everything is written, zero blocks too.
    clock.start("restore");
    auto memory = vmm->guest_memory();
    if (!memory.ok()) return fail(std::move(memory).error());
    auto copied = write_guest_image(chain, *memory);
    if (!copied.ok()) return fail(std::move(copied).error());
    rep.bytes = *copied;
    rep.mode_reason += memory->memfd >= 0 ? " (through the VMM's memfd)" : " (process_vm_writev)";
  }
  clock.start("device_load");
  if (Status s = vmm->load_device_state(device); !s.ok()) return fail(s.error());
  clock.start("run");
  if (Status s = vmm->run(); !s.ok()) return fail(s.error());
  clock.stop();
  rep.vmm = std::move(vmm);
  rep.wall_seconds = seconds_since(t0);
  return rep;
}

}  // namespace memsnap
