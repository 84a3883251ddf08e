// Drives a memsnap-guest process (the VMM stand-in) from tests, benchmarks and the CLI's demo:
// spawns it, reads its layout, sends it commands, and checks snapshots against the pattern it
// wrote.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/base/result.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap {

class SnapshotChain;

struct GuestOptions {
  std::string binary;  // empty: default_guest_binary()
  std::uint64_t size = 64ULL << 20;
  std::string backing = "memfd";  // or "anon"
  int regions = 1;
  std::uint64_t seed = 1;
  double zero_fraction = 0.0;
  bool thp = false;

  // Resume, like Firecracker with the UFFD memory backend: the guest registers its memory with a
  // userfaultfd and sends the handshake to this Unix socket (empty: no userfaultfd, no
  // handshake). spawn() returns as soon as the guest printed its layout, before the handshake is
  // accepted; wait_ready() then waits until it has been (and the guest took memsnap's reply).
  std::string handshake_socket;
  // Do not write the pattern at start: guest memory comes from memsnap.
  bool no_fill = false;
  // With no_fill: the generation each page should hold (guest_size / 4096 entries); empty: all
  // zeros. Passed to the guest in a temporary file.
  std::vector<std::uint32_t> expect;
  // Wait for memsnap's reply after the handshake and map the memfd it may hand over.
  bool accept_memfd = false;
  // Register for asynchronous write-protect tracking (UFFD_FEATURE_WP_ASYNC) if the kernel can.
  bool track_writes = true;
  // With track_writes: write-protect without WP_ASYNC (memsnap-guest --track-writes sync), so
  // that each write to a protected page is a fault memsnap resolves (live pauses need it).
  bool write_faults = false;
  // A misbehaving VMM (memsnap-guest --ack, --stray-page): how it answers a handed memfd ("ok",
  // "bad": a wrong ack, "none": never), and one registered page outside every region, read by
  // the command `touch-stray` (answers {"touching":true} first, then blocks on a fault nobody
  // can serve).
  std::string ack = "ok";
  bool stray_page = false;
};

// memsnap-guest next to the running executable, else in $MEMSNAP_BIN_DIR.
std::string default_guest_binary();

// One running memsnap-guest. Not thread-safe. The destructor asks it to exit and reaps it
// (killing it if it does not go).
class GuestProcess {
 public:
  static Result<std::unique_ptr<GuestProcess>> spawn(const GuestOptions& options);
  ~GuestProcess();
  GuestProcess(const GuestProcess&) = delete;
  GuestProcess& operator=(const GuestProcess&) = delete;

  pid_t pid() const { return pid_; }
  std::uint64_t guest_size() const { return guest_size_; }
  std::uint64_t seed() const { return seed_; }
  int memfd_number() const { return memfd_number_; }  // in the guest, -1 for anonymous memory
  const std::vector<plugin::Region>& regions() const { return regions_; }
  // Generation each page should hold now (0: never written).
  const std::vector<std::uint32_t>& expected_generations() const { return expected_; }

  // Whether the guest registered its memory with a userfaultfd, and with asynchronous
  // write-protect tracking (from the layout, refreshed by wait_ready()).
  bool uffd() const { return uffd_; }
  bool wp_async() const { return wp_async_; }
  bool write_faults() const { return write_faults_; }
  // After wait_ready(): the guest maps a memfd memsnap handed it.
  bool memfd_from_memsnap() const { return memfd_from_memsnap_; }
  bool ready() const { return ready_; }

  // Sends `ping` and waits up to timeout for the answer. A guest started with a handshake socket
  // answers only once the handshake is done (and, with accept_memfd, memsnap's reply handled).
  // kHandshakeTimeout if it did not answer in time (the ping stays pending: a later wait_ready()
  // or command() consumes its answer first); kProcessGone if it exited.
  Status wait_ready(std::chrono::milliseconds timeout);

  // Sends one command line and returns its one-line JSON answer (waiting as long as it takes).
  Result<nlohmann::json> command(const std::string& line);
  // Dirties a share of the pages with a new generation; returns the dirty byte ranges.
  Result<std::vector<plugin::ByteRange>> dirty(double fraction, bool sequential,
                                               std::uint64_t seed);
  // Number of pages that do not hold what they should, as the guest itself sees them.
  Result<std::uint64_t> verify();
  // Releases pages [first_page, first_page + count) like a balloon (their expected generation
  // becomes 0); returns the number discarded. With a userfaultfd registered this blocks until
  // the handler has read the UFFD_EVENT_REMOVE it raises.
  Result<std::uint64_t> discard(std::uint64_t first_page, std::uint64_t count);
  // A thread of the guest writes pages [first_page, first_page + count) over and over, each
  // round a new generation and in the scattered order write_loop_page() gives, until
  // write_stop(), which updates expected_generations() to what the guest holds then.
  // write_rounds(): rounds finished so far.
  Status write_loop(std::uint64_t first_page, std::uint64_t count);
  // The page of the i-th write of each round.
  std::uint64_t write_loop_page(std::uint64_t i) const {
    return loop_first_ + (i * loop_stride_) % loop_count_;
  }
  Result<std::uint64_t> write_rounds();
  Result<nlohmann::json> write_stop();
  // Kills it with SIGKILL and reaps it.
  void kill();

 private:
  GuestProcess() = default;
  Status send_line(const std::string& line);
  // Reads one answer line (timeout_ms < 0: no limit).
  Result<nlohmann::json> read_answer(int timeout_ms);
  void take_ping(const nlohmann::json& j);
  Status drain_pending();

  pid_t pid_ = -1;
  int to_guest_ = -1;
  int from_guest_ = -1;
  std::string buffered_;   // read from the guest, not yet returned
  int pending_pings_ = 0;  // pings sent whose answer has not been read yet
  bool uffd_ = false;
  bool wp_async_ = false;
  bool write_faults_ = false;
  bool memfd_from_memsnap_ = false;
  std::uint64_t loop_first_ = 0, loop_count_ = 0, loop_stride_ = 1;  // write_loop()
  bool ready_ = false;
  std::uint64_t guest_size_ = 0;
  std::uint64_t seed_ = 0;
  int memfd_number_ = -1;
  std::vector<plugin::Region> regions_;
  std::vector<std::uint32_t> expected_;
  std::vector<std::uint64_t> zero_pages_;
};

struct ChainCheck {
  std::uint64_t pages = 0;
  std::uint64_t mismatches = 0;
  std::string first_mismatch;  // human description of the first bad page
};

// Reads every page of the chain and checks it against the pattern: page p must hold generation
// expected[p] of seed's pattern.
Result<ChainCheck> check_chain_against_pattern(const SnapshotChain& chain, std::uint64_t seed,
                                               const std::vector<std::uint32_t>& expected);

}  // namespace memsnap
