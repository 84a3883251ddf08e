// The recovery journal of a snapshot writer whose source memory is released: written at
// make_durable (before any release), enough to put every released byte back, and gone again
// once the snapshot commits or is given up with nothing released.
#include "core/snapshot/recovery_journal.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/snapshot/snapshot_writer.h"

namespace memsnap {
namespace {

namespace fs = std::filesystem;
constexpr std::uint64_t kBlock = kSmallBlockSize;
constexpr std::uint64_t kGuestBlocks = 64;

class RecoveryJournalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/memsnap-journal-test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    guest_.resize(kGuestBlocks * kBlock);
    for (std::uint64_t b = 0; b < kGuestBlocks; ++b) {
      // Every fourth block all zero, the others a byte pattern of their own.
      if (b % 4 != 3) std::memset(&guest_[b * kBlock], int(b + 1), kBlock);
    }
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::vector<std::string> files() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_)) out.push_back(e.path().string());
    std::sort(out.begin(), out.end());
    return out;
  }
  std::unique_ptr<SnapshotWriter> writer() {
    SnapshotParams p;
    p.block_size = kBlock;
    p.guest_size = kGuestBlocks * kBlock;
    p.sync_on_commit = false;
    auto w = SnapshotWriter::create(dir_ + "/s.snap", p,
                                    {{0, 16 * kBlock}, {32 * kBlock, 16 * kBlock}});
    EXPECT_TRUE(w.ok()) << w.error().to_string();
    return w.ok() ? std::move(*w) : nullptr;
  }
  // Writes blocks [first, first+count) of the guest to w, one chunk per block.
  void write(SnapshotWriter& w, std::uint64_t first, std::uint64_t count) {
    for (std::uint64_t b = first; b < first + count; ++b) {
      const plugin::Chunk c{b * kBlock, &guest_[b * kBlock], kBlock};
      ASSERT_TRUE(w.write(&c, 1).ok());
    }
  }

  std::string dir_;
  std::vector<std::uint8_t> guest_;
};

TEST_F(RecoveryJournalTest, NoJournalWithoutMakeDurableAndNoneLeftAfterCommit) {
  auto w = writer();
  ASSERT_NE(w, nullptr);
  write(*w, 0, 16);
  EXPECT_EQ(files().size(), 1u);  // the temporary file alone
  ASSERT_TRUE(w->make_durable().ok());
  ASSERT_EQ(files().size(), 2u);
  EXPECT_EQ(files()[1], w->temp_path() + kRecoveryJournalSuffix);
  write(*w, 32, 16);
  ASSERT_TRUE(w->commit().ok());
  EXPECT_EQ(files(), std::vector<std::string>{dir_ + "/s.snap"}) << "the journal outlived it";
}

TEST_F(RecoveryJournalTest, AbortWithNothingReleasedRemovesTheJournal) {
  auto w = writer();
  ASSERT_NE(w, nullptr);
  write(*w, 0, 8);
  ASSERT_TRUE(w->make_durable().ok());
  w->abort();
  EXPECT_TRUE(files().empty());
}

// The process that released memory dies before the commit: the temporary file and its journal
// are all that is left, and they put every written block back into a memfd whose released
// ranges are holes -- including a run that grew after an earlier make_durable.
TEST_F(RecoveryJournalTest, AJournalPutsEveryReleasedBlockBack) {
  auto w = writer();
  ASSERT_NE(w, nullptr);
  write(*w, 0, 6);
  ASSERT_TRUE(w->make_durable().ok());
  write(*w, 6, 10);  // continues the run recorded above
  write(*w, 32, 5);
  ASSERT_TRUE(w->make_durable().ok());
  const std::string temp = w->temp_path();
  w->keep_temp_file();  // as if the process died here: nothing removes them
  w.reset();

  auto journal = read_recovery_journal(temp + kRecoveryJournalSuffix);
  ASSERT_TRUE(journal.ok()) << journal.error().to_string();
  EXPECT_EQ(journal->snapshot_path, dir_ + "/s.snap");
  EXPECT_EQ(journal->guest_size, kGuestBlocks * kBlock);

  const int memfd = memfd_create("journal-test", MFD_CLOEXEC);
  ASSERT_GE(memfd, 0);
  ASSERT_EQ(ftruncate(memfd, static_cast<off_t>(guest_.size())), 0);
  auto restored = restore_from_journal(*journal, temp, memfd);
  ASSERT_TRUE(restored.ok()) << restored.error().to_string();
  std::vector<std::uint8_t> back(guest_.size());
  ASSERT_EQ(pread(memfd, back.data(), back.size(), 0), static_cast<ssize_t>(back.size()));
  for (std::uint64_t b = 0; b < kGuestBlocks; ++b) {
    const bool written = b < 16 || (b >= 32 && b < 37);
    const std::vector<std::uint8_t> want =
        written ? std::vector<std::uint8_t>(guest_.begin() + b * kBlock,
                                            guest_.begin() + (b + 1) * kBlock)
                : std::vector<std::uint8_t>(kBlock, 0);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), back.begin() + b * kBlock)) << "block " << b;
  }
  // Zero blocks are recorded but cost nothing to put back.
  EXPECT_EQ(*restored, 16 * kBlock - 4 * kBlock + 5 * kBlock - 1 * kBlock);
  close(memfd);
}

TEST_F(RecoveryJournalTest, AMalformedJournalOrAWrongMemfdIsAClearError) {
  const std::string j = dir_ + "/bad.recovery";
  std::ofstream(j) << "memsnap-recovery 1\nblock_size 4096 guest_size 8192 generation 1 "
                      "data_offset 4096\nrun 1 5 data 0\n";
  auto bad = read_recovery_journal(j);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message.find(":3:"), std::string::npos) << bad.error().to_string();
  std::ofstream(j) << "something else\n";
  EXPECT_FALSE(read_recovery_journal(j).ok());

  std::ofstream(j) << "memsnap-recovery 1\nblock_size 4096 guest_size 8192 generation 1 "
                      "data_offset 4096\nrun 0 1 data 0\n";
  auto good = read_recovery_journal(j);
  ASSERT_TRUE(good.ok()) << good.error().to_string();
  const int memfd = memfd_create("journal-test", MFD_CLOEXEC);
  ASSERT_EQ(ftruncate(memfd, 4096), 0);
  auto wrong = restore_from_journal(*good, dir_ + "/missing", memfd);
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.error().code, Errc::kInvalidArgument) << wrong.error().to_string();
  close(memfd);
}

}  // namespace
}  // namespace memsnap
