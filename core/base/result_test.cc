#include "core/base/result.h"

#include <gtest/gtest.h>

#include <memory>
#include <set>
#include <string>
#include <utility>

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

// A source of Status and Result values that counts how often it is called.
struct Source {
  int calls = 0;
  Status status(bool ok) {
    ++calls;
    if (ok) return {};
    return make_error(Errc::kNotFound, "gone", 2);
  }
  Result<std::unique_ptr<int>> value(bool ok, int v) {
    ++calls;
    if (ok) return std::make_unique<int>(v);
    return make_error(Errc::kIoError, "short read", 5);
  }
};

void expect_error(const Error& e, Errc code, const std::string& message, int sys_errno) {
  EXPECT_EQ(e.code, code);
  EXPECT_EQ(e.message, message);
  EXPECT_EQ(e.sys_errno, sys_errno);
}

Status status_then(Source& src, bool ok, int* reached) {
  MEMSNAP_RETURN_IF_ERROR(src.status(ok));
  ++*reached;
  return {};
}

Result<int> status_in_result(Source& src, bool ok, int* reached) {
  MEMSNAP_RETURN_IF_ERROR(src.status(ok));
  ++*reached;
  return 7;
}

Status result_discarded(Source& src, bool ok, int* reached) {
  MEMSNAP_RETURN_IF_ERROR(src.value(ok, 3));
  ++*reached;
  return {};
}

TEST(ResultMacrosTest, ReturnIfErrorReturnsTheErrorIntactFromStatusFunctions) {
  Source src;
  int reached = 0;
  Status s = status_then(src, false, &reached);
  ASSERT_FALSE(s.ok());
  expect_error(s.error(), Errc::kNotFound, "gone", 2);
  EXPECT_EQ(reached, 0);
  EXPECT_EQ(src.calls, 1);
}

TEST(ResultMacrosTest, ReturnIfErrorContinuesOnSuccess) {
  Source src;
  int reached = 0;
  EXPECT_TRUE(status_then(src, true, &reached).ok());
  EXPECT_EQ(reached, 1);
  EXPECT_EQ(src.calls, 1);
}

TEST(ResultMacrosTest, ReturnIfErrorWorksInResultFunctionsAndOnResults) {
  Source src;
  int reached = 0;
  Result<int> bad = status_in_result(src, false, &reached);
  ASSERT_FALSE(bad.ok());
  expect_error(bad.error(), Errc::kNotFound, "gone", 2);
  Result<int> good = status_in_result(src, true, &reached);
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, 7);
  EXPECT_EQ(reached, 1);
  EXPECT_EQ(src.calls, 2);

  Status from_result = result_discarded(src, false, &reached);
  ASSERT_FALSE(from_result.ok());
  expect_error(from_result.error(), Errc::kIoError, "short read", 5);
  EXPECT_TRUE(result_discarded(src, true, &reached).ok());
  EXPECT_EQ(reached, 2);
  EXPECT_EQ(src.calls, 4);
}

TEST(ResultMacrosTest, ReturnIfErrorCopiesAnLvalueInsteadOfMovingFromIt) {
  const Status kept = make_error(Errc::kBusy, "busy", 16);
  auto f = [&]() -> Status {
    MEMSNAP_RETURN_IF_ERROR(kept);
    return {};
  };
  Status s = f();
  ASSERT_FALSE(s.ok());
  expect_error(s.error(), Errc::kBusy, "busy", 16);
  expect_error(kept.error(), Errc::kBusy, "busy", 16);
}

// Declares the value, assigns an existing variable and declares a second value in one scope (the
// hidden temporaries must not collide).
Result<int> sum_of(Source& src, bool first_ok, bool second_ok) {
  MEMSNAP_ASSIGN_OR_RETURN(auto first, src.value(first_ok, 20));
  std::unique_ptr<int> second;
  MEMSNAP_ASSIGN_OR_RETURN(second, src.value(second_ok, 22));
  MEMSNAP_ASSIGN_OR_RETURN(const std::unique_ptr<int>& third, src.value(true, 0));
  return *first + *second + *third;
}

Status assign_in_status(Source& src, bool ok, int* out) {
  MEMSNAP_ASSIGN_OR_RETURN(std::unique_ptr<int> v, src.value(ok, 9));
  *out = *v;
  return {};
}

TEST(ResultMacrosTest, AssignOrReturnContinuesWithTheValue) {
  Source src;
  Result<int> r = sum_of(src, true, true);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 42);
  EXPECT_EQ(src.calls, 3);
}

TEST(ResultMacrosTest, AssignOrReturnReturnsTheErrorIntactAndStops) {
  Source src;
  Result<int> first = sum_of(src, false, true);
  ASSERT_FALSE(first.ok());
  expect_error(first.error(), Errc::kIoError, "short read", 5);
  EXPECT_EQ(src.calls, 1);  // nothing after the failing step ran

  Result<int> second = sum_of(src, true, false);
  ASSERT_FALSE(second.ok());
  expect_error(second.error(), Errc::kIoError, "short read", 5);
  EXPECT_EQ(src.calls, 3);
}

TEST(ResultMacrosTest, AssignOrReturnWorksInStatusFunctions) {
  Source src;
  int out = 0;
  EXPECT_TRUE(assign_in_status(src, true, &out).ok());
  EXPECT_EQ(out, 9);
  Status s = assign_in_status(src, false, &out);
  ASSERT_FALSE(s.ok());
  expect_error(s.error(), Errc::kIoError, "short read", 5);
  EXPECT_EQ(src.calls, 2);
}

TEST(ErrorTest, WithContextPrefixesTheMessageAndKeepsCodeAndErrno) {
  const Error e = make_error(Errc::kIoError, "short read", 5);
  expect_error(e.with_context("reading /x"), Errc::kIoError, "reading /x: short read", 5);
  expect_error(e, Errc::kIoError, "short read", 5);  // the const& overload copies
  Error moved = make_error(Errc::kTimeout, "no answer", 110);
  expect_error(std::move(moved).with_context("qmp").with_context("boot"), Errc::kTimeout,
               "boot: qmp: no answer", 110);
}

}  // namespace
}  // namespace memsnap
