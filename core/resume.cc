#include "core/resume.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <string_view>
#include <utility>

#include <spdlog/spdlog.h>

#include "core/dirty_set.h"
#include "core/guest_image.h"
#include "core/phase_clock.h"
#include "core/strategy_policy/strategy_policy.h"

namespace memsnap {
namespace {

// Whether a userfaultfd was set up (UFFDIO_API) for write-protect faults that reach its reader:
// shared-memory write-protect without WP_ASYNC. The features are in its fdinfo ("API:\t<api>:
// <features>:<ioctls>", hex).
bool sends_write_faults(int uffd) {
  constexpr std::uint64_t kWpAsync = 1ULL << 15;  // UFFD_FEATURE_WP_ASYNC
  constexpr std::uint64_t kWpShmem = 1ULL << 12;  // UFFD_FEATURE_WP_HUGETLBFS_SHMEM
  std::ifstream in("/proc/self/fdinfo/" + std::to_string(uffd));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("API:", 0) != 0) continue;
    const auto first = line.find(':', 4);
    if (first == std::string::npos) return false;
    const std::uint64_t features = std::strtoull(line.c_str() + first + 1, nullptr, 16);
    return (features & kWpShmem) != 0 && (features & kWpAsync) == 0;
  }
  return false;
}

// Appends b's ranges to a and returns them sorted and merged.
std::vector<plugin::ByteRange> merged(std::vector<plugin::ByteRange> a,
                                      const std::vector<plugin::ByteRange>& b) {
  a.insert(a.end(), b.begin(), b.end());
  std::sort(a.begin(), a.end(), [](const plugin::ByteRange& x, const plugin::ByteRange& y) {
    return x.offset < y.offset;
  });
  std::vector<plugin::ByteRange> out;
  for (const auto& r : a) {
    if (r.length == 0) continue;
    if (!out.empty() && out.back().offset + out.back().length >= r.offset) {
      out.back().length =
          std::max(out.back().offset + out.back().length, r.offset + r.length) - out.back().offset;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

// A resume's mode when none is asked for, and why: the strategy policy's resume start in terms
// of ResumeMode (kept_matches: kept holds exactly snapshot_id).
std::pair<ResumeMode, std::string> default_mode(const PluginInfo& info, const RetainedMemory* kept,
                                                const std::string& snapshot_id, bool kept_matches) {
  const StrategyPolicy policy = StrategyPolicy::of(info);
  switch (policy.resume_start(kept_matches)) {
    case ResumeStart::kLazy:
      break;
    case ResumeStart::kWarm:
      return {ResumeMode::kWarm,
              "the memfd kept from the pause holds snapshot " + snapshot_id + ": warm"};
    case ResumeStart::kBackground:
      if (policy.releases_memory()) {
        return {ResumeMode::kBackground,
                "strategy " + info.name + " released the memory it paused: cold (background fill)"};
      }
      return {ResumeMode::kBackground, kept == nullptr || kept->memfd.get() < 0
                                           ? "no memfd kept from the pause: cold (background fill)"
                                           : "the memfd kept from the pause holds snapshot " +
                                                 kept->snapshot_id + ", not " + snapshot_id +
                                                 ": cold (background fill)"};
  }
  return {ResumeMode::kLazy, "strategy " + info.name + " reads the VMM's address space: lazy"};
}

}  // namespace

Result<std::string> chain_strategy(const SnapshotReader& newest, const std::string& asked) {
  const std::string recorded = newest.origin().strategy();
  if (recorded.empty()) {
    if (asked.empty()) {
      return make_error(Errc::kInvalidArgument,
                        "snapshot " + newest.path() + " (format version " +
                            std::to_string(newest.header().version) +
                            ") does not record the strategy that wrote it: name the strategy");
    }
    return asked;
  }
  if (!asked.empty() && asked != recorded) {
    return make_error(Errc::kInvalidArgument, "snapshot " + newest.path() +
                                                  " was written by strategy \"" + recorded +
                                                  "\", not \"" + asked + "\"");
  }
  return recorded;
}

std::string_view resume_mode_name(ResumeMode mode) noexcept {
  switch (mode) {
    case ResumeMode::kLazy:
      return "lazy";
    case ResumeMode::kBackground:
      return "background";
    case ResumeMode::kEager:
      return "eager";
    case ResumeMode::kWarm:
      return "warm";
  }
  return "unknown";
}

Result<ResumeMode> parse_resume_mode(std::string_view name) {
  for (ResumeMode m :
       {ResumeMode::kLazy, ResumeMode::kBackground, ResumeMode::kEager, ResumeMode::kWarm}) {
    if (resume_mode_name(m) == name) return m;
  }
  return make_error(Errc::kInvalidArgument, "unknown resume mode '" + std::string(name) +
                                                "' (lazy, background, eager, warm)");
}

Result<std::unique_ptr<ResumeSession>> ResumeSession::prepare(const PluginRegistry& registry,
                                                              ResumeRequest request) {
  std::unique_ptr<ResumeSession> s(new ResumeSession());
  s->registry_ = &registry;
  s->request_ = std::move(request);
  ResumeReport& rep = s->report_;
  PhaseClock clock(rep.phases);

  clock.start("open");
  if (s->request_.pending != nullptr) {
    MEMSNAP_RETURN_IF_ERROR(s->prepare_pending());
  } else {
    MEMSNAP_ASSIGN_OR_RETURN(
        auto chain,
        SnapshotChain::open(s->request_.chain,
                            s->request_.verify_checksums ? Verify::kFull : Verify::kHeaderAndMap,
                            s->request_.reader_limits));
    s->chain_ = std::make_shared<const SnapshotChain>(std::move(chain));
    const SnapshotReader& newest = s->chain_->newest();
    rep.guest_size = s->chain_->guest_size();
    rep.block_size = s->chain_->block_size();
    rep.generation = newest.header().generation;
    rep.snapshot_id = to_hex(newest.header().snapshot_id);
    rep.chain_length = s->chain_->size();
  }

  if (s->request_.pending == nullptr) {
    MEMSNAP_ASSIGN_OR_RETURN(s->request_.strategy,
                             chain_strategy(s->chain_->newest(), s->request_.strategy));
  } else if (s->request_.strategy.empty()) {
    // The pending snapshot is not written yet: the caller knows which strategy writes it.
    return make_error(Errc::kInvalidArgument, "no strategy given for the pending snapshot");
  }
  rep.strategy = s->request_.strategy;

  // The strategy's own mode, from its capabilities.
  const PluginInfo* info = registry.find(s->request_.strategy);
  if (info == nullptr || !info->loaded()) {
    return make_error(Errc::kPluginNotLoaded,
                      "strategy '" + s->request_.strategy + "' is not loaded");
  }
  const RetainedMemory* kept = s->request_.retained;
  const bool kept_matches = kept != nullptr && kept->memfd.get() >= 0 &&
                            kept->snapshot_id == rep.snapshot_id &&
                            kept->guest_size == rep.guest_size;
  auto [mode, why] = default_mode(*info, kept, rep.snapshot_id, kept_matches);
  if (rep.before_durable) {
    // The held memory must stay the pause's image until the export has read it: a VMM never
    // gets it, it only gets copies of its pages.
    mode = ResumeMode::kBackground;
    why =
        "the snapshot is still being exported: its pages come from the memory held for the "
        "export (background fill), which the VMM never gets";
    if (s->request_.mode &&
        (*s->request_.mode == ResumeMode::kWarm || *s->request_.mode == ResumeMode::kEager)) {
      return make_error(Errc::kInvalidState,
                        "a " + std::string(resume_mode_name(*s->request_.mode)) +
                            " resume hands memory to the VMM, but the snapshot is still being "
                            "exported from it: resume in background or lazy mode, or once it "
                            "is durable");
    }
  }
  if (s->request_.mode && *s->request_.mode != mode) {
    const ResumeMode asked = *s->request_.mode;
    if (asked == ResumeMode::kWarm && !kept_matches) {
      return make_error(Errc::kGenerationMismatch,
                        "warm resume asked for, but no kept memfd holds snapshot " +
                            rep.snapshot_id + " (generation " + std::to_string(rep.generation) +
                            ")");
    }
    why = "mode " + std::string(resume_mode_name(asked)) +
          " asked for (strategy default: " + std::string(resume_mode_name(mode)) + ")";
    mode = asked;
  }
  rep.mode = mode;
  rep.mode_reason = why;

  clock.start("listen");
  MEMSNAP_ASSIGN_OR_RETURN(auto listener, handshake::Listener::listen(s->request_.socket_path));
  s->listener_.emplace(std::move(listener));
  clock.stop();
  return s;
}

Status ResumeSession::prepare_pending() {
  const PendingSnapshot& p = *request_.pending;
  ResumeReport& rep = report_;
  if (!request_.chain.empty()) {
    MEMSNAP_ASSIGN_OR_RETURN(
        auto chain,
        SnapshotChain::open(request_.chain,
                            request_.verify_checksums ? Verify::kFull : Verify::kHeaderAndMap,
                            request_.reader_limits));
    if (chain.guest_size() != p.guest_size || chain.block_size() != p.block_size) {
      return make_error(Errc::kInvalidArgument, "the pending snapshot (" +
                                                    std::to_string(p.guest_size) +
                                                    " bytes) does not fit its parents (" +
                                                    std::to_string(chain.guest_size()) + " bytes)");
    }
    chain_ = std::make_shared<const SnapshotChain>(std::move(chain));
  }
  // A description of its own, read-only: the resume moves its file position (SEEK_DATA) and
  // can never write the memory the export reads.
  const std::string path = "/proc/self/fd/" + std::to_string(p.memfd);
  held_.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (held_.get() < 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("reopening the held memory", err), err);
  }
  // Before the VMM connects, so that none of it is on the resume's path.
  MEMSNAP_ASSIGN_OR_RETURN(held_populated_,
                           populated_ranges_of_memfd(held_.get(), p.guest_size, p.block_size));
  if (p.ranges) {
    MEMSNAP_ASSIGN_OR_RETURN(held_ranges_, normalize_ranges(*p.ranges, p.guest_size, p.block_size));
  } else {
    held_ranges_ = held_populated_;
  }
  rep.guest_size = p.guest_size;
  rep.block_size = p.block_size;
  rep.generation = chain_ ? chain_->newest().header().generation + 1 : 1;
  rep.snapshot_id.clear();
  rep.chain_length = request_.chain.size() + 1;
  rep.before_durable = true;
  return {};
}

ResumeSession::~ResumeSession() { stop(); }

void ResumeSession::stop() {
  if (arming_.valid()) arming_.wait();
  if (server_) server_->stop();
  end_vmm_if_running("memsnap stopped serving its memory while it still ran");
  release_guard();
}

void ResumeSession::release_guard() {
  if (guard_token_ != 0) {
    request_.guard->release(guard_token_);
    guard_token_ = 0;
  }
}

bool ResumeSession::stop_leaving_vmm_running() {
  if (arming_.valid()) arming_.wait();
  if (!vmm_running() || !memfd_complete() || handshake_.uffd.get() < 0) {
    stop();
    return false;
  }
  // The server first: it resolves what it has read, while the ranges are still registered (an
  // ioctl on an unregistered range would fail, and a failing server ends the VMM). Faults
  // raised from now on wait in the userfaultfd's queue.
  if (server_) server_->stop();
  // One userfaultfd ioctl on every region; false at the first that fails.
  auto on_every_region = [&](unsigned long request, std::string_view what) {
    for (const plugin::Region& r : regions_) {
      uffdio_range range{r.host_addr, r.size};
      if (::ioctl(handshake_.uffd.get(), request, &range) != 0) {
        const int err = errno;
        spdlog::warn("resume: VMM pid {}: {} at {:#x} failed: {}", report_.vmm_pid, what,
                     r.host_addr, std::strerror(err));
        return false;
      }
    }
    return true;
  };
  // Unregistering wakes only the faults of ranges registered for MISSING: every waiting fault
  // is then woken, and retried on memory no userfaultfd watches any more.
  if (!on_every_region(UFFDIO_UNREGISTER, "unregistering its memory") ||
      !on_every_region(UFFDIO_WAKE, "waking the faults on its memory")) {
    stop();
    return false;
  }
  release_guard();
  spdlog::info(
      "resume: VMM pid {} runs on without memsnap (its memory is whole in its memfd; its "
      "writes are no longer tracked: its next pause exports every populated page)",
      report_.vmm_pid);
  vmm_pidfd_.reset();
  return true;
}

bool ResumeSession::vmm_running() const {
  if (vmm_pidfd_.get() < 0) return false;
  pollfd p{vmm_pidfd_.get(), POLLIN, 0};  // readable once the process has exited
  return ::poll(&p, 1, 0) == 0;
}

bool ResumeSession::end_vmm_if_running(std::string_view why) {
  if (!vmm_running()) {
    vmm_pidfd_.reset();
    return false;
  }
  // Its memory is not served (any more): its next fault would block forever. Firecracker's
  // documentation asks the handler to end the VMM then; the pidfd is the process that connected.
  spdlog::warn(
      "resume: VMM pid {}: {}; ending it (SIGKILL) so that it cannot hang on its next "
      "page fault",
      report_.vmm_pid, why);
  const bool sent = ::syscall(SYS_pidfd_send_signal, vmm_pidfd_.get(), SIGKILL, nullptr, 0) == 0;
  vmm_pidfd_.reset();
  if (sent) vmm_ended_ = true;
  return sent;
}

FaultStats ResumeSession::fault_stats(bool settle) const {
  return server_ ? server_->stats(settle) : FaultStats{};
}

Status ResumeSession::serve_error() const { return server_ ? server_->error() : Status(); }

Status ResumeSession::wait_filled(std::chrono::milliseconds timeout) const {
  if (!server_) return make_error(Errc::kInvalidArgument, "the session is not serving");
  return server_->wait_filled(timeout);
}

Status ResumeSession::hand_over_memfd(int memfd, std::uint64_t generation) {
  // With synchronous tracking nothing can read and re-protect in one step what the guest wrote
  // before an arm: the VMM protects the memory before it runs (~4 ms per GiB of fresh mapping).
  const bool vmm_arms =
      request_.track_writes && (request_.arm_tracking_before_ready || report_.write_faults);
  if (Status s = handshake::send_reply(handshake_.connection.get(), true, memfd, report_.guest_size,
                                       generation, vmm_arms);
      !s.ok()) {
    return s;
  }
  return handshake::wait_mapped_ack(handshake_.connection.get(), request_.ack_timeout);
}

Status ResumeSession::accept_and_serve() {
  if (!listener_) return make_error(Errc::kInvalidArgument, "accept_and_serve called twice");
  ResumeReport& rep = report_;
  PhaseClock clock(rep.phases);

  clock.start("wait_vmm");
  // Waiting for the VMM to connect and send its message, then receiving and validating it:
  // mostly the VMM's own start-up, so ready_seconds starts only once the message is in.
  handshake::Expectations expect;
  expect.page_size = rep.block_size;
  expect.guest_size = rep.guest_size;
  auto hs = listener_->accept(expect, request_.handshake_timeout);
  const auto handshake_done = std::chrono::steady_clock::now();
  listener_.reset();  // one VMM per session: nobody else may connect
  if (!hs.ok()) return std::move(hs).error();
  handshake_ = std::move(*hs);
  rep.vmm_pid = handshake_.vmm_pid;
  // The VMM as a process handle, taken now (it is connected): if memsnap ever stops serving its
  // memory while it runs, it is ended through this, never through a pid that may be reused.
  vmm_pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, rep.vmm_pid, 0)));
  if (vmm_pidfd_.get() < 0) {
    spdlog::warn(
        "resume: no pidfd for VMM pid {} ({}): it cannot be ended if memsnap stops "
        "serving it",
        rep.vmm_pid, std::strerror(errno));
  } else if (request_.guard != nullptr) {
    if (auto token = request_.guard->watch(vmm_pidfd_.get()); token.ok()) {
      guard_token_ = *token;
    } else {
      spdlog::warn("resume: VMM pid {} is not guarded: {}", rep.vmm_pid, token.error().to_string());
    }
  }
  rep.vmm_memfd = handshake_.memfd.get() >= 0;
  for (const auto& r : handshake_.regions) {
    plugin::Region region{};
    region.guest_offset = r.offset;
    region.host_addr = r.base_host_virt_addr;
    region.size = r.size;
    regions_.push_back(region);
  }
  // Synchronous write tracking: the userfaultfd's features say so, and protecting the first page
  // works (the range is registered for write-protect). Protecting a page early is always safe: a
  // write to it then reaches the fault server and counts as written.
  if (request_.track_writes && rep.vmm_memfd && !regions_.empty() &&
      sends_write_faults(handshake_.uffd.get())) {
    uffdio_writeprotect probe{};
    probe.range.start = regions_.front().host_addr;
    probe.range.len = rep.block_size;
    probe.mode = UFFDIO_WRITEPROTECT_MODE_WP;
    rep.write_faults = ::ioctl(handshake_.uffd.get(), UFFDIO_WRITEPROTECT, &probe) == 0;
  }

  // From here on the VMM has registered its memory with the userfaultfd it sent: if memsnap does
  // not serve it, whatever went wrong, its first fault blocks forever. End it then, and say so.
  Status served = hand_over_and_serve(clock, handshake_done);
  if (served.ok()) return served;
  Error e = std::move(served).error();
  const bool had_pidfd = vmm_pidfd_.get() >= 0;
  const bool ended =
      end_vmm_if_running("the resume failed after its handshake (" + e.message + ")");
  e.message += "; VMM pid " + std::to_string(rep.vmm_pid) +
               (ended       ? " was ended (SIGKILL)"
                : had_pidfd ? " had exited already"
                            : " could not be ended (no pidfd)");
  return e;
}

Status ResumeSession::hand_over_and_serve(PhaseClock& clock,
                                          std::chrono::steady_clock::time_point handshake_done) {
  ResumeReport& rep = report_;
  ResumeMode mode = rep.mode;
  // Background fills the VMM's own memfd; eager and warm hand one over, so only it needs one.
  if (mode == ResumeMode::kBackground && !rep.vmm_memfd) {
    rep.mode_reason += "; the VMM's guest memory is not a memfd: lazy instead";
    mode = ResumeMode::kLazy;
  }
  rep.mode = mode;

  FaultServerOptions options;
  options.write_protect = request_.track_writes;
  options.write_faults = rep.write_faults;
  options.fill_chunk_bytes = request_.fill_chunk_bytes;
  if (mode == ResumeMode::kBackground) {
    memfd_ = std::move(handshake_.memfd);
    options.fill_memfd = memfd_.get();
    options.map_filled = request_.map_ahead.value_or(rep.before_durable);
  } else if (mode == ResumeMode::kLazy) {
    memfd_ = std::move(handshake_.memfd);
  }
  if (held_.get() >= 0) {  // a resume before durable: the held memory over the parents
    options.overlay.memfd = held_.get();
    options.overlay.guest_size = rep.guest_size;
    options.overlay.block_size = rep.block_size;
    options.overlay.ranges = held_ranges_;
    options.overlay.populated = held_populated_;
  }

  if (mode == ResumeMode::kEager) {
    clock.start("fill");
    io::UniqueFd fresh(::memfd_create("memsnap-resume", MFD_CLOEXEC));
    if (fresh.get() < 0) {
      const int err = errno;
      return make_error(Errc::kIoError, io::errno_message("memfd_create", err), err);
    }
    if (::ftruncate(fresh.get(), static_cast<off_t>(rep.guest_size)) != 0) {
      const int err = errno;
      return make_error(Errc::kIoError, io::errno_message("ftruncate(memfd)", err), err);
    }
    MEMSNAP_ASSIGN_OR_RETURN(auto copied, fill_memfd(*chain_, fresh.get()));
    rep.eager_bytes = copied;
    clock.start("hand_over");
    if (Status s = hand_over_memfd(fresh.get(), rep.generation); !s.ok()) return s;
    memfd_ = std::move(fresh);
  } else if (mode == ResumeMode::kWarm) {
    clock.start("hand_over");
    RetainedMemory& kept = *request_.retained;
    if (Status s = hand_over_memfd(kept.memfd.get(), kept.generation); !s.ok()) {
      // The VMM may hold the memfd now and may have written to it before it failed: it is no
      // longer any snapshot's image, so it must never be handed to another VMM as one.
      kept = RetainedMemory{};
      return s;
    }
    memfd_ = std::move(kept.memfd);
    kept.snapshot_id.clear();
  } else {
    // Tell a VMM that waits for memsnap's reply that no memfd comes; others never read it.
    if (Status s = handshake::send_reply(handshake_.connection.get(), false, -1, 0, 0); !s.ok()) {
      spdlog::debug("resume: reply to the VMM not sent: {}", s.error().to_string());
    }
  }

  // Serving stops on an error while the VMM runs: its next fault would hang, so end it at once
  // (on the fault thread; vmm_pidfd_ stays open until stop() has joined that thread).
  options.on_error = [this, pid = rep.vmm_pid, pidfd = vmm_pidfd_.get()](const Error& e) {
    spdlog::error(
        "resume: serving the memory of VMM pid {} failed ({}): ending it (SIGKILL) so "
        "that it cannot hang on its next page fault",
        pid, e.to_string());
    if (pidfd >= 0 && ::syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, nullptr, 0) == 0) {
      vmm_ended_ = true;
    }
  };
  clock.start("serve");
  MEMSNAP_ASSIGN_OR_RETURN(auto server,
                           FaultServer::start(handshake_.uffd.get(), regions_, chain_, options));
  server_ = std::move(server);
  held_.reset();  // the fault server maps what it still needs
  clock.stop();
  rep.ready_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - handshake_done).count();

  // Is WP_ASYNC tracking there? A scan without re-arming tells without changing anything.
  // Probing one page is enough: the VMM registers all of guest memory the same way.
  if (rep.write_faults) {
    rep.write_tracking = true;
    rep.write_tracking_reason =
        "userfaultfd write-protect faults, resolved by memsnap (synchronous) + PAGEMAP_SCAN";
  } else if (request_.track_writes) {
    std::vector<plugin::Region> first = {regions_.front()};
    first.front().size = std::min<std::uint64_t>(first.front().size, rep.block_size);
    auto probe = written_ranges_of_process(rep.vmm_pid, first, rep.block_size, false);
    rep.write_tracking = probe.ok();
    rep.write_tracking_reason =
        probe.ok() ? "userfaultfd WP_ASYNC + PAGEMAP_SCAN"
                   : probe.error().message + "; the next pause exports every populated page";
  } else {
    rep.write_tracking_reason = "write tracking off; the next pause exports every populated page";
  }
  // Pages the guest has not touched yet are empty page-table entries, which PAGEMAP_SCAN counts
  // as written until they are protected: without an arm, the next pause would take every page
  // the guest never touched (and fault it in to read it). A handed-over memfd (warm, eager) is
  // all unprotected. Arming takes ~7 ms per GiB, longer than the rest of a warm resume, so it
  // runs while the guest does; what the guest touches before its page is armed is reported by
  // the arm itself. Pages the fault server installs arrive protected either way.
  const bool vmm_armed = (request_.arm_tracking_before_ready || rep.write_faults) &&
                         (mode == ResumeMode::kWarm || mode == ResumeMode::kEager);
  if (rep.write_tracking && !vmm_armed) {
    rep.tracking_armed_in_background = true;
    arming_ = std::async(
        std::launch::async, [this, pid = rep.vmm_pid, regions = regions_, bs = rep.block_size] {
          const auto start = std::chrono::steady_clock::now();
          auto armed =
              report_.write_faults ? arm_write_faults() : arm_write_tracking(pid, regions, bs);
          arm_seconds_ =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          return armed;
        });
  }
  return {};
}

Status ResumeSession::wait_tracking_armed() {
  if (!arming_.valid()) return {};
  auto armed = arming_.get();  // makes arm_seconds_ visible here
  report_.tracking_arm_seconds = arm_seconds_;
  if (!armed.ok()) {
    // Writes may have gone unrecorded: the next pause must take every populated page.
    report_.write_tracking = false;
    report_.write_tracking_reason = "arming write tracking failed (" + armed.error().message +
                                    "); the next pause exports every populated page";
    return std::move(armed).error();
  }
  uncommitted_ = merged(std::move(uncommitted_), *armed);
  return {};
}

Result<std::vector<plugin::ByteRange>> ResumeSession::dirty_since_resume(std::string* how) {
  std::vector<plugin::ByteRange> ranges;
  std::string source;
  if (Status s = wait_tracking_armed(); !s.ok()) {
    spdlog::warn("resume: {}", report_.write_tracking_reason);
  }
  // Discards first: taking them can fail (the serving thread did not come round), and it must
  // fail before the scan below re-protects the written pages, which would lose them. Once taken
  // they are kept in uncommitted_ until a pause commits them, whatever fails next.
  bool any_discarded = false;
  if (server_) {
    MEMSNAP_ASSIGN_OR_RETURN(auto taken, server_->discarded(true));
    any_discarded = !taken.empty();
    uncommitted_ = merged(std::move(uncommitted_), std::move(taken));
  }
  if (report_.write_tracking && report_.write_faults) {
    // What the fault server resolved, and what is writable now (the same pages, and any
    // installed without protection); then protected again, so that later writes fault.
    MEMSNAP_ASSIGN_OR_RETURN(auto taken, take_write_faults());
    ranges = std::move(taken);
    source = "pages written since the resume (userfaultfd write-protect faults + PAGEMAP_SCAN)";
  } else if (report_.write_tracking) {
    MEMSNAP_ASSIGN_OR_RETURN(auto written, written_ranges_of_process(report_.vmm_pid, regions_,
                                                                     report_.block_size, true));
    ranges = std::move(written);
    source = "pages written since the resume (userfaultfd WP_ASYNC + PAGEMAP_SCAN)";
  } else if (memfd_.get() >= 0) {
    MEMSNAP_ASSIGN_OR_RETURN(
        auto populated,
        populated_ranges_of_memfd(memfd_.get(), report_.guest_size, report_.block_size));
    ranges = std::move(populated);
    source = "every populated page of the memfd (" + report_.write_tracking_reason + ")";
  } else {
    MEMSNAP_ASSIGN_OR_RETURN(
        auto populated, populated_ranges_of_process(report_.vmm_pid, regions_, report_.block_size));
    ranges = std::move(populated);
    source = "every populated page of the process (" + report_.write_tracking_reason + ")";
  }
  if (any_discarded) source += ", plus ranges the VMM discarded";
  // A pause that took ranges but did not commit them must not lose them: they stay in every
  // dirty set until pause_committed().
  uncommitted_ = merged(std::move(ranges), uncommitted_);
  if (how) *how = source;
  return uncommitted_;
}

bool ResumeSession::memfd_complete() const {
  if (memfd_.get() < 0) return false;
  switch (report_.mode) {
    case ResumeMode::kWarm:
    case ResumeMode::kEager:
      return true;
    case ResumeMode::kBackground:
      return server_ && server_->stats().fill_done;
    case ResumeMode::kLazy:
      return false;
  }
  return false;
}

void ResumeSession::pause_committed() { uncommitted_.clear(); }

Result<std::vector<plugin::ByteRange>> ResumeSession::arm_write_faults() const {
  // Pages writable now were written (or installed unprotected): they are the result. Any page
  // protected or unmapped now reaches the fault server when it is written, before or after the
  // protection below, and the server records it (written()).
  MEMSNAP_ASSIGN_OR_RETURN(
      auto writable, writable_ranges_of_process(report_.vmm_pid, regions_, report_.block_size));
  std::vector<plugin::ByteRange> all;
  for (const auto& r : regions_) all.push_back({r.guest_offset, r.size});
  MEMSNAP_RETURN_IF_ERROR(protect_guest_ranges(handshake_.uffd.get(), regions_, all));
  return writable;
}

Result<std::vector<plugin::ByteRange>> ResumeSession::take_write_faults() {
  // Recorded first: a page made writable after the record was taken is found by the scan. Both
  // go into uncommitted_ before anything is protected, so that a failure half way loses none of
  // them (they stay in every dirty set until a pause commits).
  MEMSNAP_ASSIGN_OR_RETURN(auto resolved, server_->written(true));
  uncommitted_ = merged(std::move(uncommitted_), resolved);
  MEMSNAP_ASSIGN_OR_RETURN(
      auto writable, writable_ranges_of_process(report_.vmm_pid, regions_, report_.block_size));
  uncommitted_ = merged(std::move(uncommitted_), writable);
  // Every recorded block is protected again, mapped or not: a page the guest wrote and whose
  // entry was zapped since (reclaim, a discard) has no write-protect marker, and on a mapping
  // registered for write-protect only the kernel would map it writable without a fault.
  std::vector<plugin::ByteRange> taken = merged(std::move(resolved), std::move(writable));
  MEMSNAP_RETURN_IF_ERROR(protect_guest_ranges(handshake_.uffd.get(), regions_, taken));
  return taken;
}

Status ResumeSession::prepare_live() {
  if (!can_pause_live()) return make_error(Errc::kUnsupported, "this sandbox cannot pause live");
  if (Status s = wait_tracking_armed(); !s.ok()) return s;
  // take_write_faults() keeps what it takes in uncommitted_: in every dirty set until a pause
  // commits it.
  MEMSNAP_ASSIGN_OR_RETURN(auto taken, take_write_faults());
  (void)taken;
  return {};
}

bool ResumeSession::can_pause_live() const {
  return report_.write_faults && report_.write_tracking && server_ && memfd_.get() >= 0;
}

Result<std::shared_ptr<LiveImage>> ResumeSession::begin_live(
    const std::vector<plugin::ByteRange>& ranges) {
  if (!can_pause_live()) {
    return make_error(Errc::kUnsupported, "this sandbox cannot pause live");
  }
  MEMSNAP_ASSIGN_OR_RETURN(
      auto image, LiveImage::create(memfd_.get(), report_.guest_size, report_.block_size, ranges));
  // The image first, then the protection. The VMM is stopped, but the fault server may still
  // resolve a write fault its vCPU raised before the stop: set_live() waits for one that found
  // no image, and every later one preserves its block before the page becomes writable. In the
  // other order such a fault could make a page writable after it was protected, unpreserved.
  server_->set_live(image);
  // Every block of the export protected, whatever its way into the dirty set (taken just now, a
  // discard, an earlier pause that did not commit, a cut-off snapshot's blocks): one that is
  // not could change without a fault. Protecting a protected page changes nothing.
  if (Status s = protect_guest_ranges(handshake_.uffd.get(), regions_, ranges); !s.ok()) {
    server_->set_live(nullptr);
    return s.error();
  }
  return image;
}

void ResumeSession::end_live() {
  if (server_) server_->set_live(nullptr);
}

}  // namespace memsnap
