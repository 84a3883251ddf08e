#include "core/pattern/pattern.h"

#include <gtest/gtest.h>

#include <set>
#include <vector>

namespace memsnap::pattern {
namespace {

TEST(PatternTest, FilledPageChecksAndIsNeverZero) {
  std::vector<std::uint64_t> page(512);
  fill_page(page.data(), 4096, 7, 42, 3);
  EXPECT_TRUE(check_page(page.data(), 4096, 7, 42, 3).ok);
  EXPECT_NE(page[100], 0u);
  EXPECT_FALSE(check_page(page.data(), 4096, 7, 42, 0).ok);
}

TEST(PatternTest, MismatchTellsWhichPageAndGenerationWasFound) {
  std::vector<std::uint64_t> page(512);
  fill_page(page.data(), 4096, 7, 41, 2);
  const PageCheck c = check_page(page.data(), 4096, 7, 42, 3);
  EXPECT_FALSE(c.ok);
  EXPECT_EQ(c.found_page, 41u);
  EXPECT_EQ(c.found_generation, 2u);
  fill_page(page.data(), 4096, 7, 42, 3);
  page[300] ^= 1;  // one flipped bit in the body
  EXPECT_FALSE(check_page(page.data(), 4096, 7, 42, 3).ok);
}

TEST(PatternTest, GenerationZeroIsAllZeros) {
  std::vector<std::uint64_t> page(512, 0);
  EXPECT_TRUE(check_page(page.data(), 4096, 1, 5, 0).ok);
  page[511] = 1;
  EXPECT_FALSE(check_page(page.data(), 4096, 1, 5, 0).ok);
}

TEST(PatternTest, SelectPagesIsDeterministicDistinctAndSized) {
  for (bool dense : {false, true}) {
    const double fraction = dense ? 0.7 : 0.1;
    auto a = select_pages(10000, fraction, 99, false);
    auto b = select_pages(10000, fraction, 99, false);
    EXPECT_EQ(a, b);
    EXPECT_EQ(a.size(), dense ? 7000u : 1000u);
    EXPECT_EQ(std::set<std::uint64_t>(a.begin(), a.end()).size(), a.size());
    EXPECT_LT(a.back(), 10000u);
    EXPECT_NE(a, select_pages(10000, fraction, 100, false));
  }
  auto seq = select_pages(1000, 0.25, 3, true);
  ASSERT_EQ(seq.size(), 250u);
  for (std::size_t i = 1; i < seq.size(); ++i) EXPECT_EQ(seq[i], seq[i - 1] + 1);
  EXPECT_EQ(select_pages(1000, 1.0, 3, false).size(), 1000u);
  EXPECT_TRUE(select_pages(1000, 0.0, 3, false).empty());
}

}  // namespace
}  // namespace memsnap::pattern
