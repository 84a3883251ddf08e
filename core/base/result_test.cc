#include "core/base/result.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

namespace memsnap {
namespace {

TEST(ResultTest, HoldsValueOrError) {
  Result<int> good = 42;
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, 42);
  Result<int> bad = make_error(Errc::kNotFound, "no such thing", 2);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, Errc::kNotFound);
  EXPECT_EQ(bad.error().sys_errno, 2);
  EXPECT_EQ(bad.error().to_string(), "not_found: no such thing");
}

TEST(ResultTest, EveryCodeHasADistinctStableName) {
  std::set<std::string_view> names;
  for (int c = static_cast<int>(Errc::kOk); c <= static_cast<int>(Errc::kDataAtRisk); ++c) {
    auto name = errc_name(static_cast<Errc>(c));
    EXPECT_NE(name, "unknown") << c;
    EXPECT_TRUE(names.insert(name).second) << "duplicate name " << name;
  }
}

}  // namespace
}  // namespace memsnap
