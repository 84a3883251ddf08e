#include "core/snapshot/snapshot_format.h"

#include <xxhash.h>

namespace memsnap {

bool is_zero_id(const SnapshotId& id) noexcept {
  for (std::uint8_t b : id) {
    if (b != 0) return false;
  }
  return true;
}

std::string to_hex(const SnapshotId& id) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * id.size());
  for (std::uint8_t b : id) {
    out += kDigits[b >> 4];
    out += kDigits[b & 15];
  }
  return out;
}

std::string_view run_kind_name(RunKind kind) noexcept {
  switch (kind) {
    case RunKind::kData:
      return "data";
    case RunKind::kZero:
      return "zero";
    case RunKind::kParent:
      return "parent";
  }
  return "unknown";
}

std::uint64_t compute_header_checksum(const FileHeader& header, std::string_view origin) noexcept {
  FileHeader copy = header;
  copy.header_checksum = 0;
  if (origin.empty()) return XXH3_64bits(&copy, sizeof(copy));
  // Streamed (XXH3's streaming and one-shot results are equal): no copy of the origin record.
  // Out of memory: a checksum the header does not hold (its reader then refuses the file).
  XXH3_state_t* state = XXH3_createState();
  if (state == nullptr) return ~std::uint64_t{0} ^ header.header_checksum;
  XXH3_64bits_reset(state);
  XXH3_64bits_update(state, &copy, sizeof(copy));
  XXH3_64bits_update(state, origin.data(), origin.size());
  const std::uint64_t sum = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return sum;
}

std::uint64_t compute_map_checksum(std::span<const MapRun> runs) noexcept {
  return XXH3_64bits(runs.data(), runs.size_bytes());
}

}  // namespace memsnap
