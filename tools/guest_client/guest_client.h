// Drives a memsnap-guest process (the VMM stand-in) from tests, benchmarks and the CLI's demo:
// spawns it, reads its layout, sends it commands, and checks snapshots against the pattern it
// wrote.
#pragma once

#include <sys/types.h>

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

  // Sends one command line and returns its one-line JSON answer.
  Result<nlohmann::json> command(const std::string& line);
  // Dirties a share of the pages with a new generation; returns the dirty byte ranges.
  Result<std::vector<plugin::ByteRange>> dirty(double fraction, bool sequential,
                                               std::uint64_t seed);
  // Number of pages that do not hold what they should, as the guest itself sees them.
  Result<std::uint64_t> verify();
  // Kills it with SIGKILL and reaps it.
  void kill();

 private:
  GuestProcess() = default;
  pid_t pid_ = -1;
  int to_guest_ = -1;
  std::FILE* from_guest_ = nullptr;
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
