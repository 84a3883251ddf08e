// One sandbox, round and round: start a stand-in VMM, fill it, pause it into a snapshot, kill
// it, resume a new stand-in from the snapshot chain through the UFFD handshake, verify every
// page, dirty a share of the pages, pause a diff, kill, resume from the longer chain, verify...
// The CLI's `memsnap cycle`, the memory-integrity tests and the resume benchmark all run this
// one sequence, so what the tests prove is what the operator watches.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/resume.h"

namespace memsnap {

struct CycleOptions {
  std::string strategy;
  std::optional<ResumeMode> mode;  // default: what the strategy calls for
  std::uint64_t size = 256ULL << 20;
  std::string backing;  // anon or memfd; empty: memfd when the strategy needs one, else anon
  bool thp = false;     // MADV_HUGEPAGE on the first VMM's memory
  std::uint64_t seed = 1;
  double zero_fraction = 0.05;   // never-written pages of the first VMM
  double dirty_fraction = 0.10;  // dirtied between generations, random pages
  // Pages the guest discards between generations, like a balloon (after dirtying): they must
  // come back as zeros, never as older snapshot bytes.
  std::uint64_t discard_pages = 0;
  int generations = 2;  // snapshots taken (each followed by a resume and a verify)
  std::string dir;      // snapshots and sockets go here (must exist)
  bool sync = true;
  bool verify_checksums = true;
  bool track_writes = true;           // memsnap installs pages write-protected
  bool vmm_supports_wp_async = true;  // the resumed VMMs ask for UFFD_FEATURE_WP_ASYNC
  bool arm_tracking_before_ready = false;  // ResumeRequest::arm_tracking_before_ready
  // Dirty right after each resume, before the verify (which then checks the new bytes too): the
  // guest writes while memsnap may still be arming write tracking.
  bool dirty_first = false;
  // Called after generation g's snapshot is committed and its VMM killed, before the resume
  // (tests corrupt a snapshot here).
  std::function<void(int generation, const std::vector<std::string>& chain)> before_resume;
  // One line per step, for progress output.
  std::function<void(const std::string& line)> progress;
};

struct CycleGeneration {
  int generation = 0;
  PauseReport pause;
  ResumeReport resume;
  FaultStats faults;            // after the verify
  bool retained_memfd = false;  // the pause's memfd was kept for a warm resume
  std::uint64_t pages = 0;
  std::uint64_t mismatches = 0;
  std::string first_mismatch;  // the guest's description of the first bad page
  double verify_seconds = 0;   // touching and checking every page (faults included)
  // Guest memory the resumed VMM has mapped with 2 MiB pages after the verify touched every
  // page (huge_page_bytes): which resume modes give THP guests their huge pages back.
  std::uint64_t huge_bytes = 0;
};

struct CycleReport {
  std::string strategy;
  std::string backing;
  bool thp = false;
  bool thp_used = false;  // the first VMM really got huge pages (huge_page_bytes > 0)
  std::vector<std::string> chain;
  std::vector<CycleGeneration> generations;
  std::uint64_t total_mismatches() const;
};

// Runs the cycle. An error is returned only when a step could not run at all; mismatches are
// reported in the result.
Result<CycleReport> run_cycle(const PluginRegistry& registry, const CycleOptions& options);

}  // namespace memsnap
