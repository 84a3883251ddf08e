#include "core/pattern/pattern.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace memsnap::pattern {
namespace {

std::uint64_t splitmix64(std::uint64_t& state) noexcept {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

std::uint64_t page_state(std::uint64_t seed, std::uint64_t page, std::uint64_t generation) {
  std::uint64_t s = seed ^ (page * 0xd6e8feb86659fd93ULL) ^ (generation * 0xa0761d6478bd642fULL);
  return splitmix64(s);
}

}  // namespace

void fill_page(void* dst, std::size_t page_size, std::uint64_t seed, std::uint64_t page,
               std::uint64_t generation) noexcept {
  auto* words = static_cast<std::uint64_t*>(dst);
  const std::size_t n = page_size / 8;
  if (generation == 0) {
    std::memset(dst, 0, page_size);
    return;
  }
  words[0] = kPageMagic;
  words[1] = page;
  words[2] = generation;
  words[3] = seed;
  std::uint64_t state = page_state(seed, page, generation);
  for (std::size_t i = 4; i < n; ++i) words[i] = splitmix64(state);
}

PageCheck check_page(const void* src, std::size_t page_size, std::uint64_t seed, std::uint64_t page,
                     std::uint64_t generation) noexcept {
  const auto* words = static_cast<const std::uint64_t*>(src);
  const std::size_t n = page_size / 8;
  PageCheck r;
  if (words[0] == kPageMagic) {
    r.found_page = words[1];
    r.found_generation = words[2];
  }
  if (generation == 0) {
    r.ok = std::all_of(words, words + n, [](std::uint64_t w) { return w == 0; });
    return r;
  }
  if (words[0] != kPageMagic || words[1] != page || words[2] != generation || words[3] != seed) {
    return r;
  }
  std::uint64_t state = page_state(seed, page, generation);
  for (std::size_t i = 4; i < n; ++i) {
    if (words[i] != splitmix64(state)) return r;
  }
  r.ok = true;
  return r;
}

std::vector<std::uint64_t> select_pages(std::uint64_t page_count, double fraction,
                                        std::uint64_t seed, bool sequential) {
  fraction = std::clamp(fraction, 0.0, 1.0);
  const auto want = static_cast<std::uint64_t>(std::llround(fraction * double(page_count)));
  std::vector<std::uint64_t> pages;
  if (want == 0 || page_count == 0) return pages;
  std::uint64_t state = seed;
  if (sequential) {
    const std::uint64_t start =
        want >= page_count ? 0 : splitmix64(state) % (page_count - want + 1);
    pages.resize(want);
    std::iota(pages.begin(), pages.end(), start);
    return pages;
  }
  if (want * 2 > page_count) {
    // Dense: shuffle all indices and keep a prefix.
    pages.resize(page_count);
    std::iota(pages.begin(), pages.end(), 0);
    for (std::uint64_t i = page_count - 1; i > 0; --i) {
      std::swap(pages[i], pages[splitmix64(state) % (i + 1)]);
    }
    pages.resize(want);
  } else {
    // Sparse: rejection sampling on a bitmap.
    std::vector<bool> taken(page_count);
    pages.reserve(want);
    while (pages.size() < want) {
      const std::uint64_t p = splitmix64(state) % page_count;
      if (!taken[p]) {
        taken[p] = true;
        pages.push_back(p);
      }
    }
  }
  std::sort(pages.begin(), pages.end());
  return pages;
}

std::vector<std::uint64_t> never_written_pages(std::uint64_t page_count, double zero_fraction,
                                               std::uint64_t seed) {
  return select_pages(page_count, zero_fraction, seed ^ 0x5a5a, false);
}

}  // namespace memsnap::pattern
