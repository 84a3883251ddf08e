#include "text/utf8.h"

#include <string>
#include <string_view>

#include <gtest/gtest.h>

namespace memsnap {
namespace {

constexpr std::size_t npos = std::string_view::npos;

std::size_t check(std::initializer_list<int> bytes) {
  std::string s;
  for (int b : bytes) s.push_back(static_cast<char>(b));
  return first_invalid_utf8(s);
}

TEST(Utf8Test, WellFormedTextIsAccepted) {
  EXPECT_EQ(first_invalid_utf8(""), npos);
  EXPECT_EQ(first_invalid_utf8("plain ascii: 0x7f \x7f"), npos);
  EXPECT_EQ(first_invalid_utf8("\xc3\xa9t\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"), npos);
  EXPECT_EQ(check({0xc2, 0x80}), npos);              // U+0080, the smallest 2-byte form
  EXPECT_EQ(check({0xed, 0x9f, 0xbf}), npos);        // U+D7FF, just below the surrogates
  EXPECT_EQ(check({0xf4, 0x8f, 0xbf, 0xbf}), npos);  // U+10FFFF, the largest code point
}

TEST(Utf8Test, TheFirstBadByteIsReported) {
  EXPECT_EQ(check({'a', 0x80}), 1u);               // a lone continuation byte
  EXPECT_EQ(check({'a', 'b', 0xc0, 0x80}), 2u);    // overlong NUL
  EXPECT_EQ(check({0xe0, 0x80, 0x80}), 0u);        // overlong 3-byte form
  EXPECT_EQ(check({0xf0, 0x80, 0x80, 0x80}), 0u);  // overlong 4-byte form
  EXPECT_EQ(check({0xed, 0xa0, 0x80}), 0u);        // U+D800, a surrogate
  EXPECT_EQ(check({0xf4, 0x90, 0x80, 0x80}), 0u);  // above U+10FFFF
  EXPECT_EQ(check({0xf5, 0x80, 0x80, 0x80}), 0u);  // never a lead byte
  EXPECT_EQ(check({'x', 0xe2, 0x82}), 1u);         // truncated at the end
  EXPECT_EQ(check({0xc3, 'a'}), 0u);               // continuation missing
}

}  // namespace
}  // namespace memsnap
