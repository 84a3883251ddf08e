// The pause export pipeline: one call takes a sandbox's guest memory out of its VMM into a
// committed snapshot file through a strategy plugin, and reports what happened.
//
//   resolve strategy (explicit fallback) -> freeze -> dirty set -> export -> commit -> thaw
//
// Every phase is timed the same way for every strategy (wall and thread CPU), so strategies are
// compared fairly. Nothing is committed unless every dirty byte reached the snapshot; if the
// strategy had already released source memory when a pause fails, those bytes are written back
// into the memfd from the unfinished snapshot before it is discarded.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/base/result.h"
#include "core/fallback/fallback.h"
#include "core/live_image.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/snapshot/snapshot_reader.h"
#include "core/snapshot/snapshot_writer.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap {

struct PauseRequest {
  // The source: a VMM pid with its guest regions, and/or the memfd that backs guest memory (not
  // owned; guest offset == memfd offset).
  pid_t pid = -1;
  // A pidfd of that process (not owned), when the caller pinned it earlier (memsnapd does at
  // registration): the freeze signals it, so a pid reused since can never be stopped or continued
  // in its place. -1: the freeze opens one itself.
  int pidfd = -1;
  std::vector<plugin::Region> regions;
  int memfd = -1;
  std::uint64_t guest_size = 0;  // 0: the memfd's size, or the end of the last region
  std::uint32_t block_size = 4096;
  // What the parent snapshot's header may claim (its guest size is checked before it is used).
  ReaderLimits reader_limits;

  // What to export; nullopt means everything populated (SEEK_DATA on the memfd, else
  // PAGEMAP_SCAN on the process).
  std::optional<std::vector<plugin::ByteRange>> dirty;
  // When set (and dirty is not), called in the dirty_set phase -- after the freeze, so no write
  // can slip between computing the set and exporting it -- e.g. a resume session's write
  // tracking. It describes its source in *how.
  std::function<Result<std::vector<plugin::ByteRange>>(std::string* how)> dirty_source;

  std::string strategy;
  std::vector<std::pair<std::string, std::string>> strategy_options;
  // When the strategy cannot run (not loaded, or its prerequisites are missing), or starts and
  // fails half way (the plugin returns an error; not when the disk refuses the snapshot or the
  // VMM is gone), use fallback_strategy instead -- only if allowed, and always reported in
  // PauseReport. After a failure half way the fallback exports the same dirty set into a fresh
  // snapshot, once the first attempt's file is gone and any memory it released is back.
  bool allow_fallback = false;
  std::string fallback_strategy = "process_vm_readv";

  std::string out_path;
  std::string parent_path;  // empty: a base snapshot; else the diff's parent
  bool freeze = false;      // SIGSTOP every thread of the pid for the export, SIGCONT after
  // With freeze: after a successful pause, leave the VMM stopped (a paused sandbox does not run;
  // the caller kills it). Its memory then still equals the snapshot, so a memfd kept from it
  // can serve a warm resume. Without freeze: the caller's word that it stopped the VMM itself
  // and keeps it stopped. A failed pause continues a VMM it froze, except when released memory
  // could not be put back (Errc::kDataAtRisk): then the VMM stays stopped.
  // A strategy that releases memory (hole_punch) runs only when no VMM runs on afterwards: with
  // a pid, stay_frozen must be set, else the pause is refused before anything is touched (also
  // when a flag or a fallback picked that strategy).
  bool stay_frozen = false;
  bool sync = true;  // fsync the snapshot and its directory at commit
  // How a synced snapshot's data reaches the disk (see DataWrite); ignored without sync.
  DataWrite data_write = DataWrite::kBuffered;

  // A live pause (pause mode "live"; needs freeze without stay_frozen): once the dirty set is
  // known, begin() makes sure the guest cannot change those blocks unnoticed (they are
  // write-protected, and copied into the returned image before a write goes through), and the
  // VMM is continued at once: it runs during the export, and the snapshot still holds its memory
  // as it was when it stopped. end() is called once the export is over, whatever its outcome.
  // prepare(), if set, runs before the freeze, while the guest still runs: it may protect what
  // the guest wrote so far, so that the stop only has to protect what it writes after that.
  struct Live {
    std::function<Status()> prepare;
    std::function<Result<std::shared_ptr<LiveImage>>(const std::vector<plugin::ByteRange>&)> begin;
    std::function<void()> end;
  };
  std::optional<Live> live;

  // Progress, for a caller watching the pause from another thread (the background exporter).
  // Not owned; each may be null. *total_bytes is stored once the dirty set is known (its bytes,
  // report.dirty_bytes); *progress_bytes is set to 0 when an export starts (again, for a
  // fallback's) and grows by the bytes the strategy hands to the snapshot, as it goes, so that it
  // ends equal to the dirty set's bytes when the pause succeeds. Both relaxed: figures to show,
  // not to synchronise on.
  std::atomic<std::uint64_t>* progress_bytes = nullptr;
  std::atomic<std::uint64_t>* total_bytes = nullptr;
};

struct PhaseTiming {
  std::string name;  // resolve, freeze, dirty_set, export, commit, thaw
  double wall_seconds = 0;
  double cpu_seconds = 0;  // CPU of the calling thread (user + system), plus the snapshot
                           // writer's hashing helper thread in "export"
};

struct PauseReport {
  std::string requested_strategy;
  std::string strategy;         // the one that ran
  std::string fallback_reason;  // empty when no fallback happened
  // Why the pipeline ran its fallback strategy instead of the one asked for (decided at
  // FallbackStage::kPipeline): kPluginNotLoaded, kMissingMemfd, kMissingPid (the strategy cannot
  // run this request) or kStrategyFailed (it ran, failed half way, and the fallback exported the
  // same dirty set). kNone when no fallback happened.
  FallbackCause fallback = FallbackCause::kNone;
  std::string snapshot_path;
  std::string snapshot_id;  // 32 hex digits
  std::string parent_id;    // empty for a base snapshot
  std::uint64_t generation = 0;
  std::uint64_t guest_size = 0;
  std::uint32_t block_size = 0;
  std::uint64_t dirty_bytes = 0;
  std::string dirty_set_source;  // given, dirty_source's description, or how it was found
  std::uint64_t data_blocks = 0;
  std::uint64_t zero_blocks = 0;
  std::uint64_t parent_blocks = 0;
  std::uint64_t data_bytes = 0;  // bytes of data in the snapshot file
  // How the data was written at the end ("buffered" or "direct"), and why a pause that asked for
  // direct writes fell back to buffered ones ("" if it did not).
  std::string data_write;
  std::string data_write_fallback;
  plugin::ExportStats export_stats;
  std::vector<PhaseTiming> phases;
  double wall_seconds = 0;
  double cpu_seconds = 0;
  // How long the VMM was stopped by this pause: from the freeze to the thaw (live), or to the end
  // of the pause when it stayed stopped throughout (0 without a freeze).
  double stopped_seconds = 0;
  bool live = false;              // ran live (PauseRequest::live)
  std::uint64_t live_copies = 0;  // live: blocks copied out before the guest wrote them

  const PhaseTiming* phase(std::string_view name) const;
  PhaseTiming* phase_mutable(std::string_view name);
};

// Runs a pause. Thread-safe as long as distinct calls use distinct outputs and sources.
Result<PauseReport> pause(const PluginRegistry& registry, const PauseRequest& request);

}  // namespace memsnap
