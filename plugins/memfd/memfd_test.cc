#include "plugins/memfd/memfd.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
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
using plugin::ExportRequest;
using plugin::ExportStats;
using plugin::Option;
using plugin::Region;
using plugin::Status;
using plugin::StatusCode;
using plugin::testing::RecordingSink;
using plugin::testing::total_bytes;
using testing::make_request;
using testing::Memfd;
using testing::pattern;

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kMiB = 1 << 20;

std::unique_ptr<MemfdStrategy> make_strategy(const std::vector<Option>& options) {
  plugin::Strategy* s = nullptr;
  Status st = create_memfd(&s, options.data(), options.size());
  EXPECT_TRUE(st.ok()) << st.message;
  return std::unique_ptr<MemfdStrategy>(static_cast<MemfdStrategy*>(s));
}

// Requested bytes equal expected(offset); all others are untouched (0xEE).
template <typename Expected>
void expect_image(const RecordingSink& sink, const std::vector<ByteRange>& ranges,
                  Expected expected) {
  EXPECT_EQ(sink.contract_violation(), "");
  EXPECT_EQ(sink.mismatches(ranges, expected), 0u);
}

std::vector<ByteRange> scattered_ranges(std::uint64_t size, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::vector<ByteRange> ranges;
  std::uint64_t page = rng() % 8;
  const std::uint64_t pages = size / kPage;
  while (page < pages) {
    const std::uint64_t run =
        std::min<std::uint64_t>(rng() % 8 == 0 ? 2 + rng() % 3 : 1, pages - page);
    ranges.push_back({page * kPage, run * kPage});
    page += run + 1 + rng() % (run * 16);
  }
  return ranges;
}

// Each configuration: small windows and buffers force many windows / fills.
class MemfdMethodTest : public ::testing::TestWithParam<std::vector<Option>> {};

std::string options_name(const ::testing::TestParamInfo<std::vector<Option>>& info) {
  std::string name;
  for (const Option& o : info.param) {
    name += std::string(name.empty() ? "" : "_") + o.key + "_" + o.value;
  }
  return name.empty() ? "defaults" : name;
}

INSTANTIATE_TEST_SUITE_P(
    Methods, MemfdMethodTest,
    ::testing::Values(std::vector<Option>{}, std::vector<Option>{{"read_method", "mmap"}},
                      std::vector<Option>{{"read_method", "mmap"}, {"window_bytes", "2097152"}},
                      std::vector<Option>{{"read_method", "mmap"}, {"populate", "false"}},
                      std::vector<Option>{{"read_method", "pread"}},
                      std::vector<Option>{{"read_method", "pread"}, {"buffer_bytes", "65536"}}),
    options_name);

TEST_P(MemfdMethodTest, FullExportIsByteExact) {
  Memfd memfd(13 * kMiB + 3 * kPage);
  memfd.fill();
  const std::vector<ByteRange> ranges = {{0, memfd.size()}};
  RecordingSink sink(memfd.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, pattern);
  EXPECT_EQ(stats.bytes_read, memfd.size());
  EXPECT_GE(stats.read_calls, 1u);
}

TEST_P(MemfdMethodTest, ScatteredTenPercentIsByteExact) {
  Memfd memfd(24 * kMiB);
  memfd.fill();
  const std::vector<ByteRange> ranges = scattered_ranges(memfd.size(), 9);
  ASSERT_GT(ranges.size(), 500u);
  RecordingSink sink(memfd.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, pattern);
  EXPECT_EQ(stats.bytes_read, total_bytes(ranges));
  // Batched: many chunks per sink call (a 64 KiB buffer holds about a dozen ranges).
  EXPECT_LE(sink.write_calls(), ranges.size() / 8 + 1);
}

// Regions do not matter to a memfd (guest offset == file offset), even when ranges span them.
TEST_P(MemfdMethodTest, RangesSpanningRegionsAndWindows) {
  Memfd memfd(8 * kMiB);
  memfd.fill();
  const std::vector<Region> regions = {{0, 0x7000000000, 3 * kMiB},
                                       {3 * kMiB, 0x7100000000, kPage},
                                       {3 * kMiB + kPage, 0x7200000000, 5 * kMiB - kPage}};
  const std::vector<ByteRange> ranges = {{kPage, kPage},
                                         {2 * kMiB - kPage, 2 * kMiB},  // window and region edges
                                         {5 * kMiB - 2 * kPage, 4 * kPage},
                                         {8 * kMiB - kPage, kPage}};
  RecordingSink sink(memfd.size(), kPage, ranges);
  ExportStats stats;
  ExportRequest request = make_request(memfd.fd(), memfd.size(), ranges);
  request.regions = regions.data();
  request.region_count = regions.size();
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(request, sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, pattern);
}

TEST_P(MemfdMethodTest, RangePastEndOfFileIsShortRead) {
  Memfd memfd(kMiB);
  memfd.fill();
  for (const ByteRange past : {ByteRange{kMiB - kPage, 2 * kPage}, ByteRange{kMiB, kPage}}) {
    const std::vector<ByteRange> ranges = {{0, kPage}, past};
    RecordingSink sink(2 * kMiB, kPage, ranges);
    ExportStats stats;
    auto strategy = make_strategy(GetParam());
    Status st = strategy->export_ranges(make_request(memfd.fd(), 2 * kMiB, ranges), sink, stats);
    EXPECT_EQ(st.code, StatusCode::kShortRead) << st.message;
    EXPECT_EQ(sink.bytes_written(), 0u);
  }
}

// Holes are exported as zeros without reading them, so the memfd stays sparse.
TEST_P(MemfdMethodTest, SparseMemfdStaysUnpopulatedAndExportsZeros) {
  Memfd memfd(24 * kMiB);
  const std::vector<ByteRange> data = {
      {0, kPage}, {10 * kMiB + kPage, 3 * kPage}, {24 * kMiB - kPage, kPage}};
  for (const ByteRange& d : data) memfd.fill(d.offset, d.length);
  const std::uint64_t before = memfd.allocated();
  ASSERT_EQ(before, total_bytes(data));
  auto expected = [&](std::uint64_t g) -> unsigned char {
    for (const ByteRange& d : data) {
      if (g >= d.offset && g < d.offset + d.length) return pattern(g);
    }
    return 0;
  };
  const std::vector<ByteRange> all = {{0, memfd.size()}};
  const std::vector<ByteRange> some = {{kPage, kMiB}, {10 * kMiB, 2 * kMiB}, {20 * kMiB, 4 * kMiB}};
  for (const auto& ranges : {all, some}) {
    RecordingSink sink(memfd.size(), kPage, ranges);
    ExportStats stats;
    auto strategy = make_strategy(GetParam());
    Status st =
        strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
    ASSERT_TRUE(st.ok()) << st.message;
    expect_image(sink, ranges, expected);
    EXPECT_EQ(memfd.allocated(), before);
    EXPECT_LE(stats.bytes_read, total_bytes(data));
  }
}

// Short ranges are read without looking for holes first: the holes among them come out as
// zeros, and still nothing gets populated (pread of a hole allocates nothing).
TEST_P(MemfdMethodTest, ShortRangesOverHolesExportZerosAndPopulateNothing) {
  Memfd memfd(8 * kMiB);
  for (std::uint64_t off = 0; off < memfd.size(); off += 64 * kPage) memfd.fill(off, 8 * kPage);
  const std::uint64_t before = memfd.allocated();
  auto expected = [](std::uint64_t g) -> unsigned char {
    return g % (64 * kPage) < 8 * kPage ? pattern(g) : 0;
  };
  std::vector<ByteRange> ranges;  // 1 to 40 pages each, over data, holes and both
  for (std::uint64_t off = kPage; off + 40 * kPage <= memfd.size(); off += 45 * kPage) {
    ranges.push_back({off, (1 + off / kPage % 40) * kPage});
  }
  RecordingSink sink(memfd.size(), kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, expected);
  EXPECT_EQ(memfd.allocated(), before);
}

// With 2 MiB blocks a block can be partly hole: it is data, and still nothing gets populated.
TEST_P(MemfdMethodTest, HugeBlocksPartlyHole) {
  Memfd memfd(8 * kMiB);
  memfd.fill(2 * kMiB + 2 * kPage, kPage);
  memfd.fill(6 * kMiB, 2 * kMiB);
  const std::uint64_t before = memfd.allocated();
  auto expected = [](std::uint64_t g) -> unsigned char {
    const bool data = (g >= 2 * kMiB + 2 * kPage && g < 2 * kMiB + 3 * kPage) || g >= 6 * kMiB;
    return data ? pattern(g) : 0;
  };
  const std::vector<ByteRange> ranges = {{0, 8 * kMiB}};
  RecordingSink sink(memfd.size(), 2 * kMiB, ranges);
  ExportStats stats;
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges, 2 * kMiB),
                                      sink, stats);
  if (strategy->options().read_method == MemfdReadMethod::kPread &&
      strategy->options().buffer_bytes < 2 * kMiB) {
    EXPECT_EQ(st.code, StatusCode::kInvalidArgument) << "a buffer smaller than a block";
    return;
  }
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, expected);
  EXPECT_EQ(memfd.allocated(), before);
}

TEST_P(MemfdMethodTest, SinkFailureStopsTheExport) {
  Memfd memfd(16 * kMiB);
  memfd.fill();
  const std::vector<ByteRange> ranges = scattered_ranges(memfd.size(), 4);
  RecordingSink sink(memfd.size(), kPage, ranges);
  sink.fail_after_bytes(kPage);
  ExportStats stats;
  auto strategy = make_strategy(GetParam());
  Status st = strategy->export_ranges(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
  EXPECT_EQ(st.code, StatusCode::kSinkError);
  EXPECT_EQ(st.sys_errno, 28);
  EXPECT_EQ(sink.write_calls(), 1u);
}

// A pread stand-in: short reads of at most `limit` bytes, and scripted failures first.
struct PreadInjector {
  enum Action { kReal, kEintr, kEof, kEio };
  std::vector<Action> script;
  std::size_t limit = 0;
  std::size_t calls = 0;

  static ssize_t call(void* context, int fd, void* buffer, std::size_t count, off_t offset) {
    auto* self = static_cast<PreadInjector*>(context);
    const Action action = self->calls < self->script.size() ? self->script[self->calls] : kReal;
    ++self->calls;
    switch (action) {
      case kEintr:
        errno = EINTR;
        return -1;
      case kEio:
        errno = EIO;
        return -1;
      case kEof:
        return 0;
      case kReal:
        break;
    }
    return ::pread(fd, buffer, self->limit != 0 ? std::min(count, self->limit) : count, offset);
  }
};

TEST(MemfdTest, ShortPreadsAndEintrContinue) {
  Memfd memfd(4 * kMiB);
  memfd.fill();
  const std::vector<ByteRange> ranges = scattered_ranges(memfd.size(), 2);
  RecordingSink sink(memfd.size(), kPage, ranges);
  ExportStats stats;
  PreadInjector injector;
  injector.script = {PreadInjector::kEintr, PreadInjector::kReal, PreadInjector::kEintr};
  injector.limit = 1000;
  MemfdOptions options;
  options.read_method = MemfdReadMethod::kPread;
  options.buffer_bytes = 65536;
  MemfdExporter exporter(options);
  exporter.set_pread_for_test(&PreadInjector::call, &injector);
  Status st = exporter.run(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges, pattern);
  const std::uint64_t bytes = total_bytes(ranges);
  EXPECT_EQ(stats.bytes_read, bytes);
  EXPECT_EQ(stats.retries, 2u);
  EXPECT_EQ(stats.read_calls, injector.calls - 2);
  EXPECT_GE(stats.read_calls, bytes / 1000);
  // Every run of pages is one pread that comes back short until its last piece.
  EXPECT_GE(stats.partial_reads, bytes / 1000 - ranges.size());
}

TEST(MemfdTest, PreadEofAndErrorsStopTheExport) {
  Memfd memfd(kMiB);
  memfd.fill();
  const std::vector<ByteRange> ranges = {{0, 4 * kPage}, {8 * kPage, kPage}};
  MemfdOptions options;
  options.read_method = MemfdReadMethod::kPread;
  for (const auto action : {PreadInjector::kEof, PreadInjector::kEio}) {
    RecordingSink sink(memfd.size(), kPage, ranges);
    ExportStats stats;
    PreadInjector injector;
    injector.script = {PreadInjector::kReal, action};
    injector.limit = kPage;
    MemfdExporter exporter(options);
    exporter.set_pread_for_test(&PreadInjector::call, &injector);
    Status st = exporter.run(make_request(memfd.fd(), memfd.size(), ranges), sink, stats);
    EXPECT_EQ(st.code,
              action == PreadInjector::kEof ? StatusCode::kShortRead : StatusCode::kIoError)
        << st.message;
    EXPECT_NE(std::string(st.message).find("0x1000"), std::string::npos) << st.message;
    EXPECT_EQ(sink.bytes_written(), 0u);
  }
}

TEST(MemfdTest, NoMemfdIsUnsupported) {
  const std::vector<ByteRange> ranges = {{0, kPage}};
  RecordingSink sink(kMiB, kPage, ranges);
  ExportStats stats;
  auto strategy = make_strategy({});
  EXPECT_EQ(strategy->export_ranges(make_request(-1, kMiB, ranges), sink, stats).code,
            StatusCode::kUnsupported);
}

TEST(MemfdTest, MalformedRequests) {
  Memfd memfd(kMiB);
  auto strategy = make_strategy({});
  ExportStats stats;
  RecordingSink sink(kMiB, kPage, {{0, kMiB}});
  const std::vector<std::vector<ByteRange>> bad = {
      {{1, kPage}}, {{0, 100}}, {{kPage, kPage}, {0, kPage}}, {{0, 0}}, {{kMiB, kPage}}};
  for (const auto& ranges : bad) {
    EXPECT_EQ(strategy->export_ranges(make_request(memfd.fd(), kMiB, ranges), sink, stats).code,
              StatusCode::kInvalidArgument);
  }
  const std::vector<ByteRange> ok = {{0, kPage}};
  for (std::uint64_t block : {0ul, 3000ul, 4 * kMiB}) {
    EXPECT_EQ(strategy->export_ranges(make_request(memfd.fd(), kMiB, ok, block), sink, stats).code,
              StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(sink.bytes_written(), 0u);
}

TEST(MemfdTest, Options) {
  auto strategy = make_strategy(
      {{"read_method", "pread"}, {"window_bytes", "4194304"}, {"buffer_bytes", "65536"}});
  EXPECT_EQ(strategy->options().read_method, MemfdReadMethod::kPread);
  EXPECT_EQ(strategy->options().window_bytes, 4 * kMiB);
  EXPECT_EQ(strategy->options().buffer_bytes, 64 * 1024u);
  EXPECT_TRUE(strategy->options().populate);
  EXPECT_FALSE(make_strategy({{"populate", "false"}})->options().populate);

  const std::vector<Option> bad = {
      {"read_method", "splice"},
      {"read_method", ""},
      {"read_method", nullptr},
      {"window_bytes", "1048576"},
      {"window_bytes", "0"},
      {"window_bytes", "2097153"},
      {"window_bytes", "2147483648"},
      {"buffer_bytes", "100"},
      {"buffer_bytes", "0"},
      {"buffer_bytes", "8MiB"},
      {"populate", "yes"},
      {"populate", ""},
      {"chunk_bytes", "2097152"},
      {"no_such_option", "1"},
      {nullptr, nullptr},
  };
  for (const Option& option : bad) {
    plugin::Strategy* s = nullptr;
    Status st = create_memfd(&s, &option, 1);
    EXPECT_EQ(st.code, StatusCode::kInvalidArgument)
        << (option.key ? option.key : "null") << "=" << (option.value ? option.value : "null");
    EXPECT_EQ(s, nullptr);
  }
}

// The exporter's hook: called after each chunk_bytes of data, once everything of the chunk is
// written and nothing of it is mapped.
class RecordingHook final : public ChunkHook {
 public:
  RecordingHook(const RecordingSink& sink, std::string memfd_name)
      : sink_(sink), memfd_name_(std::move(memfd_name)) {}

  Status after_chunk(const ByteRange* pieces, std::size_t count) noexcept override {
    std::uint64_t bytes = 0;
    for (std::size_t i = 0; i < count; ++i) {
      bytes += pieces[i].length;
      for (std::uint64_t g = pieces[i].offset; g < pieces[i].offset + pieces[i].length; ++g) {
        if (sink_.image()[g] != pattern(g)) {
          not_written = true;
          break;
        }
      }
      if (i > 0 && pieces[i - 1].offset + pieces[i - 1].length >= pieces[i].offset) unmerged = true;
    }
    chunk_sizes.push_back(bytes);
    std::ifstream maps("/proc/self/maps");
    for (std::string line; std::getline(maps, line);) {
      if (line.find(memfd_name_) != std::string::npos) still_mapped = true;
    }
    return calls_until_failure_-- == 1 ? Status::Error(StatusCode::kIoError, 5, "hook failure")
                                       : Status::Ok();
  }
  void fail_on_call(int n) { calls_until_failure_ = n; }

  std::vector<std::uint64_t> chunk_sizes;
  bool not_written = false;
  bool still_mapped = false;
  bool unmerged = false;

 private:
  const RecordingSink& sink_;
  std::string memfd_name_;
  int calls_until_failure_ = 0;
};

TEST_P(MemfdMethodTest, ExporterCallsTheHookAfterEachWrittenChunk) {
  Memfd memfd(16 * kMiB, "hooked_memfd");
  memfd.fill(0, 12 * kMiB);  // the last 4 MiB are a hole: not data, not in any chunk
  const std::vector<ByteRange> ranges = {{0, 5 * kMiB + kPage}, {6 * kMiB, 10 * kMiB}};
  RecordingSink sink(memfd.size(), kPage, ranges);
  ExportStats stats;
  RecordingHook hook(sink, "hooked_memfd");
  MemfdOptions options;
  for (const Option& o : GetParam()) ASSERT_TRUE(apply_memfd_option(o, &options).ok());
  MemfdExporter exporter(options);
  Status st =
      exporter.run(make_request(memfd.fd(), memfd.size(), ranges), sink, stats, &hook, 2 * kMiB);
  ASSERT_TRUE(st.ok()) << st.message;
  expect_image(sink, ranges,
               [](std::uint64_t g) -> unsigned char { return g < 12 * kMiB ? pattern(g) : 0; });
  // 11 MiB + 1 page of data: five full chunks, then the rest.
  EXPECT_EQ(hook.chunk_sizes, (std::vector<std::uint64_t>{2 * kMiB, 2 * kMiB, 2 * kMiB, 2 * kMiB,
                                                          2 * kMiB, kMiB + kPage}));
  EXPECT_FALSE(hook.not_written);
  EXPECT_FALSE(hook.still_mapped);
  EXPECT_FALSE(hook.unmerged);

  // A failing hook stops the export there.
  RecordingSink sink2(memfd.size(), kPage, ranges);
  RecordingHook failing(sink2, "hooked_memfd");
  failing.fail_on_call(2);
  st = exporter.run(make_request(memfd.fd(), memfd.size(), ranges), sink2, stats, &failing,
                    2 * kMiB);
  EXPECT_EQ(st.code, StatusCode::kIoError);
  EXPECT_EQ(failing.chunk_sizes.size(), 2u);
  EXPECT_EQ(sink2.bytes_written(), 4 * kMiB);

  // chunk_bytes must be whole blocks.
  EXPECT_EQ(
      exporter.run(make_request(memfd.fd(), memfd.size(), ranges), sink2, stats, &hook, 5000).code,
      StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace memsnap::plugins
