#include "plugins/hole_punch/hole_punch.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "plugins/memfd_io/testing/test_memfd.h"
#include "plugins/plugin_api/testing/recording_sink.h"

namespace memsnap::plugins {
namespace {

using plugin::ByteRange;
using plugin::Chunk;
using plugin::ExportRequest;
using plugin::ExportStats;
using plugin::Option;
using plugin::Status;
using plugin::StatusCode;
using plugin::testing::RecordingSink;
using plugin::testing::total_bytes;
using testing::make_request;
using testing::Memfd;
using testing::pattern;

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kMiB = 1 << 20;

std::unique_ptr<HolePunchStrategy> make_strategy(const std::vector<Option>& options) {
  plugin::Strategy* s = nullptr;
  Status st = create_hole_punch(&s, options.data(), options.size());
  EXPECT_TRUE(st.ok()) << st.message;
  return std::unique_ptr<HolePunchStrategy>(static_cast<HolePunchStrategy*>(s));
}

template <typename Expected>
void expect_image(const RecordingSink& sink, const std::vector<ByteRange>& ranges,
                  Expected expected) {
  EXPECT_EQ(sink.contract_violation(), "");
  EXPECT_EQ(sink.mismatches(ranges, expected), 0u);
}

std::uint64_t released_end(const RecordingSink& sink) {
  std::uint64_t end = 0;
  for (const ByteRange& r : sink.released_ranges()) end = std::max(end, r.offset + r.length);
  return end;
}

// Forwards to a RecordingSink; make_durable fails from the n-th call on.
class FailingDurableSink final : public plugin::BlockSink {
 public:
  FailingDurableSink(RecordingSink& inner, int fail_on) : inner_(inner), fail_on_(fail_on) {}
  Status write(const Chunk* chunks, std::size_t count) noexcept override {
    return inner_.write(chunks, count);
  }
  Status make_durable() noexcept override {
    if (++calls_ >= fail_on_) return Status::Error(StatusCode::kIoError, 5, "fsync: EIO");
    return inner_.make_durable();
  }
  void released(std::uint64_t offset, std::uint64_t length) noexcept override {
    inner_.released(offset, length);
  }

 private:
  RecordingSink& inner_;
  int fail_on_;
  int calls_ = 0;
};

class HolePunchTest : public ::testing::TestWithParam<std::vector<Option>> {};

std::string options_name(const ::testing::TestParamInfo<std::vector<Option>>& info) {
  std::string name;
  for (const Option& o : info.param) {
    name += std::string(name.empty() ? "" : "_") + o.key + "_" + o.value;
  }
  return name.empty() ? "defaults" : name;
}

INSTANTIATE_TEST_SUITE_P(
    Methods, HolePunchTest,
    ::testing::Values(std::vector<Option>{}, std::vector<Option>{{"read_method", "mmap"}},
                      std::vector<Option>{{"read_method", "mmap"}, {"window_bytes", "4194304"}},
                      std::vector<Option>{{"read_method", "pread"}},
                      std::vector<Option>{{"read_method", "pread"}, {"buffer_bytes", "65536"}}),
    options_name);

TEST_P(HolePunchTest, FullExportReleasesAllMemory) {
  Memfd memfd(32 * kMiB + 3 * kPage);
  memfd.fill();
  ASSERT_EQ(memfd.allocated(), memfd.size());
  const std::vector<ByteRange> ranges = {{0, memfd.size()}};
  RecordingSink sink(memfd.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, pattern);
  EXPECT_EQ(memfd.allocated(), 0u);
  EXPECT_EQ(stats.bytes_released, memfd.size());
  EXPECT_EQ(stats.bytes_read, memfd.size());
  EXPECT_EQ(total_bytes(sink.released_ranges()), memfd.size());
  EXPECT_FALSE(sink.released_beyond_durable());
  EXPECT_EQ(sink.durable_calls(), 17u);  // 16 full chunks and the last 3 pages
  EXPECT_EQ(memfd.mismatches(0, memfd.size(), true), 0u);
}

TEST_P(HolePunchTest, ScatteredRangesReleaseOnlyThemselves) {
  Memfd memfd(24 * kMiB);
  memfd.fill();
  std::mt19937_64 rng(17);
  std::vector<ByteRange> ranges;
  for (std::uint64_t page = rng() % 8; page < memfd.size() / kPage;) {
    const std::uint64_t run =
        std::min<std::uint64_t>(rng() % 8 == 0 ? 2 + rng() % 3 : 1, memfd.size() / kPage - page);
    ranges.push_back({page * kPage, run * kPage});
    page += run + 1 + rng() % (run * 16);
  }
  RecordingSink sink(memfd.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, pattern);
  const std::uint64_t bytes = total_bytes(ranges);
  EXPECT_EQ(stats.bytes_released, bytes);
  EXPECT_EQ(memfd.allocated(), memfd.size() - bytes);
  EXPECT_FALSE(sink.released_beyond_durable());
  EXPECT_EQ(sink.durable_calls(), (bytes + 2 * kMiB - 1) / (2 * kMiB));
  // Exported pages are now zero, the others still hold their data.
  std::uint64_t next = 0;
  for (const ByteRange& r : ranges) {
    EXPECT_EQ(memfd.mismatches(next, r.offset - next, false), 0u);
    EXPECT_EQ(memfd.mismatches(r.offset, r.length, true), 0u);
    next = r.offset + r.length;
  }
  EXPECT_EQ(memfd.mismatches(next, memfd.size() - next, false), 0u);
}

TEST_P(HolePunchTest, SinkFailureHalfWayPunchesNothingUnwritten) {
  Memfd memfd(16 * kMiB);
  memfd.fill();
  const std::vector<ByteRange> ranges = {{0, memfd.size()}};
  RecordingSink sink(memfd.size(), kPage, ranges);
  sink.fail_after_bytes(7 * kMiB);
  ExportStats stats;
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
  EXPECT_EQ(st.code, StatusCode::kSinkError) << st.message;
  EXPECT_FALSE(sink.released_beyond_durable());
  // The failing write() call may have copied data, but reported failure: not released.
  const std::uint64_t released = released_end(sink);
  EXPECT_EQ(released, 6 * kMiB);
  EXPECT_EQ(total_bytes(sink.released_ranges()), released);
  EXPECT_EQ(stats.bytes_released, released);
  EXPECT_EQ(memfd.mismatches(0, released, true), 0u);
  EXPECT_EQ(memfd.mismatches(released, memfd.size() - released, false), 0u);
  EXPECT_EQ(memfd.allocated(), memfd.size() - released);
}

TEST_P(HolePunchTest, MakeDurableFailureReleasesNothingMore) {
  Memfd memfd(16 * kMiB);
  memfd.fill();
  const std::vector<ByteRange> ranges = {{0, memfd.size()}};
  RecordingSink recording(memfd.size(), kPage, ranges);
  FailingDurableSink sink(recording, 3);
  ExportStats stats;
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
  EXPECT_EQ(st.code, StatusCode::kSinkError) << st.message;
  EXPECT_EQ(st.sys_errno, 5);
  EXPECT_EQ(released_end(recording), 4 * kMiB);
  EXPECT_EQ(recording.bytes_written(), 6 * kMiB);
  EXPECT_EQ(memfd.mismatches(4 * kMiB, 12 * kMiB, false), 0u);
  EXPECT_EQ(memfd.allocated(), 12 * kMiB);
}

// Punching what is already a hole frees nothing and is counted as nothing.
TEST_P(HolePunchTest, SparseMemfdCountsOnlyRealMemory) {
  Memfd memfd(32 * kMiB);
  memfd.fill(kMiB, 3 * kPage);
  memfd.fill(20 * kMiB, kMiB);
  const std::vector<ByteRange> ranges = {{0, memfd.size()}};
  RecordingSink sink(memfd.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, [](std::uint64_t g) -> unsigned char {
    const bool data = (g >= kMiB && g < kMiB + 3 * kPage) || (g >= 20 * kMiB && g < 21 * kMiB);
    return data ? pattern(g) : 0;
  });
  EXPECT_EQ(stats.bytes_released, kMiB + 3 * kPage);
  EXPECT_EQ(memfd.allocated(), 0u);
  EXPECT_FALSE(sink.released_beyond_durable());
}

// A 2 MiB block with one page of data is exported whole and punched whole: only the page counts.
TEST_P(HolePunchTest, HugeBlockPartlyHoleCountsOnlyRealMemory) {
  Memfd memfd(8 * kMiB);
  memfd.fill(2 * kMiB + 5 * kPage, kPage);
  memfd.fill(6 * kMiB, 2 * kMiB);
  const std::vector<ByteRange> ranges = {{0, memfd.size()}};
  RecordingSink sink(memfd.size(), 2 * kMiB, ranges);
  ExportStats stats;
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges, 2 * kMiB),
                                      sink, stats);
  if (strategy->options().memfd.read_method == MemfdReadMethod::kPread &&
      strategy->options().memfd.buffer_bytes < 2 * kMiB) {
    EXPECT_EQ(st.code, StatusCode::kInvalidArgument) << "a buffer smaller than a block";
    return;
  }
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, [](std::uint64_t g) -> unsigned char {
    const bool data = (g >= 2 * kMiB + 5 * kPage && g < 2 * kMiB + 6 * kPage) || g >= 6 * kMiB;
    return data ? pattern(g) : 0;
  });
  EXPECT_EQ(total_bytes(sink.released_ranges()), 4 * kMiB);  // two whole blocks
  EXPECT_EQ(stats.bytes_released, 2 * kMiB + kPage);
  EXPECT_EQ(memfd.allocated(), 0u);
}

TEST_P(HolePunchTest, SmallChunksAndHugeBlocks) {
  Memfd memfd(8 * kMiB);
  memfd.fill();
  const std::vector<ByteRange> ranges = {{2 * kMiB, 4 * kMiB}};
  RecordingSink sink(memfd.size(), 2 * kMiB, ranges);
  ExportStats stats;
  std::vector<Option> options = GetParam();
  options.push_back({"chunk_bytes", "2097152"});
  auto strategy = make_strategy(options);
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges, 2 * kMiB),
                                      sink, stats);
  if (strategy->options().memfd.read_method == MemfdReadMethod::kPread &&
      strategy->options().memfd.buffer_bytes < 2 * kMiB) {
    EXPECT_EQ(st.code, StatusCode::kInvalidArgument) << "a buffer smaller than a block";
    EXPECT_EQ(memfd.allocated(), memfd.size());
    return;
  }
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, pattern);
  EXPECT_EQ(sink.durable_calls(), 2u);
  EXPECT_EQ(memfd.allocated(), 4 * kMiB);

  options.back() = {"chunk_bytes", "4096"};
  auto small = make_strategy(options);
  const std::vector<ByteRange> first = {{0, 2 * kMiB}};
  RecordingSink sink4k(memfd.size(), kPage, first);
  st = small->export_ranges(make_request(memfd.fd(), memfd.size(), first), sink4k, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  EXPECT_EQ(sink4k.durable_calls(), 512u);
  EXPECT_EQ(memfd.allocated(), 2 * kMiB);
  EXPECT_FALSE(sink4k.released_beyond_durable());
}

TEST(HolePunchOptionsTest, ChunkBytesNotABlockMultipleIsInvalid) {
  Memfd memfd(4 * kMiB);
  memfd.fill();
  const std::vector<ByteRange> ranges = {{0, 4 * kMiB}};
  RecordingSink sink(memfd.size(), 2 * kMiB, ranges);
  ExportStats stats;
  auto strategy = make_strategy({{"chunk_bytes", "1048576"}});
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges, 2 * kMiB),
                                      sink, stats);
  EXPECT_EQ(st.code, StatusCode::kInvalidArgument) << st.message;
  EXPECT_EQ(sink.bytes_written(), 0u);
  EXPECT_EQ(memfd.allocated(), 4 * kMiB);
}

TEST(HolePunchOptionsTest, Options) {
  auto strategy = make_strategy({{"chunk_bytes", "8388608"}, {"read_method", "pread"}});
  EXPECT_EQ(strategy->options().chunk_bytes, 8 * kMiB);
  EXPECT_EQ(strategy->options().memfd.read_method, MemfdReadMethod::kPread);
  EXPECT_EQ(make_strategy({})->options().chunk_bytes, 2 * kMiB);

  const std::vector<Option> bad = {
      {"chunk_bytes", "5000"},
      {"chunk_bytes", "0"},
      {"chunk_bytes", "2M"},
      {"chunk_bytes", nullptr},
      {"chunk_bytes", "2147483648"},
      {"read_method", "sendfile"},
      {"window_bytes", "4096"},
      {"punch", "yes"},
      {nullptr, "1"},
  };
  for (const Option& option : bad) {
    plugin::Strategy* s = nullptr;
    Status st = create_hole_punch(&s, &option, 1);
    EXPECT_EQ(st.code, StatusCode::kInvalidArgument)
        << (option.key ? option.key : "null") << "=" << (option.value ? option.value : "null");
    EXPECT_EQ(s, nullptr);
  }
}

TEST(HolePunchOptionsTest, NoMemfdIsUnsupported) {
  const std::vector<ByteRange> ranges = {{0, kPage}};
  RecordingSink sink(kMiB, kPage, ranges);
  ExportStats stats;
  EXPECT_EQ(make_strategy({})->export_ranges(make_request(-1, kMiB, ranges), sink, stats).code,
            StatusCode::kUnsupported);
}

}  // namespace
}  // namespace memsnap::plugins
