// The resume half: a new VMM connects through the Firecracker UFFD handshake and memsnap gives it
// back the guest memory of a snapshot chain, the way the sandbox's strategy calls for.
//
//   lazy        every page on first touch, from the chain (UFFDIO_COPY / UFFDIO_ZEROPAGE)
//   background  cold memfd: fill the VMM's memfd from the chain in the background, serve MINOR
//               faults with UFFDIO_CONTINUE and faults ahead of the fill with UFFDIO_COPY
//   eager       cold memfd: fill a fresh memfd completely, then hand it to the VMM
//   warm        hand back the memfd memsnap kept from the pause: no copy at all
//
// Which mode a strategy gets (ResumeRequest::mode overrides it; every choice is reported):
//   a strategy that reads a memfd and keeps it (needs-memfd, not releases-memory): warm when
//   the retained memfd holds exactly the newest snapshot, else background; one that releases
//   memory (hole_punch): background, always cold; any other (process_vm_readv): lazy. Memfd
//   modes need a VMM whose guest memory is a memfd; without one, lazy, and the report says so.
//
// Handing a memfd to the VMM (eager, warm) uses memsnap's reply extension of the handshake (see
// core/handshake/handshake.h); the VMM must support it.
//
// The session also tracks what the guest writes, for the next pause's diff: pages are installed
// write-protected and a VMM userfaultfd in WP_ASYNC mode records the writes (read with
// PAGEMAP_SCAN). A VMM whose userfaultfd is registered for write-protect without WP_ASYNC
// (synchronous) sends each first write to the fault server, which records and resolves it: each
// costs a round trip (~25 us against ~1 us), and in exchange the sandbox can pause live
// (begin_live()). Without either the next pause exports every populated page, and says so.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/file_io.h"
#include "core/base/result.h"
#include "core/fault_server.h"
#include "core/handshake/handshake.h"
#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/snapshot/snapshot_chain.h"
#include "core/vmm_guard.h"

namespace memsnap {

class PhaseClock;

enum class ResumeMode { kLazy, kBackground, kEager, kWarm };
std::string_view resume_mode_name(ResumeMode mode) noexcept;
Result<ResumeMode> parse_resume_mode(std::string_view name);

// The strategy of a chain whose newest snapshot is `newest`: the one it records (format 2),
// which `asked` may repeat but not contradict (kInvalidArgument); a version 1 snapshot records
// none, so `asked` must name it (kInvalidArgument when empty).
Result<std::string> chain_strategy(const SnapshotReader& newest, const std::string& asked);

// Guest memory a memfd pause kept after the VMM went away, for a warm resume.
struct RetainedMemory {
  io::UniqueFd memfd;
  std::string snapshot_id;  // the snapshot whose content the memfd holds (hex)
  std::uint64_t generation = 0;
  std::uint64_t guest_size = 0;
};

// A snapshot whose export has not committed yet, and the pause's memory held for that export
// (a resume before durable, docs/resume.md). The snapshot will hold `ranges` from that memory
// and inherit the rest from its parent chain.
struct PendingSnapshot {
  int memfd = -1;  // borrowed until prepare() returns, which reopens it read-only
  std::uint64_t guest_size = 0;
  std::uint64_t block_size = 4096;
  // What the export stores from that memory (the pause's dirty set); nullopt: the memfd's
  // populated blocks, as the export finds them itself.
  std::optional<std::vector<plugin::ByteRange>> ranges;
};

struct ResumeRequest {
  // Snapshot files, base first. With `pending`, the pending snapshot's parents (maybe none).
  std::vector<std::string> chain;
  std::string socket_path;         // where the VMM will connect
  // The strategy that wrote the chain; picks the mode. Empty: the one the newest snapshot records
  // (format 2); given, it must agree with it (kInvalidArgument). Required with `pending`.
  std::string strategy;
  std::optional<ResumeMode> mode;  // overrides the strategy's choice
  // Memory kept from the pause (warm candidate). Consumed only by a warm resume.
  RetainedMemory* retained = nullptr;
  // Resume before durable: serve the pending snapshot from the memory held for its export. That
  // memory is never handed to the VMM (the export still reads it): background (the VMM's own
  // memfd is filled from it) or lazy; warm and eager are refused.
  const PendingSnapshot* pending = nullptr;
  std::chrono::milliseconds handshake_timeout{30000};
  // Eager and warm: how long the VMM has to ack the memfd handed to it ({"memsnap_mapped":true}).
  std::chrono::milliseconds ack_timeout{30000};
  bool verify_checksums = true;  // hash every DATA run of the chain before serving
  // What the chain's headers may claim: the guest size is checked before anything is sized by it.
  ReaderLimits reader_limits;
  bool track_writes = true;      // install pages write-protected for WP_ASYNC tracking
  // Warm/eager with tracking: who arms write tracking on the handed-over memfd, and when.
  // false (default): memsnap, after the VMM is ready, while the guest runs (~7 ms per GiB off the
  // resume path; pages the guest touches before their turn count as dirty, read or written, so
  // the next diff may hold a little more; nothing is ever missed). true: the VMM, before it acks
  // (the dirty set is exact; a 1 GiB warm resume then takes ~10 ms instead of ~0.3 ms).
  bool arm_tracking_before_ready = false;
  std::uint64_t fill_chunk_bytes = 2 * 1024 * 1024;
  // Background: the fill also maps what it writes into the VMM (FaultServerOptions::map_filled),
  // so the guest takes no fault on it, at the price of page-table work for every page, touched
  // or not (measured: +0.4 s of the fill thread a GiB, against ~40 us a fault the guest would
  // take; docs/performance.md). nullopt: on for a resume before durable, off otherwise.
  std::optional<bool> map_ahead;
  // When set, the VMM is handed to this guardian while the session serves it, so that it is
  // ended if memsnap dies (core/vmm_guard.h). Must outlive the session.
  VmmGuard* guard = nullptr;
};

struct ResumeReport {
  std::string strategy;
  ResumeMode mode = ResumeMode::kLazy;
  std::string mode_reason;  // why this mode (and why not the one asked for, if it differs)
  pid_t vmm_pid = -1;
  std::uint64_t guest_size = 0;
  std::uint64_t block_size = 0;
  std::uint64_t generation = 0;  // of the newest snapshot
  std::string snapshot_id;
  std::size_t chain_length = 0;
  bool vmm_memfd = false;  // the VMM sent a memfd
  bool write_tracking = false;
  std::string write_tracking_reason;
  // The VMM's userfaultfd sends write-protect faults to memsnap (registered for WP without
  // WP_ASYNC): tracking is synchronous, and the sandbox can pause live.
  bool write_faults = false;
  // Warm and eager: the handed-over memfd is mapped afresh by the VMM, so tracking must be armed
  // on all of it (about 7 ms per GiB). That happens after the VMM is ready, while it runs (see
  // arm_write_tracking); ready_seconds does not include it. tracking_arm_seconds (how long the
  // arm took) is filled by wait_tracking_armed().
  bool tracking_armed_in_background = false;
  double tracking_arm_seconds = 0;
  // Phases: open (chain, with checksums), listen, wait_vmm (until the handshake is in and
  // validated: mostly the VMM's own start-up), fill (eager), hand_over (reply + the VMM's
  // ack), serve (start the fault server).
  std::vector<PhaseTiming> phases;
  // From the handshake's arrival to the VMM being able to run: what resume costs a sandbox
  // beyond its VMM's start-up (open is counted separately: it may happen ahead of time).
  double ready_seconds = 0;
  std::uint64_t eager_bytes = 0;  // copied into a fresh memfd (eager)
  // Served from the memory held for a pause whose export had not committed yet; snapshot_id is
  // then empty (the snapshot has none until it is committed).
  bool before_durable = false;
};

// One resumed sandbox. prepare() opens the chain and listens; start the VMM; then
// accept_and_serve(). The session serves faults until stop() or destruction: keep it alive as
// long as the VMM runs (a later pause of a lazily resumed VMM may fault pages in through it).
class ResumeSession {
 public:
  static Result<std::unique_ptr<ResumeSession>> prepare(const PluginRegistry& registry,
                                                        ResumeRequest request);
  ~ResumeSession();
  ResumeSession(const ResumeSession&) = delete;
  ResumeSession& operator=(const ResumeSession&) = delete;

  // Waits for the VMM's handshake, validates it against the chain and starts serving.
  Status accept_and_serve();

  const ResumeReport& report() const { return report_; }
  // settle: first let the fault thread publish what it has counted (waits up to a loop of it,
  // at most 1 s); without, what was published last (at most one batch old), at once.
  FaultStats fault_stats(bool settle = true) const;
  Status serve_error() const;
  // Background mode: waits for the fill to finish.
  Status wait_filled(std::chrono::milliseconds timeout) const;

  pid_t vmm_pid() const { return report_.vmm_pid; }
  // The VMM's guest regions as a pause needs them.
  const std::vector<plugin::Region>& regions() const { return regions_; }
  // The memfd that now backs the VMM's guest memory (its own, or the one handed to it); -1 for
  // anonymous memory. Owned by the session.
  int memfd() const { return memfd_.get(); }
  // Whether memfd() holds the whole guest image (eager, warm, or a finished background fill),
  // so that it can be kept for a warm resume after the next pause. A lazily served memfd only
  // holds the pages the guest touched.
  bool memfd_complete() const;

  // The dirty set of the next pause of this VMM, computed while it is frozen: written pages
  // (tracked) or every populated page (no tracking), plus every range the VMM discarded, plus
  // what an earlier pause took but did not commit. Fill `how` with which. Use it as
  // PauseRequest::dirty_source, and call pause_committed() after the pause succeeded.
  Result<std::vector<plugin::ByteRange>> dirty_since_resume(std::string* how);
  void pause_committed();

  // Warm/eager with tracking: waits for the background arm to finish (dirty_since_resume does
  // it too). Returns its error, if any; the report then says tracking is off.
  Status wait_tracking_armed();

  // Whether a live pause can run: synchronous write tracking on, a memfd, faults served.
  bool can_pause_live() const;
  // A live pause, before its freeze, while the guest runs: takes what the guest wrote so far
  // into the next dirty set and protects it again, so that the stop only re-protects what the
  // guest writes from now on. Nothing is lost if the pause then fails (as dirty_since_resume).
  Status prepare_live();
  // A live pause, with the VMM stopped and right after dirty_since_resume() re-protected
  // `ranges` (its result): until end_live(), the fault server copies each block of `ranges`
  // out before the guest may change it.
  Result<std::shared_ptr<LiveImage>> begin_live(const std::vector<plugin::ByteRange>& ranges);
  void end_live();

  // Stops serving faults. A VMM that still runs then would hang on its next page fault, so it
  // is ended (SIGKILL through a pidfd taken at the handshake, i.e. the process SO_PEERCRED
  // named): stop only after the VMM exited, or when it must end. Idempotent.
  // The same end comes without stop() when serving cannot go on: accept_and_serve() failing
  // after the handshake (a wrong or missing ack, a fault server that cannot start; its error
  // says so), or the fault server stopping on an error while the VMM runs (serve_error()).
  void stop();
  // stop() for a graceful stop of memsnap (not a takeover), for a sandbox that runs: a VMM
  // whose whole memory is in its memfd (warm, eager, a background fill that is done) can run on
  // without memsnap, so the server stops (resolving what it read), its guest ranges are
  // unregistered from its userfaultfd (UFFDIO_UNREGISTER acts on the VMM's address space) and
  // every fault still waiting is woken (UFFDIO_WAKE), and it is left running, no longer tracked.
  // Any other running VMM (served lazily) is ended as stop() ends it. Returns whether a VMM was
  // left running. Not for a VMM a pause left stopped: nobody would continue it (use stop()).
  bool stop_leaving_vmm_running();
  // Whether the VMM that connected still runs.
  bool vmm_running() const;
  // Whether memsnap ended the VMM (stop(), a failed accept_and_serve(), a fault-server error).
  bool vmm_ended() const { return vmm_ended_; }

 private:
  ResumeSession() = default;
  Status hand_over_memfd(int memfd, std::uint64_t generation);
  // accept_and_serve() once the handshake is in: picks the final mode, fills / hands over the
  // memory, starts the fault server, probes write tracking.
  Status hand_over_and_serve(PhaseClock& clock,
                             std::chrono::steady_clock::time_point handshake_done);
  bool end_vmm_if_running(std::string_view why);
  // Gives the VMM back from request_.guard (it no longer ends it if memsnap dies).
  void release_guard();
  // prepare() for a resume before durable: the parents, the held memory, the report.
  Status prepare_pending();

  const PluginRegistry* registry_ = nullptr;
  ResumeRequest request_;
  ResumeReport report_;
  std::shared_ptr<const SnapshotChain> chain_;  // null: a pending snapshot without parents
  io::UniqueFd held_;  // resume before durable: the held memory, reopened read-only
  std::vector<plugin::ByteRange> held_ranges_;     // what the pending snapshot takes from it
  std::vector<plugin::ByteRange> held_populated_;  // its populated blocks
  std::optional<handshake::Listener> listener_;
  handshake::Handshake handshake_;
  std::vector<plugin::Region> regions_;
  io::UniqueFd memfd_;
  io::UniqueFd vmm_pidfd_;
  // Also set by the fault thread (FaultServerOptions::on_error).
  std::atomic<bool> vmm_ended_{false};
  std::uint64_t guard_token_ = 0;  // non-zero while request_.guard holds the VMM
  std::unique_ptr<FaultServer> server_;
  std::vector<plugin::ByteRange> uncommitted_;  // taken by a pause that has not committed yet
  // The background arm of write tracking (warm/eager): the pages writable before it.
  std::future<Result<std::vector<plugin::ByteRange>>> arming_;
  // Synchronous write tracking: what the fault server recorded and what is writable now, then
  // protected again (with the VMM stopped or not: a later write reaches the fault server).
  Result<std::vector<plugin::ByteRange>> take_write_faults();
  // Synchronous write tracking: the pages writable before the arm, then everything protected.
  Result<std::vector<plugin::ByteRange>> arm_write_faults() const;
  double arm_seconds_ = 0;  // written by the arming task, read after arming_.get()
};

}  // namespace memsnap
