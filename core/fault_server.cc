#include "core/fault_server.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include <spdlog/spdlog.h>

namespace memsnap {
namespace {

constexpr std::size_t kMessagesPerRead = 64;

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

using Extent = FaultServer::Extent;

// The part [from, to) of extent x (blocks), pointing at the same bytes.
Extent piece_of(const Extent& x, std::uint64_t from, std::uint64_t to, std::uint64_t block_size) {
  Extent p;
  p.first_block = from;
  p.block_count = to - from;
  p.zero = x.zero;
  if (!x.zero) p.data = x.data + (from - x.first_block) * block_size;
  return p;
}

// base covers every block, in order; top is sorted and disjoint. Where top has an extent, it
// wins; base gives the rest.
std::vector<Extent> overlay_extents(const std::vector<Extent>& base, const std::vector<Extent>& top,
                                    std::uint64_t blocks, std::uint64_t block_size) {
  std::vector<Extent> out;
  out.reserve(base.size() + 2 * top.size());
  std::size_t i = 0, j = 0;
  std::uint64_t pos = 0;
  while (pos < blocks) {
    while (i < base.size() && base[i].first_block + base[i].block_count <= pos) ++i;
    while (j < top.size() && top[j].first_block + top[j].block_count <= pos) ++j;
    if (i == base.size()) break;
    if (j < top.size() && top[j].first_block <= pos) {
      const std::uint64_t end = top[j].first_block + top[j].block_count;
      out.push_back(piece_of(top[j], pos, end, block_size));
      pos = end;
    } else {
      std::uint64_t end = base[i].first_block + base[i].block_count;
      if (j < top.size()) end = std::min(end, top[j].first_block);
      out.push_back(piece_of(base[i], pos, end, block_size));
      pos = end;
    }
  }
  return out;
}

}  // namespace

// One snapshot layer mapped read-only for UFFDIO_COPY's source.
struct FaultServer::Mapping {
  void* base = MAP_FAILED;
  std::size_t length = 0;
  ~Mapping() {
    if (base != MAP_FAILED) ::munmap(base, length);
  }
};

Result<std::unique_ptr<FaultServer>> FaultServer::start(int uffd,
                                                        std::vector<plugin::Region> regions,
                                                        std::shared_ptr<const SnapshotChain> chain,
                                                        FaultServerOptions options) {
  std::unique_ptr<FaultServer> s(new FaultServer());
  s->uffd_ = uffd;
  s->chain_ = std::move(chain);
  const bool overlay = options.overlay.memfd >= 0;
  if (!s->chain_ && !overlay) {
    return make_error(Errc::kInvalidArgument, "a fault server needs a chain or an overlay");
  }
  s->block_size_ = s->chain_ ? s->chain_->block_size() : options.overlay.block_size;
  s->guest_size_ = s->chain_ ? s->chain_->guest_size() : options.overlay.guest_size;
  const std::uint64_t guest_size = s->guest_size_;
  if (overlay && (options.overlay.block_size != s->block_size_ ||
                  options.overlay.guest_size != guest_size || s->block_size_ == 0)) {
    return make_error(Errc::kInvalidArgument,
                      "the held memory (" + std::to_string(options.overlay.guest_size) +
                          " bytes, blocks of " + std::to_string(options.overlay.block_size) +
                          ") does not fit the chain (" + std::to_string(guest_size) +
                          " bytes, blocks of " + std::to_string(s->block_size_) + ")");
  }
  s->options_ = std::move(options);

  std::sort(regions.begin(), regions.end(), [](const plugin::Region& a, const plugin::Region& b) {
    return a.host_addr < b.host_addr;
  });
  for (const auto& r : regions) {
    if (r.size == 0 || r.guest_offset + r.size > guest_size || r.host_addr % s->block_size_ ||
        r.size % s->block_size_ || r.guest_offset % s->block_size_) {
      return make_error(Errc::kInvalidArgument,
                        "guest region at offset " + std::to_string(r.guest_offset) +
                            " does not fit the snapshot (block size " +
                            std::to_string(s->block_size_) + ", guest size " +
                            std::to_string(guest_size) + ")");
    }
  }
  s->regions_ = std::move(regions);

  // Map every layer that stores data read-only: UFFDIO_COPY copies straight from the page
  // cache of the snapshot file.
  const std::size_t layers = s->chain_ ? s->chain_->size() : 0;
  s->layer_bases_.assign(layers, nullptr);
  for (std::size_t i = 0; i < layers; ++i) {
    const SnapshotReader& r = s->chain_->layer(i);
    const FileHeader& h = r.header();
    if (h.data_bytes == 0) continue;
    auto m = std::make_unique<Mapping>();
    m->length = h.data_offset + h.data_bytes;
    m->base = ::mmap(nullptr, m->length, PROT_READ, MAP_SHARED, r.fd(), 0);
    if (m->base == MAP_FAILED) {
      const int err = errno;
      return make_error(Errc::kIoError, io::errno_message("mmap " + r.path(), err), err);
    }
    s->layer_bases_[i] = static_cast<const std::uint8_t*>(m->base);
    s->mappings_.push_back(std::move(m));
  }
  // A block of zeros to copy from (read-only anonymous memory reads as zeros).
  auto zeros = std::make_unique<Mapping>();
  zeros->length = s->block_size_;
  zeros->base = ::mmap(nullptr, zeros->length, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (zeros->base == MAP_FAILED) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("mmap of a zero block", err), err);
  }
  s->zeros_ = static_cast<const std::uint8_t*>(zeros->base);
  s->mappings_.push_back(std::move(zeros));
  if (overlay) MEMSNAP_RETURN_IF_ERROR(s->map_overlay());
  s->options_.overlay.memfd = -1;  // borrowed only until here

  // The flattened extents and the per-block states are built by the serving thread before it
  // reads its first message (prepare_serving()), not here: flattening a 1 GiB chain with 5% of
  // its pages zero at random (~25,000 extents) took ~0.5 ms, most of a warm resume's budget,
  // and the VMM's own start-up can overlap it. Nothing in it can fail.

  s->ops_ = s->options_.uffd_ops ? s->options_.uffd_ops
                                 : std::shared_ptr<UffdOps>(make_uffd_ioctls(uffd));
  s->modes_.copy_wp = s->options_.write_protect;
  s->modes_.continue_wp = s->options_.write_protect;
  s->stats_.fill_done = s->options_.fill_memfd < 0;

  const int flags = ::fcntl(uffd, F_GETFL);
  if (flags < 0 || ::fcntl(uffd, F_SETFL, flags | O_NONBLOCK) != 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("fcntl(uffd, O_NONBLOCK)", err), err);
  }
  s->stop_fd_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  s->settle_fd_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (s->stop_fd_.get() < 0 || s->settle_fd_.get() < 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("eventfd", err), err);
  }
  s->started_ = std::chrono::steady_clock::now();
  s->thread_ = std::thread([srv = s.get()] { srv->run(); });
  return s;
}

FaultServer::~FaultServer() { stop(); }

void FaultServer::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return;
    stopped_ = true;
  }
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = ::write(stop_fd_.get(), &one, sizeof(one));
  if (thread_.joinable()) thread_.join();
  filled_cv_.notify_all();
}

bool FaultServer::settle_locked(std::unique_lock<std::mutex>& lock,
                                std::chrono::milliseconds timeout) const {
  // The serving loop counts an iteration before it polls, reads and handles a batch: once the
  // count has moved past what it was here, every message read before now has been handled.
  auto settled_or_over = [&] { return stopped_ || exited_ || !error_.ok(); };
  if (settled_or_over() || !thread_.joinable()) return true;
  const std::uint64_t seen = loops_;
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = ::write(settle_fd_.get(), &one, sizeof(one));
  return filled_cv_.wait_for(lock, timeout,
                             [&] { return loops_ > seen || settled_or_over(); });
}

FaultStats FaultServer::stats(bool settle) const {
  std::unique_lock<std::mutex> lock(mu_);
  if (settle) settle_locked(lock, std::chrono::seconds(1));
  return stats_;
}

Status FaultServer::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

Status FaultServer::wait_filled(std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  const bool done = filled_cv_.wait_for(lock, timeout, [&] {
    return stats_.fill_done || stopped_ || !error_.ok() || stats_.vmm_gone;
  });
  if (!error_.ok()) return error_;
  if (!stats_.fill_done) {
    return make_error(done ? Errc::kResumeFailed : Errc::kHandshakeTimeout,
                      done ? "the background fill stopped before it finished"
                           : "the background fill did not finish in time");
  }
  return {};
}

Result<std::vector<plugin::ByteRange>> FaultServer::discarded(bool clear,
                                                              std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  // A discard returns to the VMM once its event is read, which may be before it is handled: a
  // pause that froze the VMM after the discard must see it, or it would inherit the parent's
  // bytes where the guest has zeros.
  if (!settle_locked(lock, timeout)) {
    return make_error(Errc::kResumeFailed,
                      "the fault-serving thread did not come round within " +
                          std::to_string(timeout.count()) +
                          " ms: which ranges the VMM discarded is not known");
  }
  std::vector<plugin::ByteRange> out = discarded_;
  if (clear) discarded_.clear();
  return out;
}

Result<std::vector<plugin::ByteRange>> FaultServer::written(bool clear,
                                                            std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!settle_locked(lock, timeout)) {
    return make_error(Errc::kResumeFailed, "the fault-serving thread did not come round within " +
                                               std::to_string(timeout.count()) +
                                               " ms: which pages the guest wrote is not known");
  }
  std::vector<plugin::ByteRange> out = written_;
  if (clear) written_.clear();
  return out;
}

void FaultServer::set_live(std::shared_ptr<LiveImage> image) {
  std::lock_guard<std::mutex> lock(live_mu_);
  live_ = std::move(image);
}

std::shared_ptr<LiveImage> FaultServer::live() const {
  std::lock_guard<std::mutex> lock(live_mu_);
  return live_;
}

void FaultServer::fail(Error e) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_.ok()) error_ = std::move(e);
}

Status FaultServer::map_overlay() {
  const FaultServerOptions::Overlay& o = options_.overlay;
  auto m = std::make_unique<Mapping>();
  m->length = o.guest_size;
  m->base = ::mmap(nullptr, m->length, PROT_READ, MAP_SHARED, o.memfd, 0);
  if (m->base == MAP_FAILED) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("mmap of the held memory", err), err);
  }
  const auto* base = static_cast<const std::uint8_t*>(m->base);
  // Holes read as zeros; reading them through the mapping would allocate pages in the held
  // memfd, so they are zero extents instead.
  const std::vector<plugin::ByteRange>& data = o.populated;
  std::size_t d = 0;
  for (const plugin::ByteRange& r : o.ranges) {
    if (r.offset % block_size_ != 0 || r.length % block_size_ != 0 ||
        r.offset + r.length > guest_size_ || r.offset + r.length < r.offset ||
        (!overlay_extents_.empty() &&
         r.offset / block_size_ <
             overlay_extents_.back().first_block + overlay_extents_.back().block_count)) {
      return make_error(Errc::kInvalidArgument,
                        "the held memory's ranges must be block-aligned, sorted and disjoint");
    }
    std::uint64_t pos = r.offset;
    const std::uint64_t end = r.offset + r.length;
    while (pos < end) {
      while (d < data.size() && data[d].offset + data[d].length <= pos) ++d;
      Extent x;
      x.first_block = pos / block_size_;
      std::uint64_t to = end;
      if (d < data.size() && data[d].offset <= pos) {
        to = std::min(end, data[d].offset + data[d].length);
        x.zero = false;
        x.data = base + pos;
      } else if (d < data.size()) {
        to = std::min(end, data[d].offset);
      }
      x.block_count = (to - pos) / block_size_;
      overlay_extents_.push_back(x);
      pos = to;
    }
  }
  overlay_map_ = std::move(m);
  return {};
}

void FaultServer::prepare_serving() {
  const std::uint64_t blocks = guest_size_ / block_size_;
  if (chain_) {
    const std::vector<ChainExtent> flat = chain_->flatten();
    extents_.reserve(flat.size());
    for (const ChainExtent& c : flat) {
      Extent x;
      x.first_block = c.first_block;
      x.block_count = c.block_count;
      x.zero = c.kind != RunKind::kData;
      if (!x.zero) x.data = layer_bases_[c.layer] + c.file_offset;
      extents_.push_back(x);
    }
  } else {
    Extent all;
    all.block_count = blocks;
    extents_.push_back(all);  // no parent: what the held memory does not cover is zero
  }
  if (!overlay_extents_.empty()) {
    extents_ = overlay_extents(extents_, overlay_extents_, blocks, block_size_);
  }
  state_.assign(blocks, BlockState::kUntouched);
}

void FaultServer::publish_locked() {
  stats_.faults += pending_.faults;
  stats_.minor_faults += pending_.minor_faults;
  stats_.copies += pending_.copies;
  stats_.zeropages += pending_.zeropages;
  stats_.continues += pending_.continues;
  stats_.eexist += pending_.eexist;
  stats_.copy_wp_downgrades += pending_.copy_wp_downgrades;
  stats_.continue_wp_downgrades += pending_.continue_wp_downgrades;
  stats_.zeropage_downgrades += pending_.zeropage_downgrades;
  stats_.write_faults += pending_.write_faults;
  stats_.live_copies += pending_.live_copies;
  stats_.service_seconds += pending_.service_seconds;
  stats_.max_service_seconds = std::max(stats_.max_service_seconds, pending_.max_service_seconds);
  for (std::size_t i = 0; i < stats_.latency_counts.size(); ++i) {
    stats_.latency_counts[i] += pending_.latency_counts[i];
  }
  pending_ = FaultStats{};
}

const FaultServer::Extent* FaultServer::extent_of(std::uint64_t block) const {
  auto it = std::upper_bound(extents_.begin(), extents_.end(), block,
                             [](std::uint64_t b, const Extent& x) { return b < x.first_block; });
  if (it == extents_.begin()) return nullptr;
  --it;
  return block < it->first_block + it->block_count ? &*it : nullptr;
}

const plugin::Region* FaultServer::region_of(std::uint64_t host_addr) const {
  auto it =
      std::upper_bound(regions_.begin(), regions_.end(), host_addr,
                       [](std::uint64_t a, const plugin::Region& r) { return a < r.host_addr; });
  if (it == regions_.begin()) return nullptr;
  --it;
  return host_addr < it->host_addr + it->size ? &*it : nullptr;
}

std::optional<std::uint64_t> FaultServer::block_at(std::uint64_t host_addr) {
  const plugin::Region* region = region_of(host_addr);
  if (region == nullptr) {
    fail(make_error(Errc::kResumeFailed, "fault at host address " + std::to_string(host_addr) +
                                             " outside every guest region"));
    return std::nullopt;
  }
  return (region->guest_offset + (host_addr - region->host_addr)) / block_size_;
}

void FaultServer::preserve_for_live(LiveImage& image, std::uint64_t block) {
  const std::uint64_t before = image.copies();
  // A failed copy breaks the image (the pause fails); the guest goes on either way.
  if (Status s = image.preserve(block); !s.ok()) {
    spdlog::error("fault server: live copy of guest offset {} failed: {}", block * block_size_,
                  s.error().to_string());
  }
  pending_.live_copies += image.copies() - before;
}

FaultServer::Served FaultServer::serve_write(std::uint64_t host_page) {
  const auto block = block_at(host_page);
  if (!block) return Served::kError;
  // live_mu_ is held until the page is writable: set_live() cannot come between finding no
  // image and the un-protect, so once set_live() returns, every page made writable either had
  // its block preserved or was made writable before the caller's protection that follows.
  std::lock_guard<std::mutex> live_lock(live_mu_);
  // The guest's write has not happened yet: what the page holds now is the pause's.
  if (live_) preserve_for_live(*live_, *block);
  const plugin::ByteRange record{*block * block_size_, block_size_};
  {
    std::lock_guard<std::mutex> lock(mu_);
    written_.push_back(record);
  }
  const int err = ops_->write_protect(host_page, block_size_, false);
  // The address space is changing (an event this thread has not read yet): try again after the
  // next read, like a fault's EAGAIN. Counted once, when it is resolved; recorded again then
  // (the record stays unless it is the newest: taken since, it counts as written, harmlessly).
  if (err == EAGAIN) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!written_.empty() && written_.back().offset == record.offset) written_.pop_back();
    return Served::kRetry;
  }
  ++pending_.write_faults;
  if (err == 0) return Served::kOk;
  if (err == ESRCH) return Served::kGone;
  fail(make_error(Errc::kResumeFailed,
                  io::errno_message("UFFDIO_WRITEPROTECT (make writable) at guest offset " +
                                        std::to_string(*block * block_size_),
                                    err),
                  err));
  return Served::kError;
}

FaultServer::Served FaultServer::serve(std::uint64_t host_page, bool minor) {
  const auto found = block_at(host_page);
  if (!found) return Served::kError;
  const std::uint64_t block = *found;
  // With write faults, live_mu_ is held until the page is installed, as in serve_write(): a page
  // installed writable (a write-protect mode turned off) must not slip in between a set_live()
  // and the protection that follows it unpreserved.
  std::unique_lock<std::mutex> live_lock(live_mu_, std::defer_lock);
  if (options_.write_faults) {
    live_lock.lock();
    // A page installed now may be written at once: keep what the export still needs.
    if (live_) preserve_for_live(*live_, block);
  }
  const Extent* x = extent_of(block);
  const std::uint8_t* data = x->zero ? nullptr : x->data + (block - x->first_block) * block_size_;

  FaultInput in;
  in.state = state_[block];
  in.minor = minor;
  in.zero_extent = x->zero;
  in.has_fill_memfd = options_.fill_memfd >= 0;
  in.write_protect = options_.write_protect;
  in.modes = modes_;
  FaultDecision d = decide_fault(in);
  if (d.write_memfd_first) {
    const Status w =
        io::pwrite_all(options_.fill_memfd, data, block_size_, block * block_size_, "memfd");
    if (!w.ok()) {
      fail(w.error());
      return Served::kError;
    }
  }
  int err = install(d, host_page, data);
  // A refused mode is turned off and the page installed again without it; each mode can be
  // turned off once, so this ends.
  for (ModeDowngrade g = downgrade_for(d, err); g != ModeDowngrade::kNone;
       g = downgrade_for(d, err)) {
    downgrade(g, block);
    in.modes = modes_;
    d = decide_fault(in);
    err = install(d, host_page, data);
  }
  return finish(d, err, host_page, block);
}

int FaultServer::install(const FaultDecision& d, std::uint64_t host_page,
                         const std::uint8_t* data) {
  switch (d.action) {
    case FaultAction::kCopyData:
      return ops_->copy(host_page, data, block_size_, d.wp);
    case FaultAction::kCopyZeros:
      return ops_->copy(host_page, zeros_, block_size_, d.wp);
    case FaultAction::kZeroPage:
      return ops_->zeropage(host_page, block_size_);
    case FaultAction::kContinue:
      return ops_->continue_range(host_page, block_size_, d.wp);
  }
  return EINVAL;
}

void FaultServer::downgrade(ModeDowngrade g, std::uint64_t block) {
  modes_ = downgraded(modes_, g);
  const std::uint64_t offset = block * block_size_;
  switch (g) {
    case ModeDowngrade::kNone:
      return;
    case ModeDowngrade::kCopyWithoutWp:
      ++pending_.copy_wp_downgrades;
      spdlog::warn(
          "fault server: UFFDIO_COPY_MODE_WP refused (EINVAL) at guest offset {}: copying pages "
          "without write protection from now on (they count as written)",
          offset);
      return;
    case ModeDowngrade::kContinueWithoutWp:
      ++pending_.continue_wp_downgrades;
      spdlog::warn(
          "fault server: UFFDIO_CONTINUE_MODE_WP refused (EINVAL) at guest offset {}: mapping "
          "memfd pages without write protection from now on (they count as written)",
          offset);
      return;
    case ModeDowngrade::kZeroByCopy:
      ++pending_.zeropage_downgrades;
      spdlog::warn(
          "fault server: UFFDIO_ZEROPAGE refused (EEXIST, a write-protect marker) at guest "
          "offset {}: copying zeros in from now on",
          offset);
      return;
  }
}

FaultServer::Served FaultServer::finish(const FaultDecision& d, int err, std::uint64_t host_page,
                                        std::uint64_t block) {
  if (err == 0) {
    state_[block] = d.next_state;
    ++(d.action == FaultAction::kCopyData   ? pending_.copies
       : d.action == FaultAction::kContinue ? pending_.continues
                                            : pending_.zeropages);
    return Served::kOk;
  }
  if (err == EEXIST) {
    // Already mapped (another thread's fault on the same page, or a racing event): just wake
    // whoever waits on it.
    ops_->wake(host_page, block_size_);
    state_[block] = d.next_state;
    ++pending_.eexist;
    return Served::kOk;
  }
  if (err == EAGAIN) return Served::kRetry;
  if (err == ESRCH) return Served::kGone;
  fail(make_error(Errc::kResumeFailed,
                  io::errno_message(std::string(ioctl_name(d.action)) + " at guest offset " +
                                        std::to_string(block * block_size_),
                                    err),
                  err));
  return Served::kError;
}

void FaultServer::handle_message(const void* raw) {
  const uffd_msg& msg = *static_cast<const uffd_msg*>(raw);
  if (msg.event == UFFD_EVENT_PAGEFAULT) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::uint64_t page = msg.arg.pagefault.address & ~(block_size_ - 1);
    const bool minor = (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0;
    // A write-protect fault is resolved by making the page writable, whether or not this
    // server tracks writes (installing the page again would only wake the guest into the same
    // fault).
    const bool write_fault = (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) != 0;
    const Served s = write_fault ? serve_write(page) : serve(page, minor);
    const double dt = seconds_since(t0);
    // Hot counters stay with this thread and are published once per batch (publish_locked).
    ++pending_.faults;
    if (minor) ++pending_.minor_faults;
    pending_.service_seconds += dt;
    pending_.max_service_seconds = std::max(pending_.max_service_seconds, dt);
    const auto& bounds = FaultStats::kLatencyBounds;
    ++pending_.latency_counts[static_cast<std::size_t>(
        std::lower_bound(bounds.begin(), bounds.end(), dt) - bounds.begin())];
    if (s == Served::kRetry) {
      (write_fault ? write_retry_ : retry_).push_back(page);
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.eagain_retries;
    } else if (s == Served::kGone) {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.vmm_gone = true;
    }
    return;
  }
  if (msg.event == UFFD_EVENT_REMOVE) {
    const std::uint64_t start = msg.arg.remove.start;
    const std::uint64_t end = msg.arg.remove.end;
    const std::shared_ptr<LiveImage> image = live();
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.remove_events;
    for (const auto& r : regions_) {
      const std::uint64_t s = std::max(start, r.host_addr);
      const std::uint64_t e = std::min(end, r.host_addr + r.size);
      if (s >= e) continue;
      const std::uint64_t g = r.guest_offset + (s - r.host_addr);
      const std::uint64_t first = g / block_size_;
      const std::uint64_t last = (g + (e - s) + block_size_ - 1) / block_size_;
      for (std::uint64_t b = first; b < last; ++b) state_[b] = BlockState::kRemoved;
      discarded_.push_back({first * block_size_, (last - first) * block_size_});
      if (image) image->discarded(first * block_size_, (last - first) * block_size_);
      stats_.removed_bytes += e - s;
    }
    return;
  }
  // Other events are not requested by the VMMs memsnap serves; nothing to do.
}

void FaultServer::map_filled(std::uint64_t first, std::uint64_t end) {
  const std::uint64_t g0 = first * block_size_, g1 = end * block_size_;
  std::uint64_t mapped = 0;
  for (const plugin::Region& r : regions_) {
    const std::uint64_t s = std::max(g0, r.guest_offset);
    const std::uint64_t e = std::min(g1, r.guest_offset + r.size);
    if (s >= e) continue;
    const std::uint64_t host = r.host_addr + (s - r.guest_offset);
    int err = ops_->continue_range(host, e - s, modes_.continue_wp);
    if (err == 0) {
      mapped += e - s;
      continue;
    }
    if (err == EEXIST || err == EAGAIN) {
      // Part of it is mapped already (a fault got there first) or the address space changed:
      // page by page, leaving whatever the kernel will not map now to the guest's own fault.
      err = 0;
      for (std::uint64_t p = host; p < host + (e - s) && err == 0; p += block_size_) {
        const int one = ops_->continue_range(p, block_size_, modes_.continue_wp);
        if (one == 0) mapped += block_size_;
        if (one != 0 && one != EEXIST && one != EAGAIN) err = one;
      }
      if (err == 0) continue;
    }
    map_filled_ok_ = false;
    if (err != ESRCH) {
      spdlog::warn(
          "fault server: mapping filled pages ahead of the guest was refused ({}); the "
          "guest faults them in instead",
          std::strerror(err));
    }
    break;
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.mapped_ahead_bytes += mapped;
}

bool FaultServer::fill_step() {
  // Copies up to fill_chunk_bytes of DATA blocks that no fault has touched into the memfd.
  std::uint64_t budget = options_.fill_chunk_bytes / block_size_;
  if (budget == 0) budget = 1;
  while (budget > 0 && fill_extent_ < extents_.size()) {
    const Extent& x = extents_[fill_extent_];
    if (x.zero || fill_block_ >= x.first_block + x.block_count) {
      ++fill_extent_;
      fill_block_ = fill_extent_ < extents_.size() ? extents_[fill_extent_].first_block : 0;
      continue;
    }
    if (fill_block_ < x.first_block) fill_block_ = x.first_block;
    const std::uint64_t end = std::min(x.first_block + x.block_count, fill_block_ + budget);
    // Write maximal runs of untouched blocks.
    std::uint64_t b = fill_block_;
    while (b < end) {
      if (state_[b] != BlockState::kUntouched) {
        ++b;
        continue;
      }
      std::uint64_t e = b + 1;
      while (e < end && state_[e] == BlockState::kUntouched) ++e;
      const Status w =
          io::pwrite_all(options_.fill_memfd, x.data + (b - x.first_block) * block_size_,
                         (e - b) * block_size_, b * block_size_, "memfd");
      if (!w.ok()) {
        fail(w.error());
        return false;
      }
      std::fill(state_.begin() + static_cast<std::ptrdiff_t>(b),
                state_.begin() + static_cast<std::ptrdiff_t>(e), BlockState::kFilled);
      if (options_.map_filled && map_filled_ok_) map_filled(b, e);
      std::lock_guard<std::mutex> lock(mu_);
      stats_.filled_bytes += (e - b) * block_size_;
      b = e;
    }
    budget -= end - fill_block_;
    fill_block_ = end;
  }
  return fill_extent_ < extents_.size();
}

void FaultServer::run() {
  prepare_serving();
  bool filling = options_.fill_memfd >= 0;
  if (filling && !extents_.empty()) fill_block_ = extents_.front().first_block;
  std::vector<uffd_msg> msgs(kMessagesPerRead);
  for (;;) {
    int timeout = -1;
    if (!retry_.empty() || !write_retry_.empty()) timeout = 1;
    if (filling) timeout = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++loops_;
    }
    filled_cv_.notify_all();
    pollfd fds[3] = {
        {uffd_, POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}, {settle_fd_.get(), POLLIN, 0}};
    const int n = ::poll(fds, 3, timeout);
    if (n > 0 && (fds[2].revents & POLLIN)) {
      std::uint64_t v;
      [[maybe_unused]] const ssize_t r = ::read(settle_fd_.get(), &v, sizeof(v));
    }
    if (n < 0 && errno != EINTR) {
      fail(make_error(Errc::kResumeFailed, io::errno_message("poll(uffd)", errno), errno));
      break;
    }
    if (n > 0 && (fds[1].revents & POLLIN)) break;
    if (n > 0 && (fds[0].revents & (POLLERR | POLLHUP))) {
      // The VMM side is gone (its mm was torn down).
      std::lock_guard<std::mutex> lock(mu_);
      stats_.vmm_gone = true;
      break;
    }
    if (n > 0 && (fds[0].revents & POLLIN)) {
      const ssize_t got = ::read(uffd_, msgs.data(), msgs.size() * sizeof(uffd_msg));
      if (got < 0 && errno != EAGAIN && errno != EINTR) {
        fail(make_error(Errc::kResumeFailed, io::errno_message("read(uffd)", errno), errno));
        break;
      }
      if (got > 0 && options_.after_read_for_testing) options_.after_read_for_testing();
      for (ssize_t i = 0; got > 0 && i < got / static_cast<ssize_t>(sizeof(uffd_msg)); ++i) {
        handle_message(&msgs[static_cast<std::size_t>(i)]);
      }
    }
    if (!write_retry_.empty()) {
      std::vector<std::uint64_t> again;
      again.swap(write_retry_);
      for (std::uint64_t page : again) {
        const Served s = serve_write(page);
        std::lock_guard<std::mutex> lock(mu_);
        if (s == Served::kRetry) {
          ++stats_.eagain_retries;
          write_retry_.push_back(page);
        } else if (s == Served::kGone) {
          stats_.vmm_gone = true;
        }
      }
    }
    if (!retry_.empty()) {
      std::vector<std::uint64_t> again;
      again.swap(retry_);
      for (std::uint64_t page : again) {
        const Served s = serve(page, false);
        std::lock_guard<std::mutex> lock(mu_);
        if (s == Served::kRetry) {
          ++stats_.eagain_retries;
          retry_.push_back(page);
        } else if (s == Served::kGone) {
          stats_.vmm_gone = true;
        }
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      publish_locked();  // before the next loops_ step, so a settled stats() sees this batch
      if (!error_.ok() || stats_.vmm_gone) break;
    }
    if (filling) {
      filling = fill_step();
      if (!filling) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          if (!error_.ok()) break;
          stats_.fill_done = true;
          stats_.fill_seconds = seconds_since(started_);
        }
        // Every block of the held memory is in the VMM's memfd or was served: nothing reads it
        // any more, and its pages need not stay for this session.
        overlay_map_.reset();
        filled_cv_.notify_all();
      }
    }
  }
  Status failed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    publish_locked();
    failed = error_;
    exited_ = true;
  }
  filled_cv_.notify_all();
  if (!failed.ok() && options_.on_error) options_.on_error(failed.error());
}

}  // namespace memsnap
