#include "core/live_image.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include <gtest/gtest.h>

namespace memsnap {
namespace {

constexpr std::uint64_t kBlock = 4096;
constexpr std::uint64_t kBlocks = 16;

class LiveImageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    memfd_.reset(::memfd_create("live-image-test", MFD_CLOEXEC));
    ASSERT_GE(memfd_.get(), 0);
    for (std::uint64_t b = 0; b < kBlocks; ++b) write_block(b, static_cast<std::uint8_t>(b + 1));
  }
  void write_block(std::uint64_t b, std::uint8_t value) {
    std::vector<std::uint8_t> bytes(kBlock, value);
    ASSERT_TRUE(io::pwrite_all(memfd_.get(), bytes.data(), kBlock, b * kBlock, "test").ok());
  }
  std::vector<std::uint8_t> read(std::uint64_t first, std::uint64_t count) {
    std::vector<std::uint8_t> out(count * kBlock);
    EXPECT_TRUE(io::pread_exact(memfd_.get(), out.data(), out.size(), first * kBlock, "t").ok());
    return out;
  }
  io::UniqueFd memfd_;
};

TEST_F(LiveImageTest, ABlockPreservedBeforeAWriteIsPutBackIntoWhatTheExportReadAfterIt) {
  // The export takes blocks 2..5.
  auto image =
      LiveImage::create(memfd_.get(), kBlocks * kBlock, kBlock, {{2 * kBlock, 4 * kBlock}});
  ASSERT_TRUE(image.ok()) << image.error().to_string();
  LiveImage& live = **image;
  ASSERT_TRUE(live.preserve(3).ok());
  ASSERT_TRUE(live.preserve(3).ok());   // a second fault on the same block copies nothing more
  ASSERT_TRUE(live.preserve(10).ok());  // outside the export: nothing to keep
  EXPECT_EQ(live.copies(), 1u);
  write_block(3, 0xEE);  // the guest's write goes through
  write_block(4, 0xDD);  // a write the fault server never saw (cannot happen): stays as read
  std::vector<std::uint8_t> read_back = read(2, 4);
  ASSERT_TRUE(live.patch(2 * kBlock, read_back.data(), read_back.size()).ok());
  EXPECT_EQ(read_back[0], 3);               // block 2, untouched
  EXPECT_EQ(read_back[1 * kBlock], 4);      // block 3: as at the pause
  EXPECT_EQ(read_back[2 * kBlock], 0xDD);   // block 4: never preserved, the bytes read
  EXPECT_EQ(read_back[4 * kBlock - 1], 6);  // block 5
  EXPECT_TRUE(live.broken().ok());
  // Once the export has read everything, writes need no copy.
  live.close();
  ASSERT_TRUE(live.preserve(5).ok());
  EXPECT_EQ(live.copies(), 1u);
}

TEST_F(LiveImageTest, ADiscardOfABlockTheExportStillNeedsBreaksTheImage) {
  auto image =
      LiveImage::create(memfd_.get(), kBlocks * kBlock, kBlock, {{2 * kBlock, 4 * kBlock}});
  ASSERT_TRUE(image.ok()) << image.error().to_string();
  LiveImage& live = **image;
  live.discarded(8 * kBlock, 2 * kBlock);  // outside the export
  EXPECT_TRUE(live.broken().ok());
  ASSERT_TRUE(live.preserve(2).ok());
  live.discarded(2 * kBlock, kBlock);  // preserved first: its pause-instant bytes are safe
  EXPECT_TRUE(live.broken().ok());
  live.discarded(4 * kBlock, kBlock);
  EXPECT_FALSE(live.broken().ok());
}

TEST_F(LiveImageTest, RangesThatAreNotBlockAlignedAreRefused) {
  EXPECT_FALSE(LiveImage::create(memfd_.get(), kBlocks * kBlock, kBlock, {{100, kBlock}}).ok());
  EXPECT_FALSE(
      LiveImage::create(memfd_.get(), kBlocks * kBlock, kBlock, {{0, (kBlocks + 1) * kBlock}})
          .ok());
}

}  // namespace
}  // namespace memsnap
