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

}  // namespace

std::string device_state_path(const std::string& snapshot_path) {
  constexpr std::string_view kExt = ".snap";
  if (snapshot_path.size() > kExt.size() &&
      snapshot_path.compare(snapshot_path.size() - kExt.size(), kExt.size(), kExt) == 0) {
    return snapshot_path.substr(0, snapshot_path.size() - kExt.size()) + ".vmstate";
  }
  return snapshot_path + ".vmstate";
}

Result<VmmPauseReport> pause_vmm(const PluginRegistry& registry, VmmAdapter& vmm,
                                 const VmmPauseRequest& request) {
  const auto t0 = std::chrono::steady_clock::now();
  VmmPauseReport rep;
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
  std::optional<SnapshotChain> parent;
  if (!request.parent_chain.empty()) {
    MEMSNAP_ASSIGN_OR_RETURN(auto chain,
                             SnapshotChain::open(request.parent_chain, Verify::kHeaderAndMap));
    parent.emplace(std::move(chain));
  }

  std::vector<PhaseTiming> before;
  std::vector<PhaseTiming> after;
  PhaseClock clock(before);
  clock.start("stop");
  if (Status s = vmm.stop(); !s.ok()) return s.error();
  // From here a failure lets the guest run again (its memory is intact: the pipeline writes back
  // what a releasing strategy had already released).
  auto fail = [&](Error e) -> Result<VmmPauseReport> {
    if (Status s = vmm.run(); !s.ok()) {
      spdlog::error("pause of {} pid {} failed and the guest could not run again: {}", vmm.kind(),
                    vmm.pid(), s.error().to_string());
    }
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

  PauseRequest p;
  p.pid = memory->pid;
  p.regions = memory->regions;
  p.memfd = memory->memfd;
  p.guest_size = memory->guest_size;
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
  if (parent) {
    p.parent_path = request.parent_chain.back();
    const GuestMemoryAccess access = *memory;
    p.dirty_source = [&parent, access](std::string* how) {
      *how = "content compared with the parent chain";
      return changed_ranges(*parent, access);
    };
  }
  auto paused = pause(registry, p);
  if (!paused.ok()) {
    ::unlink(rep.device_state_path.c_str());
    return fail(std::move(paused).error());
  }
  rep.memory = std::move(*paused);

  PhaseClock tail(after);
  if (request.run_after) {
    tail.start("run");
    if (Status s = vmm.run(); !s.ok()) return s.error();
  }
  tail.stop();
  rep.phases = std::move(before);
  for (const PhaseTiming& t : rep.memory.phases) rep.phases.push_back(t);
  for (PhaseTiming& t : after) rep.phases.push_back(std::move(t));
  rep.wall_seconds = seconds_since(t0);
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
