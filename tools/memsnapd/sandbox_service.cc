#include "tools/memsnapd/sandbox_service.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <thread>
#include <utility>

#include <spdlog/spdlog.h>

#include "core/base/file_io.h"
#include "core/chain_ranges.h"
#include "core/dirty_set.h"
#include "core/pause.h"
#include "core/pause_mode/pause_mode.h"
#include "core/report_json.h"
#include "core/resume.h"
#include "core/snapshot/snapshot_reader.h"
#include "core/strategy_selection/strategy_selection.h"
#include "core/vmm_identity.h"
#include "core/vmm_process.h"

namespace memsnap::daemon {

namespace fs = std::filesystem;
using nlohmann::json;

bool Caller::privileged() const { return uid == 0 || uid == ::geteuid(); }


// A handover pause's export, from its answer until the snapshot is durable (states exporting and
// export_failed). The job holds the guest memory for the export, in a process of its own;
// memsnapd's own reference (memfd) becomes the warm memory of the paused sandbox once durable.
struct PendingExport {
  std::unique_ptr<BackgroundExport> job;
  io::UniqueFd memfd;
  std::vector<std::string> chain;  // the chain up to the new snapshot's parent
  std::string out_path;
  std::string strategy;
  PauseMode mode = PauseMode::kHandover;
  std::uint64_t guest_size = 0;
  bool keeps_memory = false;  // the strategy leaves the memfd whole: it can be kept warm
  std::chrono::steady_clock::time_point started;  // when the pause was asked for
  ExportStatus status;                            // as last reported
  // What the export was asked (its memfd: memsnapd's own reference above), so that an export
  // whose process is gone can be started again from the memory memsnapd still holds.
  PauseRequest request;
  int restarts = 0;
};

// One sandbox. Fields are read and written under SandboxService::mu_, except by the one pause or
// resume that owns the sandbox (state pausing/resuming): it works on the session and memfd
// without the lock, and nobody else touches them meanwhile.
struct Sandbox {
  std::string id;
  SandboxAttributes attributes;
  SandboxState state = SandboxState::kRunning;  // moved only by SandboxService::move_locked
  bool counted = false;  // registered: in the by-state counts, moved by the lifecycle's table
  uid_t owner_uid = 0;  // who registered it: only it and root may act on it
  pid_t vmm_pid = -1;
  io::UniqueFd vmm_pidfd;  // the VMM, pinned (from registration, or the resumed one)
  std::uint64_t vmm_start_time = 0;  // of vmm_pid (process_start_time): the registry's record
  std::vector<plugin::Region> regions;
  // The memfd backing a registered VMM's guest memory, taken once at registration (checked to be
  // a read-write memfd); dropped when the sandbox is paused with after=stop.
  io::UniqueFd vmm_memfd;
  std::uint64_t guest_size = 0;
  std::vector<std::string> chain;  // committed snapshots, base first
  std::string strategy;            // of the newest snapshot
  std::unique_ptr<ResumeSession> session;
  RetainedMemory retained;
  std::string session_strategy;  // what the session's fault-latency series are recorded under
  FaultStats faults_recorded;    // what went into the metrics already
  json last_pause;               // null until the first pause
  json last_resume;
  std::string last_error;
  std::thread resume_thread;
  // exporting, export_failed; also running (or resuming) after a resume before durable
  std::unique_ptr<PendingExport> pending_export;
  // Exports that ended (durable): destroyed outside the lock, never from their own callback.
  std::vector<std::unique_ptr<BackgroundExport>> finished_exports;
};

namespace {

// The start time that, with its pid, names a VMM in the registry; 0 if unknown.
std::uint64_t start_time_of(pid_t pid) {
  auto t = process_start_time(pid);
  return t.ok() ? *t : 0;
}

bool valid_id(const std::string& id) {
  if (id.empty() || id.size() > 128 || id.front() == '.') return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.';
  });
}

// Checks that body only has the given keys (a typo must not be ignored silently).
Status only_keys(const json& body, std::initializer_list<const char*> keys, const char* what) {
  if (!body.is_object()) {
    return make_error(Errc::kInvalidArgument, std::string(what) + ": the body must be an object");
  }
  for (const auto& item : body.items()) {
    const std::string& k = item.key();
    if (std::none_of(keys.begin(), keys.end(), [&](const char* known) { return k == known; })) {
      std::string list;
      for (const char* known : keys) list += std::string(list.empty() ? "" : ", ") + known;
      return make_error(Errc::kInvalidArgument,
                        std::string(what) + ": unknown field \"" + k + "\" (known: " + list + ")");
    }
  }
  return {};
}

template <typename T>
Result<T> field(const json& body, const char* name, T fallback) {
  if (!body.contains(name) || body[name].is_null()) return fallback;
  const json& v = body[name];
  if constexpr (std::is_same_v<T, std::string>) {
    if (!v.is_string()) {
      return make_error(Errc::kInvalidArgument, std::string(name) + " must be a string");
    }
    return v.get<std::string>();
  } else if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_boolean()) {
      return make_error(Errc::kInvalidArgument, std::string(name) + " must be true or false");
    }
    return v.get<bool>();
  } else {
    if (!v.is_number_unsigned()) {
      return make_error(Errc::kInvalidArgument,
                        std::string(name) + " must be a non-negative integer");
    }
    return static_cast<T>(v.get<std::uint64_t>());
  }
}

Result<std::vector<plugin::ByteRange>> ranges_of(const json& v, const char* name, const char* a,
                                                 const char* b) {
  if (!v.is_array()) {
    return make_error(Errc::kInvalidArgument, std::string(name) + " must be an array");
  }
  std::vector<plugin::ByteRange> out;
  for (const auto& item : v) {
    if (!item.is_object() || !item.contains(a) || !item.contains(b) ||
        !item[a].is_number_unsigned() || !item[b].is_number_unsigned()) {
      return make_error(Errc::kInvalidArgument, std::string(name) + ": every element needs " + a +
                                                    " and " + b + " (non-negative integers)");
    }
    out.push_back({item[a].get<std::uint64_t>(), item[b].get<std::uint64_t>()});
  }
  return out;
}

bool process_alive(pid_t pid) { return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM); }

// A running sandbox whose fault server stopped on an error: its session ended the VMM (whose
// next fault could only hang, ResumeSession), so the sandbox is failed, saying why, instead of
// staying running on a VMM that is gone. Its chain is untouched. True if it failed now (the
// caller moves it to failed).
bool serving_failed_locked(Sandbox& sb) {
  if (!sb.session) return false;
  const Status serving = sb.session->serve_error();
  if (serving.ok()) return false;
  sb.session->stop();  // releases the guard; ends the VMM if it still runs
  sb.last_error = "serving the guest memory stopped on an error (" + serving.error().to_string() +
                  "); VMM pid " + std::to_string(sb.vmm_pid) +
                  (sb.session->vmm_ended() ? " was ended" : " had exited");
  spdlog::error("sandbox {} failed: {}", sb.id, sb.last_error);
  return true;
}

// Takes an export's progress (not its state: that moves only through export_changed, with the
// sandbox's).
void refresh_progress_locked(PendingExport& e) {
  const ExportStatus now = e.job->status();
  e.status.bytes_done = now.bytes_done;
  e.status.bytes_total = now.bytes_total;
  e.status.cpu_seconds = now.cpu_seconds;
}

// The API's export object (docs/api.md "Pause").
json export_json(const ExportStatus& st) {
  return {{"state", std::string(export_state_name(st.state))},
          {"bytes_done", st.bytes_done},
          {"bytes_total", st.bytes_total},
          {"attempts", st.attempts},
          {"cpu_seconds", st.cpu_seconds},
          {"error", st.error ? json(st.error->to_string()) : json(nullptr)}};
}

// Guest bytes an export may still have to write: what is left of its dirty set, or the whole
// guest while the dirty set is not known yet.
std::uint64_t backlog_of(const PendingExport& e) {
  if (e.status.state == ExportState::kDurable) return 0;
  if (e.status.bytes_total == 0) return e.guest_size;
  return e.status.bytes_total - std::min(e.status.bytes_done, e.status.bytes_total);
}

json phases_json(const std::vector<PhaseTiming>& phases) {
  json out = json::object();
  for (const auto& p : phases) out[p.name] = p.wall_seconds;
  return out;
}

std::vector<metrics::Phase> metric_phases(const std::vector<PhaseTiming>& phases) {
  std::vector<metrics::Phase> out;
  for (const auto& p : phases) out.push_back({p.name, p.wall_seconds});
  return out;
}

// The handshake directory, created if missing, canonical; refused unless nobody but memsnapd's
// uid may change it or a directory on the way to it.
// A directory memsnapd acts on by name as root, created with `mode` if missing:
// nobody else may write to it, nor to a directory it resolves through (it is resolved once, here,
// and must be ours). The handshake directory (sockets are created, replaced and removed in it)
// and the state directory (its registry decides which processes memsnapd takes back).
// `what` names it in errors.
Result<std::string> prepare_own_dir(const std::string& dir, const std::string& what,
                                    mode_t mode = 0755) {
  if (dir.empty() || dir.front() != '/') {
    return make_error(Errc::kInvalidArgument, what + " must be absolute: \"" + dir + "\"");
  }
  if (::mkdir(dir.c_str(), mode) != 0 && errno != EEXIST) {
    return make_error(Errc::kIoError,
                      io::errno_message("cannot create " + what + " " + dir, errno));
  }
  std::error_code ec;
  const fs::path canonical = fs::canonical(dir, ec);
  struct stat hst {};
  if (ec || ::lstat(canonical.c_str(), &hst) != 0 || !S_ISDIR(hst.st_mode)) {
    return make_error(Errc::kIoError, "cannot resolve " + what + " " + dir);
  }
  if (hst.st_uid != ::geteuid() || (hst.st_mode & 022) != 0) {
    return make_error(
        Errc::kInvalidArgument,
        what + " " + canonical.string() +
            " must belong to memsnapd's uid and be writable by nobody else (it is "
            "uid " +
            std::to_string(hst.st_uid) + ", mode " +
            [&] {
              char m[8];
              std::snprintf(m, sizeof(m), "%04o", hst.st_mode & 07777);
              return std::string(m);
            }() +
            ")");
  }
  // Nor may anyone else rename or replace a directory on the way to it (a sticky, world-writable
  // /tmp is fine: only its owner may rename an entry there).
  for (fs::path up = canonical.parent_path();; up = up.parent_path()) {
    struct stat ust {};
    if (::lstat(up.c_str(), &ust) != 0) {
      return make_error(Errc::kIoError, io::errno_message("lstat " + up.string(), errno));
    }
    const bool others_write = (ust.st_mode & 022) != 0 && (ust.st_mode & S_ISVTX) == 0;
    if (others_write || (ust.st_uid != 0 && ust.st_uid != ::geteuid())) {
      return make_error(Errc::kInvalidArgument,
                        what + " " + canonical.string() + " lies in " + up.string() +
                            ", which others may change: it must be writable by nobody else");
    }
    if (up == up.parent_path()) break;
  }
  return canonical.string();
}

// The default output of a pause, relative to the snapshot directory: "<id>/generation-<n>.snap",
// n being the generation the snapshot will have (1 for a base, its parent's + 1 for a diff, as
// the pipeline writes it in the header). A new base, or a diff against an older parent, repeats
// a generation the sandbox has a file of already: then "<id>/generation-<n>.<k>.snap" with the
// first k from 2 that is free. Never an existing file: the chain it branches from stays whole.
Result<std::string> default_output(const std::string& snapshot_dir, const std::string& id,
                                   const std::string& parent_path, const ReaderLimits& limits) {
  std::uint64_t generation = 1;
  if (!parent_path.empty()) {
    MEMSNAP_ASSIGN_OR_RETURN(auto parent,
                             SnapshotReader::open(parent_path, Verify::kHeaderAndMap, limits));
    generation = parent->header().generation + 1;
  }
  const std::string stem = id + "/generation-" + std::to_string(generation);
  std::string name = stem + ".snap";
  std::error_code ec;
  for (int k = 2; fs::exists(fs::symlink_status(fs::path(snapshot_dir) / name, ec)); ++k) {
    name = stem + "." + std::to_string(k) + ".snap";
  }
  return name;
}

}  // namespace


// The strategy a pause will use and why.
struct SandboxService::Choice {
  std::string strategy;
  std::string requested;
  std::string variant;  // the flag's variant ("" when none, e.g. forced or no flag file)
  std::string reason;   // forced, no_flags, or flagd's reason (TARGETING_MATCH, ...)
  FallbackCause fallback = FallbackCause::kNone;  // the selector's (FallbackStage::kSelection)
  std::string fallback_reason;
  bool refused = false;  // it would have fallen back, but fallback is not allowed
  json trace;
};

// The mode a pause runs in and why.
struct SandboxService::ModeChoice {
  PauseMode requested = PauseMode::kCopy;
  std::string source = "default";  // body, flag or default
  std::string variant;             // the flag's variant, when the flag decided
  std::string flag_problem;        // why the flag could not be used (then copy, counted)
  PauseModeDecision decision;      // the mode that runs, and why not the one asked for
};

SandboxService::SandboxService(const PluginRegistry& registry, metrics::HostMetrics& metrics,
                               ServiceOptions options)
    : registry_(registry),
      metrics_(metrics),
      options_(std::move(options)),
      pipeline_(options_.pipeline ? *options_.pipeline : core_pipeline()),
      settings_(options_.settings) {}

Result<std::unique_ptr<SandboxService>> SandboxService::create(const PluginRegistry& registry,
                                                               metrics::HostMetrics& metrics,
                                                               ServiceOptions options) {
  std::error_code ec;
  fs::create_directories(options.snapshot_dir, ec);
  if (ec) {
    return make_error(Errc::kIoError, "cannot create the snapshot directory " +
                                          options.snapshot_dir + ": " + ec.message());
  }
  const fs::path canonical = fs::canonical(options.snapshot_dir, ec);
  if (ec) {
    return make_error(Errc::kIoError, "cannot resolve the snapshot directory " +
                                          options.snapshot_dir + ": " + ec.message());
  }
  MEMSNAP_ASSIGN_OR_RETURN(auto handshake_canonical,
                           prepare_own_dir(options.handshake_dir.empty()
                                               ? (canonical.parent_path() / "handshake").string()
                                               : options.handshake_dir,
                                           "the handshake directory"));
  std::unique_ptr<SandboxService> service(
      new SandboxService(registry, metrics, std::move(options)));
  service->snapshot_dir_ = canonical.string();
  service->handshake_dir_ = handshake_canonical;
  {
    std::lock_guard lock(service->mu_);
    service->publish_states_locked();
  }
  if (!service->options_.state_dir.empty()) {
    // The registry decides which processes memsnapd takes back and for whom: its directory must
    // be memsnapd's alone.
    std::error_code made;
    fs::create_directories(fs::path(service->options_.state_dir).parent_path(), made);
    MEMSNAP_ASSIGN_OR_RETURN(
        const std::string state_dir,
        prepare_own_dir(service->options_.state_dir, "the state directory", 0700));
    service->registry_file_ = std::make_unique<RegistryFile>(state_dir);
    service->boot_id_ = boot_id();
    // A registry that cannot be read is refused, never overwritten: the sandboxes it records
    // would be forgotten for good.
    MEMSNAP_ASSIGN_OR_RETURN(auto recorded, service->registry_file_->load());
    service->recover(recorded ? *recorded : RegistryDocument{});
  }
  return service;
}

SandboxService::~SandboxService() {
  std::map<std::string, std::shared_ptr<Sandbox>> all;
  {
    std::lock_guard lock(mu_);
    draining_ = true;
    all = sandboxes_;
  }
  changed_.notify_all();
  // A VMM that can run without memsnapd (its memory whole in its memfd) is left running, no
  // longer served or tracked; one served lazily, or stopped by a pause, is ended. Per sandbox in
  // the log.
  for (auto& [id, sb] : all) {
    if (sb->resume_thread.joinable()) sb->resume_thread.join();
    SandboxState state;
    {
      std::lock_guard lock(mu_);
      state = sb->state;
    }
    switch (release_vmm(*sb, state, /*leave_running=*/state == SandboxState::kRunning)) {
      case VmmRelease::kLeftRunning:
        spdlog::info("memsnapd stops: sandbox {} runs on without it (VMM pid {})", id, sb->vmm_pid);
        break;
      case VmmRelease::kEnded:
        spdlog::warn("memsnapd stops: sandbox {} ({}) was ended (VMM pid {}): {}", id,
                     state_name(state), sb->vmm_pid,
                     state == SandboxState::kRunning
                         ? "its memory was served lazily; it resumes from its last snapshot"
                         : "a pause had left it stopped; it resumes from its snapshot");
        break;
      case VmmRelease::kNone:
      case VmmRelease::kNotEnded:
        break;
    }
  }
  // Background exports go on without memsnapd (they commit, or hold the memory and retry): only
  // their watchers stop here, outside the lock their callbacks take.
  std::vector<std::unique_ptr<BackgroundExport>> jobs;
  {
    std::lock_guard lock(mu_);
    for (auto& [id, sb] : all) {
      for (auto& j : sb->finished_exports) jobs.push_back(std::move(j));
      sb->finished_exports.clear();
      if (sb->pending_export) jobs.push_back(std::move(sb->pending_export->job));
    }
  }
  jobs.clear();
  persist_registry();
}

void SandboxService::set_flags(std::shared_ptr<flags::FlagStore> store) {
  std::lock_guard lock(mu_);
  flags_ = std::move(store);
  reloads_seen_ = 0;
  reload_failures_seen_ = 0;
  if (flags_) {
    const auto stats = flags_->stats();
    reloads_seen_ = stats.reloads_ok;
    reload_failures_seen_ = stats.reloads_failed;
  }
}

void SandboxService::update_settings(const ServiceSettings& settings) {
  {
    std::lock_guard lock(mu_);
    settings_ = settings;
  }
  changed_.notify_all();  // a raised limit frees waiting operations
}

ServiceSettings SandboxService::settings() const {
  std::lock_guard lock(mu_);
  return settings_;
}

void SandboxService::poll() {
  std::shared_ptr<flags::FlagStore> store;
  bool failed = false;
  std::vector<std::unique_ptr<BackgroundExport>> finished;  // destroyed outside the lock
  {
    std::lock_guard lock(mu_);
    store = flags_;
    // The progress of background exports (bytes done) moves the backlog gauge.
    for (auto& [id, sb] : sandboxes_) {
      for (auto& j : sb->finished_exports) finished.push_back(std::move(j));
      sb->finished_exports.clear();
      if (sb->pending_export) refresh_progress_locked(*sb->pending_export);
    }
    publish_exports_locked();
    // Only running sandboxes: a pause or resume in flight owns its sandbox's session.
    for (auto& [id, sb] : sandboxes_) {
      if (sb->state != SandboxState::kRunning) continue;
      flush_fault_stats_locked(*sb);
      if (serving_failed_locked(*sb)) {
        move_locked(*sb, SandboxState::kFailed);
        failed = true;
      }
    }
  }
  if (failed) changed_.notify_all();
  retry_unrecovered();
  // Whatever changed without an endpoint to write it (a VMM that failed, a claim put back) is
  // on disk within a poll.
  persist_registry();
  if (!store) return;
  const auto stats = store->stats();
  std::lock_guard lock(mu_);
  if (store != flags_) return;
  // A re-read of unchanged content is no reload: only new flags in force count as a success.
  for (; reloads_seen_ < stats.reloads_ok; ++reloads_seen_) metrics_.record_flag_reload(true);
  for (; reload_failures_seen_ < stats.reloads_failed; ++reload_failures_seen_) {
    metrics_.record_flag_reload(false);
  }
}

SandboxService::Choice SandboxService::choose(const SandboxAttributes& attributes,
                                              const std::string& forced, bool record) const {
  Choice c;
  std::shared_ptr<flags::FlagStore> store;
  ServiceSettings settings;
  {
    std::lock_guard lock(mu_);
    store = flags_;
    settings = settings_;
  }
  if (!forced.empty()) {
    c.strategy = c.requested = forced;
    c.reason = "forced";
    return c;
  }
  if (!store) {
    c.strategy = c.requested = settings.fallback_strategy;
    c.reason = "no_flags";
    return c;
  }
  StrategySelectionOptions so;
  so.flag_key = settings.strategy_flag;
  so.safe_strategy = settings.fallback_strategy;
  const StrategySelector selector(*store, registry_, so);
  const StrategyChoice sc = selector.select(attributes);
  c.strategy = sc.strategy;
  c.requested = sc.requested;
  c.variant = sc.resolution.variant.value_or("");
  c.reason = std::string(flags::reason_name(sc.resolution.reason));
  c.fallback = sc.fallback;
  c.fallback_reason = sc.fallback_reason;
  c.refused = sc.fell_back && !settings.allow_fallback;
  if (record) {
    metrics_.record_flag_evaluation(so.flag_key, c.variant, c.reason);
    if (sc.fell_back && !c.refused) {
      metrics_.record_fallback(sc.requested, sc.strategy, sc.fallback);
    }
  }
  return c;
}

Result<std::string> SandboxService::confine(const std::string& path, bool must_exist) const {
  if (path.empty()) return make_error(Errc::kInvalidArgument, "empty path");
  fs::path p(path);
  if (p.is_relative()) p = fs::path(snapshot_dir_) / p;
  p = p.lexically_normal();
  for (const auto& part : p) {
    if (part == "..") {
      return make_error(Errc::kPathNotAllowed, "\"" + path + "\" leaves the snapshot directory");
    }
  }
  const fs::path root(snapshot_dir_);
  auto inside = [&](const fs::path& candidate) {
    auto r = root.begin();
    auto c = candidate.begin();
    for (; r != root.end(); ++r, ++c) {
      if (c == candidate.end() || *r != *c) return false;
    }
    return c != candidate.end();  // strictly below the root
  };
  if (!inside(p)) {
    return make_error(Errc::kPathNotAllowed,
                      "\"" + path + "\" is not inside the snapshot directory " + snapshot_dir_);
  }
  // Symlinks: the directory that will hold the file must resolve inside the root too, and the
  // file itself must not be a symlink.
  std::error_code ec;
  const fs::path dir = fs::weakly_canonical(p.parent_path(), ec);
  if (ec || (dir != root && !inside(dir))) {
    return make_error(Errc::kPathNotAllowed,
                      "\"" + path + "\" resolves outside the snapshot directory " + snapshot_dir_);
  }
  const auto st = fs::symlink_status(p, ec);
  if (fs::is_symlink(st)) {
    return make_error(Errc::kPathNotAllowed, "\"" + path + "\" is a symbolic link");
  }
  if (must_exist && !fs::is_regular_file(st)) {
    return make_error(Errc::kNotFound, "no snapshot file \"" + path + "\"");
  }
  return (dir / p.filename()).string();
}

Result<std::string> SandboxService::handshake_path(const std::string& requested) const {
  // A bare name, or an absolute path whose directory is the handshake directory itself: never a
  // subdirectory (nothing below it is memsnapd's own), never "." or ".." or a hidden name.
  std::string name = requested;
  if (!requested.empty() && requested.front() == '/') {
    const fs::path p(requested);
    if (p.parent_path() != fs::path(handshake_dir_)) {
      return make_error(Errc::kPathNotAllowed,
                        "handshake_socket \"" + requested +
                            "\" is not in the handshake directory " + handshake_dir_ +
                            " (give a name, or a path directly in that directory)");
    }
    name = p.filename().string();
  }
  const bool plain = !name.empty() && name.size() <= 64 && name.front() != '.' &&
                     std::all_of(name.begin(), name.end(), [](char c) {
                       return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                              (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
                     });
  if (!plain) {
    return make_error(Errc::kPathNotAllowed,
                      "handshake_socket \"" + requested +
                          "\" must be a name of 1-64 characters of [A-Za-z0-9._-], not starting "
                          "with '.', in the handshake directory " + handshake_dir_);
  }
  const std::string path = handshake_dir_ + "/" + name;
  if (path.size() >= 108) {
    return make_error(Errc::kInvalidArgument, "handshake_socket \"" + path +
                                                  "\" is too long for a Unix socket path");
  }
  // memsnapd made the directory at start; something may have removed it since (a cleanup of
  // /run). Nothing can listen there then: say so, rather than fail at bind() as an I/O error.
  struct stat st {};
  const bool found = ::lstat(handshake_dir_.c_str(), &st) == 0;
  const int err = found ? 0 : errno;
  if (!found || !S_ISDIR(st.st_mode)) {
    std::string what = " is not a directory any more";
    if (err == ENOENT || err == ENOTDIR) what = " does not exist (any more)";
    if (err != 0 && err != ENOENT && err != ENOTDIR) what = io::errno_message(": lstat", err);
    return make_error(Errc::kInvalidArgument,
                      "the handshake directory " + handshake_dir_ + what +
                          ": handshake_socket \"" + requested +
                          "\" cannot be created there. Create it again (owned by memsnapd's "
                          "uid, writable by nobody else), or restart memsnapd, which creates it");
  }
  return path;
}

namespace {
// While a sandbox is resuming, its resume thread works on sb.session and sb.retained without the
// lock (it hands the kept memfd back, takes the VMM's, starts the fault server): nobody else may
// read them then, not even under the lock.
bool resume_thread_owns(const Sandbox& sb) { return sb.state == SandboxState::kResuming; }

// The memfd kept for a warm resume of sb, -1 if none. A resuming sandbox's kept memfd counts as
// handed back (the VMM holds it now).
int kept_memfd_locked(const Sandbox& sb) {
  return resume_thread_owns(sb) ? -1 : sb.retained.memfd.get();
}

// Whether memsnapd can reach the memfd backing sb's guest memory; false while resuming (it is
// being handed over).
bool has_memfd_locked(const Sandbox& sb) {
  if (resume_thread_owns(sb)) return false;
  return sb.session ? sb.session->memfd() >= 0 : sb.vmm_memfd.get() >= 0;
}

// Host memory a kept memfd holds (its allocated blocks; holes cost nothing), 0 without one.
std::uint64_t resident_bytes(int fd) {
  struct stat st {};
  if (fd < 0 || ::fstat(fd, &st) != 0) return 0;
  return static_cast<std::uint64_t>(st.st_blocks) * 512;
}
}  // namespace

void SandboxService::publish_states_locked() {
  // The counts are kept as states change; only sandboxes that may keep a memfd are visited.
  std::map<std::string, std::uint64_t> warm;
  for (auto it = warm_candidates_.begin(); it != warm_candidates_.end();) {
    const std::shared_ptr<Sandbox> sb = it->second.lock();
    const auto registered = sb ? sandboxes_.find(it->first) : sandboxes_.end();
    if (!sb || registered == sandboxes_.end() || registered->second != sb ||
        (!resume_thread_owns(*sb) && sb->retained.memfd.get() < 0)) {
      it = warm_candidates_.erase(it);
      continue;
    }
    if (const int fd = kept_memfd_locked(*sb); fd >= 0) warm[sb->strategy] += resident_bytes(fd);
    ++it;
  }
  metrics_.set_sandboxes_by_state(state_counts_.by_name());
  metrics_.set_warm_memory_bytes(warm);
}

json SandboxService::describe_locked(const Sandbox& sb) const {
  const json regions = regions_json(sb.regions);
  return {{"id", sb.id},
          {"state", std::string(state_name(sb.state))},
          {"vmm_pid", sb.vmm_pid},
          {"owner_uid", sb.owner_uid},
          {"guest_size", sb.guest_size},
          {"regions", regions},
          {"memfd", has_memfd_locked(sb)},
          {"attributes", sandbox_context(sb.attributes)},
          {"snapshots", sb.chain},
          {"strategy", sb.strategy},
          {"warm_memory_kept", kept_memfd_locked(sb) >= 0},
          {"warm_memory_bytes", resident_bytes(kept_memfd_locked(sb))},
          {"durable", !sb.pending_export},
          {"export", sb.pending_export ? export_json(sb.pending_export->status) : json(nullptr)},
          {"last_pause", sb.last_pause},
          {"last_resume", sb.last_resume},
          {"last_error", sb.last_error.empty() ? json(nullptr) : json(sb.last_error)}};
}

Status SandboxService::pin_vmm(const Caller& caller, const json& body, Sandbox& sb) const {
  // The pidfd first: every check below is then about this process, which the pidfd names for
  // good, and it is checked to be alive after them (a pid reused meanwhile fails that check).
  MEMSNAP_ASSIGN_OR_RETURN(auto pidfd, open_pidfd(sb.vmm_pid));
  if (!caller.privileged()) {
    if (Status s = check_process_owner(sb.vmm_pid, caller.uid); !s.ok()) {
      return make_error(s.error().code, "uid " + std::to_string(caller.uid) +
                                            " may register only its own processes: " +
                                            s.error().message);
    }
  }
  if (Status s = check_regions_mapped(sb.vmm_pid, sb.regions); !s.ok()) return s;
  MEMSNAP_ASSIGN_OR_RETURN(auto memfd_fd, field<std::uint64_t>(body, "memfd_fd", ~0ULL));
  if (memfd_fd != ~0ULL) {
    if (memfd_fd > static_cast<std::uint64_t>(INT_MAX)) {
      return make_error(Errc::kInvalidArgument,
                        "memfd_fd " + std::to_string(memfd_fd) + " is not an fd number");
    }
    const int number = static_cast<int>(memfd_fd);
    // Taken now and kept: a wrong number is an error at registration, and whatever the VMM
    // later puts at that number is never taken for its guest memory.
    MEMSNAP_ASSIGN_OR_RETURN(auto taken, take_fd_of_pidfd(pidfd.get(), number));
    if (Status s = check_guest_memfd(taken.get(), sb.guest_size); !s.ok()) {
      return make_error(s.error().code, "fd " + std::to_string(number) + " of process " +
                                            std::to_string(sb.vmm_pid) + ": " +
                                            s.error().message);
    }
    sb.vmm_memfd = std::move(taken);
  }
  // Read before the liveness check, like everything above: about this very process.
  sb.vmm_start_time = start_time_of(sb.vmm_pid);
  if (!pidfd_alive(pidfd.get())) {
    return make_error(Errc::kProcessGone, "process " + std::to_string(sb.vmm_pid) +
                                              " exited while being registered");
  }
  sb.vmm_pidfd = std::move(pidfd);
  sb.owner_uid = caller.uid;
  return {};
}

namespace {

// A registration's "attributes" (what flags target) into attrs.
Status parse_attributes(const json& a, SandboxAttributes& attrs) {
  MEMSNAP_RETURN_IF_ERROR(only_keys(a,
                                    {"team", "template", "vmm", "vmm_version", "kernel_version",
                                     "memory_mib", "hugepages", "host"},
                                    "attributes"));
  auto str = [&](const char* k, std::string& out) -> Status {
    MEMSNAP_ASSIGN_OR_RETURN(out, field<std::string>(a, k, ""));
    return {};
  };
  for (auto [k, out] : {std::pair{"team", &attrs.team},
                        std::pair{"template", &attrs.template_name},
                        std::pair{"vmm", &attrs.vmm},
                        std::pair{"vmm_version", &attrs.vmm_version},
                        std::pair{"kernel_version", &attrs.kernel_version},
                        std::pair{"host", &attrs.host}}) {
    MEMSNAP_RETURN_IF_ERROR(str(k, *out));
  }
  MEMSNAP_ASSIGN_OR_RETURN(attrs.hugepages, field<bool>(a, "hugepages", false));
  MEMSNAP_ASSIGN_OR_RETURN(attrs.memory_mib, field<std::uint64_t>(a, "memory_mib", 0));
  return {};
}

}  // namespace

// A running VMM's registration: its pid, guest regions and size, then pinned (pin_vmm).
Status SandboxService::register_running(const Caller& caller, const json& body,
                                        Sandbox& sb) const {
  if (body.contains("strategy")) {
    return make_error(Errc::kInvalidArgument,
                      "strategy goes with snapshots (the plugin that wrote them); a running "
                      "VMM's strategy comes from the flag at each pause");
  }
  MEMSNAP_ASSIGN_OR_RETURN(const std::uint64_t pid, field<std::uint64_t>(body, "vmm_pid", 0));
  if (pid == 0 || pid > 4194304) return make_error(Errc::kInvalidArgument, "vmm_pid is not a pid");
  sb.vmm_pid = static_cast<pid_t>(pid);
  if (!body.contains("regions")) {
    return make_error(Errc::kInvalidArgument, "a running VMM needs regions");
  }
  std::vector<plugin::Region> regions;
  const json& rs = body["regions"];
  if (!rs.is_array() || rs.empty()) {
    return make_error(Errc::kInvalidArgument, "regions must be a non-empty array");
  }
  for (const auto& r : rs) {
    MEMSNAP_RETURN_IF_ERROR(only_keys(r, {"guest_offset", "host_addr", "size"}, "region"));
    plugin::Region region{};
    auto off = field<std::uint64_t>(r, "guest_offset", 0);
    auto addr = field<std::uint64_t>(r, "host_addr", 0);
    auto size = field<std::uint64_t>(r, "size", 0);
    if (!off.ok() || !addr.ok() || !size.ok() || !r.contains("host_addr") ||
        !r.contains("size")) {
      return make_error(Errc::kInvalidArgument,
                        "a region needs guest_offset, host_addr and size (non-negative "
                        "integers)");
    }
    region.guest_offset = *off;
    region.host_addr = *addr;
    region.size = *size;
    regions.push_back(region);
  }
  std::uint64_t end = 0;
  for (const auto& r : regions) end = std::max(end, r.guest_offset + r.size);
  MEMSNAP_ASSIGN_OR_RETURN(const std::uint64_t guest_size,
                           field<std::uint64_t>(body, "guest_size", end));
  MEMSNAP_RETURN_IF_ERROR(validate_regions(regions, guest_size));
  if (const std::uint64_t max = settings().reader_limits.max_guest_size; guest_size > max) {
    return make_error(Errc::kInvalidArgument, "guest_size " + std::to_string(guest_size) +
                                                  " is above limits.max_guest_size (" +
                                                  std::to_string(max) + ")");
  }
  sb.regions = std::move(regions);
  sb.guest_size = guest_size;
  MEMSNAP_RETURN_IF_ERROR(pin_vmm(caller, body, sb));
  sb.attributes.has_memfd = sb.vmm_memfd.get() >= 0;
  if (sb.attributes.memory_mib == 0) sb.attributes.memory_mib = sb.guest_size >> 20;
  sb.state = SandboxState::kRunning;
  return {};
}

// A paused sandbox's registration: its snapshot chain (root's only), checked to open.
Status SandboxService::register_chain(const Caller& caller, const json& body, Sandbox& sb) const {
  if (!caller.privileged()) {
    return make_error(Errc::kForbidden,
                      "only root may register a snapshot chain (uid " +
                          std::to_string(caller.uid) + " may register its own running VMMs)");
  }
  sb.owner_uid = caller.uid;
  if (body.contains("regions") || body.contains("memfd_fd") || body.contains("guest_size")) {
    return make_error(Errc::kInvalidArgument,
                      "a paused sandbox has no regions, memfd_fd or guest_size (the snapshots "
                      "give its size)");
  }
  const json& chain = body["snapshots"];
  if (!chain.is_array() || chain.empty()) {
    return make_error(Errc::kInvalidArgument, "snapshots must be a non-empty array of paths");
  }
  for (const auto& p : chain) {
    if (!p.is_string()) return make_error(Errc::kInvalidArgument, "snapshots: paths are strings");
    MEMSNAP_ASSIGN_OR_RETURN(std::string confined,
                             confine(p.get<std::string>(), /*must_exist=*/true));
    sb.chain.push_back(std::move(confined));
  }
  MEMSNAP_ASSIGN_OR_RETURN(
      const SnapshotChain chain_open,
      SnapshotChain::open(sb.chain, Verify::kHeaderAndMap, settings().reader_limits));
  sb.guest_size = chain_open.guest_size();
  MEMSNAP_ASSIGN_OR_RETURN(const std::string asked, field<std::string>(body, "strategy", ""));
  MEMSNAP_ASSIGN_OR_RETURN(sb.strategy, chain_strategy(chain_open.newest(), asked));
  if (registry_.find(sb.strategy) == nullptr) {
    return make_error(Errc::kInvalidArgument, "snapshot " + chain_open.newest().path() +
                                                  " was written by strategy \"" + sb.strategy +
                                                  "\", which is not a loaded plugin");
  }
  sb.state = SandboxState::kPaused;
  return {};
}

// Adds a registered sandbox, unless its id or its VMM is taken or the limit is reached.
Result<json> SandboxService::add_locked(std::shared_ptr<Sandbox> sb) {
  if (sandboxes_.count(sb->id)) {
    return make_error(Errc::kAlreadyExists, "sandbox " + sb->id + " is already registered");
  }
  if (sb->vmm_pidfd.get() >= 0) {
    // One registration per VMM: another sandbox whose VMM is this live process.
    if (const auto it = vmm_sandbox_.find(sb->vmm_pid); it != vmm_sandbox_.end()) {
      const auto other = sandboxes_.find(it->second);
      if (other != sandboxes_.end() && other->second->vmm_pid == sb->vmm_pid &&
          pidfd_alive(other->second->vmm_pidfd.get())) {
        return make_error(Errc::kAlreadyExists, "process " + std::to_string(sb->vmm_pid) +
                                                    " is registered already, as sandbox " +
                                                    other->first);
      }
    }
  }
  if (sandboxes_.size() >= settings_.max_sandboxes) {
    return make_error(Errc::kLimitReached,
                      "memsnapd has " + std::to_string(sandboxes_.size()) +
                          " sandboxes, its limit (limits.max_sandboxes): remove one first");
  }
  sandboxes_[sb->id] = sb;
  if (sb->vmm_pidfd.get() >= 0) vmm_sandbox_[sb->vmm_pid] = sb->id;
  sb->counted = true;
  // A registration of an id the start could not take back replaces what the registry kept.
  std::erase_if(unrecovered_, [&](const RegistryEntry& e) { return e.id == sb->id; });
  registry_changed_locked();
  state_counts_.enter(sb->state);
  publish_states_locked();
  spdlog::info("sandbox {} registered ({}, {} MiB, owner uid {})", sb->id, state_name(sb->state),
               sb->guest_size >> 20, sb->owner_uid);
  return describe_locked(*sb);
}

Result<json> SandboxService::register_sandbox(const Caller& caller, const json& body) {
  MEMSNAP_RETURN_IF_ERROR(only_keys(body,
                                    {"id", "vmm_pid", "regions", "memfd_fd", "guest_size",
                                     "attributes", "snapshots", "strategy"},
                                    "register"));
  auto sb = std::make_shared<Sandbox>();
  MEMSNAP_ASSIGN_OR_RETURN(const std::string id, field<std::string>(body, "id", ""));
  if (!valid_id(id)) {
    return make_error(Errc::kInvalidArgument,
                      "id must be 1-128 characters of [A-Za-z0-9._-], not starting with '.'");
  }
  sb->id = id;
  sb->attributes.id = id;
  if (body.contains("attributes") && !body["attributes"].is_null()) {
    MEMSNAP_RETURN_IF_ERROR(parse_attributes(body["attributes"], sb->attributes));
  }
  const bool has_vmm = body.contains("vmm_pid");
  const bool has_chain = body.contains("snapshots");
  if (has_vmm == has_chain) {
    return make_error(Errc::kInvalidArgument,
                      "give either vmm_pid and regions (a running VMM) or snapshots (a paused "
                      "sandbox)");
  }
  const Status registered =
      has_vmm ? register_running(caller, body, *sb) : register_chain(caller, body, *sb);
  if (!registered.ok()) return registered.error();
  std::optional<Result<json>> added;
  {
    std::lock_guard lock(mu_);
    added.emplace(add_locked(std::move(sb)));
  }
  persist_registry();
  return std::move(*added);
}

Result<std::shared_ptr<Sandbox>> SandboxService::find_locked(const Caller& caller,
                                                             const std::string& id) const {
  const auto it = sandboxes_.find(id);
  if (it == sandboxes_.end()) return make_error(Errc::kSandboxNotFound, "no sandbox " + id);
  if (!caller.privileged() && caller.uid != it->second->owner_uid) {
    return make_error(Errc::kForbidden, "sandbox " + id + " is not uid " +
                                            std::to_string(caller.uid) +
                                            "'s: only its owner and root may act on it");
  }
  return it->second;
}

// A sandbox claimed by one pause or resume (state pausing or resuming). Until finish() is called,
// destroying the claim puts the sandbox back in the state it was claimed from (the operation did
// not get to change anything), so every refusal on the way is a plain return.
class SandboxService::Claim {
 public:
  Claim(SandboxService& service, std::shared_ptr<Sandbox> sb, SandboxState before)
      : service_(&service), sb_(std::move(sb)), before_(before) {}
  Claim(Claim&& other) noexcept
      : service_(other.service_), sb_(std::move(other.sb_)), before_(other.before_) {}
  Claim& operator=(Claim&&) = delete;
  ~Claim() { finish(before_); }

  Sandbox& operator*() const { return *sb_; }
  Sandbox* operator->() const { return sb_.get(); }
  const std::shared_ptr<Sandbox>& sandbox() const { return sb_; }

  // Ends the claim: under the service's lock, update(sandbox) runs and the sandbox moves to `to`;
  // then whoever waits on a change is woken. Once only; later calls do nothing.
  void finish(SandboxState to, const std::function<void(Sandbox&)>& update = nullptr) {
    if (!sb_) return;
    {
      std::lock_guard lock(service_->mu_);
      if (update) update(*sb_);
      service_->move_locked(*sb_, parked(to) ? parked_state_locked(*sb_) : to);
    }
    service_->changed_.notify_all();
    sb_.reset();
  }

 private:
  SandboxService* service_;
  std::shared_ptr<Sandbox> sb_;  // null once finished (or moved from)
  SandboxState before_;
};

// A sandbox whose VMM is not running is paused, or -- while the snapshot of its last pause is
// still being exported -- exporting or export_failed, whatever the operation that ends says.
bool SandboxService::parked(SandboxState s) {
  return s == SandboxState::kPaused || s == SandboxState::kExporting ||
         s == SandboxState::kExportFailed;
}

SandboxState SandboxService::parked_state_locked(const Sandbox& sb) {
  if (!sb.pending_export) return SandboxState::kPaused;
  return sb.pending_export->status.state == ExportState::kFailed ? SandboxState::kExportFailed
                                                                 : SandboxState::kExporting;
}

bool SandboxService::export_running_locked(const Sandbox& sb) {
  return sb.pending_export && sb.pending_export->status.state != ExportState::kFailed;
}

// A pause or resume slot (limits.max_concurrent_*), given back when destroyed or released.
class SandboxService::Slot {
 public:
  Slot(SandboxService& service, bool pause_slot) : service_(&service), pause_slot_(pause_slot) {}
  Slot(const Slot&) = delete;
  Slot& operator=(const Slot&) = delete;
  ~Slot() { release(); }
  void release() {
    if (service_ != nullptr) service_->release_slot(pause_slot_);
    service_ = nullptr;
  }

 private:
  SandboxService* service_;
  bool pause_slot_;
};

void SandboxService::move_locked(Sandbox& sb, SandboxState to) {
  // What a finished operation changed besides the state (chain, VMM) is recorded too.
  registry_changed_locked();
  if (sb.state == to) return;
  if (sb.counted) {
    if (!transition_allowed(sb.state, to)) {
      // A bug in this file, never a caller's doing: said loudly; the state still follows what
      // happened, so that the sandbox is not left in a state it is not in.
      spdlog::critical("sandbox {}: moved from {} to {}, which its lifecycle does not allow",
                       sb.id, state_name(sb.state), state_name(to));
    }
    state_counts_.leave(sb.state);
    state_counts_.enter(to);
  }
  sb.state = to;
  publish_states_locked();
}

Result<SandboxService::Claim> SandboxService::claim(const Caller& caller, const std::string& id,
                                                    const char* op, SandboxState required,
                                                    SandboxState owned) {
  std::unique_lock lock(mu_);
  if (draining_) {
    return make_error(Errc::kShuttingDown,
                      "memsnapd is shutting down: no new " + std::string(op) + "s");
  }
  MEMSNAP_ASSIGN_OR_RETURN(auto found, find_locked(caller, id));
  // A pause of a sandbox resumed before its last pause was durable: its diff names that
  // snapshot as its parent, so it waits until the export committed it -- checked and claimed
  // under one hold of the lock, so that no resume or export can slip in between.
  if (owned == SandboxState::kPausing && found->state == SandboxState::kRunning &&
      found->pending_export) {
    const bool settled = changed_.wait_for(lock, settings_.queue_timeout, [&] {
      return draining_ || !export_running_locked(*found) || found->state != SandboxState::kRunning;
    });
    if (draining_) {
      return make_error(Errc::kShuttingDown,
                        "memsnapd is shutting down: no new " + std::string(op) + "s");
    }
    if (!settled) {
      return make_error(Errc::kBusy, "sandbox " + id +
                                         "'s last snapshot is still being exported after the "
                                         "queue timeout; try again when it is durable");
    }
    MEMSNAP_ASSIGN_OR_RETURN(found, find_locked(caller, id));  // removed meanwhile?
    if (found->pending_export && found->state == SandboxState::kRunning) {
      return make_error(Errc::kInvalidState,
                        "sandbox " + id + "'s background export failed (" + found->last_error +
                            "): its memory is held; retry the export (POST /v1/sandboxes/" + id +
                            "/export/retry) before the next pause");
    }
  }
  Sandbox& sb = *found;
  const std::string now(state_name(sb.state));
  if (is_owned(sb.state)) {
    return make_error(Errc::kBusy, "sandbox " + id + " is " + now + " already");
  }
  if (sb.state != required) {
    return make_error(Errc::kInvalidState, "sandbox " + id + " is " + now + "; a " + op +
                                               " needs it " + std::string(state_name(required)));
  }
  move_locked(sb, owned);
  return Claim(*this, found, required);
}

Errc SandboxService::acquire_slot(bool pause_slot) {
  std::unique_lock lock(mu_);
  int& in_flight = pause_slot ? pauses_in_flight_ : resumes_in_flight_;
  auto limit = [&] {
    return pause_slot ? settings_.max_concurrent_pauses : settings_.max_concurrent_resumes;
  };
  const auto deadline = std::chrono::steady_clock::now() + settings_.queue_timeout;
  if (!changed_.wait_until(lock, deadline, [&] { return draining_ || in_flight < limit(); })) {
    metrics_.record_concurrency_rejection(pause_slot ? metrics::OperationKind::kPause
                                                     : metrics::OperationKind::kResume);
    return Errc::kBusy;
  }
  if (draining_) return Errc::kShuttingDown;
  ++in_flight;
  return Errc::kOk;
}

void SandboxService::release_slot(bool pause_slot) {
  {
    std::lock_guard lock(mu_);
    --(pause_slot ? pauses_in_flight_ : resumes_in_flight_);
  }
  changed_.notify_all();
}

void SandboxService::flush_fault_stats_locked(Sandbox& sb) {
  if (!sb.session) return;
  // Not settled: this runs under the service's lock (every second for every running sandbox),
  // and must not wait for a busy fault thread. What it misses is counted at the next call.
  const FaultStats now = sb.session->fault_stats(/*settle=*/false);
  if (now.faults > sb.faults_recorded.faults) {
    const double sum = now.service_seconds - sb.faults_recorded.service_seconds;
    const auto& bounds = metrics::fault_latency_buckets();
    if (std::equal(bounds.begin(), bounds.end(), FaultStats::kLatencyBounds.begin(),
                   FaultStats::kLatencyBounds.end())) {
      std::vector<std::uint64_t> counts(now.latency_counts.size());
      for (std::size_t i = 0; i < counts.size(); ++i) {
        counts[i] = now.latency_counts[i] - sb.faults_recorded.latency_counts[i];
      }
      metrics_.observe_fault_latency_buckets(sb.session_strategy, counts, sum);
    } else {
      metrics_.observe_fault_latency_batch(sb.session_strategy,
                                           now.faults - sb.faults_recorded.faults, sum);
    }
  }
  // A mode the kernel refused is turned off once per session: each is counted when it happens.
  metrics_.record_fault_mode_downgrades(sb.session_strategy, metrics::FaultModeDowngrade::kCopyWp,
                                        now.copy_wp_downgrades -
                                            sb.faults_recorded.copy_wp_downgrades);
  metrics_.record_fault_mode_downgrades(
      sb.session_strategy, metrics::FaultModeDowngrade::kContinueWp,
      now.continue_wp_downgrades - sb.faults_recorded.continue_wp_downgrades);
  metrics_.record_fault_mode_downgrades(sb.session_strategy,
                                        metrics::FaultModeDowngrade::kZeroPage,
                                        now.zeropage_downgrades -
                                            sb.faults_recorded.zeropage_downgrades);
  sb.faults_recorded = now;
}

// A pause request's body, decoded and checked (docs/api.md "Pause").
struct PauseBody {
  std::string output;  // empty: generation-<n>.snap in the sandbox's directory
  std::string parent;  // empty (automatic), "none", "latest" or a snapshot of the chain
  std::string forced;  // a strategy the caller forces, or empty (the flag decides)
  bool stop = true;    // after: "stop" (the VMM stays stopped) or "continue"
  bool sync = true;
  std::optional<std::vector<plugin::ByteRange>> dirty;
  std::optional<PauseMode> mode;  // nullopt: the pause-mode flag decides
};

// Where the snapshot goes and what it is a diff of.
struct ChainPlan {
  std::string parent_path;         // empty: a new base
  std::vector<std::string> chain;  // the chain the new snapshot will end: up to its parent
  // Every block recorded by the snapshots after the parent (a diff against an older parent).
  std::vector<plugin::ByteRange> cut_off_ranges;
  std::size_t cut_off_count = 0;
  std::string out_path;
};

namespace {

Result<PauseBody> parse_pause_body(const json& body, bool default_sync,
                                                   const PluginRegistry& registry) {
  MEMSNAP_RETURN_IF_ERROR(
      only_keys(body, {"output", "parent", "dirty", "strategy", "after", "sync", "mode"}, "pause"));
  auto output = field<std::string>(body, "output", "");
  auto parent = field<std::string>(body, "parent", "");
  auto forced = field<std::string>(body, "strategy", "");
  auto after = field<std::string>(body, "after", "stop");
  auto mode = field<std::string>(body, "mode", "");
  auto sync = field<bool>(body, "sync", default_sync);
  for (const Result<std::string>* r : {&output, &parent, &forced, &after, &mode}) {
    if (!r->ok()) return r->error();
  }
  if (!sync.ok()) return std::move(sync).error();
  if (*after != "stop" && *after != "continue") {
    return make_error(Errc::kInvalidArgument, "after must be \"stop\" or \"continue\"");
  }
  if (!forced->empty() && registry.find(*forced) == nullptr) {
    return make_error(Errc::kInvalidArgument,
                      "strategy \"" + *forced + "\" is not a loaded plugin");
  }
  PauseBody out;
  if (!mode->empty()) {
    out.mode = parse_pause_mode(*mode);
    if (!out.mode) {
      return make_error(Errc::kInvalidArgument, "mode must be \"copy\", \"handover\" or \"live\"");
    }
  }
  out.output = std::move(*output);
  out.parent = std::move(*parent);
  out.forced = std::move(*forced);
  out.stop = *after == "stop";
  out.sync = *sync;
  if (body.contains("dirty") && !body["dirty"].is_null()) {
    MEMSNAP_ASSIGN_OR_RETURN(auto ranges, ranges_of(body["dirty"], "dirty", "offset", "length"));
    out.dirty = std::move(ranges);
  }
  return out;
}

}  // namespace

Result<ChainPlan> SandboxService::plan_chain(const Sandbox& sb,
                                                             const PauseBody& body) const {
  ChainPlan plan;
  plan.chain = sb.chain;
  if (body.parent.empty()) {
    // A diff needs to know what changed: write tracking from a resume, or a given dirty set.
    if (!plan.chain.empty() && (sb.session || body.dirty)) plan.parent_path = plan.chain.back();
  } else if (body.parent == "none") {
    // a base snapshot
  } else if (body.parent == "latest") {
    if (plan.chain.empty()) return make_error(Errc::kInvalidArgument, "no snapshot yet");
    plan.parent_path = plan.chain.back();
  } else {
    MEMSNAP_ASSIGN_OR_RETURN(auto confined, confine(body.parent, true));
    if (std::find(plan.chain.begin(), plan.chain.end(), confined) == plan.chain.end()) {
      return make_error(Errc::kInvalidArgument,
                        "parent must be one of the sandbox's snapshots (or latest/none)");
    }
    plan.parent_path = confined;
  }
  if (!plan.parent_path.empty() && !sb.session && !body.dirty) {
    return make_error(Errc::kInvalidArgument,
                      "a diff needs a dirty set: give \"dirty\", or resume the sandbox through "
                      "memsnapd (which tracks writes), or use parent \"none\"");
  }
  // A diff against an older parent than the newest snapshot: what the snapshots after that parent
  // recorded may differ from the parent too (their own writes since), and the dirty set of the
  // session or the caller only covers writes since the newest. Their recorded blocks join the
  // dirty set, or what changed in between would silently revert to the parent's content.
  if (!plan.parent_path.empty() && plan.parent_path != plan.chain.back()) {
    const auto it = std::find(plan.chain.begin(), plan.chain.end(), plan.parent_path);
    const std::vector<std::string> cut_off(it + 1, plan.chain.end());
    MEMSNAP_ASSIGN_OR_RETURN(auto recorded, ranges_recorded_in(cut_off));
    plan.cut_off_ranges = std::move(recorded);
    plan.cut_off_count = cut_off.size();
    plan.chain.erase(it + 1, plan.chain.end());
  } else if (plan.parent_path.empty()) {
    plan.chain.clear();
  }
  std::string out_name = body.output;
  if (out_name.empty()) {
    MEMSNAP_ASSIGN_OR_RETURN(auto named, default_output(snapshot_dir_, sb.id, plan.parent_path,
                                                        settings().reader_limits));
    out_name = named;
  }
  MEMSNAP_ASSIGN_OR_RETURN(auto out_path, confine(out_name, false));
  std::error_code ec;
  if (fs::exists(fs::symlink_status(out_path, ec))) {
    return make_error(Errc::kAlreadyExists,
                      "\"" + out_path + "\" exists: snapshots are never overwritten");
  }
  fs::create_directories(fs::path(out_path).parent_path(), ec);
  if (ec) {
    return make_error(Errc::kIoError,
                      "cannot create the directory of " + out_path + ": " + ec.message());
  }
  plan.out_path = std::move(out_path);
  return plan;
}

Status SandboxService::check_choice(const Sandbox& sb, const Choice& choice,
                                    const PauseBody& body) const {
  if (choice.refused) {
    return make_error(Errc::kUnsupported, "the flag chose " + choice.requested + " for sandbox " +
                                              sb.id + ", which cannot run it (" +
                                              choice.fallback_reason +
                                              ") and strategy.allow_fallback is false");
  }
  if (const PluginInfo* chosen = registry_.find(choice.strategy);
      chosen && StrategyPolicy::of(*chosen).vmm_must_stay_stopped() && !body.stop) {
    // It gives the guest's memory back to the host as it exports it: the VMM must not run on.
    return make_error(Errc::kInvalidArgument,
                      choice.strategy + " releases the guest's memory as it exports it, so the "
                                        "sandbox cannot continue after the pause: use after "
                                        "\"stop\" or another strategy");
  }
  // The VMM must still be the process registered (or resumed): its pid may name another
  // process once it is gone, the pidfd never does.
  if (sb.vmm_pidfd.get() >= 0 && !pidfd_alive(sb.vmm_pidfd.get())) {
    return make_error(Errc::kProcessGone, "the VMM of sandbox " + sb.id + " (pid " +
                                              std::to_string(sb.vmm_pid) + ") has exited");
  }
  return {};
}

// The memory a pause reads, and how it knows what to read.
struct PauseSource {
  int memfd = -1;
  // A new base of a resumed VMM whose memory is not all resident: every page is read, through
  // the VMM's own mappings.
  bool whole_guest_through_vmm = false;
};

namespace {

// The memfd: the one a resume handed over (or the VMM's own, kept by the session), else the one
// taken from the registered VMM at registration (never re-taken by fd number).
// A resumed VMM whose memory is not all resident yet (served lazily, or a background fill still
// running) has pages only the chain holds: read from the memfd, its holes are zeros. A pause whose
// dirty set may reach such pages -- a new base (every page), or a diff against an older parent
// (the blocks of the cut-off snapshots) -- reads through the VMM's own mappings instead
// (process_vm_readv, the fallback when the chosen strategy reads the memfd), where every page not
// served yet is faulted in from the chain by the session. A base's dirty set is then the whole
// guest (SEEK_DATA / PAGEMAP_SCAN would see only what is resident).
PauseSource pause_source(const Sandbox& sb, const ChainPlan& plan,
                         const PauseBody& body) {
  PauseSource source;
  if (sb.session && sb.session->memfd() >= 0) {
    source.memfd = sb.session->memfd();
  } else if (sb.vmm_memfd.get() >= 0) {
    source.memfd = sb.vmm_memfd.get();
  }
  const bool partial_memory = sb.session && !sb.session->memfd_complete();
  source.whole_guest_through_vmm = partial_memory && plan.parent_path.empty() && !body.dirty;
  if (source.whole_guest_through_vmm || (partial_memory && plan.cut_off_count > 0)) {
    source.memfd = -1;
  }
  return source;
}

// The dirty set: the caller's, the whole guest, or the session's write tracking; plus the blocks
// of snapshots cut off by an older parent. plan must outlive the request.
void set_dirty_set(PauseRequest& req, const Sandbox& sb, const ChainPlan& plan,
                   const PauseBody& body, const PauseSource& source) {
  if (body.dirty) {
    req.dirty = body.dirty;
    req.dirty->insert(req.dirty->end(), plan.cut_off_ranges.begin(), plan.cut_off_ranges.end());
  } else if (source.whole_guest_through_vmm) {
    req.dirty_source = [size = sb.guest_size](std::string* how) {
      *how =
          "the whole guest (a new base of a resumed VMM whose memory is not all resident: what "
          "was not served yet is faulted in from the chain)";
      return Result<std::vector<plugin::ByteRange>>(std::vector<plugin::ByteRange>{{0, size}});
    };
  } else if (sb.session && !plan.parent_path.empty()) {
    req.dirty_source = [s = sb.session.get(),
                        &plan](std::string* how) -> Result<std::vector<plugin::ByteRange>> {
      auto written = s->dirty_since_resume(how);
      if (!written.ok() || plan.cut_off_count == 0) return written;
      written->insert(written->end(), plan.cut_off_ranges.begin(), plan.cut_off_ranges.end());
      *how += ", plus every block recorded by the " + std::to_string(plan.cut_off_count) +
              " snapshot(s) after the parent";
      return written;
    };
  }
}

// The API's fallback object; its reason is the cause's API code at stage (docs/api.md).
// What the pipeline is asked to do: the sandbox's VMM and memory, the plan's output and parent,
// the strategy chosen and the settings' fallback and write mode. plan must outlive it.
PauseRequest pause_request(const Sandbox& sb, const ChainPlan& plan, const PauseBody& body,
                           const PauseSource& source, const std::string& strategy,
                           const ServiceSettings& settings) {
  PauseRequest req;
  req.pid = sb.vmm_pid;
  req.pidfd = sb.vmm_pidfd.get();
  req.regions = sb.regions;
  req.memfd = source.memfd;
  req.guest_size = sb.guest_size;
  req.reader_limits = settings.reader_limits;
  req.strategy = strategy;
  req.allow_fallback = settings.allow_fallback;
  req.fallback_strategy = settings.fallback_strategy;
  req.out_path = plan.out_path;
  req.parent_path = plan.parent_path;
  req.freeze = true;
  req.stay_frozen = body.stop;
  req.sync = body.sync;
  req.data_write = settings.durable_write;
  set_dirty_set(req, sb, plan, body, source);
  return req;
}

json fallback_json(const std::string& from, const std::string& to, FallbackCause cause,
                   FallbackStage stage, const std::string& detail) {
  return {{"from", from},
          {"to", to},
          {"reason", std::string(fallback_names(cause, stage).api_code)},
          {"detail", detail}};
}

}  // namespace

void SandboxService::record_pause(const PauseReport* report, const std::string& strategy,
                                  double seconds) {
  metrics::PauseObservation obs;
  if (report == nullptr) {
    obs.strategy = strategy;
    obs.outcome = metrics::Outcome::kError;
    obs.seconds = seconds;
    metrics_.record_pause(obs);
    return;
  }
  const PauseReport& rep = *report;
  if (rep.fallback != FallbackCause::kNone) {
    // The pipeline's own fallback: the strategy could not run this sandbox, or failed half way.
    metrics_.record_fallback(rep.requested_strategy, rep.strategy, rep.fallback);
  }
  obs.strategy = rep.strategy;
  obs.outcome = metrics::Outcome::kOk;
  obs.seconds = rep.wall_seconds;
  obs.phases = metric_phases(rep.phases);
  obs.exported_bytes = rep.dirty_bytes;
  obs.written_bytes = rep.data_bytes;
  obs.zero_blocks = rep.zero_blocks;
  obs.block_size = rep.block_size;
  obs.released_bytes = rep.export_stats.bytes_released;
  obs.cpu_seconds = rep.cpu_seconds;
  metrics_.record_pause(obs);
}

Result<json> SandboxService::fail_pause(Claim& claim, Error error) {
  spdlog::error("pause {} failed: {}", claim->id, error.to_string());
  // Data at risk: the pipeline left the VMM stopped, and the only copy of memory it released is
  // the kept file the error names. The sandbox must not look runnable.
  const bool at_risk = error.code == Errc::kDataAtRisk;
  const bool runs = !at_risk && process_alive(claim->vmm_pid);
  claim.finish(runs ? SandboxState::kRunning : SandboxState::kFailed,
               [&](Sandbox& sb) { sb.last_error = error.to_string(); });
  return error;
}

// A committed pause's answer (docs/api.md "Pause").
json SandboxService::pause_answer(const std::string& id, const Choice& choice,
                                  const ChainPlan& plan, const PauseBody& body,
                                  const PauseReport& rep) const {
  json answer = {{"id", id},
                 {"strategy", rep.strategy},
                 {"requested_strategy", choice.requested},
                 {"variant", choice.variant.empty() ? json(nullptr) : json(choice.variant)},
                 {"reason", choice.reason},
                 {"fallback", nullptr},
                 {"snapshot", rep.snapshot_path},
                 {"snapshot_id", rep.snapshot_id},
                 {"generation", rep.generation},
                 {"parent", plan.parent_path.empty() ? json(nullptr) : json(plan.parent_path)},
                 {"bytes", rep.dirty_bytes},
                 {"data_bytes", rep.data_bytes},
                 {"zero_blocks", rep.zero_blocks},
                 {"memory_released", rep.export_stats.bytes_released},
                 {"dirty_set_source", rep.dirty_set_source},
                 {"seconds", rep.wall_seconds},
                 {"stopped_seconds", rep.stopped_seconds},
                 {"cpu_seconds", rep.cpu_seconds},
                 {"phases", phases_json(rep.phases)},
                 {"after", body.stop ? "stop" : "continue"},
                 {"report", to_json(rep)}};
  if (choice.fallback != FallbackCause::kNone) {
    answer["fallback"] = fallback_json(choice.requested, choice.strategy, choice.fallback,
                                       FallbackStage::kSelection, choice.fallback_reason);
  } else if (rep.fallback != FallbackCause::kNone) {
    answer["fallback"] = fallback_json(rep.requested_strategy, rep.strategy, rep.fallback,
                                       FallbackStage::kPipeline, rep.fallback_reason);
  }
  return answer;
}

SandboxService::ModeChoice SandboxService::choose_mode(const Sandbox& sb, const PauseBody& body,
                                                      const std::string& strategy,
                                                      const PauseSource& source) {
  ModeChoice m;
  std::shared_ptr<flags::FlagStore> store;
  std::string flag_key;
  {
    std::lock_guard lock(mu_);
    store = flags_;
    flag_key = settings_.pause_mode_flag;
  }
  if (body.mode) {
    m.requested = *body.mode;
    m.source = "body";
  } else if (store) {
    const flags::Resolution r = store->snapshot()->evaluate(
        flag_key, sandbox_context(sb.attributes), flags::FlagType::kString,
        std::string(pause_mode_name(PauseMode::kCopy)));
    if (r.error_code == flags::ErrorCode::kFlagNotFound) {
      // No pause-mode flag in the file: every sandbox pauses as it always did.
    } else if (!r.ok()) {
      m.flag_problem = "flag \"" + flag_key + "\": " +
                       std::string(flags::error_code_name(r.error_code)) + ": " + r.error_message;
    } else if (const auto mode = parse_pause_mode(r.value.get<std::string>()); !mode) {
      m.flag_problem = "flag \"" + flag_key + "\" chose \"" + r.value.get<std::string>() +
                       "\", which is no pause mode (copy, handover, live)";
    } else {
      m.requested = *mode;
      m.source = "flag";
      m.variant = r.variant.value_or("");
    }
    metrics_.record_flag_evaluation(flag_key, r.variant.value_or(""),
                                    std::string(flags::reason_name(r.reason)));
  }
  const PluginInfo* info = registry_.find(strategy);
  const bool partial_memory = sb.session && !sb.session->memfd_complete();
  // Live: the session resolves this VMM's write faults, and the pause reads its memfd.
  const bool live_capable = sb.session && sb.session->can_pause_live() && source.memfd >= 0 &&
                            source.memfd == sb.session->memfd();
  m.decision = decide_pause_mode(
      m.requested, {.strategy_needs_memfd = info && StrategyPolicy::of(*info).needs_memfd(),
                    .memfd_held = source.memfd >= 0,
                    .memory_resident = !partial_memory,
                    .stop = body.stop,
                    .live_capable = live_capable});
  if (!m.flag_problem.empty()) m.decision.fallback = PauseModeFallback::kFlagError;
  metrics_.record_pause_mode_evaluation(m.requested, m.source);
  if (m.decision.fallback != PauseModeFallback::kNone) {
    metrics_.record_pause_mode_fallback(m.requested, m.decision.mode, m.decision.fallback);
    spdlog::warn("pause {}: mode {} instead of {}: {}{}", sb.id, pause_mode_name(m.decision.mode),
                 pause_mode_name(m.requested), pause_mode_fallback_text(m.decision.fallback),
                 m.flag_problem.empty() ? "" : " (" + m.flag_problem + ")");
  }
  return m;
}

namespace {

// What every pause answer says about its mode (docs/api.md "Pause").
template <typename ModeChoiceT>
void add_mode_json(json& answer, const ModeChoiceT& m, double handover_seconds) {
  answer["mode"] = std::string(pause_mode_name(m.decision.mode));
  answer["requested_mode"] = std::string(pause_mode_name(m.requested));
  answer["mode_source"] = m.source;
  answer["mode_fallback"] =
      m.decision.fallback == PauseModeFallback::kNone
          ? json(nullptr)
          : json{{"from", std::string(pause_mode_name(m.requested))},
                 {"to", std::string(pause_mode_name(m.decision.mode))},
                 {"reason", std::string(pause_mode_fallback_name(m.decision.fallback))},
                 {"detail", m.flag_problem.empty()
                                ? std::string(pause_mode_fallback_text(m.decision.fallback))
                                : m.flag_problem}};
  answer["handover_seconds"] = handover_seconds;
  answer["durable"] = m.decision.mode != PauseMode::kHandover;
}

}  // namespace

Result<json> SandboxService::pause(const Caller& caller, const std::string& id, const json& body) {
  // Written once the operation is over (the last destructor to run before the answer leaves).
  const PersistAtExit persist_at_exit(*this);
  MEMSNAP_ASSIGN_OR_RETURN(auto parsed, parse_pause_body(body, options_.sync, registry_));
  const PauseBody& request = parsed;
  MEMSNAP_ASSIGN_OR_RETURN(
      auto claimed, claim(caller, id, "pause", SandboxState::kRunning, SandboxState::kPausing));
  Claim& claim = claimed;  // until finished, any return puts the sandbox back to running
  // Not written here (a write costs the answer ~1-3 ms while an export fills the disk): a crash
  // during the pause finds the registry saying `running` with the VMM stopped by the freeze,
  // which a start does not take back (recover_entry), or `pausing` once poll() wrote it.
  const Sandbox& sb = *claim;

  MEMSNAP_ASSIGN_OR_RETURN(auto plan, plan_chain(sb, request));
  if (const Errc slot = acquire_slot(true); slot != Errc::kOk) {
    return slot == Errc::kShuttingDown
               ? make_error(slot, "memsnapd is shutting down: no new pauses")
               : make_error(slot,
                            "no free pause slot: the concurrency limit was reached and stayed "
                            "so for the queue timeout");
  }
  Slot slot(*this, /*pause_slot=*/true);
  metrics::InFlight in_flight = metrics_.track_in_flight(metrics::OperationKind::kPause);
  const auto started = std::chrono::steady_clock::now();

  const Choice choice = choose(sb.attributes, request.forced, /*record=*/true);
  MEMSNAP_RETURN_IF_ERROR(check_choice(sb, choice, request));
  const PauseSource source = pause_source(sb, plan, request);
  const ModeChoice mode = choose_mode(sb, request, choice.strategy, source);
  {
    std::lock_guard lock(mu_);
    flush_fault_stats_locked(*claim);
  }
  if (mode.decision.mode == PauseMode::kHandover) {
    return pause_handover(claim, slot, choice, mode, std::move(plan), request, source, started);
  }

  PauseRequest req = pause_request(sb, plan, request, source, choice.strategy, settings());
  if (mode.decision.mode == PauseMode::kLive) {
    // The session outlives the pause: the sandbox is claimed (pausing) until it finishes.
    ResumeSession* session = sb.session.get();
    req.live = PauseRequest::Live{[session] { return session->prepare_live(); },
                                  [session](const std::vector<plugin::ByteRange>& ranges) {
                                    return session->begin_live(ranges);
                                  },
                                  [session] { session->end_live(); }};
  }
  spdlog::info("pause {}: strategy {} ({}{}), mode {} -> {}", id, choice.strategy, choice.reason,
               choice.variant.empty() ? "" : ", variant " + choice.variant,
               pause_mode_name(mode.decision.mode), plan.out_path);
  auto paused = pipeline_.pause(registry_, req);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  slot.release();
  record_pause(paused.ok() ? &*paused : nullptr, choice.strategy, seconds);
  if (!paused.ok()) return fail_pause(claim, std::move(paused).error());
  const PauseReport& rep = *paused;
  // Live: the moment that matters to the guest is when it runs again.
  metrics_.record_handover(rep.strategy, mode.decision.mode,
                           rep.live ? rep.stopped_seconds : seconds);
  metrics_.record_durable(rep.strategy, mode.decision.mode, seconds, true);
  if (rep.live) metrics_.record_live_copies(rep.strategy, rep.live_copies);

  json answer = pause_answer(id, choice, plan, request, rep);
  add_mode_json(answer, mode, seconds);
  if (rep.live) {
    answer["live"] = {{"copies", rep.live_copies},
                      {"copied_bytes", rep.live_copies * rep.block_size}};
  }
  ExportStatus done;
  done.state = ExportState::kDurable;
  done.bytes_done = done.bytes_total = rep.dirty_bytes;
  done.cpu_seconds = rep.cpu_seconds;
  answer["export"] = export_json(done);

  const PluginInfo* info = registry_.find(rep.strategy);
  const bool keeps_memory = info && StrategyPolicy::of(*info).keeps_memory();
  claim.finish(request.stop ? SandboxState::kPaused : SandboxState::kRunning, [&](Sandbox& s) {
    const bool complete = !s.session || s.session->memfd_complete();
    if (s.session) s.session->pause_committed();
    plan.chain.push_back(rep.snapshot_path);
    s.chain = std::move(plan.chain);
    s.strategy = rep.strategy;
    s.retained = RetainedMemory{};
    if (request.stop && keeps_memory && source.memfd >= 0 && complete) {
      s.retained.memfd.reset(::dup(source.memfd));
      s.retained.snapshot_id = rep.snapshot_id;
      s.retained.generation = rep.generation;
      s.retained.guest_size = s.guest_size;
    }
    if (s.retained.memfd.get() >= 0) warm_candidates_[s.id] = claim.sandbox();
    // A paused sandbox's VMM is done with: memsnapd keeps no reference to its memory (a kept
    // memfd for a warm resume is the dup above).
    if (request.stop) s.vmm_memfd.reset();
    s.last_pause = answer;
    s.last_error.clear();
  });
  return answer;
}

Status SandboxService::reserve_export(std::uint64_t guest_size) {
  std::unique_lock lock(mu_);
  auto backlog = [&] {
    std::uint64_t sum = 0;
    for (const auto& [id, sb] : sandboxes_) {
      if (sb->pending_export) sum += backlog_of(*sb->pending_export);
    }
    return sum;
  };
  auto fits = [&] {
    if (exports_pending_ == 0) return true;  // one is always allowed
    return exports_pending_ < settings_.max_background_exports &&
           backlog() + guest_size <= settings_.max_export_backlog_bytes;
  };
  const auto deadline = std::chrono::steady_clock::now() + settings_.queue_timeout;
  if (!changed_.wait_until(lock, deadline, [&] { return draining_ || fits(); })) {
    metrics_.record_concurrency_rejection(metrics::OperationKind::kPause);
    return make_error(Errc::kBusy,
                      "the background exports are at their limit (" +
                          std::to_string(exports_pending_) + " not durable, " +
                          std::to_string(backlog()) +
                          " bytes to write; limits.max_background_exports " +
                          std::to_string(settings_.max_background_exports) +
                          ", limits.max_export_backlog_bytes " +
                          std::to_string(settings_.max_export_backlog_bytes) +
                          ") and stayed so for the queue timeout; nothing was changed. Pause "
                          "with mode \"copy\", or wait for exports to become durable");
  }
  if (draining_) return make_error(Errc::kShuttingDown, "memsnapd is shutting down: no new pauses");
  ++exports_pending_;
  return {};
}

void SandboxService::unreserve_export() {
  {
    std::lock_guard lock(mu_);
    --exports_pending_;
    publish_exports_locked();
  }
  changed_.notify_all();
}

Result<json> SandboxService::pause_handover(Claim& claim, Slot& slot, const Choice& choice,
                                            const ModeChoice& mode, ChainPlan plan,
                                            const PauseBody& body, const PauseSource& source,
                                            std::chrono::steady_clock::time_point started) {
  const Sandbox& sb = *claim;
  MEMSNAP_RETURN_IF_ERROR(reserve_export(sb.guest_size));
  bool reserved = true;
  struct Unreserve {
    SandboxService* s;
    bool* on;
    ~Unreserve() {
      if (*on) s->unreserve_export();
    }
  } unreserve{this, &reserved};

  // 1. The VMM stops (for good: after "stop").
  auto frozen = Freezer::freeze(sb.vmm_pid, sb.vmm_pidfd.get());
  if (!frozen.ok()) return fail_pause(claim, std::move(frozen).error());
  // 2. What to export, while nothing can write: the caller's dirty set, or the session's write
  // tracking (which needs the VMM), or -- none given -- the memfd's populated blocks, found by
  // the export itself (the memfd no longer changes).
  PauseRequest req = pause_request(sb, plan, body, source, choice.strategy, settings());
  std::string how = req.dirty ? "given" : "";
  if (req.dirty_source) {
    auto dirty = req.dirty_source(&how);
    if (!dirty.ok()) return fail_pause(claim, std::move(dirty).error());
    req.dirty = std::move(*dirty);
    req.dirty_source = nullptr;
  }
  if (!req.dirty) how = "the memfd's populated blocks (SEEK_DATA), found by the background export";
  // 3. memsnapd holds the memory: the export's own reference, and memsnapd's.
  req.pid = -1;
  req.pidfd = -1;
  req.regions.clear();
  req.freeze = false;
  req.stay_frozen = false;
  req.allow_fallback = false;
  io::UniqueFd held(::fcntl(source.memfd, F_DUPFD_CLOEXEC, 0));
  if (held.get() < 0) {
    return fail_pause(claim, make_error(Errc::kIoError,
                                        std::string("dup of the memfd: ") + std::strerror(errno),
                                        errno));
  }
  auto pending = std::make_unique<PendingExport>();
  pending->chain = plan.chain;
  pending->out_path = plan.out_path;
  pending->strategy = choice.strategy;
  pending->mode = PauseMode::kHandover;
  pending->guest_size = sb.guest_size;
  const PluginInfo* info = registry_.find(choice.strategy);
  pending->keeps_memory = info && StrategyPolicy::of(*info).keeps_memory();
  pending->started = started;
  std::weak_ptr<Sandbox> weak = claim.sandbox();
  auto job = pipeline_.start_export(
      registry_, req, [this, weak](const ExportStatus& st) { export_changed(weak, st); });
  if (!job.ok()) {
    // Nothing was handed over: the VMM runs on, as after any failed pause.
    (void)frozen->thaw();
    return fail_pause(claim, std::move(job).error().with_context("starting the background export"));
  }
  frozen->keep_stopped();
  req.memfd = held.get();
  pending->request = std::move(req);
  pending->memfd = std::move(held);
  pending->job = std::move(*job);
  pending->status = pending->job->status();
  const double handover =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  slot.release();
  metrics_.record_handover(choice.strategy, PauseMode::kHandover, handover);

  json answer = {{"id", sb.id},
                 {"strategy", choice.strategy},
                 {"requested_strategy", choice.requested},
                 {"variant", choice.variant.empty() ? json(nullptr) : json(choice.variant)},
                 {"reason", choice.reason},
                 {"fallback", nullptr},
                 {"snapshot", plan.out_path},
                 {"snapshot_id", nullptr},
                 {"generation", nullptr},
                 {"parent", plan.parent_path.empty() ? json(nullptr) : json(plan.parent_path)},
                 {"dirty_set_source", how},
                 {"seconds", handover},
                 {"after", "stop"}};
  if (choice.fallback != FallbackCause::kNone) {
    answer["fallback"] = fallback_json(choice.requested, choice.strategy, choice.fallback,
                                       FallbackStage::kSelection, choice.fallback_reason);
  }
  add_mode_json(answer, mode, handover);
  answer["export"] = export_json(pending->status);
  spdlog::info("pause {}: handed over in {:.3f} ms; {} exports {} in the background", sb.id,
               handover * 1e3, choice.strategy, plan.out_path);
  reserved = false;  // counted until the export is durable (export_changed)
  claim.finish(SandboxState::kExporting, [&](Sandbox& s) {
    s.retained = RetainedMemory{};
    s.vmm_memfd.reset();
    s.pending_export = std::move(pending);
    s.last_pause = answer;
    s.last_error.clear();
    publish_exports_locked();
  });
  // In the registry before the answer, as every change is, but not fsynced: the snapshot is not
  // durable yet either, and an fsync here waits for the export's writes (measured: the answer
  // went from ~1 ms to ~4 ms at 256 MiB). A kill -9 of memsnapd finds it; the export's durable
  // moment writes it synced.
  persist_registry(/*sync=*/false);
  return answer;
}

void SandboxService::export_changed(const std::weak_ptr<Sandbox>& weak, const ExportStatus& st) {
  const std::shared_ptr<Sandbox> sb = weak.lock();
  if (!sb) return;
  std::string strategy;
  double seconds = 0;
  {
    std::lock_guard lock(mu_);
    PendingExport* e = sb->pending_export.get();
    if (!e) return;
    e->status = st;
    strategy = e->strategy;
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - e->started).count();
    if (st.state == ExportState::kFailed) {
      sb->last_error = st.error ? st.error->to_string() : "the background export failed";
      if (sb->last_pause.is_object()) sb->last_pause["export"] = export_json(st);
      spdlog::critical(
          "sandbox {}: the background export to {} failed: {}; the guest memory is held, retry "
          "with POST /v1/sandboxes/{}/export/retry",
          sb->id, e->out_path, sb->last_error, sb->id);
      // A sandbox resumed before durable runs on: only its next pause waits for the retry.
      if (sb->state == SandboxState::kExporting) move_locked(*sb, SandboxState::kExportFailed);
    } else if (st.state == ExportState::kDurable && st.report) {
      const PauseReport& rep = *st.report;
      // Still paused: the memory becomes the warm memory of the paused sandbox. Resumed (or
      // resuming) before durable: the guest runs on a copy, and the session and kept memory
      // belong to that resume; only the chain grows.
      const bool paused = sb->state == SandboxState::kExporting;
      if (paused && sb->session) sb->session->pause_committed();
      sb->chain = e->chain;
      sb->chain.push_back(rep.snapshot_path);
      sb->strategy = rep.strategy;
      if (paused) sb->retained = RetainedMemory{};
      if (paused && e->keeps_memory) {
        sb->retained.memfd = std::move(e->memfd);
        sb->retained.snapshot_id = rep.snapshot_id;
        sb->retained.generation = rep.generation;
        sb->retained.guest_size = e->guest_size;
        warm_candidates_[sb->id] = sb;
      }
      if (sb->last_pause.is_object()) {
        sb->last_pause["durable"] = true;
        sb->last_pause["durable_seconds"] = seconds;
        sb->last_pause["snapshot_id"] = rep.snapshot_id;
        sb->last_pause["generation"] = rep.generation;
        sb->last_pause["bytes"] = rep.dirty_bytes;
        sb->last_pause["data_bytes"] = rep.data_bytes;
        sb->last_pause["export"] = export_json(st);
        sb->last_pause["report"] = to_json(rep);
      }
      sb->finished_exports.push_back(std::move(e->job));
      sb->pending_export.reset();
      --exports_pending_;
      registry_changed_locked();
      sb->last_error.clear();
      if (paused) move_locked(*sb, SandboxState::kPaused);
    }
    publish_exports_locked();
  }
  changed_.notify_all();
  if (st.state == ExportState::kDurable && st.report) {
    record_pause(&*st.report, strategy, st.report->wall_seconds);
    metrics_.record_durable(strategy, PauseMode::kHandover, seconds, true);
    spdlog::info("sandbox {}: durable {:.3f} s after the pause ({} bytes)", sb->id, seconds,
                 st.report->dirty_bytes);
  } else if (st.state == ExportState::kFailed) {
    metrics_.record_durable(strategy, PauseMode::kHandover, seconds, false);
  }
  persist_registry();
}

Result<json> SandboxService::retry_export(const Caller& caller, const std::string& id) {
  // Written once the operation is over (the last destructor to run before the answer leaves).
  const PersistAtExit persist_at_exit(*this);
  std::string strategy;
  std::string state_after;
  {
    std::lock_guard lock(mu_);
    MEMSNAP_ASSIGN_OR_RETURN(auto sb, find_locked(caller, id));
    if (!sb->pending_export || export_running_locked(*sb) || is_owned(sb->state)) {
      return make_error(Errc::kInvalidState, "sandbox " + id + " is " +
                                                 std::string(state_name(sb->state)) +
                                                 "; only a failed export can be retried");
    }
    PendingExport& e = *sb->pending_export;
    if (auto retried = e.job->retry(); !retried.ok()) {
      // The exporter cannot run again (its process is gone, or it released memory it could
      // not put back). memsnapd's own reference still holds the guest's memory as it was at
      // the pause when the strategy never releases any: a new exporter starts from it.
      if (!e.keeps_memory || e.memfd.get() < 0) {
        return std::move(retried).error().with_context(
            "the export cannot be retried, and its strategy (" + e.strategy +
            ") releases memory, so it cannot be started again from the memory memsnapd holds");
      }
      std::weak_ptr<Sandbox> weak = sb;
      auto job = pipeline_.start_export(
          registry_, e.request, [this, weak](const ExportStatus& st) { export_changed(weak, st); });
      if (!job.ok()) return std::move(job).error().with_context("starting the export again");
      sb->finished_exports.push_back(std::move(e.job));  // destroyed outside the lock
      e.job = std::move(*job);
      ++e.restarts;
      spdlog::warn("sandbox {}: the export could not be retried ({}); a new one started from "
                   "the memory memsnapd holds", id, retried.error().to_string());
    }
    strategy = sb->pending_export->strategy;
    sb->pending_export->status.state = ExportState::kRunning;
    sb->pending_export->status.error.reset();
    sb->last_error.clear();
    if (sb->state == SandboxState::kExportFailed) move_locked(*sb, SandboxState::kExporting);
    state_after = std::string(state_name(sb->state));
    publish_exports_locked();
  }
  changed_.notify_all();
  metrics_.record_export_retry(strategy);
  spdlog::info("sandbox {}: background export retried", id);
  return json{{"id", id}, {"state", state_after}};
}

void SandboxService::publish_exports_locked() {
  std::uint64_t running = 0, failed = 0, backlog = 0, held = 0;
  for (const auto& [id, sb] : sandboxes_) {
    const PendingExport* e = sb->pending_export.get();
    if (!e) continue;
    (e->status.state == ExportState::kFailed ? failed : running) += 1;
    backlog += backlog_of(*e);
    held += resident_bytes(e->memfd.get());
  }
  metrics_.set_background_exports(running, failed, backlog, held);
}

namespace {

// A resume request's body, decoded and checked (docs/api.md "Resume").
struct ResumeBody {
  std::string socket;  // in the handshake directory
  std::optional<ResumeMode> mode;  // nullopt: the strategy's default
  bool track_writes = true;
  std::optional<bool> map_ahead;  // nullopt: the session's default
};

Result<ResumeBody> parse_resume_body(const json& body) {
  MEMSNAP_RETURN_IF_ERROR(
      only_keys(body, {"handshake_socket", "mode", "track_writes", "map_ahead"}, "resume"));
  auto socket = field<std::string>(body, "handshake_socket", "");
  auto mode_name = field<std::string>(body, "mode", "");
  auto track = field<bool>(body, "track_writes", true);
  auto map_ahead = field<bool>(body, "map_ahead", false);
  const bool map_ahead_given = body.contains("map_ahead") && !body["map_ahead"].is_null();
  if (!socket.ok()) return std::move(socket).error();
  if (!mode_name.ok()) return std::move(mode_name).error();
  if (!track.ok()) return std::move(track).error();
  if (!map_ahead.ok()) return std::move(map_ahead).error();
  if (socket->empty()) return make_error(Errc::kInvalidArgument, "handshake_socket is required");
  ResumeBody out;
  out.socket = std::move(*socket);
  out.track_writes = *track;
  if (map_ahead_given) out.map_ahead = *map_ahead;
  if (!mode_name->empty()) {
    MEMSNAP_ASSIGN_OR_RETURN(out.mode, parse_resume_mode(*mode_name));
  }
  return out;
}

}  // namespace

Result<json> SandboxService::resume(const Caller& caller, const std::string& id,
                                    const json& body) {
  // Written once the operation is over (the last destructor to run before the answer leaves).
  const PersistAtExit persist_at_exit(*this);
  MEMSNAP_ASSIGN_OR_RETURN(const ResumeBody request, parse_resume_body(body));
  MEMSNAP_ASSIGN_OR_RETURN(const std::string socket_path, handshake_path(request.socket));
  MEMSNAP_ASSIGN_OR_RETURN(auto claimed, claim_for_resume(caller, id, request.mode));
  Claim& claim = claimed;  // until finished or handed on, any return parks it again
  const std::shared_ptr<Sandbox> sb = claim.sandbox();
  if (sb->resume_thread.joinable()) sb->resume_thread.join();  // the previous one, long done
  // Before durable: the pending snapshot is served from the memory held for its export. The
  // export may turn durable meanwhile; what is taken here stays valid (its own reference).
  PendingSnapshot pending;
  io::UniqueFd held;
  std::vector<std::string> chain;
  std::string strategy;
  int dup_errno = 0;
  {
    std::lock_guard lock(mu_);
    const PendingExport* e = sb->pending_export.get();
    strategy = e != nullptr ? e->strategy : sb->strategy;
    if (e != nullptr && e->memfd.get() >= 0) {
      held.reset(::fcntl(e->memfd.get(), F_DUPFD_CLOEXEC, 0));
      if (held.get() < 0) dup_errno = errno;
      pending.memfd = held.get();
      pending.guest_size = e->guest_size;
      pending.block_size = e->request.block_size;
      pending.ranges = e->request.dirty;
      chain = e->chain;
    } else {
      chain = sb->chain;
    }
  }
  const std::vector<std::string> committed = chain;  // for the answer: parents, or the chain
  if (dup_errno != 0) {
    return make_error(Errc::kIoError, "the memory held for sandbox " + id +
                                          "'s export cannot be shared with the resume: " +
                                          std::strerror(dup_errno));
  }

  if (const Errc slot = acquire_slot(false); slot != Errc::kOk) {
    return slot == Errc::kShuttingDown
               ? make_error(slot, "memsnapd is shutting down: no new resumes")
               : make_error(slot,
                            "no free resume slot: the concurrency limit was reached and "
                            "stayed so for the queue timeout");
  }
  ResumeRequest rr;
  rr.chain = std::move(chain);
  rr.pending = pending.memfd >= 0 ? &pending : nullptr;
  rr.socket_path = socket_path;
  rr.strategy = strategy;
  rr.mode = request.mode;
  rr.retained = &sb->retained;
  rr.handshake_timeout = settings().handshake_timeout;
  rr.reader_limits = settings().reader_limits;
  rr.verify_checksums = true;
  rr.track_writes = request.track_writes;
  rr.map_ahead = request.map_ahead;
  rr.guard = options_.guard;
  auto prepared = pipeline_.prepare_resume(registry_, std::move(rr));
  if (!prepared.ok()) {
    release_slot(false);
    metrics::ResumeObservation obs;
    obs.strategy = strategy;
    obs.outcome = metrics::Outcome::kError;
    metrics_.record_resume(obs);
    claim.finish(SandboxState::kPaused,
                 [&](Sandbox& s) { s.last_error = prepared.error().to_string(); });
    return std::move(prepared).error();
  }
  held.reset();  // the session has its own
  // Everything is checked (prepare refuses a warm resume without the kept memfd, a chain that
  // fails verification, a socket it cannot listen on): only now is the old session let go. Its
  // VMM is gone or stopped for good, and it has nothing left to serve; a VMM that still runs is
  // ended by stop(). A refused resume never gets here, so it ends nothing.
  std::unique_ptr<ResumeSession> old;
  {
    std::lock_guard lock(mu_);
    flush_fault_stats_locked(*sb);
    old = std::move(sb->session);
  }
  if (old) {
    old->stop();
  } else if (release_vmm(*sb, SandboxState::kPaused, /*leave_running=*/false) ==
             VmmRelease::kEnded) {
    // A VMM a pause left stopped that memsnapd never served (registered running, or pinned
    // again after a restart): the same rule as for a session's.
    spdlog::info("resume {}: the VMM its pause left stopped (pid {}) was ended", id, sb->vmm_pid);
  }
  old.reset();

  const std::string mode_chosen(resume_mode_name((*prepared)->report().mode));
  const bool rr_before_durable = (*prepared)->report().before_durable;
  {
    std::lock_guard lock(mu_);
    sb->session = std::move(*prepared);
    sb->session_strategy = strategy;
    sb->faults_recorded = FaultStats{};
  }
  // The VMM connects when the orchestrator starts it, after this answer: wait for it on a
  // thread of the sandbox's own, which owns the claim from now on.
  sb->resume_thread =
      std::thread([this, owned = std::move(claim)]() mutable { finish_resume(std::move(owned)); });
  return json{{"id", id},
              {"state", std::string(state_name(SandboxState::kResuming))},
              {"handshake_socket", socket_path},
              {"strategy", strategy},
              {"mode", mode_chosen},
              {"before_durable", rr_before_durable},
              {"snapshots", committed}};
}

Result<SandboxService::Claim> SandboxService::claim_for_resume(const Caller& caller,
                                                               const std::string& id,
                                                               std::optional<ResumeMode> mode) {
  bool before_durable = false;
  bool exporting = false;
  {
    std::lock_guard lock(mu_);
    MEMSNAP_ASSIGN_OR_RETURN(auto sb, find_locked(caller, id));
    exporting = sb->state == SandboxState::kExporting || sb->state == SandboxState::kExportFailed;
    const PendingExport* e = sb->pending_export.get();
    // Served at once from the held memory when the strategy leaves it whole (not hole_punch,
    // which releases it as it writes) and the mode does not hand memory to the VMM.
    const bool hands_over = mode && (*mode == ResumeMode::kWarm || *mode == ResumeMode::kEager);
    before_durable = sb->state == SandboxState::kExporting && e != nullptr && e->keeps_memory &&
                     e->memfd.get() >= 0 && !hands_over;
  }
  if (before_durable) {
    auto claimed = claim(caller, id, "resume", SandboxState::kExporting, SandboxState::kResuming);
    // Durable in between: a resume like any other.
    if (claimed.ok() || claimed.error().code != Errc::kInvalidState) return claimed;
  } else if (exporting) {
    MEMSNAP_RETURN_IF_ERROR(wait_until_durable(caller, id));
  }
  return claim(caller, id, "resume", SandboxState::kPaused, SandboxState::kResuming);
}

Status SandboxService::wait_until_durable(const Caller& caller, const std::string& id) {
  std::unique_lock lock(mu_);
  MEMSNAP_ASSIGN_OR_RETURN(auto sb, find_locked(caller, id));
  const auto timeout = settings_.queue_timeout;
  if (!changed_.wait_for(lock, timeout, [&] { return !export_running_locked(*sb) || draining_; })) {
    return make_error(Errc::kBusy, "sandbox " + id +
                                       "'s snapshot is still being exported after the queue "
                                       "timeout; try again when it is durable");
  }
  if (sb->pending_export && !export_running_locked(*sb)) {
    return make_error(Errc::kInvalidState, "sandbox " + id + "'s background export failed (" +
                                               sb->last_error +
                                               "): its memory is held; retry the export "
                                               "(POST /v1/sandboxes/" +
                                               id + "/export/retry) first");
  }
  return {};
}

void SandboxService::finish_resume(Claim claim) {
  // Written once the operation is over (the last destructor to run before the answer leaves).
  const PersistAtExit persist_at_exit(*this);
  const std::shared_ptr<Sandbox> sb = claim.sandbox();
  metrics::InFlight in_flight = metrics_.track_in_flight(metrics::OperationKind::kResume);
  ResumeSession& session = *sb->session;
  const Status served = session.accept_and_serve();
  const ResumeReport& rep = session.report();
  metrics::ResumeObservation obs;
  obs.strategy = sb->session_strategy;
  obs.phases = metric_phases(rep.phases);
  obs.mode = std::string(resume_mode_name(rep.mode));
  release_slot(false);
  if (!served.ok()) {
    obs.outcome = metrics::Outcome::kError;
    metrics_.record_resume(obs);
    spdlog::error("resume {} failed: {}", sb->id, served.error().to_string());
    std::unique_ptr<ResumeSession> failed;
    claim.finish(SandboxState::kPaused, [&](Sandbox& s) {
      failed = std::move(s.session);
      s.last_error = served.error().to_string();
    });
    failed.reset();
    return;
  }
  obs.outcome = metrics::Outcome::kOk;
  obs.seconds = rep.ready_seconds;
  metrics_.record_resume(obs);
  json answer = {{"id", sb->id},
                 {"strategy", sb->session_strategy},
                 {"mode", obs.mode},
                 {"mode_reason", rep.mode_reason},
                 {"before_durable", rep.before_durable},
                 {"vmm_pid", rep.vmm_pid},
                 {"ready_seconds", rep.ready_seconds},
                 {"phases", phases_json(rep.phases)},
                 {"write_tracking", rep.write_tracking},
                 {"report", to_json(rep)}};
  spdlog::info("resume {}: VMM pid {} ready in {:.3f} ms ({})", sb->id, rep.vmm_pid,
               rep.ready_seconds * 1e3, obs.mode);
  claim.finish(SandboxState::kRunning, [&](Sandbox&) {
    sb->vmm_pid = rep.vmm_pid;
    sb->regions = session.regions();
    sb->vmm_memfd.reset();  // the session holds the memfd now, if there is one
    if (auto pidfd = open_pidfd(rep.vmm_pid); pidfd.ok()) {
      // Read, then checked to be about the pinned process (a pid reused in between is not).
      sb->vmm_start_time = start_time_of(rep.vmm_pid);
      if (!pidfd_alive(pidfd->get())) sb->vmm_start_time = 0;
      sb->vmm_pidfd = std::move(*pidfd);
      vmm_sandbox_[rep.vmm_pid] = sb->id;
    } else {
      sb->vmm_pidfd.reset();
    }
    sb->guest_size = rep.guest_size;
    sb->attributes.has_memfd = session.memfd() >= 0;
    sb->last_resume = answer;
    sb->last_error.clear();
  });
}

namespace {
// Whether a wait_while=state still waits. Exporting also covers a sandbox resumed before its
// snapshot was durable: the export runs on while the sandbox runs.
bool waits_while(const Sandbox& sb, SandboxState state) {
  if (state == SandboxState::kExporting) {
    return sb.state == SandboxState::kExporting ||
           (sb.pending_export && sb.pending_export->status.state != ExportState::kFailed);
  }
  return sb.state == state;
}
}  // namespace

Result<json> SandboxService::get(const Caller& caller, const std::string& id,
                                 const std::string& wait_while_state,
                                 std::chrono::milliseconds timeout,
                                 const std::function<bool()>& client_gone) {
  const std::optional<SandboxState> wait_while = parse_sandbox_state(wait_while_state);
  if (!wait_while_state.empty() && !wait_while) {
    std::string names;
    for (const auto& n : sandbox_state_names()) names += (names.empty() ? "" : ", ") + n;
    // A state no sandbox is ever in would end the wait at once, as if it were over.
    return make_error(Errc::kInvalidArgument,
                      "wait_while takes " + names + ", not '" + wait_while_state + "'");
  }
  std::unique_lock lock(mu_);
  MEMSNAP_ASSIGN_OR_RETURN(auto found, find_locked(caller, id));
  const std::shared_ptr<Sandbox> sb = found;
  if (wait_while) {
    // In slices: a wait holds a connection slot, so it must notice soon that its client left.
    // A drain wakes it at once (drain() notifies changed_).
    constexpr std::chrono::milliseconds kSlice{200};
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto until = std::min(deadline, std::chrono::steady_clock::now() + kSlice);
      if (changed_.wait_until(lock, until,
                              [&] { return !waits_while(*sb, *wait_while) || draining_; })) {
        break;
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        return make_error(Errc::kTimeout, "sandbox " + id + " is still " + wait_while_state +
                                              " after " + std::to_string(timeout.count()) + " ms");
      }
      if (client_gone && client_gone()) {
        return make_error(Errc::kTimeout, "the client of the wait for sandbox " + id +
                                              " closed its connection");
      }
    }
    if (waits_while(*sb, *wait_while)) {
      return make_error(Errc::kShuttingDown, "memsnapd is shutting down: sandbox " + id +
                                                 " is still " + wait_while_state);
    }
  }
  if (sb->pending_export) refresh_progress_locked(*sb->pending_export);
  json out = describe_locked(*sb);
  if (sb->session && !resume_thread_owns(*sb)) {
    out["faults"] = to_json(sb->session->fault_stats(/*settle=*/false));
  }
  return out;
}

json SandboxService::list(const Caller& caller) const {
  std::lock_guard lock(mu_);
  json out = json::array();
  for (const auto& [id, sb] : sandboxes_) {
    if (!caller.privileged() && sb->owner_uid != caller.uid) continue;
    out.push_back({{"id", id},
                   {"state", std::string(state_name(sb->state))},
                   {"strategy", sb->strategy},
                   {"vmm_pid", sb->vmm_pid},
                   {"snapshots", sb->chain.size()}});
  }
  return {{"sandboxes", out}};
}

Result<json> SandboxService::explain(const Caller& caller, const std::string& id) const {
  SandboxAttributes attributes;
  {
    std::lock_guard lock(mu_);
    MEMSNAP_ASSIGN_OR_RETURN(auto found, find_locked(caller, id));
    attributes = found->attributes;
  }
  const Choice c = choose(attributes, "", /*record=*/false);
  json out = {{"id", id},
              {"strategy", c.strategy},
              {"requested_strategy", c.requested},
              {"variant", c.variant.empty() ? json(nullptr) : json(c.variant)},
              {"reason", c.reason},
              {"fallback", c.fallback == FallbackCause::kNone
                               ? json(nullptr)
                               : fallback_json(c.requested, c.strategy, c.fallback,
                                               FallbackStage::kSelection, c.fallback_reason)},
              {"context", sandbox_context(attributes)}};
  std::shared_ptr<flags::FlagStore> store;
  std::string flag;
  {
    std::lock_guard lock(mu_);
    store = flags_;
    flag = settings_.strategy_flag;
  }
  out["flag"] = flag;
  if (store) {
    flags::EvalOptions eo;
    eo.explain = true;
    const auto r = store->snapshot()->evaluate(flag, sandbox_context(attributes),
                                               flags::FlagType::kString, c.requested, eo);
    out["trace"] = r.trace;
  }
  return out;
}

Result<json> SandboxService::remove(const Caller& caller, const std::string& id, bool force) {
  std::shared_ptr<Sandbox> sb;
  // Watchers of exports it leaves behind, joined outside the lock.
  std::unique_ptr<BackgroundExport> exports_dropped;
  std::vector<std::unique_ptr<BackgroundExport>> finished;
  {
    std::lock_guard lock(mu_);
    MEMSNAP_RETURN_IF_ERROR(find_locked(caller, id));
    const auto it = sandboxes_.find(id);
    if (is_owned(it->second->state)) {
      return make_error(Errc::kBusy,
                        "sandbox " + id + " is " + std::string(state_name(it->second->state)));
    }
    // A running VMM whose memory memsnapd serves cannot run on without it: forgetting the
    // sandbox ends the VMM, and what the guest did since its last pause is lost. Only on request.
    if (!force && it->second->state == SandboxState::kRunning && it->second->session &&
        it->second->session->vmm_running()) {
      return make_error(Errc::kInvalidState,
                        "sandbox " + id + " runs on memory memsnapd serves (VMM pid " +
                            std::to_string(it->second->vmm_pid) +
                            "): removing it would end the VMM. Pause it first, or remove it "
                            "with force=true (memsnap unregister --force)");
    }
    // A pause left this sandbox's released memory at risk: its VMM (stopped) and the memory
    // memsnapd holds for it are half of what `memsnap recover` needs. Only on request.
    if (!force && it->second->state == SandboxState::kFailed &&
        it->second->last_error.rfind(std::string(errc_name(Errc::kDataAtRisk)), 0) == 0) {
      return make_error(Errc::kInvalidState,
                        "sandbox " + id + " failed with its memory at risk (" +
                            it->second->last_error +
                            "): recover it first (memsnap recover), or remove it with force=true "
                            "(memsnap unregister --force)");
    }
    // A handover pause was answered and its snapshot is not durable yet. Exporting: with force
    // the sandbox is forgotten and its export still commits. Failed: with force the held memory
    // -- the only copy of what the pause acknowledged -- is let go.
    if (it->second->pending_export) {
      const bool failed = !export_running_locked(*it->second);
      if (!force) {
        return make_error(Errc::kInvalidState,
                          "sandbox " + id + (failed ? "'s background export failed" :
                                                      "'s snapshot is still being exported") +
                              ": its guest memory is held for it. " +
                              (failed ? "Retry the export (POST /v1/sandboxes/" + id +
                                            "/export/retry), or remove it with force=true, "
                                            "which lets the memory go"
                                      : "Wait until it is durable (wait_while=exporting), or "
                                        "remove it with force=true (the export still commits)"));
      }
      if (failed) MEMSNAP_RETURN_IF_ERROR(it->second->pending_export->job->release());
      exports_dropped = std::move(it->second->pending_export->job);
      it->second->pending_export.reset();
      --exports_pending_;
    }
    sb = it->second;
    flush_fault_stats_locked(*sb);
    sandboxes_.erase(it);
    registry_changed_locked();
    if (sb->counted) state_counts_.leave(sb->state);
    sb->counted = false;
    warm_candidates_.erase(id);
    if (const auto v = vmm_sandbox_.find(sb->vmm_pid); v != vmm_sandbox_.end() && v->second == id) {
      vmm_sandbox_.erase(v);
    }
    publish_states_locked();
    publish_exports_locked();
    for (auto& j : sb->finished_exports) finished.push_back(std::move(j));
    sb->finished_exports.clear();
  }
  changed_.notify_all();  // a handover waiting for room in the export limits
  exports_dropped.reset();
  finished.clear();
  if (sb->resume_thread.joinable()) sb->resume_thread.join();
  const bool vmm_ended = release_vmm(*sb, sb->state, /*leave_running=*/false) == VmmRelease::kEnded;
  spdlog::info("sandbox {} unregistered (its snapshots stay){}", id,
               vmm_ended ? "; its VMM was ended" : "");
  persist_registry();
  return json{{"id", id}, {"removed", true}, {"snapshots", sb->chain}, {"vmm_ended", vmm_ended}};
}

RegistryDocument SandboxService::registry_locked() const {
  RegistryDocument doc;
  doc.boot_id = boot_id_;
  for (const auto& [id, sb] : sandboxes_) {
    RegistryEntry e;
    e.id = id;
    e.state = sb->state;
    e.owner_uid = sb->owner_uid;
    // As a registration gives them (the flag context's other keys are derived).
    e.attributes = sandbox_context(sb->attributes);
    e.attributes.erase("targetingKey");
    e.attributes.erase("has_memfd");
    e.chain = sb->chain;
    e.strategy = sb->strategy;
    e.guest_size = sb->guest_size;
    if (sb->vmm_pid > 0 && sb->vmm_pidfd.get() >= 0 && sb->vmm_start_time != 0) {
      e.vmm_pid = sb->vmm_pid;
      e.vmm_start_time = sb->vmm_start_time;
      e.regions = sb->regions;
    }
    if (sb->pending_export) {
      e.export_output = sb->pending_export->out_path;
      e.export_chain = sb->pending_export->chain;
    }
    doc.sandboxes.push_back(std::move(e));
  }
  for (const RegistryEntry& e : unrecovered_) {
    if (!sandboxes_.count(e.id)) doc.sandboxes.push_back(e);
  }
  return doc;
}

void SandboxService::persist_registry(bool sync) {
  if (!registry_file_) return;
  std::lock_guard write(registry_write_mu_);
  RegistryDocument doc;
  std::uint64_t seq = 0;
  {
    std::lock_guard lock(mu_);
    seq = registry_seq_;
    if (seq == registry_written_) return;
    doc = registry_locked();
  }
  if (Status s = registry_file_->save(doc, sync); !s.ok()) {
    if (!registry_failed_.exchange(true)) {
      spdlog::error(
          "registry: writing {} failed: {}; until it is written again, a restart "
          "does not know what changed since",
          registry_file_->path(), s.error().to_string());
    }
    return;
  }
  if (registry_failed_.exchange(false)) {
    spdlog::info("registry: {} is written again", registry_file_->path());
  }
  registry_written_ = seq;
}

void SandboxService::retry_unrecovered() {
  std::vector<RegistryEntry> ready;
  {
    std::lock_guard lock(mu_);
    for (const RegistryEntry& e : unrecovered_) {
      struct stat st {};
      if (!e.export_output.empty() && ::stat(e.export_output.c_str(), &st) == 0) ready.push_back(e);
    }
  }
  for (const RegistryEntry& e : ready) {
    std::string how;
    std::string why;
    std::shared_ptr<Sandbox> sb = recover_entry(e, registry_same_boot_, &how, &why);
    if (!sb) continue;  // still not: kept, said at start
    std::lock_guard lock(mu_);
    if (!add_locked(sb).ok()) continue;
    spdlog::info("registry: sandbox {} recovered once its export committed: {}", e.id, how);
    json& lost = recovery_["not_recovered"];
    for (auto it = lost.begin(); it != lost.end(); ++it) {
      if ((*it)["id"] == e.id) {
        lost.erase(it);
        break;
      }
    }
    recovery_["recovered"].push_back({{"id", e.id},
                                      {"was", std::string(state_name(e.state))},
                                      {"state", std::string(state_name(sb->state))},
                                      {"detail", how}});
    metrics_.set_registry_recovery(recovery_["recovered"].size(), lost.size());
  }
}

void SandboxService::recover(const RegistryDocument& doc) {
  const bool same_boot = !doc.boot_id.empty() && doc.boot_id == boot_id_;
  registry_same_boot_ = same_boot;
  if (!doc.sandboxes.empty()) {
    // Kept as it was: what this start did not take back stays readable there.
    std::error_code ec;
    fs::copy_file(registry_file_->path(), registry_file_->path() + ".previous",
                  fs::copy_options::overwrite_existing, ec);
  }
  json recovered = json::array();
  json lost = json::array();
  for (const RegistryEntry& e : doc.sandboxes) {
    std::string how;
    std::string why;
    std::shared_ptr<Sandbox> sb = recover_entry(e, same_boot, &how, &why);
    if (sb) {
      std::lock_guard lock(mu_);
      auto added = add_locked(sb);
      if (added.ok()) {
        spdlog::info("registry: sandbox {} recovered ({} when memsnapd stopped): {}", e.id,
                     state_name(e.state), how);
        recovered.push_back({{"id", e.id},
                             {"was", std::string(state_name(e.state))},
                             {"state", std::string(state_name(sb->state))},
                             {"detail", how}});
        continue;
      }
      why = added.error().message;
    }
    spdlog::error(
        "registry: sandbox {} ({} when memsnapd stopped) NOT recovered: {}; kept in "
        "the registry as it was",
        e.id, state_name(e.state), why);
    lost.push_back({{"id", e.id}, {"was", std::string(state_name(e.state))}, {"reason", why}});
    std::lock_guard lock(mu_);
    unrecovered_.push_back(e);
  }
  if (!doc.sandboxes.empty()) {
    spdlog::info("registry: {} of {} sandboxes recovered from {}", recovered.size(),
                 doc.sandboxes.size(), registry_file_->path());
  }
  metrics_.set_registry_recovery(recovered.size(), lost.size());
  recovery_ = {{"file", registry_file_->path()},
               {"recovered", std::move(recovered)},
               {"not_recovered", std::move(lost)}};
  {
    std::lock_guard lock(mu_);
    registry_changed_locked();  // written now, in this memsnapd's words
  }
  persist_registry();
}

std::shared_ptr<Sandbox> SandboxService::readopt_running(const RegistryEntry& e,
                                                         std::vector<std::string> chain,
                                                         std::shared_ptr<Sandbox> sb,
                                                         std::string* how, std::string* why) {
  const Caller self{};  // root's rights: the registration was checked when it was made
  // Still the owner's process (root's registrations may name any process).
  if (e.owner_uid != 0) {
    if (Status s = check_process_owner(e.vmm_pid, e.owner_uid); !s.ok()) {
      *why = "its VMM (pid " + std::to_string(e.vmm_pid) + ") is no longer uid " +
             std::to_string(e.owner_uid) + "'s: " + s.error().message;
      return nullptr;
    }
  }
  sb->vmm_pid = e.vmm_pid;
  const json body = {{"vmm_pid", static_cast<std::uint64_t>(e.vmm_pid)},
                     {"regions", regions_json(e.regions)},
                     {"guest_size", e.guest_size}};
  if (Status s = register_running(self, body, *sb); !s.ok()) {
    *why = "its VMM (pid " + std::to_string(e.vmm_pid) +
           ") runs, but cannot be taken back: " + s.error().message;
    return nullptr;
  }
  if (sb->vmm_start_time != e.vmm_start_time) {
    *why = "its VMM (pid " + std::to_string(e.vmm_pid) + ") ended while it was taken back";
    return nullptr;
  }
  sb->owner_uid = e.owner_uid;
  sb->chain = std::move(chain);
  sb->strategy = e.strategy;
  // Its memfd, if its memory is one: taken back from its mappings (memsnapd held it before).
  // Without it a pause can only read the VMM's address space, and refuses a shared mapping.
  std::string memfd_note = "without its memfd";
  if (auto memfd = take_mapped_memfd(e.vmm_pid, e.regions); !memfd.ok()) {
    memfd_note += " (" + memfd.error().message + ")";
  } else if (Status s = check_guest_memfd(memfd->get(), sb->guest_size); !s.ok()) {
    memfd_note += " (" + s.error().message + ")";
  } else {
    sb->vmm_memfd = std::move(*memfd);
    sb->attributes.has_memfd = true;
    memfd_note = "its memfd taken back from its mappings";
  }
  *how = "running: its VMM (pid " + std::to_string(e.vmm_pid) +
         ") ran on; memsnapd neither serves nor tracks its memory any more, so its next pause "
         "exports every populated page; " +
         memfd_note;
  return sb;
}

std::shared_ptr<Sandbox> SandboxService::recover_entry(const RegistryEntry& e, bool same_boot,
                                                       std::string* how, std::string* why) {
  auto sb = std::make_shared<Sandbox>();
  sb->id = e.id;
  sb->attributes.id = e.id;
  if (!valid_id(e.id)) {
    *why = "not a valid sandbox id";
    return nullptr;
  }
  if (Status s = parse_attributes(e.attributes, sb->attributes); !s.ok()) {
    *why = s.error().message;
    return nullptr;
  }
  // Its chain: the committed snapshots, and a handover's snapshot once its export committed it
  // (the export process finishes without memsnapd).
  std::vector<std::string> chain = e.chain;
  bool export_committed = false;
  if (!e.export_output.empty()) {
    auto out =
        SnapshotReader::open(e.export_output, Verify::kHeaderAndMap, settings().reader_limits);
    if (!out.ok()) {
      *why = "its pause was answered at handover and its export had not committed " +
             e.export_output + " (" + out.error().message +
             "); the export goes on without memsnapd: once the file exists, register the "
             "sandbox with its snapshots";
      return nullptr;
    }
    chain = e.export_chain;
    chain.push_back(e.export_output);
    export_committed = true;
  }
  // Its VMM, if it is the very process memsnapd knew: same boot, pid and start time.
  bool vmm_alive = false;
  if (same_boot && e.vmm_pid > 0) {
    const auto started = process_start_time(e.vmm_pid);
    vmm_alive = started.ok() && started.value() == e.vmm_start_time;
  }
  if (e.state == SandboxState::kRunning && vmm_alive) {
    // A running sandbox's VMM runs: stopped, a pause of it was under way (and may have released
    // memory), which is for a person to look at, not for a restart to take back as running.
    if (const auto st = process_stat(e.vmm_pid);
        st.ok() && (st.value().state == 'T' || st.value().state == 't')) {
      *why = "its VMM (pid " + std::to_string(e.vmm_pid) +
             ") is stopped, as by a pause that never finished: left as it is";
      return nullptr;
    }
    return readopt_running(e, std::move(chain), std::move(sb), how, why);
  }
  if (e.state == SandboxState::kPausing || e.state == SandboxState::kFailed) {
    *why =
        std::string("a sandbox ") +
        (e.state == SandboxState::kPausing ? "whose pause was never answered" : "that had failed") +
        " is not taken back: its VMM and snapshots are as they were; register it again";
    return nullptr;
  }
  if (chain.empty()) {
    *why = "it has no snapshot, and its VMM " +
           (e.vmm_pid > 0 ? "(pid " + std::to_string(e.vmm_pid) + ") is gone" : "is unknown");
    return nullptr;
  }
  // The strategy the newest snapshot records; the registry's is the one before a handover whose
  // export committed since (and the only answer for a format 1 chain).
  const json body = {{"snapshots", chain}, {"strategy", export_committed ? "" : e.strategy}};
  const Caller self{};  // root's rights: the registration was checked when it was made
  if (Status s = register_chain(self, body, *sb); !s.ok()) {
    *why = s.error().message;
    return nullptr;
  }
  sb->owner_uid = e.owner_uid;
  std::string vmm_note = "no VMM";
  if (vmm_alive) {
    // The VMM a pause left stopped: pinned again, so that DELETE (or the next stop) ends it --
    // if it is still its owner's.
    if (auto pidfd = open_pidfd(e.vmm_pid);
        pidfd.ok() && start_time_of(e.vmm_pid) == e.vmm_start_time &&
        (e.owner_uid == 0 || check_process_owner(e.vmm_pid, e.owner_uid).ok())) {
      sb->vmm_pid = e.vmm_pid;
      sb->vmm_pidfd = std::move(*pidfd);
      sb->vmm_start_time = e.vmm_start_time;
      sb->regions = e.regions;
      vmm_note = "its stopped VMM (pid " + std::to_string(e.vmm_pid) + ") pinned again";
    }
  } else if (e.vmm_pid > 0) {
    vmm_note = "its VMM (pid " + std::to_string(e.vmm_pid) + ") is gone";
  }
  *how = "paused at " + chain.back() + " (" + std::to_string(chain.size()) + " snapshot" +
         (chain.size() == 1 ? "" : "s") + ", strategy " + sb->strategy + "; " + vmm_note +
         (e.state == SandboxState::kRunning || e.state == SandboxState::kResuming
              ? "; what the guest did since that snapshot is lost"
              : "") +
         ")";
  return sb;
}

SandboxService::VmmRelease SandboxService::release_vmm(Sandbox& sb, SandboxState state,
                                                       bool leave_running) {
  if (sb.session) {
    if (leave_running && state == SandboxState::kRunning &&
        sb.session->stop_leaving_vmm_running()) {
      return VmmRelease::kLeftRunning;
    }
    sb.session->stop();
    return sb.session->vmm_ended() ? VmmRelease::kEnded : VmmRelease::kNone;
  }
  if (!vmm_left_stopped(state) || sb.vmm_pidfd.get() < 0 || !pidfd_alive(sb.vmm_pidfd.get())) {
    return VmmRelease::kNone;
  }
  // The VMM memsnapd stopped for the pause, never resumed by it. Through the pidfd taken at
  // registration: never a successor with the same pid.
  if (Status s = pidfd_signal(sb.vmm_pidfd.get(), SIGKILL); !s.ok()) {
    spdlog::warn("sandbox {}: its stopped VMM (pid {}) could not be ended: {}", sb.id, sb.vmm_pid,
                 s.error().to_string());
    return VmmRelease::kNotEnded;
  }
  return VmmRelease::kEnded;
}

json SandboxService::health() const {
  std::lock_guard lock(mu_);
  json plugins = json::array();
  for (const auto& p : registry_.plugins()) {
    plugins.push_back({{"name", p.name}, {"status", p.loaded() ? "loaded" : "refused"}});
  }
  json flags = nullptr;
  if (flags_) {
    const auto stats = flags_->stats();
    flags = {{"path", flags_->path()},
             {"generation", stats.generation},
             {"reloads", stats.reloads_ok},
             {"reloads_unchanged", stats.reloads_unchanged},
             {"reloads_failed", stats.reloads_failed},
             {"last_error", stats.last_error}};
  }
  return {{"status", draining_ ? "draining" : "ok"},
          {"sandboxes", sandboxes_.size()},
          {"pauses_in_flight", pauses_in_flight_},
          {"resumes_in_flight", resumes_in_flight_},
          {"snapshot_dir", snapshot_dir_},
          {"handshake_dir", handshake_dir_},
          {"plugins", plugins},
          {"flags", flags},
          {"registry", registry_health()}};
}

json SandboxService::registry_health() const {
  if (!registry_file_) return nullptr;
  json out = recovery_;
  out["written"] = !registry_failed_.load();
  return out;
}

bool SandboxService::drain(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  draining_ = true;
  changed_.notify_all();
  auto busy = [&] {
    return std::any_of(sandboxes_.begin(), sandboxes_.end(), [](const auto& kv) {
      return is_owned(kv.second->state);
    });
  };
  return changed_.wait_for(lock, timeout, [&] { return !busy(); });
}

}  // namespace memsnap::daemon
