// MurmurHash3 x86_32 (Austin Appleby's public-domain definition), the hash flagd buckets with.
#pragma once

#include <cstdint>
#include <string_view>

namespace memsnap::flags {

std::uint32_t murmur3_x86_32(std::string_view data, std::uint32_t seed = 0) noexcept;

// flagd's bucket for a hash: (uint64(hash) * total_weight) >> 32, in [0, total_weight).
std::uint64_t bucket_of(std::uint32_t hash, std::uint64_t total_weight) noexcept;

}  // namespace memsnap::flags
