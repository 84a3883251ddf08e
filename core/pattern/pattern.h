// A verifiable per-page memory pattern: the stand-in VMM fills guest pages with it, tests and the
// demo check snapshots against it. A page's content is a pure function of (seed, page index,
// generation); generation 0 means "never written" and is all zeros. A filled page is never all
// zeros, and its first words say which page and generation it holds, so a mismatch can be told
// apart from a page that landed at the wrong offset or came from the wrong snapshot.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace memsnap::pattern {

inline constexpr std::uint64_t kPageMagic = 0x4d454d534e415021ULL;  // "MEMSNAP!"

// Fills page_size bytes (a multiple of 8, >= 32) at dst. Thread-safe (pure).
void fill_page(void* dst, std::size_t page_size, std::uint64_t seed, std::uint64_t page,
               std::uint64_t generation) noexcept;

struct PageCheck {
  bool ok = false;
  std::uint64_t found_page = 0;        // as recorded in the page, if it carries the magic
  std::uint64_t found_generation = 0;  // 0 if the page is all zeros or unrecognisable
};

// Checks a page against what fill_page (or zeros, for generation 0) would have written.
PageCheck check_page(const void* src, std::size_t page_size, std::uint64_t seed, std::uint64_t page,
                     std::uint64_t generation) noexcept;

// Picks round(fraction * page_count) distinct pages, sorted: a pseudo-random set determined by
// seed, or, when sequential, one contiguous run starting at a seed-determined page.
std::vector<std::uint64_t> select_pages(std::uint64_t page_count, double fraction,
                                        std::uint64_t seed, bool sequential);

// The pages a stand-in guest leaves never written (generation 0) for a zero fraction: the one
// definition the guest and everything that checks its memory share.
std::vector<std::uint64_t> never_written_pages(std::uint64_t page_count, double zero_fraction,
                                               std::uint64_t seed);

}  // namespace memsnap::pattern
