#include "flags/murmur3.h"

namespace memsnap::flags {
namespace {

constexpr std::uint32_t rotl32(std::uint32_t x, int r) noexcept {
  return (x << r) | (x >> (32 - r));
}

constexpr std::uint32_t fmix32(std::uint32_t h) noexcept {
  h ^= h >> 16;
  h *= 0x85ebca6bU;
  h ^= h >> 13;
  h *= 0xc2b2ae35U;
  h ^= h >> 16;
  return h;
}

}  // namespace

std::uint32_t murmur3_x86_32(std::string_view data, std::uint32_t seed) noexcept {
  constexpr std::uint32_t c1 = 0xcc9e2d51U;
  constexpr std::uint32_t c2 = 0x1b873593U;
  const auto* bytes = reinterpret_cast<const unsigned char*>(data.data());
  const std::size_t len = data.size();
  const std::size_t nblocks = len / 4;
  std::uint32_t h = seed;

  for (std::size_t i = 0; i < nblocks; ++i) {
    const unsigned char* p = bytes + i * 4;
    // Blocks are read little-endian whatever the host's byte order.
    std::uint32_t k = static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
                      (static_cast<std::uint32_t>(p[2]) << 16) |
                      (static_cast<std::uint32_t>(p[3]) << 24);
    k *= c1;
    k = rotl32(k, 15);
    k *= c2;
    h ^= k;
    h = rotl32(h, 13);
    h = h * 5 + 0xe6546b64U;
  }

  const unsigned char* tail = bytes + nblocks * 4;
  std::uint32_t k1 = 0;
  switch (len & 3U) {
    case 3:
      k1 ^= static_cast<std::uint32_t>(tail[2]) << 16;
      [[fallthrough]];
    case 2:
      k1 ^= static_cast<std::uint32_t>(tail[1]) << 8;
      [[fallthrough]];
    case 1:
      k1 ^= tail[0];
      k1 *= c1;
      k1 = rotl32(k1, 15);
      k1 *= c2;
      h ^= k1;
      break;
    default:
      break;
  }

  h ^= static_cast<std::uint32_t>(len);
  return fmix32(h);
}

std::uint64_t bucket_of(std::uint32_t hash, std::uint64_t total_weight) noexcept {
  // 128-bit product: weights are not limited to 32 bits.
  const unsigned __int128 product = static_cast<unsigned __int128>(hash) * total_weight;
  return static_cast<std::uint64_t>(product >> 32);
}

}  // namespace memsnap::flags
