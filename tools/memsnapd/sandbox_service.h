// memsnapd's sandboxes: what the control API's endpoints do, without HTTP.
//
// A sandbox is registered (a running VMM: pid, guest regions, optionally the fd number of the
// memfd that backs its memory; or a paused one: its snapshot chain), then paused and resumed,
// any number of times, through the same pipelines the CLI uses (core/pause, core/resume). The
// strategy of each pause comes from the feature flag (StrategySelector) unless the request forces
// one; every pause and resume is recorded in HostMetrics by strategy.
//
// States: tools/memsnapd/sandbox_lifecycle.h holds them and the one table of moves between them.
// A refused pause or resume changes nothing: every precondition is checked before anything is
// done (a resume lets go of the old VMM's session only once it has been accepted).
// Registering a running VMM gives running; registering a snapshot chain gives paused.
// A sandbox is operated on by one pause or resume at a time (a second one gets kBusy); every
// snapshot path is confined to the snapshot directory; nothing is committed unless the whole
// pause succeeded (the pipeline's temporary file is renamed into place last).
//
// Who may do what (docs/api.md "Who may do what"): every endpoint gets the Caller (the kernel's
// SO_PEERCRED of the connection). A caller may register only a VMM process it owns (real,
// effective and saved uid its own, dumpable); the sandbox records its owner. Only the owner and
// root (or memsnapd's own uid) may see or act on a sandbox; registering a snapshot chain is
// root's. Others get kForbidden. A registered VMM is pinned: memsnapd keeps a pidfd of it and the
// memfd it named (checked to be a read-write memfd) from registration on, never re-taking either
// by number.
//
// Thread-safety: every method may be called from any thread (the control API serves each
// connection on its own thread).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <sys/types.h>

#include <nlohmann/json.hpp>

#include "core/base/result.h"
#include "core/metrics/host_metrics.h"
#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/snapshot/snapshot_reader.h"
#include "core/snapshot/snapshot_writer.h"
#include "core/strategy_selection/strategy_selection.h"
#include "core/vmm_guard.h"
#include "flags/flag_store.h"
#include "tools/memsnapd/pipeline.h"
#include "tools/memsnapd/sandbox_lifecycle.h"
#include "tools/memsnapd/sandbox_registry.h"

namespace memsnap::daemon {

// What SIGHUP may change.
struct ServiceSettings {
  int max_concurrent_pauses = 4;
  int max_concurrent_resumes = 4;
  std::chrono::milliseconds handshake_timeout{10000};
  // How long a pause or resume waits for a free slot before it is refused (kBusy).
  std::chrono::milliseconds queue_timeout{60000};
  std::string fallback_strategy = "process_vm_readv";
  // false: a sandbox whose flagged strategy cannot serve it is refused instead of falling back.
  bool allow_fallback = true;
  std::string strategy_flag = "memory-export-strategy";
  // limits.max_guest_size: the largest guest a snapshot or a registration may describe.
  ReaderLimits reader_limits;
  // Registrations beyond this many sandboxes are refused (kLimitReached).
  std::size_t max_sandboxes = 4096;
  // snapshots.durable_write: how synced pauses write guest memory (ignored without sync).
  DataWrite durable_write = DataWrite::kBuffered;
  // flags.pause_mode_flag: the flag that picks a pause's mode (copy, handover, live) when its
  // body names none. Not in the flag file (or no flag file): copy.
  std::string pause_mode_flag = "pause-mode";
  // limits.max_background_exports / limits.max_export_backlog_bytes: handover exports not durable
  // yet (running or failed), and the guest bytes they may still have to write. A handover pause
  // that would go beyond either waits up to queue_timeout for exports to finish, then is refused
  // (kBusy) with nothing changed. One export is always allowed when none is pending.
  std::size_t max_background_exports = 16;
  std::uint64_t max_export_backlog_bytes = std::uint64_t{64} << 30;
};

// Who made a request, as the kernel saw it at connect (SO_PEERCRED).
struct Caller {
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;
  // root and memsnapd's own uid may act on every sandbox and register any process.
  bool privileged() const;
};

struct ServiceOptions {
  std::string snapshot_dir;  // absolute; created if missing
  // Where resumes' handshake sockets go (a request names a socket in it); absolute. Created if
  // missing (mode 0755); it must be a directory of memsnapd's uid that nobody else may write.
  // Empty: <snapshot_dir>/../handshake.
  std::string handshake_dir;
  bool sync = true;          // fsync snapshots at commit
  // Where the registry of sandboxes is kept across restarts (tools/memsnapd/sandbox_registry.h);
  // created if missing. Empty: no registry (a restart forgets every sandbox).
  std::string state_dir;
  ServiceSettings settings;
  // Ends the VMMs memsnapd serves if memsnapd dies (core/vmm_guard.h); null: none.
  VmmGuard* guard = nullptr;
  // What pauses and resumes run; null: core's (core_pipeline()). Must outlive the service.
  Pipeline* pipeline = nullptr;
};

struct Sandbox;
struct PauseBody;  // the steps of a pause (sandbox_service.cc)
struct ChainPlan;
struct PauseSource;

class SandboxService {
 public:
  // registry and metrics must outlive the service.
  static Result<std::unique_ptr<SandboxService>> create(const PluginRegistry& registry,
                                                        metrics::HostMetrics& metrics,
                                                        ServiceOptions options);
  ~SandboxService();
  SandboxService(const SandboxService&) = delete;
  SandboxService& operator=(const SandboxService&) = delete;

  // The flag source strategies are chosen from; null: none (every sandbox gets the fallback
  // strategy, which is then not counted as a fallback).
  void set_flags(std::shared_ptr<flags::FlagStore> store);
  void update_settings(const ServiceSettings& settings);
  ServiceSettings settings() const;

  // The endpoints. Bodies are the parsed JSON requests (docs/api.md); results are the JSON
  // answers. Errors carry the code the API maps to a status.
  Result<nlohmann::json> register_sandbox(const Caller& caller, const nlohmann::json& body);
  Result<nlohmann::json> pause(const Caller& caller, const std::string& id,
                               const nlohmann::json& body);
  Result<nlohmann::json> resume(const Caller& caller, const std::string& id,
                                const nlohmann::json& body);
  // wait_while_state: when set, waits (up to timeout) until the state is no longer that one.
  // The wait ends early with kShuttingDown when memsnapd drains, and with kTimeout soon after
  // client_gone() says nobody waits for the answer any more (asked a few times a second).
  Result<nlohmann::json> get(const Caller& caller, const std::string& id,
                             const std::string& wait_while_state,
                             std::chrono::milliseconds timeout,
                             const std::function<bool()>& client_gone = nullptr);
  // The caller's sandboxes (every one for a privileged caller).
  nlohmann::json list(const Caller& caller) const;
  Result<nlohmann::json> explain(const Caller& caller, const std::string& id) const;
  // A handover pause's export that failed (state export_failed) tries again
  // (POST /v1/sandboxes/{id}/export/retry); kInvalidState in any other state.
  Result<nlohmann::json> retry_export(const Caller& caller, const std::string& id);
  // Refuses (invalid_state) a running sandbox whose memory memsnapd serves unless force: its VMM
  // would be ended. Also without force: a sandbox exporting (with force it is forgotten, and its
  // export still finishes and commits) or whose export failed (with force its memory is let go:
  // the only copy of what the pause acknowledged).
  Result<nlohmann::json> remove(const Caller& caller, const std::string& id, bool force = false);
  nlohmann::json health() const;

  // SIGTERM: refuses new pauses and resumes (kShuttingDown), then waits up to timeout for the
  // ones in flight. True if none is left.
  bool drain(std::chrono::milliseconds timeout);

  // Called now and then (every second) by the daemon: flag reload counters, and the page faults
  // served for running sandboxes since the last call, into the metrics.
  void poll();

 private:
  SandboxService(const PluginRegistry& registry, metrics::HostMetrics& metrics,
                 ServiceOptions options);

  struct Choice;
  struct ModeChoice;
  class Claim;
  class Slot;
  Choice choose(const SandboxAttributes& sandbox, const std::string& forced, bool record) const;
  // The pause's mode: the body's, else the pause-mode flag's, else copy; then what the sandbox
  // and strategy allow (decide_pause_mode). Records the metrics.
  ModeChoice choose_mode(const Sandbox& sb, const PauseBody& body, const std::string& strategy,
                         const PauseSource& source);
  // The sandbox id if it exists and caller may act on it (kSandboxNotFound, kForbidden).
  Result<std::shared_ptr<Sandbox>> find_locked(const Caller& caller, const std::string& id) const;
  // Takes the sandbox for one pause or resume: it must be in `required`, and is `owned` until the
  // claim is finished (or destroyed, which puts it back). kBusy if another operation owns it,
  // kInvalidState if it is in another state, kShuttingDown while draining.
  Result<Claim> claim(const Caller& caller, const std::string& id, const char* op,
                      SandboxState required, SandboxState owned);
  // Moves sb to `to` (the lifecycle's table; a move it does not allow is logged as a bug),
  // keeps the by-state counts and publishes them.
  void move_locked(Sandbox& sb, SandboxState to);
  // kOk, kShuttingDown (draining), or kBusy (no slot within the queue timeout).
  Errc acquire_slot(bool pause_slot);
  void release_slot(bool pause_slot);
  void publish_states_locked();
  nlohmann::json describe_locked(const Sandbox& sandbox) const;
  Result<std::string> confine(const std::string& path, bool must_exist) const;
  // A resume's handshake_socket as a path in the handshake directory (kPathNotAllowed).
  Result<std::string> handshake_path(const std::string& requested) const;
  // Registration of a running VMM: pins it (pidfd, memfd) into sb after the ownership and
  // mapping checks.
  Status pin_vmm(const Caller& caller, const nlohmann::json& body, Sandbox& sb) const;
  // The steps of a registration: a running VMM (then pinned) or a snapshot chain, then added.
  Status register_running(const Caller& caller, const nlohmann::json& body, Sandbox& sb) const;
  Status register_chain(const Caller& caller, const nlohmann::json& body, Sandbox& sb) const;
  Result<nlohmann::json> add_locked(std::shared_ptr<Sandbox> sb);
  void flush_fault_stats_locked(Sandbox& sandbox);
  // The registry on disk. Every change of what it records bumps registry_seq_ (under mu_:
  // registry_changed_locked); persist_registry() (never under mu_) writes the newest version
  // when it is not on disk yet, and returns once it is durable. Called before every answer that
  // changed a sandbox, by the callbacks of background work, and by poll() (each second).
  void registry_changed_locked() { ++registry_seq_; }
  // sync=false: renamed into place without fsync (see RegistryFile::save) -- for a handover's
  // answer, whose snapshot is not durable yet either; its durable moment writes it synced.
  void persist_registry(bool sync = true);
  // persist_registry() when it goes (declared first in an endpoint, it runs last).
  struct PersistAtExit {
    explicit PersistAtExit(SandboxService& s) : service(s) {}
    ~PersistAtExit() { service.persist_registry(); }
    PersistAtExit(const PersistAtExit&) = delete;
    PersistAtExit& operator=(const PersistAtExit&) = delete;
    SandboxService& service;
  };
  RegistryDocument registry_locked() const;
  // At start: takes back what the registry recorded (recover_entry), says so per sandbox in the
  // log and in health(), and writes the registry as it now is.
  void recover(const RegistryDocument& doc);
  // health()'s "registry": its file, what the start recovered and what not, whether the last
  // write succeeded; null without a registry.
  nlohmann::json registry_health() const;
  // One recorded sandbox as it can be taken back, or why it cannot (kept in *why). *how says
  // what became of it ("paused, its VMM gone", ...).
  std::shared_ptr<Sandbox> recover_entry(const RegistryEntry& entry, bool same_boot,
                                         std::string* how, std::string* why);
  // recover_entry for a running sandbox whose VMM is still the same process: registered again
  // (regions, its memfd taken back from its mappings), with the chain it had.
  std::shared_ptr<Sandbox> readopt_running(const RegistryEntry& entry,
                                           std::vector<std::string> chain,
                                           std::shared_ptr<Sandbox> sb, std::string* how,
                                           std::string* why);
  // What became of a VMM memsnapd let go of (release_vmm).
  enum class VmmRelease { kNone, kLeftRunning, kEnded, kNotEnded };
  // memsnapd lets go of sandbox's VMM, once the sandbox is out of sandboxes_ (DELETE) or memsnapd
  // stops. With leave_running (memsnapd's graceful stop of a running sandbox), a VMM whose memory
  // is whole in its memfd runs on, no longer served or tracked. Otherwise, and for a VMM served
  // lazily (its next fault would hang), it is ended; so is a VMM a pause left stopped, whether
  // memsnapd resumed it or not (nobody would continue it, and its memory is in the snapshot or
  // held by the export), through the pidfd taken at registration. `state` is the sandbox's.
  VmmRelease release_vmm(Sandbox& sandbox, SandboxState state, bool leave_running);
  // The steps of a pause (pause() runs them in this order).
  Result<ChainPlan> plan_chain(const Sandbox& sb, const PauseBody& body) const;
  Status check_choice(const Sandbox& sb, const Choice& choice, const PauseBody& body) const;
  nlohmann::json pause_answer(const std::string& id, const Choice& choice, const ChainPlan& plan,
                              const PauseBody& body, const PauseReport& rep) const;
  // report: null when the pause failed.
  void record_pause(const PauseReport* report, const std::string& strategy, double seconds);
  Result<nlohmann::json> fail_pause(Claim& claim, Error error);
  // A handover pause, from the freeze to the answer; its export then runs in the background.
  Result<nlohmann::json> pause_handover(Claim& claim, Slot& slot, const Choice& choice,
                                        const ModeChoice& mode, ChainPlan plan,
                                        const PauseBody& body, const PauseSource& source,
                                        std::chrono::steady_clock::time_point started);
  // Waits (up to the queue timeout) until one more background export of guest_size fits the
  // limits, and counts it; kBusy, kShuttingDown.
  Status reserve_export(std::uint64_t guest_size);
  void unreserve_export();
  // A background export's state changed (its watcher thread).
  void export_changed(const std::weak_ptr<Sandbox>& weak, const ExportStatus& status);
  void publish_exports_locked();
  void finish_resume(Claim claim);
  // A resume of a sandbox whose handover export runs waits for it to be durable (up to the queue
  // timeout; kBusy after); kInvalidState when the export failed.
  // Until the snapshot of the sandbox's last pause is durable (at most the queue timeout);
  // kInvalidState if its export failed (it must be retried first).
  Status wait_until_durable(const Caller& caller, const std::string& id);
  // A resume's claim: at once from exporting when the held memory can serve it (resume before
  // durable), else from paused once durable.
  Result<Claim> claim_for_resume(const Caller& caller, const std::string& id,
                                 std::optional<ResumeMode> mode);
  // Lifecycle helpers: a state a finished operation parks a sandbox in (paused, exporting,
  // export_failed), the one it really is in given its export, and whether that export runs.
  static bool parked(SandboxState s);
  static SandboxState parked_state_locked(const Sandbox& sb);
  static bool export_running_locked(const Sandbox& sb);

  const PluginRegistry& registry_;
  metrics::HostMetrics& metrics_;
  const ServiceOptions options_;
  Pipeline& pipeline_;
  std::string snapshot_dir_;  // canonical
  std::string handshake_dir_;  // canonical

  mutable std::mutex mu_;
  std::condition_variable changed_;  // any state change, slot release, drain
  std::map<std::string, std::shared_ptr<Sandbox>> sandboxes_;
  // Sandboxes by state, kept as they move (move_locked), so publishing is not a walk.
  StateCounts state_counts_;
  // Sandboxes that may hold a kept memfd (for the warm-memory gauge); pruned when publishing.
  std::map<std::string, std::weak_ptr<Sandbox>> warm_candidates_;
  // The sandbox last registered or resumed with each VMM pid (one registration per live VMM).
  std::map<pid_t, std::string> vmm_sandbox_;
  ServiceSettings settings_;
  std::shared_ptr<flags::FlagStore> flags_;
  int pauses_in_flight_ = 0;
  // Background exports not durable yet, and handovers about to start one (reserve_export).
  std::size_t exports_pending_ = 0;
  int resumes_in_flight_ = 0;
  bool draining_ = false;
  std::uint64_t reloads_seen_ = 0;
  std::uint64_t reload_failures_seen_ = 0;

  // The registry (null without options_.state_dir) and the boot its VMM records belong to.
  std::unique_ptr<RegistryFile> registry_file_;
  std::string boot_id_;
  std::uint64_t registry_seq_ = 0;      // under mu_: bumped by every change it records
  std::mutex registry_write_mu_;        // one write at a time; taken before mu_, never under it
  std::uint64_t registry_written_ = 0;  // under registry_write_mu_: the seq on disk
  std::atomic<bool> registry_failed_{false};  // the last write failed
  // What the start made of the registry (health's "registry"); set before serving, then under
  // mu_ (a retry that takes a sandbox back moves it to "recovered").
  nlohmann::json recovery_ = nullptr;
  // Under mu_: what the start could not take back, kept in the registry as it was (until a
  // registration of the same id replaces it); a handover among them is retried by poll() once
  // its export's snapshot exists.
  std::vector<RegistryEntry> unrecovered_;
  bool registry_same_boot_ = false;
  // poll()'s retry of unrecovered_ handovers.
  void retry_unrecovered();
};

}  // namespace memsnap::daemon
