// An address range that process pid has not mapped, for tests of regions that are not mapped.
// Not a fixed address: sanitizer runtimes reserve large parts of the address space (ASan's
// shadow covers 0x10007fff8000 and below), so the range is found in /proc/PID/maps.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace memsnap::testing {

inline std::uint64_t unmapped_address(pid_t pid, std::uint64_t size) {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> maps;
  std::ifstream in("/proc/" + std::to_string(pid) + "/maps");
  std::string line;
  while (std::getline(in, line)) {
    const auto dash = line.find('-');
    const auto space = line.find(' ');
    maps.emplace_back(std::stoull(line.substr(0, dash), nullptr, 16),
                      std::stoull(line.substr(dash + 1, space - dash - 1), nullptr, 16));
  }
  // 1 GiB steps from 32 TiB (above ASan's and TSan's low reservations), below 128 TiB.
  for (std::uint64_t a = 0x200000000000ULL; a + size < 0x7f0000000000ULL; a += 1ULL << 30) {
    bool free = true;
    for (const auto& [start, end] : maps) free = free && (a + size <= start || a >= end);
    if (free) return a;
  }
  return 0;
}

}  // namespace memsnap::testing
