// FaultServer: serves a VMM's guest memory from a snapshot chain through the VMM's userfaultfd,
// on one thread of its own, until stopped.
//
//   MISSING fault, DATA block   UFFDIO_COPY straight from a read-only mapping of the snapshot
//                               file that holds the block (no intermediate buffer)
//   MISSING fault, ZERO block   UFFDIO_ZEROPAGE, or UFFDIO_COPY of zeros when tracking writes
//   MINOR fault (memfd)         UFFDIO_CONTINUE: the page is already in the memfd
//   UFFD_EVENT_REMOVE           the VMM discarded the range: later faults there get zero pages,
//                               and the range is reported by discarded() (a later diff must
//                               store it as zero, not inherit it from the parent)
//   EEXIST                      the page is already there: wake the faulting thread
//   EAGAIN                      the address space was changing: retry (the kernel does not
//                               deliver the fault again)
//   ESRCH                       the VMM is gone: stop serving
//
// With a memfd to fill (cold memfd resume), the same thread also copies the chain into the
// VMM's memfd in the background, a chunk at a time between fault batches, skipping every block
// a fault has already served; the VMM then takes MINOR faults on filled pages, answered with
// UFFDIO_CONTINUE. Because the fill and the fault service run on one thread, the fill never
// overwrites a page the guest may already have written.
//
// With write_protect, pages are installed write-protected (UFFDIO_COPY_MODE_WP,
// UFFDIO_CONTINUE_MODE_WP) so that a userfaultfd in WP_ASYNC mode records which ones the guest
// writes afterwards (read back with PAGEMAP_SCAN); zero blocks are then copied in as zeros,
// write-protected too. A page installed without protection counts as written: an over-report,
// never a loss.
//
// A write to a protected page of a VMM whose userfaultfd reports write-protect faults (without
// WP_ASYNC) arrives as a WP fault: the server records the block as written (written()) and makes
// the page writable again (UFFDIO_WRITEPROTECT), which wakes the guest (EAGAIN: again after the
// next read). With write_faults the session then uses that record as its write tracking. During a
// live pause (set_live()) it first copies the block into the pause's LiveImage if the export still
// needs it, and does the same before installing a page there.
//
// Which ioctl answers a fault is decide_fault() (core/fault_decision.h), a pure function of the
// block's state, the fault and the modes. When the kernel refuses a mode (EINVAL for a
// write-protecting COPY or CONTINUE: the range is not registered for WP, or the kernel predates
// UFFDIO_CONTINUE_MODE_WP; EEXIST for UFFDIO_ZEROPAGE over a WP marker), the server turns that
// mode off for good, logs a warning, counts it in FaultStats and installs the page again.
// The ioctls go through UffdOps (core/uffd_ops.h), which tests replace to fail on purpose.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "core/base/file_io.h"
#include "core/base/result.h"
#include "core/fault_decision.h"
#include "core/live_image.h"
#include "core/snapshot/snapshot_chain.h"
#include "core/uffd_ops.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap {

struct FaultServerOptions {
  bool write_protect = false;  // install pages write-protected (WP_ASYNC write tracking)
  // The userfaultfd delivers write-protect faults (registered for WP without WP_ASYNC): record
  // and resolve them (synchronous write tracking, and live pauses).
  bool write_faults = false;
  int fill_memfd = -1;         // cold memfd: fill this (borrowed) memfd in the background
  std::uint64_t fill_chunk_bytes = 2 * 1024 * 1024;  // background fill step between fault batches
  // Background fill: also map every run it writes into the VMM (UFFDIO_CONTINUE over the run),
  // so the guest takes no fault there. Page-table work for every page, touched later or not
  // (~12 us a page on a paravirtualized host): for guests that will touch most of their memory.
  // A run the kernel refuses as a whole (the guest faulted a page of it meanwhile) is mapped page
  // by page; any other refusal turns it off for the session (logged).
  bool map_filled = false;
  // Called once, on the serving thread, when serving stops on an error (the one error() then
  // returns): the VMM's next fault would block forever, so the owner must end it. Not called
  // after stop() or when the VMM went away.
  std::function<void(const Error&)> on_error;
  // Tests only: called on the serving thread after each read() of messages, before they are
  // handled (to hold the thread there, as a loaded host may).
  std::function<void()> after_read_for_testing;
  // The userfaultfd ioctls; null: the real ones on uffd. Tests pass one that fails on purpose.
  std::shared_ptr<UffdOps> uffd_ops;
  // A pause's memory, held while its snapshot is still being exported (a resume before
  // durable): blocks inside `ranges` come from this memfd (guest offset == file offset) instead
  // of the chain, which gives the rest (the chain may then be null: no parent, the rest is
  // zero). Exactly what the snapshot being written will hold. The memfd is only mapped
  // read-only, and its holes are served as zeros without reading them. The mapping is let go
  // once a background fill is done.
  struct Overlay {
    int memfd = -1;  // borrowed until start() returns
    std::uint64_t guest_size = 0;
    std::uint64_t block_size = 0;
    std::vector<plugin::ByteRange> ranges;  // block-aligned, sorted, disjoint
    // The memfd's populated blocks (populated_ranges_of_memfd), found by the caller ahead of
    // time: a SEEK_DATA walk of a large memfd takes milliseconds, which start() must not.
    std::vector<plugin::ByteRange> populated;
  };
  Overlay overlay;
};

struct FaultStats {
  std::uint64_t faults = 0;  // page-fault messages handled
  std::uint64_t minor_faults = 0;
  std::uint64_t copies = 0;     // UFFDIO_COPY of snapshot bytes
  std::uint64_t zeropages = 0;  // zero blocks: UFFDIO_ZEROPAGE, or UFFDIO_COPY of zeros
  std::uint64_t continues = 0;  // UFFDIO_CONTINUE
  std::uint64_t eexist = 0;
  // Modes the kernel refused, turned off for good (each at most once per server, logged):
  std::uint64_t copy_wp_downgrades = 0;      // UFFDIO_COPY_MODE_WP: EINVAL
  std::uint64_t continue_wp_downgrades = 0;  // UFFDIO_CONTINUE_MODE_WP: EINVAL
  std::uint64_t zeropage_downgrades = 0;     // UFFDIO_ZEROPAGE: EEXIST; zeros copied instead
  std::uint64_t eagain_retries = 0;
  std::uint64_t remove_events = 0;
  std::uint64_t write_faults = 0;  // write-protect faults resolved (write_faults)
  std::uint64_t live_copies = 0;   // blocks copied out for a live pause before a write
  std::uint64_t removed_bytes = 0;
  std::uint64_t filled_bytes = 0;  // copied into the memfd by the background fill
  std::uint64_t mapped_ahead_bytes = 0;  // of those, mapped into the VMM by the fill (map_filled)
  bool fill_done = false;          // true at once when there is nothing to fill
  bool vmm_gone = false;           // ESRCH: the VMM exited while faults were served
  double service_seconds = 0;      // sum over faults of message read -> page installed
  double max_service_seconds = 0;
  // The same per fault, bucketed: latency_counts[i] faults took at most kLatencyBounds[i] (and
  // more than the bound before); the last element counts the rest. The bounds are those of
  // memsnapd's fault-latency histogram, so the daemon can hand the counts over as they are.
  static constexpr std::array<double, 13> kLatencyBounds = {
      1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2};
  std::array<std::uint64_t, kLatencyBounds.size() + 1> latency_counts{};
  double fill_seconds = 0;  // wall time from start to the end of the background fill
};

class FaultServer {
 public:
  // uffd is borrowed and must stay open until stop(); it is switched to non-blocking. regions
  // are the VMM's mappings of guest memory (host address, guest offset, size). chain may be null
  // only with options.overlay. Fails with
  // kInvalidArgument when regions do not fit the chain, kIoError when a snapshot cannot be
  // mapped or the thread cannot start.
  static Result<std::unique_ptr<FaultServer>> start(int uffd, std::vector<plugin::Region> regions,
                                                    std::shared_ptr<const SnapshotChain> chain,
                                                    FaultServerOptions options);
  ~FaultServer();
  FaultServer(const FaultServer&) = delete;
  FaultServer& operator=(const FaultServer&) = delete;

  // Stops the thread (idempotent). Faults that arrive later are not served: call it only once
  // the VMM is gone or its memory no longer needs memsnap.
  void stop();

  // Counters so far (the serving thread publishes per-fault counters once per batch of
  // messages). With settle, first waits (briefly) until the serving thread is between batches,
  // so every fault whose VMM thread has already been woken is counted.
  FaultStats stats(bool settle = false) const;
  // The first error that stopped serving (an unexpected ioctl failure); ok while all is well.
  // FaultServerOptions::on_error is told of it as soon as it happens.
  Status error() const;
  // Blocks until the background fill has finished (or serving stopped), at most timeout.
  Status wait_filled(std::chrono::milliseconds timeout) const;
  // Guest ranges the VMM discarded (UFFD_EVENT_REMOVE) since the last call with clear, including
  // every discard whose event the serving thread has read: it first waits (at most timeout)
  // until the thread has handled what it read. A discard returns to the VMM once its event is
  // read, so with the VMM frozen, nothing it discarded is missing. Fails (kResumeFailed) if the
  // thread does not come round in time: then nothing is known, and nothing is cleared.
  Result<std::vector<plugin::ByteRange>> discarded(
      bool clear, std::chrono::milliseconds timeout = std::chrono::seconds(10));

  // write_faults: guest ranges whose write-protect faults the server resolved since the last call
  // with clear (block-aligned, unsorted), after letting the serving thread handle what it read,
  // like discarded().
  Result<std::vector<plugin::ByteRange>> written(
      bool clear, std::chrono::milliseconds timeout = std::chrono::seconds(10));
  // A live pause's image: from now on (null: no longer) blocks it needs are copied into it
  // before the guest may change them. Call it with the VMM stopped; it takes effect for every
  // message the serving thread handles after the call, and it waits for a write-protect fault
  // being resolved without an image: once it returns, a page is made writable only after its
  // block was preserved, so a protection the caller applies after it holds until then.
  void set_live(std::shared_ptr<LiveImage> image);

  // Where a stretch of guest blocks gets its bytes, flattened from the chain.
  struct Extent {
    std::uint64_t first_block = 0;
    std::uint64_t block_count = 0;
    bool zero = true;
    const std::uint8_t* data = nullptr;  // first byte of first_block inside a mapped layer
  };

 private:
  struct Mapping;
  enum class Served { kOk, kRetry, kGone, kError };
  FaultServer() = default;
  void run();
  void handle_message(const void* msg);
  Served serve(std::uint64_t host_page, bool minor);
  // write_faults: a write-protect fault on host_page.
  Served serve_write(std::uint64_t host_page);
  // Copies `block` into a live pause's image if the export still needs it, counted.
  void preserve_for_live(LiveImage& image, std::uint64_t block);
  std::shared_ptr<LiveImage> live() const;
  // The guest block at host_addr, or nullopt (then serving has failed).
  std::optional<std::uint64_t> block_at(std::uint64_t host_addr);
  // Issues the decision's ioctl for host_page (data: the block's snapshot bytes, or null);
  // returns 0 or its errno.
  int install(const FaultDecision& d, std::uint64_t host_page, const std::uint8_t* data);
  // Turns a refused mode off for good: modes_, a warning, a counter.
  void downgrade(ModeDowngrade g, std::uint64_t block);
  // What an install's result (err) means for the fault and the block.
  Served finish(const FaultDecision& d, int err, std::uint64_t host_page, std::uint64_t block);
  bool fill_step();
  // map_filled: maps guest blocks [first, end), just filled, into the VMM.
  void map_filled(std::uint64_t first, std::uint64_t end);
  void prepare_serving();  // serving thread, before the first message: extents_ and state_
  void publish_locked();   // adds pending_ to stats_ (mu_ held)
  // Waits (mu_ held through lock) until the serving thread has handled every message it read
  // before this call, or serving is over; false when timeout passed first.
  bool settle_locked(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout) const;
  const Extent* extent_of(std::uint64_t block) const;
  Status map_overlay();  // start(): overlay_map_ and overlay_extents_
  const plugin::Region* region_of(std::uint64_t host_addr) const;
  void fail(Error e);

  int uffd_ = -1;
  io::UniqueFd stop_fd_;                 // eventfd: stop
  io::UniqueFd settle_fd_;               // eventfd: report back once between batches
  std::vector<plugin::Region> regions_;  // sorted by host address
  std::shared_ptr<const SnapshotChain> chain_;
  std::vector<std::unique_ptr<Mapping>> mappings_;
  std::vector<const std::uint8_t*> layer_bases_;  // per chain layer, null if it has no data
  FaultServerOptions options_;
  std::uint64_t block_size_ = 0;
  std::uint64_t guest_size_ = 0;
  // The overlay (FaultServerOptions::overlay) mapped, and its ranges split into data and holes;
  // the serving thread lets the mapping go once the fill is done.
  std::unique_ptr<Mapping> overlay_map_;
  std::vector<Extent> overlay_extents_;
  std::shared_ptr<UffdOps> ops_;
  const std::uint8_t* zeros_ = nullptr;  // one block of zeros (read-only mapping)

  // Owned by the serving thread.
  std::vector<Extent> extents_;       // built by prepare_serving()
  std::vector<BlockState> state_;     // per guest block
  FaultModes modes_;                  // what the kernel has not refused yet
  FaultStats pending_;                // per-fault counters not yet published to stats_
  std::vector<std::uint64_t> retry_;  // host page addresses to serve again
  std::vector<std::uint64_t> write_retry_;  // write-protect faults to resolve again
  std::size_t fill_extent_ = 0;       // background fill cursor
  std::uint64_t fill_block_ = 0;
  bool map_filled_ok_ = true;  // map_filled not refused yet
  std::chrono::steady_clock::time_point started_;

  mutable std::mutex mu_;
  mutable std::condition_variable filled_cv_;
  FaultStats stats_;                          // guarded by mu_
  Status error_;                              // guarded by mu_
  std::vector<plugin::ByteRange> discarded_;  // guarded by mu_
  std::vector<plugin::ByteRange> written_;    // guarded by mu_
  mutable std::mutex live_mu_;
  std::shared_ptr<LiveImage> live_;           // guarded by live_mu_
  bool stopped_ = false;                      // guarded by mu_
  bool exited_ = false;                       // guarded by mu_: the serving thread has ended
  std::uint64_t loops_ = 0;                   // guarded by mu_: serving-loop iterations
  std::thread thread_;
};

}  // namespace memsnap
