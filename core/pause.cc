#include "core/pause.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <optional>

#include <spdlog/spdlog.h>

#include "core/base/file_io.h"
#include "core/dirty_set.h"
#include "core/phase_clock.h"
#include "core/snapshot/snapshot_reader.h"
#include "core/snapshot/snapshot_writer.h"
#include "core/strategy_policy/strategy_policy.h"
#include "core/vmm_process.h"

namespace memsnap {
namespace {

// Why info's strategy cannot run on this request, or empty if it can; *cause says which
// prerequisite is missing (StrategyPolicy::cannot_serve).
std::string missing_prerequisite(const PluginInfo& info, const PauseRequest& req,
                                 FallbackCause* cause = nullptr) {
  const FallbackCause missing = StrategyPolicy::of(info).cannot_serve(
      {.has_memfd = req.memfd >= 0, .has_pid = req.pid > 0 && !req.regions.empty()});
  if (cause != nullptr) *cause = missing;
  if (missing == FallbackCause::kMissingMemfd) {
    return "strategy " + info.name + " needs the memfd that backs guest memory, and none was given";
  }
  if (missing == FallbackCause::kMissingPid) {
    return "strategy " + info.name +
           " needs the VMM pid and its guest regions, and they were not given";
  }
  return {};
}

// True when a VMM process runs on this pause's memory afterwards: there is one (pid), and the
// pipeline will continue it (freeze without stay_frozen), or nobody stopped it at all.
bool vmm_runs_after(const PauseRequest& req) { return req.pid > 0 && !req.stay_frozen; }

// Why info's strategy must not run on this request although it could: it releases the guest's
// memory as it exports it, and the VMM would run on (on holes that read as zeros). Empty if fine.
std::string unsafe_for(const PluginInfo& info, const PauseRequest& req) {
  if (!StrategyPolicy::of(info).vmm_must_stay_stopped() || !vmm_runs_after(req)) return {};
  return "strategy " + info.name +
         " releases the guest's memory as it exports it, so the VMM must stay stopped after the "
         "pause (freeze with stay_frozen, API after \"stop\", CLI --stop), and this pause would " +
         (req.freeze ? "continue it" : "leave it running");
}

// The fallback strategy, when it is loaded and can run this request; else kPluginNotLoaded or
// kUnsupported saying why not. Used both when the strategy asked for cannot start and when it
// failed half way.
Result<const PluginInfo*> usable_fallback(const PluginRegistry& registry, const PauseRequest& req) {
  const PluginInfo* fallback = registry.find(req.fallback_strategy);
  if (fallback == nullptr) {
    return make_error(Errc::kPluginNotLoaded,
                      "the fallback strategy " + req.fallback_strategy + " is not loaded");
  }
  if (auto why = missing_prerequisite(*fallback, req); !why.empty()) {
    return make_error(Errc::kUnsupported, "the fallback cannot run: " + why);
  }
  if (auto why = unsafe_for(*fallback, req); !why.empty()) {
    return make_error(Errc::kInvalidArgument, "the fallback cannot run: " + why);
  }
  return fallback;
}

Errc errc_of(plugin::StatusCode code) {
  switch (code) {
    case plugin::StatusCode::kProcessGone:
      return Errc::kProcessGone;
    case plugin::StatusCode::kBadAddress:
      return Errc::kBadAddress;
    case plugin::StatusCode::kInvalidArgument:
      return Errc::kInvalidArgument;
    case plugin::StatusCode::kUnsupported:
      return Errc::kUnsupported;
    default:
      return Errc::kExportFailed;
  }
}

// Puts released source memory back into the memfd from the unfinished snapshot.
Result<std::uint64_t> restore_released(SnapshotWriter& writer, int memfd) {
  std::vector<char> buf(1 << 20);
  std::uint64_t restored = 0;
  for (const auto& r : writer.released_ranges()) {
    for (std::uint64_t off = r.offset; off < r.offset + r.length;) {
      const std::uint64_t n = std::min<std::uint64_t>(buf.size(), r.offset + r.length - off);
      MEMSNAP_RETURN_IF_ERROR(writer.read_back(off, n, buf.data()));
      MEMSNAP_RETURN_IF_ERROR(
          io::pwrite_all(memfd, buf.data(), n, off, "writing released memory back"));
      off += n;
      restored += n;
    }
  }
  return restored;
}

// Called when a pause fails after the writer exists: nothing is committed, and memory the
// strategy released is put back. If it cannot be, the unfinished snapshot is kept on disk (it
// is then the only copy of those bytes), the error says where and *at_risk is set.
Error fail_pause(SnapshotWriter& writer, const PauseRequest& req, Error error,
                 bool* at_risk = nullptr) {
  if (at_risk != nullptr) *at_risk = false;
  if (writer.released_ranges().empty()) {
    writer.abort();
    return error;
  }
  auto restored = restore_released(writer, req.memfd);
  if (restored.ok()) {
    spdlog::warn("pause failed after releasing memory; restored {} bytes into the memfd",
                 *restored);
    error.message += " (the " + std::to_string(*restored) +
                     " bytes already released were written back into the memfd)";
    writer.abort();
  } else {
    if (at_risk != nullptr) *at_risk = true;
    error.code = Errc::kDataAtRisk;
    const std::string kept = writer.keep_temp_file();
    spdlog::critical(
        "pause failed and released memory could not be restored: {}; its only copy "
        "is in {}",
        restored.error().to_string(), kept);
    error.message += "; DATA AT RISK: released memory could not be written back (" +
                     restored.error().to_string() + "); its only copy is kept in " + kept;
  }
  return error;
}

// A failed pause continues a VMM it froze (~Freezer) -- unless the error says guest memory was
// released and could not be put back: a guest running on those holes would read zeros where its
// data was, and write over what could still be recovered. Such a VMM stays stopped.
Error keep_stopped_if_at_risk(std::optional<Freezer>& frozen, Error error) {
  if (error.code == Errc::kDataAtRisk && frozen) {
    frozen->keep_stopped();
    error.message += "; the VMM is left stopped";
  }
  return error;
}

// A new open file description of the same memfd. Strategies and the dirty-set scan move the file
// position with lseek(SEEK_DATA/SEEK_HOLE); on the caller's descriptor, which may share its
// description with the VMM's own (pidfd_getfd), that would move the VMM's position too. It has
// the access mode fd has, never more: a read-only fd stays read-only (a strategy that writes or
// punches then fails with EBADF instead of writing to a file the VMM could only read).
Result<int> reopen_privately(int fd) {
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) {
    return make_error(Errc::kIoError, "F_GETFL on the memfd: " + std::string(std::strerror(errno)),
                      errno);
  }
  const int copy = ::open(path.c_str(), (flags & O_ACCMODE) | O_CLOEXEC);
  if (copy < 0) {
    return make_error(Errc::kIoError,
                      "reopening the memfd through " + path + ": " + std::strerror(errno), errno);
  }
  return copy;
}

Result<std::uint64_t> derive_guest_size(const PauseRequest& req) {
  if (req.guest_size != 0) return req.guest_size;
  if (req.memfd >= 0) {
    struct stat st {};
    if (::fstat(req.memfd, &st) != 0) {
      return make_error(Errc::kIoError, std::string("fstat on the memfd: ") + std::strerror(errno),
                        errno);
    }
    return static_cast<std::uint64_t>(st.st_size);
  }
  std::uint64_t end = 0;
  for (const auto& r : req.regions) end = std::max(end, r.guest_offset + r.size);
  return end;
}

// The writer as the strategy sees it when the caller watches progress: each write() that the
// writer accepts adds its bytes to *done (one relaxed add per call, nothing per byte).
class CountingSink final : public plugin::BlockSink {
 public:
  CountingSink(plugin::BlockSink& inner, std::atomic<std::uint64_t>& done)
      : inner_(inner), done_(done) {}
  plugin::Status write(const plugin::Chunk* chunks, std::size_t count) noexcept override {
    plugin::Status s = inner_.write(chunks, count);
    if (s.ok()) {
      std::uint64_t bytes = 0;
      for (std::size_t i = 0; i < count; ++i) bytes += chunks[i].length;
      done_.fetch_add(bytes, std::memory_order_relaxed);
    }
    return s;
  }
  plugin::Status make_durable() noexcept override { return inner_.make_durable(); }
  void released(std::uint64_t guest_offset, std::uint64_t length) noexcept override {
    inner_.released(guest_offset, length);
  }

 private:
  plugin::BlockSink& inner_;
  std::atomic<std::uint64_t>& done_;
};

// The writer as the strategy sees it during a live export: each chunk is read into a buffer of
// its own first, then the blocks the guest changed since the pause are put back from the live
// image (LiveImage::patch, after the read), and only then handed on.
class LiveSink final : public plugin::BlockSink {
 public:
  LiveSink(plugin::BlockSink& inner, const LiveImage& image) : inner_(inner), image_(image) {}
  plugin::Status write(const plugin::Chunk* chunks, std::size_t count) noexcept override {
    constexpr std::uint64_t kPiece = 4u << 20;  // a multiple of every block size
    for (std::size_t i = 0; i < count; ++i) {
      const auto* data = static_cast<const std::uint8_t*>(chunks[i].data);
      for (std::uint64_t off = 0; off < chunks[i].length; off += kPiece) {
        const std::uint64_t n = std::min(kPiece, chunks[i].length - off);
        if (buf_.size() < n) buf_.resize(n);
        std::memcpy(buf_.data(), data + off, n);
        if (Status s = image_.patch(chunks[i].guest_offset + off, buf_.data(), n); !s.ok()) {
          return plugin::Status::Error(plugin::StatusCode::kSinkError, s.error().sys_errno, "%s",
                                       s.error().message.c_str());
        }
        const plugin::Chunk piece{chunks[i].guest_offset + off, buf_.data(), n};
        plugin::Status w = inner_.write(&piece, 1);
        if (!w.ok()) return w;
      }
    }
    return plugin::Status::Ok();
  }
  plugin::Status make_durable() noexcept override { return inner_.make_durable(); }
  void released(std::uint64_t guest_offset, std::uint64_t length) noexcept override {
    inner_.released(guest_offset, length);
  }

 private:
  plugin::BlockSink& inner_;
  const LiveImage& image_;
  std::vector<std::uint8_t> buf_;
};

// params with the origin record of a snapshot the strategy `name` writes: what a resume needs to
// know of it (the strategy, and its capabilities as the plugin declared them) and which memsnap
// wrote it.
SnapshotParams with_origin(const SnapshotParams& params, const PluginRegistry& registry,
                           const std::string& name) {
  SnapshotParams p = params;
  p.origin = SnapshotOrigin();
  // Plugin names are [a-z0-9_]+ (the registry refuses others), so the strategy is always
  // recorded; a plugin version that is not short printable text is left out.
  (void)p.origin.set(kOriginStrategy, name);
  if (const PluginInfo* info = registry.find(name); info != nullptr) {
    (void)p.origin.set(kOriginStrategyVersion, info->version);
    (void)p.origin.set(kOriginStrategyCapabilities, capability_list(info->capabilities));
  }
  (void)p.origin.set(kOriginMemsnapVersion, MEMSNAP_CORE_VERSION);
  return p;
}

// One export of `dirty` with one strategy into a new snapshot writer at req.out_path. On failure
// nothing is committed and the writer is gone; *strategy_at_fault is set when the strategy itself
// failed and the source is whole again (any memory it released was written back), so that another
// strategy could still succeed. It stays false when the snapshot sink refused the data (a disk
// problem the next strategy would hit too), when the VMM is gone, and when released memory could
// not be restored (then the unfinished snapshot is the only copy and must stay where it is).
Result<std::unique_ptr<SnapshotWriter>> export_once(
    plugin::Strategy& strategy, const std::string& name, const PauseRequest& req,
    const SnapshotParams& params, const std::vector<plugin::ByteRange>& dirty,
    const LiveImage* live, plugin::ExportStats& stats, bool* strategy_at_fault) {
  *strategy_at_fault = false;
  auto writer = SnapshotWriter::create(req.out_path, params, dirty);
  if (!writer.ok()) return std::move(writer).error();
  plugin::ExportRequest export_request;
  export_request.pid = req.pid;
  export_request.regions = req.regions.data();
  export_request.region_count = req.regions.size();
  export_request.memfd = req.memfd;
  export_request.guest_size = req.guest_size;
  export_request.block_size = req.block_size;
  export_request.ranges = dirty.data();
  export_request.range_count = dirty.size();
  plugin::BlockSink* sink = writer->get();
  std::optional<CountingSink> counting;
  if (req.progress_bytes != nullptr) {
    req.progress_bytes->store(0, std::memory_order_relaxed);
    sink = &counting.emplace(*sink, *req.progress_bytes);
  }
  std::optional<LiveSink> live_sink;
  if (live != nullptr) sink = &live_sink.emplace(*sink, *live);
  const plugin::Status exported = strategy.export_ranges(export_request, *sink, stats);
  if (exported.ok()) return writer;
  bool at_risk = false;
  Error error = fail_pause(
      **writer, req,
      make_error(errc_of(exported.code), "strategy " + name + " failed: " + exported.message,
                 exported.sys_errno),
      &at_risk);
  *strategy_at_fault = !at_risk && exported.code != plugin::StatusCode::kSinkError &&
                       exported.code != plugin::StatusCode::kProcessGone;
  return error;
}

}  // namespace

const PhaseTiming* PauseReport::phase(std::string_view name) const {
  for (const auto& p : phases) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

PhaseTiming* PauseReport::phase_mutable(std::string_view name) {
  return const_cast<PhaseTiming*>(std::as_const(*this).phase(name));
}

Result<PauseReport> pause(const PluginRegistry& registry, const PauseRequest& request) {
  PauseRequest req = request;
  PauseReport report;
  report.requested_strategy = req.strategy;
  const auto wall_start = std::chrono::steady_clock::now();
  const double cpu_start = thread_cpu_seconds();
  PhaseClock clock(report.phases);

  clock.start("resolve");
  if (req.out_path.empty()) return make_error(Errc::kInvalidArgument, "no output path given");
  // Refused before anything is frozen or exported; the commit refuses again (RENAME_NOREPLACE)
  // if the name is taken meanwhile.
  if (struct stat st {}; ::lstat(req.out_path.c_str(), &st) == 0) {
    return make_error(Errc::kAlreadyExists,
                      "\"" + req.out_path + "\" exists: snapshots are never overwritten");
  }
  if (req.block_size != 4096 && req.block_size != (2u << 20)) {
    return make_error(Errc::kInvalidArgument,
                      "block size must be 4096 or 2097152, not " + std::to_string(req.block_size));
  }
  if (req.memfd < 0 && req.regions.empty()) {
    return make_error(
        Errc::kInvalidArgument,
        "nothing to pause: neither the guest memfd nor the VMM's guest regions were given");
  }
  MEMSNAP_ASSIGN_OR_RETURN(auto guest_size, derive_guest_size(req));
  req.guest_size = guest_size;
  if (req.guest_size == 0 || req.guest_size % req.block_size != 0) {
    return make_error(Errc::kInvalidArgument, "guest size " + std::to_string(req.guest_size) +
                                                  " is not a positive multiple of the block size");
  }
  MEMSNAP_RETURN_IF_ERROR(validate_regions(req.regions, req.guest_size));
  if (req.memfd >= 0) {
    MEMSNAP_ASSIGN_OR_RETURN(auto own, reopen_privately(req.memfd));
    req.memfd = own;
  }
  const io::UniqueFd own_memfd(req.memfd);

  // Strategy, with an explicit fallback only where allowed.
  std::string problem;
  FallbackCause cause = FallbackCause::kPluginNotLoaded;
  const PluginInfo* info = registry.find(req.strategy);
  if (info == nullptr) {
    problem = "strategy " + req.strategy + " is not loaded";
    for (const auto& p : registry.plugins()) {
      if (p.name == req.strategy) problem += " (" + p.reason + ")";
    }
  } else {
    problem = missing_prerequisite(*info, req, &cause);
  }
  auto options = req.strategy_options;
  if (!problem.empty()) {
    if (!req.allow_fallback || req.fallback_strategy == req.strategy) {
      return make_error(info == nullptr ? Errc::kPluginNotLoaded : Errc::kUnsupported,
                        problem + (req.allow_fallback ? "" : "; fallback is not allowed"));
    }
    auto fallback = usable_fallback(registry, req);
    if (!fallback.ok()) {
      return make_error(fallback.error().code, problem + "; and " + fallback.error().message);
    }
    spdlog::warn("falling back from {} to {}: {}", req.strategy, (*fallback)->name, problem);
    report.fallback_reason = problem;
    report.fallback = cause;
    info = *fallback;
    options.clear();  // options were meant for the strategy asked for
  }
  if (auto why = unsafe_for(*info, req); !why.empty()) {
    // Never a silent downgrade: the caller asked for the VMM to run on, and this strategy would
    // take its memory away. Refused before anything is touched.
    return make_error(Errc::kInvalidArgument, why);
  }
  report.strategy = info->name;
  MEMSNAP_ASSIGN_OR_RETURN(auto strategy, registry.create(info->name, options));

  SnapshotParams params;
  params.block_size = req.block_size;
  params.guest_size = req.guest_size;
  params.generation = 1;
  params.sync_on_commit = req.sync;
  params.data_write = req.data_write;
  // sync_on_make_durable stays off: before a release, the bytes need to survive this process,
  // not the host. Released memory was RAM, as volatile as the page cache that then holds its
  // copy, so an fdatasync per released chunk (hole_punch: every 2 MiB) would add a disk flush to
  // every chunk and protect nothing more; the snapshot is synced once, at commit.
  if (!req.parent_path.empty()) {
    MEMSNAP_ASSIGN_OR_RETURN(
        auto parent,
        SnapshotReader::open(req.parent_path, Verify::kHeaderAndMap, req.reader_limits));
    const auto& h = parent->header();
    if (h.block_size != req.block_size || h.guest_size != req.guest_size) {
      return make_error(
          Errc::kSnapshotChainMismatch,
          "parent " + req.parent_path + " has block size " + std::to_string(h.block_size) +
              " and guest size " + std::to_string(h.guest_size) + "; this pause has " +
              std::to_string(req.block_size) + " and " + std::to_string(req.guest_size));
    }
    params.generation = h.generation + 1;
    params.parent_id = h.snapshot_id;
  }

  if (req.live && (!req.freeze || req.stay_frozen || req.pid <= 0 || !req.live->begin)) {
    return make_error(Errc::kInvalidArgument,
                      "a live pause needs a VMM to freeze and to continue after the pause");
  }
  if (req.live && req.live->prepare) {
    clock.start("prepare_live");
    MEMSNAP_RETURN_IF_ERROR(req.live->prepare());
  }
  std::optional<Freezer> frozen;
  const auto frozen_at = std::chrono::steady_clock::now();
  if (req.freeze && req.pid > 0) {
    clock.start("freeze");
    MEMSNAP_ASSIGN_OR_RETURN(auto f, Freezer::freeze(req.pid, req.pidfd));
    frozen.emplace(std::move(f));
  }

  clock.start("dirty_set");
  Result<std::vector<plugin::ByteRange>> dirty = std::vector<plugin::ByteRange>{};
  if (req.dirty) {
    report.dirty_set_source = "given by the caller";
    dirty = normalize_ranges(*req.dirty, req.guest_size, req.block_size);
  } else if (req.dirty_source) {
    auto ranges = req.dirty_source(&report.dirty_set_source);
    dirty = ranges.ok() ? normalize_ranges(std::move(*ranges), req.guest_size, req.block_size)
                        : std::move(ranges);
  } else if (req.memfd >= 0) {
    report.dirty_set_source = "every populated page of the memfd (SEEK_DATA)";
    dirty = populated_ranges_of_memfd(req.memfd, req.guest_size, req.block_size);
  } else {
    report.dirty_set_source = "every populated page of the process (PAGEMAP_SCAN)";
    dirty = populated_ranges_of_process(req.pid, req.regions, req.block_size);
  }
  if (!dirty.ok()) return std::move(dirty).error();
  report.dirty_bytes = total_bytes(*dirty);
  if (req.total_bytes != nullptr) {
    req.total_bytes->store(report.dirty_bytes, std::memory_order_relaxed);
  }

  // Live: protect the dirty set, then let the guest run during the export.
  std::shared_ptr<LiveImage> live;
  struct EndLive {
    const PauseRequest& req;
    std::shared_ptr<LiveImage>& image;
    bool done = false;
    void operator()() {
      if (!image || done) return;
      done = true;
      image->close();
      if (req.live->end) req.live->end();
    }
    ~EndLive() { (*this)(); }
  } end_live{req, live};
  if (req.live) {
    clock.start("arm_live");
    MEMSNAP_ASSIGN_OR_RETURN(live, req.live->begin(*dirty));
    report.live = true;
    clock.start("thaw");
    if (auto s = frozen->thaw(); !s.ok()) return std::move(s).error();
    frozen.reset();
    report.stopped_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - frozen_at).count();
  }

  clock.start("export");
  bool strategy_at_fault = false;
  auto writer =
      export_once(*strategy, report.strategy, req, with_origin(params, registry, report.strategy),
                  *dirty, live.get(), report.export_stats, &strategy_at_fault);
  if (!writer.ok() && strategy_at_fault && req.allow_fallback && report.fallback_reason.empty() &&
      req.fallback_strategy != report.strategy) {
    // The strategy started and failed half way. Its unfinished snapshot is gone and any memory it
    // released is back in the memfd (export_once made sure of both, or it would not blame the
    // strategy), so the source is whole again: the fallback exports the same dirty set from it.
    const Error first = std::move(writer).error();
    auto fallback = usable_fallback(registry, req);
    auto second = fallback.ok() ? registry.create((*fallback)->name, {})
                                : Result<StrategyHandle>(fallback.error());
    if (!second.ok()) {
      Error e = first;
      e.message += "; no fallback: " + second.error().message;
      return e;
    }
    spdlog::warn("strategy {} failed half way ({}); falling back to {}", report.strategy,
                 first.to_string(), (*fallback)->name);
    report.fallback_reason = "strategy " + report.strategy + " failed half way: " + first.message;
    report.fallback = FallbackCause::kStrategyFailed;
    report.strategy = (*fallback)->name;
    report.export_stats = {};
    writer =
        export_once(**second, report.strategy, req, with_origin(params, registry, report.strategy),
                    *dirty, live.get(), report.export_stats, &strategy_at_fault);
    if (!writer.ok()) {
      Error e = std::move(writer).error();
      e.message += " (after strategy " + report.requested_strategy +
                   " had failed half way: " + first.message + ")";
      return keep_stopped_if_at_risk(frozen, std::move(e));
    }
  }
  if (!writer.ok()) return keep_stopped_if_at_risk(frozen, std::move(writer).error());
  if (live) {
    // Every block is read: later writes need no copy. A copy that failed, or a discard of memory
    // the export still needed, means the file is not the pause-instant image: nothing commits.
    end_live();
    report.live_copies = live->copies();
    if (Status broken = live->broken(); !broken.ok()) {
      Error e = std::move(broken).error();
      e.message = "live pause: " + e.message + "; nothing was committed";
      return fail_pause(**writer, req, std::move(e));
    }
    live.reset();
  }

  clock.start("commit");
  if (auto s = (*writer)->commit(); !s.ok()) {
    return keep_stopped_if_at_risk(frozen, fail_pause(**writer, req, std::move(s).error()));
  }

  if (frozen && req.stay_frozen) {
    frozen->keep_stopped();
  } else if (frozen) {
    clock.start("thaw");
    if (auto s = frozen->thaw(); !s.ok()) spdlog::warn("{}", s.error().to_string());
  }
  clock.stop();

  // The writer hashes on a helper thread while it writes: count that CPU as the pause's too.
  const double helper_cpu = (*writer)->helper_cpu_seconds();
  if (PhaseTiming* exported_phase = report.phase_mutable("export"))
    exported_phase->cpu_seconds += helper_cpu;
  const auto& stats = (*writer)->stats();
  report.snapshot_path = req.out_path;
  report.snapshot_id = to_hex((*writer)->snapshot_id());
  report.parent_id = is_zero_id(params.parent_id) ? "" : to_hex(params.parent_id);
  report.generation = params.generation;
  report.guest_size = req.guest_size;
  report.block_size = req.block_size;
  report.data_blocks = stats.data_blocks;
  report.zero_blocks = stats.zero_blocks;
  report.parent_blocks = stats.parent_blocks;
  report.data_bytes = stats.data_bytes;
  report.data_write =
      data_write_name((*writer)->writes_direct() ? DataWrite::kDirect : DataWrite::kBuffered);
  report.data_write_fallback = (*writer)->direct_fallback();
  if (!report.data_write_fallback.empty()) {
    spdlog::warn("snapshot {}: writing its data buffered, not with O_DIRECT: {}", req.out_path,
                 report.data_write_fallback);
  }
  report.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  if (!report.live && req.freeze && req.pid > 0) {
    report.stopped_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - frozen_at).count();
  }
  report.cpu_seconds = thread_cpu_seconds() - cpu_start + helper_cpu;
  return report;
}

}  // namespace memsnap
