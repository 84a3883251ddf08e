#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <string>
#include <vector>

#include <xxhash.h>

#include "core/snapshot/snapshot_chain.h"
#include "core/snapshot/snapshot_format.h"
#include "core/snapshot/snapshot_reader.h"
#include "core/snapshot/snapshot_writer.h"

namespace memsnap {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::uint8_t>;

constexpr std::uint64_t k4K = kSmallBlockSize;
constexpr std::uint64_t k2M = kHugeBlockSize;

// A fresh directory under /tmp, removed with everything in it.
class SnapshotTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/memsnap-snapshot-test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr) << std::strerror(errno);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  // Every file in the directory, hidden ones included.
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_)) out.push_back(e.path().filename());
    std::sort(out.begin(), out.end());
    return out;
  }

  std::string dir_;
};

// Block contents: random words, with a share of all-zero blocks and of blocks whose only
// non-zero byte is the last one (they must not be taken for zero blocks).
void fill_block(std::uint8_t* p, std::uint64_t bs, std::mt19937_64& rng, int zero_percent) {
  const int dice = static_cast<int>(rng() % 100);
  std::memset(p, 0, bs);
  if (dice < zero_percent) return;
  if (dice < zero_percent + 5) {
    p[bs - 1] = 1;
    return;
  }
  for (std::uint64_t i = 0; i < bs; i += 8) {
    const std::uint64_t w = rng();
    std::memcpy(p + i, &w, 8);
  }
}

Bytes random_image(std::uint64_t blocks, std::uint64_t bs, std::uint64_t seed, int zero_percent) {
  Bytes image(blocks * bs);
  std::mt19937_64 rng(seed);
  for (std::uint64_t b = 0; b < blocks; ++b)
    fill_block(image.data() + b * bs, bs, rng, zero_percent);
  return image;
}

std::vector<plugin::ByteRange> ranges_of(const std::vector<bool>& dirty, std::uint64_t bs) {
  std::vector<plugin::ByteRange> out;
  for (std::uint64_t b = 0; b < dirty.size(); ++b) {
    if (!dirty[b]) continue;
    if (!out.empty() && out.back().offset + out.back().length == b * bs) {
      out.back().length += bs;
    } else {
      out.push_back({b * bs, bs});
    }
  }
  return out;
}

// The error code of a Status or Result, kOk if it succeeded (so a wrong success fails the test
// instead of asserting).
template <typename R>
Errc code_of(const R& r) {
  return r.ok() ? Errc::kOk : r.error().code;
}

// MEMSNAP_TEST_DATA_WRITE=direct (the snapshot_test_direct ctest): every writer of the tests
// below syncs and writes its data with O_DIRECT, so that each integrity test checks that mode too.
bool all_direct() {
  static const bool direct = [] {
    const char* mode = std::getenv("MEMSNAP_TEST_DATA_WRITE");
    return mode != nullptr && std::string(mode) == "direct";
  }();
  return direct;
}

SnapshotParams params_for(std::uint64_t bs, std::uint64_t guest_size, std::uint64_t generation = 1,
                          SnapshotId parent = {}) {
  SnapshotParams p;
  p.block_size = bs;
  p.guest_size = guest_size;
  p.generation = generation;
  p.parent_id = parent;
  p.sync_on_commit = all_direct();  // off keeps the tests fast; one test turns it on
  p.data_write = all_direct() ? DataWrite::kDirect : DataWrite::kBuffered;
  return p;
}

// Feeds `image` over `dirty` to the writer in chunks of 1..max_chunk_blocks blocks, a few chunks
// per write() call.
void feed(SnapshotWriter& w, const Bytes& image, const std::vector<plugin::ByteRange>& dirty,
          std::uint64_t bs, std::uint64_t seed, std::uint64_t max_chunk_blocks = 7) {
  std::mt19937_64 rng(seed);
  std::vector<plugin::Chunk> batch;
  auto send = [&] {
    if (batch.empty()) return;
    const plugin::Status s = w.write(batch.data(), batch.size());
    ASSERT_TRUE(s.ok()) << s.message;
    batch.clear();
  };
  for (const auto& r : dirty) {
    for (std::uint64_t off = r.offset; off < r.offset + r.length;) {
      const std::uint64_t n =
          std::min<std::uint64_t>((1 + rng() % max_chunk_blocks) * bs, r.offset + r.length - off);
      batch.push_back({off, image.data() + off, n});
      off += n;
      if (rng() % 3 == 0) {
        send();
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
  }
  send();
}

SnapshotId write_snapshot(const std::string& file, const SnapshotParams& params, const Bytes& image,
                          const std::vector<plugin::ByteRange>& dirty, std::uint64_t seed = 1) {
  auto w = SnapshotWriter::create(file, params, dirty);
  EXPECT_TRUE(w.ok()) << w.error().to_string();
  if (!w.ok()) return {};
  feed(**w, image, dirty, params.block_size, seed);
  const Status s = (*w)->commit();
  EXPECT_TRUE(s.ok()) << s.error().to_string();
  return (*w)->snapshot_id();
}

std::unique_ptr<SnapshotReader> open_ok(const std::string& file, Verify v = Verify::kFull) {
  auto r = SnapshotReader::open(file, v);
  EXPECT_TRUE(r.ok()) << r.error().to_string();
  return r.ok() ? std::move(r).value() : nullptr;
}

Bytes read_file(const std::string& file) {
  Bytes out(fs::file_size(file));
  std::ifstream in(file, std::ios::binary);
  in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
  return out;
}

void write_file(const std::string& file, const Bytes& bytes) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

FileHeader header_of(const Bytes& file) {
  FileHeader h;
  std::memcpy(&h, file.data(), sizeof(h));
  return h;
}

// The origin record's bytes as the file holds them (what follows the FileHeader, up to
// header_size, as far as the file goes).
std::string origin_bytes_of(const Bytes& file, const FileHeader& h) {
  const std::uint64_t end = std::min<std::uint64_t>(h.header_size, file.size());
  if (end <= sizeof(FileHeader)) return {};
  return std::string(file.begin() + sizeof(FileHeader), file.begin() + end);
}

// Replaces the header and fixes its checksum (over the origin record the file holds), so only
// the field under test is wrong.
void put_header(Bytes& file, FileHeader h) {
  h.header_checksum = compute_header_checksum(h, origin_bytes_of(file, h));
  std::memcpy(file.data(), &h, sizeof(h));
}

std::vector<MapRun> map_of(const Bytes& file) {
  const FileHeader h = header_of(file);
  std::vector<MapRun> runs(h.run_count);
  std::memcpy(runs.data(), file.data() + h.map_offset, runs.size() * sizeof(MapRun));
  return runs;
}

// Replaces the map and fixes both checksums, so only the map's content is wrong.
void put_map(Bytes& file, const std::vector<MapRun>& runs) {
  FileHeader h = header_of(file);
  ASSERT_EQ(runs.size(), h.run_count);
  std::memcpy(file.data() + h.map_offset, runs.data(), runs.size() * sizeof(MapRun));
  h.map_checksum = compute_map_checksum(runs);
  put_header(file, h);
}

plugin::Status write_one(SnapshotWriter& w, std::uint64_t offset, const void* data,
                         std::uint64_t length) {
  const plugin::Chunk c{offset, data, length};
  return w.write(&c, 1);
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST_F(SnapshotTest, RoundTripWithDataAndZeroBlocks) {
  const std::uint64_t blocks = 300;
  const Bytes image = random_image(blocks, k4K, 11, 30);
  const auto dirty = ranges_of(std::vector<bool>(blocks, true), k4K);
  write_snapshot(path("a.snap"), params_for(k4K, blocks * k4K, 3), image, dirty);
  EXPECT_EQ(files(), std::vector<std::string>{"a.snap"});

  auto r = open_ok(path("a.snap"));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->header().generation, 3u);
  EXPECT_TRUE(r->is_base());
  std::uint64_t zero_blocks = 0;
  for (std::uint64_t b = 0; b < blocks; ++b) {
    const bool zero = std::all_of(image.begin() + b * k4K, image.begin() + (b + 1) * k4K,
                                  [](std::uint8_t x) { return x == 0; });
    zero_blocks += zero;
    const auto run = r->find_run(b);
    ASSERT_TRUE(run.has_value());
    EXPECT_EQ(r->runs()[*run].kind, zero ? RunKind::kZero : RunKind::kData) << "block " << b;
  }
  ASSERT_GT(zero_blocks, 0u);
  EXPECT_EQ(r->summary().zero_blocks, zero_blocks);
  EXPECT_EQ(r->summary().data_blocks, blocks - zero_blocks);
  EXPECT_EQ(r->header().data_bytes, (blocks - zero_blocks) * k4K);
  EXPECT_FALSE(r->find_run(blocks).has_value());

  Bytes out(image.size(), 0xAA);
  ASSERT_TRUE(r->read(0, out.size(), out.data()).ok());
  EXPECT_TRUE(out == image);
  Bytes part(10000);
  ASSERT_TRUE(r->read(5 * k4K + 123, part.size(), part.data()).ok());
  EXPECT_TRUE(std::equal(part.begin(), part.end(), image.begin() + 5 * k4K + 123));
  EXPECT_EQ(code_of(r->read(image.size() - 10, 11, part.data())), Errc::kInvalidArgument);
}

// Format 2: the origin record a writer is given comes back from the reader, in order, and the
// header's size says where it ends.
TEST_F(SnapshotTest, TheOriginRecordRoundTrips) {
  const Bytes image = random_image(8, k4K, 5, 0);
  SnapshotParams p = params_for(k4K, image.size());
  ASSERT_TRUE(p.origin.set(kOriginStrategy, "hole_punch").ok());
  ASSERT_TRUE(p.origin.set(kOriginStrategyVersion, "0.1.0").ok());
  ASSERT_TRUE(p.origin.set(kOriginStrategyCapabilities, "needs-memfd,releases-memory").ok());
  ASSERT_TRUE(p.origin.set("future_key", "kept = as is").ok());
  write_snapshot(path("o.snap"), p, image, {{0, image.size()}});
  auto r = open_ok(path("o.snap"));
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->header().version, kSnapshotFormatVersion);
  EXPECT_EQ(r->origin().strategy(), "hole_punch");
  EXPECT_EQ(r->origin().fields(), p.origin.fields());
  EXPECT_EQ(r->header().header_size, sizeof(FileHeader) + p.origin.serialize().size());
  Bytes back(image.size());
  ASSERT_TRUE(r->read(0, back.size(), back.data()).ok());
  EXPECT_EQ(back, image);

  // Without an origin: version 2 all the same, header_size 128.
  write_snapshot(path("n.snap"), params_for(k4K, image.size()), image, {{0, image.size()}});
  auto n = open_ok(path("n.snap"));
  ASSERT_NE(n, nullptr);
  EXPECT_TRUE(n->origin().empty());
  EXPECT_EQ(n->header().header_size, sizeof(FileHeader));
}

TEST_F(SnapshotTest, AnOriginRecordThatCannotBeStoredIsRefusedBeforeAnythingIsWritten) {
  SnapshotOrigin o;
  EXPECT_EQ(o.set("Strategy", "x").error().code, Errc::kInvalidArgument);
  EXPECT_EQ(o.set("", "x").error().code, Errc::kInvalidArgument);
  EXPECT_EQ(o.set("strategy", "two\nlines").error().code, Errc::kInvalidArgument);
  EXPECT_EQ(o.set("strategy", std::string(257, 'a')).error().code, Errc::kInvalidArgument);
  EXPECT_TRUE(o.empty());
  SnapshotParams p = params_for(k4K, 8 * k4K);
  for (int i = 0; p.origin.serialize().size() <= kMaxOriginBytes; ++i) {
    ASSERT_TRUE(p.origin.set("key_" + std::to_string(i), std::string(200, 'v')).ok());
  }
  auto w = SnapshotWriter::create(path("big.snap"), p, {{0, 8 * k4K}});
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.error().code, Errc::kInvalidArgument);
  EXPECT_NE(w.error().message.find("origin record"), std::string::npos) << w.error().message;
  EXPECT_TRUE(files().empty());
}

TEST_F(SnapshotTest, ZeroBlocksTakeNoDataBytes) {
  const std::uint64_t blocks = 1024;
  Bytes image(blocks * k4K, 0);
  image[5 * k4K + 17] = 9;   // block 5: data
  image[701 * k4K - 1] = 1;  // block 700: only its last byte is set
  const auto dirty = ranges_of(std::vector<bool>(blocks, true), k4K);
  auto w = SnapshotWriter::create(path("z.snap"), params_for(k4K, image.size()), dirty);
  ASSERT_TRUE(w.ok());
  feed(**w, image, dirty, k4K, 2, 64);
  ASSERT_TRUE((*w)->commit().ok());
  EXPECT_EQ((*w)->stats().data_blocks, 2u);
  EXPECT_EQ((*w)->stats().zero_blocks, blocks - 2);
  EXPECT_EQ((*w)->stats().data_bytes, 2 * k4K);
  EXPECT_EQ((*w)->stats().run_count, 5u);  // zero, data, zero, data, zero

  auto r = open_ok(path("z.snap"));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->header().data_bytes, 2 * k4K);
  EXPECT_EQ(r->runs().size(), 5u);
  EXPECT_EQ(fs::file_size(path("z.snap")), kSnapshotDataOffset + 2 * k4K + 5 * sizeof(MapRun));
  Bytes out(image.size(), 0xAA);
  ASSERT_TRUE(r->read(0, out.size(), out.data()).ok());
  EXPECT_TRUE(out == image);
}

TEST_F(SnapshotTest, DataRunsAreCutAtOneMiB) {
  const std::uint64_t blocks = 700;
  const Bytes image = random_image(blocks, k4K, 5, 0);  // 5% have only their last byte set
  const auto dirty = ranges_of(std::vector<bool>(blocks, true), k4K);
  write_snapshot(path("c.snap"), params_for(k4K, image.size()), image, dirty);
  auto r = open_ok(path("c.snap"));
  ASSERT_TRUE(r);
  ASSERT_EQ(r->runs().size(), 3u);
  EXPECT_EQ(r->runs()[0].block_count, 256u);
  EXPECT_EQ(r->runs()[1].block_count, 256u);
  EXPECT_EQ(r->runs()[2].block_count, 700u - 512u);
  EXPECT_EQ(r->runs()[1].data_offset, 256 * k4K);
  Bytes out(image.size());
  ASSERT_TRUE(r->read(0, out.size(), out.data()).ok());
  EXPECT_TRUE(out == image);
}

TEST_F(SnapshotTest, TwoMiBBlocks) {
  const std::uint64_t blocks = 6;
  Bytes image = random_image(blocks, k2M, 8, 0);
  std::memset(image.data() + 2 * k2M, 0, k2M);  // block 2 is zero
  std::vector<bool> dirty_blocks = {true, true, true, true, false, true};
  const auto dirty = ranges_of(dirty_blocks, k2M);
  write_snapshot(path("h.snap"), params_for(k2M, image.size()), image, dirty);
  std::memset(image.data() + 4 * k2M, 0, k2M);  // not dirty in a base: zero

  auto r = open_ok(path("h.snap"));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->block_size(), k2M);
  const std::vector<RunKind> kinds = {RunKind::kData, RunKind::kData, RunKind::kZero,
                                      RunKind::kData, RunKind::kZero, RunKind::kData};
  ASSERT_EQ(r->runs().size(), kinds.size());  // one block per DATA run
  for (std::size_t i = 0; i < kinds.size(); ++i) EXPECT_EQ(r->runs()[i].kind, kinds[i]) << i;
  EXPECT_EQ(r->header().data_bytes, 4 * k2M);
  Bytes out(image.size());
  ASSERT_TRUE(r->read(0, out.size(), out.data()).ok());
  EXPECT_TRUE(out == image);
}

TEST_F(SnapshotTest, ManyScatteredBlocksInOneWriteCall) {
  // 3000 data blocks separated by zero blocks, in one call: more iovecs than IOV_MAX.
  const std::uint64_t blocks = 6000;
  Bytes image = random_image(blocks, k4K, 21, 0);
  for (std::uint64_t b = 1; b < blocks; b += 2) std::memset(image.data() + b * k4K, 0, k4K);
  const plugin::Chunk chunk{0, image.data(), image.size()};
  auto w =
      SnapshotWriter::create(path("s.snap"), params_for(k4K, image.size()), {{0, image.size()}});
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->write(&chunk, 1).ok());
  ASSERT_TRUE((*w)->commit().ok());
  auto r = open_ok(path("s.snap"));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->summary().data_runs, 3000u);
  Bytes out(image.size());
  ASSERT_TRUE(r->read(0, out.size(), out.data()).ok());
  EXPECT_TRUE(out == image);
}

TEST_F(SnapshotTest, ParallelAndInlineHashingWriteTheSameMap) {
  // Big batches are hashed on a helper thread, small ones inline; the result must not differ.
  const std::uint64_t blocks = 5000;
  const Bytes image = random_image(blocks, k4K, 31, 10);
  const std::vector<plugin::ByteRange> dirty = {{0, image.size()}};
  SnapshotParams p = params_for(k4K, image.size());
  p.snapshot_id[0] = 1;
  auto parallel = SnapshotWriter::create(path("p.snap"), p, dirty);
  ASSERT_TRUE(parallel.ok());
  const plugin::Chunk halves[] = {{0, image.data(), 2001 * k4K},
                                  {2001 * k4K, image.data() + 2001 * k4K, 2999 * k4K}};
  ASSERT_TRUE((*parallel)->write(&halves[0], 1).ok());
  ASSERT_TRUE((*parallel)->write(&halves[1], 1).ok());
  ASSERT_TRUE((*parallel)->commit().ok());
  p.hash_in_parallel = false;
  auto inline_writer = SnapshotWriter::create(path("i.snap"), p, dirty);
  ASSERT_TRUE(inline_writer.ok());
  ASSERT_TRUE((*inline_writer)->write(halves, 2).ok());
  ASSERT_TRUE((*inline_writer)->commit().ok());

  auto a = open_ok(path("p.snap"));
  auto b = open_ok(path("i.snap"));
  ASSERT_TRUE(a && b);
  ASSERT_EQ(a->runs().size(), b->runs().size());
  EXPECT_EQ(std::memcmp(a->runs().data(), b->runs().data(), a->runs().size_bytes()), 0);
  EXPECT_EQ(fs::file_size(path("p.snap")), fs::file_size(path("i.snap")));
  Bytes out(image.size());
  ASSERT_TRUE(a->read(0, out.size(), out.data()).ok());
  EXPECT_TRUE(out == image);
}

TEST_F(SnapshotTest, HashingSharedWithTheHelperMatchesInlineForRandomChunking) {
  // DATA runs that cross write() calls and batches, runs whose bytes come from several
  // separate buffers, zero blocks between them, scattered dirty ranges: every checksum must
  // verify (open_ok checks them all) and the map must equal the one of inline hashing.
  const std::uint64_t blocks = 3000;
  const Bytes image = random_image(blocks, k4K, 41, 20);
  std::mt19937_64 rng(7);
  std::vector<plugin::ByteRange> dirty;
  for (std::uint64_t b = 0; b < blocks;) {
    const std::uint64_t n = std::min<std::uint64_t>(1 + rng() % 400, blocks - b);
    if (rng() % 4 != 0) dirty.push_back({b * k4K, n * k4K});
    b += n + rng() % 3;
  }
  // Each chunk's bytes live in their own allocation, so a run's pieces are not contiguous.
  std::vector<std::vector<plugin::Chunk>> calls;
  std::vector<Bytes> copies;
  for (const auto& r : dirty) {
    for (std::uint64_t off = r.offset; off < r.offset + r.length;) {
      const std::uint64_t n =
          std::min<std::uint64_t>((1 + rng() % 300) * k4K, r.offset + r.length - off);
      copies.emplace_back(image.begin() + static_cast<std::ptrdiff_t>(off),
                          image.begin() + static_cast<std::ptrdiff_t>(off + n));
      if (calls.empty() || rng() % 3 == 0) calls.emplace_back();
      calls.back().push_back({off, nullptr, n});
      off += n;
    }
  }
  std::size_t k = 0;
  for (auto& call : calls) {
    for (auto& c : call) c.data = copies[k++].data();
  }
  SnapshotParams p = params_for(k4K, image.size());
  p.snapshot_id[0] = 1;
  for (const bool parallel : {true, false}) {
    p.hash_in_parallel = parallel;
    auto w = SnapshotWriter::create(path(parallel ? "p.snap" : "i.snap"), p, dirty);
    ASSERT_TRUE(w.ok());
    for (const auto& call : calls) ASSERT_TRUE((*w)->write(call.data(), call.size()).ok());
    ASSERT_TRUE((*w)->commit().ok());
  }
  auto a = open_ok(path("p.snap"));
  auto b = open_ok(path("i.snap"));
  ASSERT_TRUE(a && b);
  ASSERT_EQ(a->runs().size(), b->runs().size());
  EXPECT_EQ(std::memcmp(a->runs().data(), b->runs().data(), a->runs().size_bytes()), 0);
  for (const auto& r : dirty) {
    Bytes out(r.length);
    ASSERT_TRUE(a->read(r.offset, r.length, out.data()).ok());
    EXPECT_EQ(std::memcmp(out.data(), image.data() + r.offset, r.length), 0);
  }
}

TEST_F(SnapshotTest, PreallocatedSpaceThatZeroBlocksLeaveUnusedIsCutOff) {
  // Half the blocks are zero, so the data area ends far before the preallocated space does.
  const std::uint64_t blocks = 4096;
  Bytes image = random_image(blocks, k4K, 51, 0);
  for (std::uint64_t b = 0; b < blocks; b += 2) std::memset(image.data() + b * k4K, 0, k4K);
  SnapshotParams p = params_for(k4K, image.size());
  for (const bool preallocate : {true, false}) {
    p.preallocate = preallocate;
    const std::string file = path(preallocate ? "pre.snap" : "plain.snap");
    write_snapshot(file, p, image, {{0, image.size()}});
    auto r = open_ok(file);
    ASSERT_TRUE(r);
    EXPECT_EQ(fs::file_size(file),
              kSnapshotDataOffset + blocks / 2 * k4K + r->runs().size() * sizeof(MapRun));
    Bytes out(image.size());
    ASSERT_TRUE(r->read(0, out.size(), out.data()).ok());
    EXPECT_TRUE(out == image);
  }
}

TEST_F(SnapshotTest, UndirtiedBlocksAreParentInADiffAndZeroInABase) {
  const std::uint64_t blocks = 16;
  const Bytes image = random_image(blocks, k4K, 3, 0);
  const std::vector<plugin::ByteRange> dirty = {{4 * k4K, 4 * k4K}};
  write_snapshot(path("base.snap"), params_for(k4K, image.size()), image, dirty);
  SnapshotId parent{};
  parent[0] = 1;
  write_snapshot(path("diff.snap"), params_for(k4K, image.size(), 2, parent), image, dirty);
  auto base = open_ok(path("base.snap"));
  auto diff = open_ok(path("diff.snap"));
  ASSERT_TRUE(base && diff);
  EXPECT_EQ(base->summary().zero_blocks, 12u);
  EXPECT_EQ(base->summary().zero_runs, 2u);
  EXPECT_EQ(diff->summary().parent_blocks, 12u);
  EXPECT_EQ(diff->summary().parent_runs, 2u);
  EXPECT_EQ(diff->summary().zero_blocks, 0u);
  Bytes out(k4K);
  EXPECT_TRUE(diff->read(4 * k4K, k4K, out.data()).ok());
  const Status s = diff->read(3 * k4K, 2 * k4K, out.data());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(code_of(s), Errc::kSnapshotChainMismatch);
}

TEST_F(SnapshotTest, SyncOptionsAndStats) {
  const Bytes image = random_image(8, k4K, 4, 0);
  SnapshotParams p = params_for(k4K, image.size());
  p.sync_on_commit = true;
  p.sync_on_make_durable = true;
  auto w = SnapshotWriter::create(path("sync.snap"), p, {{0, image.size()}});
  ASSERT_TRUE(w.ok());
  EXPECT_FALSE(is_zero_id((*w)->snapshot_id()));  // generated
  ASSERT_TRUE(write_one(**w, 0, image.data(), image.size()).ok());
  EXPECT_TRUE((*w)->make_durable().ok());
  ASSERT_TRUE((*w)->commit().ok());
  EXPECT_TRUE((*w)->committed());
  auto r = open_ok(path("sync.snap"));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->header().snapshot_id, (*w)->snapshot_id());
  EXPECT_GT(r->header().created_unix_ns, 0u);
  EXPECT_EQ(code_of((*w)->commit()), Errc::kInvalidArgument);  // only once
}

// ---------------------------------------------------------------------------------------------
// O_DIRECT data writes (DataWrite::kDirect)

SnapshotParams direct_params(std::uint64_t bs, std::uint64_t guest_size) {
  SnapshotParams p = params_for(bs, guest_size);
  p.sync_on_commit = true;
  p.data_write = DataWrite::kDirect;
  return p;
}

// A copy of an image that starts `misalign` bytes past a page boundary (0: page-aligned), as a
// strategy's buffer may (malloc puts a big one 16 bytes into a page).
class PlacedCopy {
 public:
  PlacedCopy(const Bytes& image, std::uint64_t misalign) : storage_(image.size() + 2 * k4K) {
    const auto at = reinterpret_cast<std::uintptr_t>(storage_.data());
    data_ = storage_.data() + (k4K - at % k4K) % k4K + misalign;
    std::copy(image.begin(), image.end(), data_);
  }
  const std::uint8_t* data() const { return data_; }

 private:
  Bytes storage_;
  std::uint8_t* data_ = nullptr;
};

// Feeds the whole image in chunks of 1..max_chunk_blocks blocks, each taken from one of the
// copies at random (so aligned and unaligned chunks mix within one batch), a few chunks a call.
plugin::Status feed_from(SnapshotWriter& w, const std::vector<const std::uint8_t*>& copies,
                         std::uint64_t size, std::uint64_t bs, std::uint64_t seed,
                         std::uint64_t max_chunk_blocks) {
  std::mt19937_64 rng(seed);
  std::vector<plugin::Chunk> batch;
  for (std::uint64_t off = 0; off < size;) {
    const std::uint64_t n = std::min<std::uint64_t>((1 + rng() % max_chunk_blocks) * bs, size - off);
    batch.push_back({off, copies[rng() % copies.size()] + off, n});
    off += n;
    if (rng() % 3 == 0 || off == size) {
      const plugin::Status s = w.write(batch.data(), batch.size());
      if (!s.ok()) return s;
      batch.clear();
    }
  }
  return plugin::Status::Ok();
}

// Opens the committed file with every checksum verified and compares every page with the image.
void expect_reads_back(const std::string& file, const Bytes& image) {
  auto r = open_ok(file, Verify::kFull);
  ASSERT_TRUE(r);
  Bytes out(image.size(), 0xAA);
  ASSERT_TRUE(r->read(0, out.size(), out.data()).ok());
  for (std::uint64_t page = 0; page < image.size() / k4K; ++page) {
    ASSERT_EQ(std::memcmp(out.data() + page * k4K, image.data() + page * k4K, k4K), 0)
        << file << ": page " << page << " differs";
  }
}

// Counts the O_DIRECT writes and misbehaves on the ones a test asks for.
struct DirectFault {
  int calls = 0;
  int fail_from = -1;  // this call and the later ones fail with fail_errno (-1: none fail)
  int fail_errno = EINVAL;
  std::uint64_t short_to = 0;  // > 0: every call writes at most this many bytes
};
DirectFault g_fault;

ssize_t faulty_pwritev(int fd, const iovec* iov, int count, off_t offset) {
  const int call = g_fault.calls++;
  if (g_fault.fail_from >= 0 && call >= g_fault.fail_from) {
    errno = g_fault.fail_errno;
    return -1;
  }
  if (g_fault.short_to == 0) return ::pwritev(fd, iov, count, offset);
  const std::uint64_t n = std::min<std::uint64_t>(iov[0].iov_len, g_fault.short_to);
  return ::pwrite(fd, iov[0].iov_base, n, offset);
}

class DirectWriteTest : public SnapshotTest {
 protected:
  void SetUp() override {
    SnapshotTest::SetUp();
    g_fault = DirectFault{};
  }
  void TearDown() override {
    set_direct_pwritev_for_testing(nullptr);
    SnapshotTest::TearDown();
  }
  // Writes image from copies (see feed_from) with DataWrite::kDirect into name and returns the
  // writer after commit (null if a step failed).
  std::unique_ptr<SnapshotWriter> write_direct(const std::string& name, const Bytes& image,
                                               const std::vector<const std::uint8_t*>& copies,
                                               std::uint64_t bs = k4K,
                                               std::uint64_t max_chunk_blocks = 700) {
    auto w = SnapshotWriter::create(path(name), direct_params(bs, image.size()),
                                    {{0, image.size()}});
    EXPECT_TRUE(w.ok()) << w.error().to_string();
    if (!w.ok()) return nullptr;
    const plugin::Status s = feed_from(**w, copies, image.size(), bs, 5, max_chunk_blocks);
    EXPECT_TRUE(s.ok()) << s.message;
    const Status c = (*w)->commit();
    EXPECT_TRUE(c.ok()) << c.error().to_string();
    if (!s.ok() || !c.ok()) return nullptr;
    return std::move(*w);
  }
};

TEST_F(DirectWriteTest, AlignedUnalignedAndMixedSourcesReadBackEveryPage) {
  // 24 MiB, 20% zero blocks: chunks of up to 700 blocks make batches beyond the bounce buffer.
  const Bytes image = random_image(6144, k4K, 61, 20);
  const PlacedCopy aligned(image, 0), off16(image, 16), off512(image, 512);
  const std::vector<std::vector<const std::uint8_t*>> sources = {
      {aligned.data()}, {off16.data()}, {aligned.data(), off16.data(), off512.data()}};
  for (std::size_t i = 0; i < sources.size(); ++i) {
    const std::string name = "direct" + std::to_string(i) + ".snap";
    auto w = write_direct(name, image, sources[i]);
    ASSERT_TRUE(w);
    EXPECT_TRUE(w->writes_direct()) << w->direct_fallback();  // /tmp: ext4 takes O_DIRECT
    expect_reads_back(path(name), image);
  }
}

TEST_F(DirectWriteTest, TwoMiBBlocksFromAnUnalignedBuffer) {
  const Bytes image = random_image(12, k2M, 62, 25);
  const PlacedCopy off16(image, 16), aligned(image, 0);
  auto w = write_direct("huge.snap", image, {off16.data(), aligned.data()}, k2M, 5);
  ASSERT_TRUE(w);
  expect_reads_back(path("huge.snap"), image);
}

TEST_F(DirectWriteTest, UnsyncedSnapshotsIgnoreIt) {
  SnapshotParams p = direct_params(k4K, 16 * k4K);
  p.sync_on_commit = false;
  auto w = SnapshotWriter::create(path("u.snap"), p, {{0, 16 * k4K}});
  ASSERT_TRUE(w.ok());
  EXPECT_FALSE((*w)->writes_direct());
  EXPECT_EQ((*w)->direct_fallback(), "");
}

TEST_F(DirectWriteTest, EinvalFromTheFirstWriteFallsBackToBufferedWrites) {
  // What a file system without O_DIRECT support answers at the first write.
  g_fault.fail_from = 0;
  set_direct_pwritev_for_testing(&faulty_pwritev);
  const Bytes image = random_image(3000, k4K, 63, 10);
  const PlacedCopy aligned(image, 0), off16(image, 16);
  auto w = write_direct("einval.snap", image, {aligned.data(), off16.data()});
  ASSERT_TRUE(w);
  EXPECT_EQ(g_fault.calls, 1);
  EXPECT_FALSE(w->writes_direct());
  EXPECT_NE(w->direct_fallback().find("O_DIRECT write"), std::string::npos) << w->direct_fallback();
  expect_reads_back(path("einval.snap"), image);
}

TEST_F(DirectWriteTest, EinvalHalfWayLosesNothing) {
  g_fault.fail_from = 3;
  set_direct_pwritev_for_testing(&faulty_pwritev);
  const Bytes image = random_image(6000, k4K, 64, 10);
  const PlacedCopy aligned(image, 0), off16(image, 16);
  auto w = write_direct("half.snap", image, {aligned.data(), off16.data()});
  ASSERT_TRUE(w);
  EXPECT_EQ(g_fault.calls, 4);
  EXPECT_FALSE(w->writes_direct());
  expect_reads_back(path("half.snap"), image);
}

TEST_F(DirectWriteTest, ShortWritesAreContinued) {
  // Aligned short writes: the writer goes on with O_DIRECT from where each stopped.
  g_fault.short_to = 3 * k4K;
  set_direct_pwritev_for_testing(&faulty_pwritev);
  const Bytes image = random_image(2000, k4K, 65, 10);
  const PlacedCopy aligned(image, 0), off16(image, 16);
  auto w = write_direct("short.snap", image, {aligned.data(), off16.data()});
  ASSERT_TRUE(w);
  EXPECT_TRUE(w->writes_direct()) << w->direct_fallback();
  EXPECT_GE(std::uint64_t(g_fault.calls), w->stats().data_blocks / 3);  // 3 blocks a call
  expect_reads_back(path("short.snap"), image);
}

TEST_F(DirectWriteTest, AnUnalignedShortWriteFallsBackForTheRest) {
  // A direct write that stops 1000 bytes in (written through a buffered descriptor of the file:
  // O_DIRECT itself refuses such a length). The next offset cannot take O_DIRECT.
  set_direct_pwritev_for_testing([](int fd, const iovec* iov, int, off_t offset) -> ssize_t {
    ++g_fault.calls;
    const int buffered = ::open(("/proc/self/fd/" + std::to_string(fd)).c_str(), O_WRONLY);
    if (buffered < 0) return -1;
    const ssize_t n = ::pwrite(buffered, iov[0].iov_base, 1000, offset);
    ::close(buffered);
    return n;
  });
  const Bytes image = random_image(500, k4K, 66, 10);
  const PlacedCopy off16(image, 16);
  auto w = write_direct("odd.snap", image, {off16.data()});
  ASSERT_TRUE(w);
  EXPECT_EQ(g_fault.calls, 1);
  EXPECT_FALSE(w->writes_direct());
  EXPECT_NE(w->direct_fallback().find("unaligned"), std::string::npos) << w->direct_fallback();
  expect_reads_back(path("odd.snap"), image);
}

TEST_F(DirectWriteTest, AnIoErrorPoisonsAndNothingIsCommitted) {
  g_fault.fail_from = 2;
  g_fault.fail_errno = EIO;
  set_direct_pwritev_for_testing(&faulty_pwritev);
  const Bytes image = random_image(3000, k4K, 67, 0);
  const PlacedCopy aligned(image, 0);
  auto w = SnapshotWriter::create(path("eio.snap"), direct_params(k4K, image.size()),
                                  {{0, image.size()}});
  ASSERT_TRUE(w.ok());
  const plugin::Status s = feed_from(**w, {aligned.data()}, image.size(), k4K, 7, 700);
  EXPECT_EQ(s.code, plugin::StatusCode::kSinkError);
  EXPECT_EQ(s.sys_errno, EIO);
  const Status c = (*w)->commit();
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().sys_errno, EIO);
  EXPECT_EQ(files(), std::vector<std::string>{});
}

TEST_F(DirectWriteTest, ATmpfsSnapshotIsWrittenOneWayOrTheOther) {
  // tmpfs has taken O_DIRECT since Linux 6.6; before, opening with it fails (EINVAL) and the
  // writer falls back. Either way every page must come back.
  char tmpl[] = "/dev/shm/memsnap-direct-test.XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) GTEST_SKIP() << "no /dev/shm: " << std::strerror(errno);
  const std::string file = std::string(tmpl) + "/shm.snap";
  const Bytes image = random_image(1000, k4K, 68, 10);
  const PlacedCopy off16(image, 16), aligned(image, 0);
  auto w = SnapshotWriter::create(file, direct_params(k4K, image.size()), {{0, image.size()}});
  ASSERT_TRUE(w.ok());
  EXPECT_NE((*w)->writes_direct(), !(*w)->direct_fallback().empty());
  const plugin::Status s =
      feed_from(**w, {off16.data(), aligned.data()}, image.size(), k4K, 8, 300);
  EXPECT_TRUE(s.ok()) << s.message;
  EXPECT_TRUE((*w)->commit().ok());
  expect_reads_back(file, image);
  std::error_code ec;
  fs::remove_all(tmpl, ec);
}

// ---------------------------------------------------------------------------------------------
// Chains

TEST_F(SnapshotTest, BaseAndTwoDiffsResolveLikeAnInMemoryModel) {
  const std::uint64_t blocks = 1500;
  const std::uint64_t guest = blocks * k4K;
  std::mt19937_64 rng(20261129);
  Bytes model(guest, 0);
  std::vector<int> owner(blocks, 0);  // the layer that last wrote each block
  std::vector<std::string> paths;
  SnapshotId parent{};
  for (int layer = 0; layer < 3; ++layer) {
    const int percent = layer == 0 ? 70 : 20;
    std::vector<bool> dirty(blocks);
    for (std::uint64_t b = 0; b < blocks; ++b) dirty[b] = static_cast<int>(rng() % 100) < percent;
    const Bytes content = random_image(blocks, k4K, rng(), 25);
    for (std::uint64_t b = 0; b < blocks; ++b) {
      if (!dirty[b]) continue;
      std::memcpy(model.data() + b * k4K, content.data() + b * k4K, k4K);
      owner[b] = layer;
    }
    paths.push_back(path("layer" + std::to_string(layer) + ".snap"));
    parent = write_snapshot(paths.back(), params_for(k4K, guest, 10 + layer, parent), content,
                            ranges_of(dirty, k4K), rng());
    ASSERT_FALSE(HasFailure());
  }

  auto chain = SnapshotChain::open(paths, Verify::kFull);
  ASSERT_TRUE(chain.ok()) << chain.error().to_string();
  ASSERT_EQ(chain->size(), 3u);
  Bytes out(guest, 0xAA);
  ASSERT_TRUE(chain->read(0, guest, out.data()).ok());
  EXPECT_TRUE(out == model);

  for (int i = 0; i < 200; ++i) {
    const std::uint64_t off = rng() % guest;
    const std::uint64_t len = 1 + rng() % std::min<std::uint64_t>(guest - off, 64 * k4K);
    Bytes part(len, 0xAA);
    ASSERT_TRUE(chain->read(off, len, part.data()).ok());
    ASSERT_TRUE(std::equal(part.begin(), part.end(), model.begin() + static_cast<long>(off)))
        << "read at " << off << " length " << len;
  }

  for (std::uint64_t b = 0; b < blocks; ++b) {
    auto src = chain->resolve(b);
    ASSERT_TRUE(src.ok());
    const bool zero = std::all_of(model.begin() + b * k4K, model.begin() + (b + 1) * k4K,
                                  [](std::uint8_t x) { return x == 0; });
    EXPECT_EQ(src->kind, zero ? RunKind::kZero : RunKind::kData) << "block " << b;
    if (!zero) {
      EXPECT_EQ(src->layer, static_cast<std::size_t>(owner[b])) << "block " << b;
    }
  }
  EXPECT_EQ(code_of(chain->resolve(blocks)), Errc::kInvalidArgument);
}

class ChainMismatchTest : public SnapshotTest {
 protected:
  void SetUp() override {
    SnapshotTest::SetUp();
    image_ = random_image(8, k4K, 1, 0);
    base_a_ = write_snapshot(path("a.snap"), params_for(k4K, image_.size()), image_, all_);
    write_snapshot(path("b.snap"), params_for(k4K, image_.size()), image_, all_);
    write_snapshot(path("a1.snap"), params_for(k4K, image_.size(), 2, base_a_), image_, some_);
  }
  Errc chain_error(std::vector<std::string> names) {
    for (auto& n : names) n = path(n);
    auto c = SnapshotChain::open(names, Verify::kFull);
    if (!c.ok()) last_message_ = c.error().message;
    return c.ok() ? Errc::kOk : c.error().code;
  }

  Bytes image_;
  SnapshotId base_a_{};
  const std::vector<plugin::ByteRange> all_ = {{0, 8 * k4K}};
  const std::vector<plugin::ByteRange> some_ = {{k4K, 2 * k4K}};
  std::string last_message_;
};

TEST_F(ChainMismatchTest, AcceptsAGoodChain) {
  EXPECT_EQ(chain_error({"a.snap", "a1.snap"}), Errc::kOk);
  EXPECT_EQ(chain_error({"a.snap"}), Errc::kOk);
}

TEST_F(ChainMismatchTest, WrongParent) {
  EXPECT_EQ(chain_error({"b.snap", "a1.snap"}), Errc::kSnapshotChainMismatch);
  EXPECT_NE(last_message_.find("wrong parent"), std::string::npos) << last_message_;
  EXPECT_EQ(chain_error({"a.snap", "b.snap"}), Errc::kSnapshotChainMismatch);  // two bases
}

TEST_F(ChainMismatchTest, WrongOrder) {
  EXPECT_EQ(chain_error({"a1.snap", "a.snap"}), Errc::kSnapshotChainMismatch);
  EXPECT_NE(last_message_.find("must be a base"), std::string::npos) << last_message_;
}

TEST_F(ChainMismatchTest, DifferentBlockSize) {
  // Same 2 MiB guest, 4 KiB blocks in the base and 2 MiB blocks in the diff.
  const Bytes big(k2M, 7);
  const Bytes small = random_image(k2M / k4K, k4K, 2, 0);
  const SnapshotId base = write_snapshot(path("c.snap"), params_for(k4K, k2M), small, {{0, k2M}});
  write_snapshot(path("c-2m.snap"), params_for(k2M, k2M, 2, base), big, {{0, k2M}});
  EXPECT_EQ(chain_error({"c.snap", "c-2m.snap"}), Errc::kSnapshotChainMismatch);
  EXPECT_NE(last_message_.find("block size"), std::string::npos) << last_message_;
}

TEST_F(ChainMismatchTest, DifferentGuestSize) {
  const Bytes bigger = random_image(16, k4K, 3, 0);
  write_snapshot(path("a-big.snap"), params_for(k4K, bigger.size(), 2, base_a_), bigger,
                 {{0, k4K}});
  EXPECT_EQ(chain_error({"a.snap", "a-big.snap"}), Errc::kSnapshotChainMismatch);
}

TEST_F(ChainMismatchTest, GenerationMustIncrease) {
  write_snapshot(path("a-same-gen.snap"), params_for(k4K, image_.size(), 1, base_a_), image_,
                 some_);
  EXPECT_EQ(chain_error({"a.snap", "a-same-gen.snap"}), Errc::kSnapshotChainMismatch);
  EXPECT_NE(last_message_.find("generation"), std::string::npos) << last_message_;
}

TEST_F(ChainMismatchTest, EmptyListAndBrokenLayer) {
  EXPECT_EQ(chain_error({}), Errc::kInvalidArgument);
  EXPECT_EQ(chain_error({"a.snap", "missing.snap"}), Errc::kNotFound);
  Bytes f = read_file(path("a1.snap"));
  f[0] = 'X';
  write_file(path("a1.snap"), f);
  EXPECT_EQ(chain_error({"a.snap", "a1.snap"}), Errc::kSnapshotBadMagic);
}

// Snapshot files are hostile input: what the reader opens and how much a header may make it do.

class HostileFileTest : public SnapshotTest {};

TEST_F(HostileFileTest, AFifoIsRefusedAtOnceInsteadOfHanging) {
  const std::string fifo = path("fifo.snap");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  auto opening = std::async(std::launch::async, [&] { return SnapshotReader::open(fifo); });
  if (opening.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
    // Today's open() blocks until a writer comes: be that writer so the test can end.
    const int unblock = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    opening.wait();
    if (unblock >= 0) ::close(unblock);
    FAIL() << "opening a FIFO as a snapshot blocked";
  }
  auto r = opening.get();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::kInvalidArgument) << r.error().to_string();
  EXPECT_NE(r.error().message.find("not a regular file"), std::string::npos) << r.error().message;
}

TEST_F(HostileFileTest, ADeviceIsRefused) {
  auto r = SnapshotReader::open("/dev/zero", Verify::kHeaderAndMap);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::kInvalidArgument) << r.error().to_string();
  EXPECT_NE(r.error().message.find("not a regular file"), std::string::npos) << r.error().message;
}

TEST_F(HostileFileTest, ASymlinkIsNotFollowed) {
  const Bytes image = random_image(4, k4K, 3, 0);
  write_snapshot(path("real.snap"), params_for(k4K, image.size()), image, {{0, image.size()}});
  fs::create_symlink(path("real.snap"), path("link.snap"));
  auto r = SnapshotReader::open(path("link.snap"));
  ASSERT_FALSE(r.ok()) << "a symlink was followed";
  EXPECT_EQ(r.error().code, Errc::kPathNotAllowed) << r.error().to_string();
  EXPECT_TRUE(open_ok(path("real.snap")));
}

// A 4,136-byte file (header, one ZERO run) that claims a 64 TiB guest: everything sized by the
// guest (a fault server's per-block state, a resume's memfd) would follow that claim.
TEST_F(HostileFileTest, AGuestBeyondTheLimitIsRefusedBeforeAnythingIsSizedByIt) {
  const Bytes zeros(8 * k4K, 0);
  write_snapshot(path("small.snap"), params_for(k4K, zeros.size()), zeros, {{0, zeros.size()}});
  Bytes file = read_file(path("small.snap"));
  std::vector<MapRun> runs = map_of(file);
  ASSERT_EQ(runs.size(), 1u);
  ASSERT_EQ(runs[0].kind, RunKind::kZero);
  constexpr std::uint64_t k64T = std::uint64_t{64} << 40;
  runs[0].block_count = k64T / k4K;
  FileHeader h = header_of(file);
  h.guest_size = k64T;
  put_header(file, h);
  put_map(file, runs);
  ASSERT_EQ(file.size(), 4136u);
  write_file(path("huge.snap"), file);

  auto r = SnapshotReader::open(path("huge.snap"));
  ASSERT_FALSE(r.ok()) << "a 4,136-byte file opened as a 64 TiB guest";
  EXPECT_EQ(r.error().code, Errc::kSnapshotBadHeader) << r.error().to_string();
  EXPECT_NE(r.error().message.find("limit"), std::string::npos) << r.error().message;
  EXPECT_EQ(code_of(SnapshotChain::open({path("huge.snap")})), Errc::kSnapshotBadHeader);
  EXPECT_EQ(ReaderLimits{}.max_guest_size, kDefaultMaxGuestSize);

  // A caller that allows it (memsnapd's limits.max_guest_size) can open it.
  const ReaderLimits roomy{.max_guest_size = k64T};
  auto allowed = SnapshotReader::open(path("huge.snap"), Verify::kFull, roomy);
  ASSERT_TRUE(allowed.ok()) << allowed.error().to_string();
  EXPECT_EQ((*allowed)->guest_size(), k64T);
  EXPECT_TRUE(SnapshotChain::open({path("huge.snap")}, Verify::kFull, roomy).ok());
  const ReaderLimits tight{.max_guest_size = 4 * k4K};
  EXPECT_EQ(code_of(SnapshotReader::open(path("small.snap"), Verify::kFull, tight)),
            Errc::kSnapshotBadHeader);
}

// A sparse file holds a data area it does not really store: a header and map that claim
// gigabytes of DATA over a hole cost the attacker nothing and a full verify reads all of it.
// A data area (or map) with a hole is refused from the header alone, before any data is read.
TEST_F(HostileFileTest, AHoleInTheDataAreaIsRefusedFromTheHeader) {
  const Bytes image = random_image(64, k4K, 11, 0);
  write_snapshot(path("full.snap"), params_for(k4K, image.size()), image, {{0, image.size()}});
  const Bytes file = read_file(path("full.snap"));
  const FileHeader h = header_of(file);
  ASSERT_EQ(h.data_bytes, image.size());

  // The same bytes, but the data area written only in its first and last block: a hole between.
  const std::string sparse = path("sparse.snap");
  const int fd = ::open(sparse.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  auto put = [&](std::uint64_t from, std::uint64_t to) {
    ASSERT_EQ(::pwrite(fd, file.data() + from, to - from, static_cast<off_t>(from)),
              static_cast<ssize_t>(to - from));
  };
  put(0, h.data_offset + k4K);
  put(h.map_offset - k4K, file.size());
  ::close(fd);
  struct stat st {};
  ASSERT_EQ(::stat(sparse.c_str(), &st), 0);
  ASSERT_EQ(static_cast<std::uint64_t>(st.st_size), file.size());
  if (static_cast<std::uint64_t>(st.st_blocks) * 512 >= file.size()) {
    GTEST_SKIP() << "this file system stores no holes";
  }
  for (Verify v : {Verify::kHeaderAndMap, Verify::kFull}) {
    auto r = SnapshotReader::open(sparse, v);
    ASSERT_FALSE(r.ok()) << "a data area with a hole opened";
    EXPECT_EQ(r.error().code, Errc::kSnapshotTruncated) << r.error().to_string();
    EXPECT_NE(r.error().message.find("hole"), std::string::npos) << r.error().message;
  }
  EXPECT_TRUE(open_ok(path("full.snap")));
}

// ---------------------------------------------------------------------------------------------
// Reader errors: each corruption has its own code.

class CorruptionTest : public SnapshotTest {
 protected:
  void SetUp() override {
    SnapshotTest::SetUp();
    image_ = random_image(40, k4K, 99, 30);
    const auto dirty = ranges_of(std::vector<bool>(40, true), k4K);
    SnapshotParams p = params_for(k4K, image_.size());
    ASSERT_TRUE(p.origin.set(kOriginStrategy, "memfd").ok());
    ASSERT_TRUE(p.origin.set(kOriginStrategyCapabilities, "needs-memfd").ok());
    write_snapshot(path("good.snap"), p, image_, dirty);
    good_ = read_file(path("good.snap"));
    ASSERT_GT(good_.size(), kSnapshotDataOffset);
  }
  // Writes `bytes` as bad.snap and returns its open error.
  Errc error_of(const Bytes& bytes, Verify v = Verify::kFull) {
    write_file(path("bad.snap"), bytes);
    auto r = SnapshotReader::open(path("bad.snap"), v);
    message_ = r.ok() ? "" : r.error().message;
    return r.ok() ? Errc::kOk : r.error().code;
  }
  Bytes truncated(std::uint64_t size) const { return Bytes(good_.begin(), good_.begin() + size); }

  Bytes image_;
  Bytes good_;
  std::string message_;
};

TEST_F(CorruptionTest, TheUntouchedFileOpens) { EXPECT_EQ(error_of(good_), Errc::kOk); }

TEST_F(CorruptionTest, TruncatedInsideTheHeader) {
  for (std::uint64_t size : {0, 5, 8, 64, 127}) {
    EXPECT_EQ(error_of(truncated(size)), Errc::kSnapshotTruncated) << size;
  }
  EXPECT_EQ(error_of(truncated(2000)), Errc::kSnapshotTruncated);  // before the data area
}

TEST_F(CorruptionTest, TruncatedInsideTheData) {
  const FileHeader h = header_of(good_);
  ASSERT_GT(h.data_bytes, 0u);
  for (std::uint64_t size : {h.data_offset, h.data_offset + 100, h.map_offset - 1}) {
    EXPECT_EQ(error_of(truncated(size)), Errc::kSnapshotTruncated) << size;
    EXPECT_NE(message_.find("inside the data area"), std::string::npos) << message_;
  }
}

TEST_F(CorruptionTest, TruncatedInsideTheMap) {
  const FileHeader h = header_of(good_);
  for (std::uint64_t size : {h.map_offset, h.map_offset + 10, good_.size() - 1}) {
    EXPECT_EQ(error_of(truncated(size)), Errc::kSnapshotTruncated) << size;
    EXPECT_NE(message_.find("inside the block map"), std::string::npos) << message_;
  }
}

TEST_F(CorruptionTest, BadMagic) {
  Bytes f = good_;
  f[3] ^= 0x20;
  EXPECT_EQ(error_of(f), Errc::kSnapshotBadMagic);
  EXPECT_EQ(error_of(Bytes(4096, 0)), Errc::kSnapshotBadMagic);
}

TEST_F(CorruptionTest, BadVersion) {
  Bytes f = good_;
  FileHeader h = header_of(f);
  h.version = kSnapshotFormatVersion + 1;
  put_header(f, h);
  EXPECT_EQ(error_of(f), Errc::kSnapshotBadVersion);
  f[8] = 0;  // version 0, checksum now wrong too: the version is still what is reported
  EXPECT_EQ(error_of(f), Errc::kSnapshotBadVersion);
}

// The origin record (format 2) is covered by the header checksum, and a malformed one is refused
// even with a checksum that matches it.
TEST_F(CorruptionTest, TheOriginRecordIsCheckedWithTheHeader) {
  const FileHeader good = header_of(good_);
  ASSERT_EQ(origin_bytes_of(good_, good), "strategy=memfd\nstrategy_capabilities=needs-memfd\n");
  Bytes f = good_;
  f[sizeof(FileHeader) + 9] ^= 1;  // "memfd" -> "lemfd": the checksum no longer matches
  EXPECT_EQ(error_of(f), Errc::kSnapshotBadHeader);
  EXPECT_NE(message_.find("header checksum"), std::string::npos) << message_;

  for (const std::string& text :
       {std::string("strategy=memfd"), std::string("strategy memfd\n"),
        std::string("Strategy=memfd\n"), std::string("strategy=memfd\nstrategy=pvr\n"),
        std::string("strategy=mem\x01"
                    "fd\n"),
        std::string("=memfd\n"), std::string(3, '\0')}) {
    f = good_;
    std::fill(f.begin() + sizeof(FileHeader), f.begin() + good.header_size, 0);
    std::copy(text.begin(), text.end(), f.begin() + sizeof(FileHeader));
    FileHeader h = good;
    h.header_size = static_cast<std::uint32_t>(sizeof(FileHeader) + text.size());
    put_header(f, h);
    EXPECT_EQ(error_of(f), Errc::kSnapshotBadHeader) << text;
    EXPECT_NE(message_.find("origin record"), std::string::npos) << text << ": " << message_;
  }

  // header_size beyond the data area, with a well-formed origin record reaching into it: the
  // data offset check refuses it, not the record's.
  {
    f = good_;
    std::string text;
    for (int i = 0; text.size() + 64 <= good.data_offset + 8 - sizeof(FileHeader); ++i) {
      const std::string n = std::to_string(10000 + i).substr(1);  // 4 digits
      text += "k" + n + "=" + std::string(57, 'v') + "\n";
    }
    text += std::string("z=") +
            std::string(good.data_offset + 8 - sizeof(FileHeader) - text.size() - 3, 'v') + "\n";
    ASSERT_EQ(text.size(), good.data_offset + 8 - sizeof(FileHeader));
    std::copy(text.begin(), text.end(), f.begin() + sizeof(FileHeader));
    FileHeader h = good;
    h.header_size = static_cast<std::uint32_t>(good.data_offset + 8);
    put_header(f, h);
    EXPECT_EQ(error_of(f), Errc::kSnapshotBadHeader);
    EXPECT_NE(message_.find("inside the header"), std::string::npos) << message_;
  }
  // header_size beyond the limit, or below the FileHeader.
  for (std::uint64_t size : {std::uint64_t{kMaxHeaderSize} + 1, std::uint64_t{64}}) {
    f = good_;
    FileHeader h = good;
    h.header_size = static_cast<std::uint32_t>(size);
    put_header(f, h);
    EXPECT_EQ(error_of(f), Errc::kSnapshotBadHeader) << size;
  }
  // A file that ends inside its origin record.
  f = truncated(sizeof(FileHeader) + 4);
  EXPECT_EQ(error_of(f), Errc::kSnapshotTruncated);
  EXPECT_NE(message_.find("header"), std::string::npos) << message_;
}

// Version 1 files (no origin record, header_size 128) still open and read the same; a version 1
// header that claims an origin record is refused.
TEST_F(CorruptionTest, AVersion1FileStillOpensAndRecordsNoOrigin) {
  const FileHeader good = header_of(good_);
  Bytes f = good_;
  std::fill(f.begin() + sizeof(FileHeader), f.begin() + good.header_size, 0);
  FileHeader h = good;
  h.version = 1;
  h.header_size = sizeof(FileHeader);
  put_header(f, h);
  // The checksum of a version 1 header is XXH3-64 of its 128 bytes, the field zeroed, in one
  // call: what every version 1 file on disk holds.
  {
    FileHeader zeroed = header_of(f);
    zeroed.header_checksum = 0;
    EXPECT_EQ(header_of(f).header_checksum, XXH3_64bits(&zeroed, sizeof(zeroed)));
    // And version 2's, over the header and its origin record, that of the bytes in one piece.
    FileHeader v2 = good;
    v2.header_checksum = 0;
    Bytes whole(good_.begin(), good_.begin() + good.header_size);
    std::memcpy(whole.data(), &v2, sizeof(v2));
    EXPECT_EQ(good.header_checksum, XXH3_64bits(whole.data(), whole.size()));
  }
  write_file(path("v1.snap"), f);
  auto r = open_ok(path("v1.snap"));
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->header().version, 1u);
  EXPECT_TRUE(r->origin().empty());
  EXPECT_EQ(r->origin().strategy(), "");
  Bytes back(image_.size());
  ASSERT_TRUE(r->read(0, back.size(), back.data()).ok());
  EXPECT_EQ(back, image_);

  h.header_size = good.header_size;  // version 1 with the origin record left in
  f = good_;
  put_header(f, h);
  EXPECT_EQ(error_of(f), Errc::kSnapshotBadHeader);
  EXPECT_NE(message_.find("version 1 headers"), std::string::npos) << message_;
}

TEST_F(CorruptionTest, HeaderFieldTampered) {
  Bytes f = good_;
  f[offsetof(FileHeader, guest_size) + 1] ^= 1;  // checksum no longer matches
  EXPECT_EQ(error_of(f), Errc::kSnapshotBadHeader);
  EXPECT_NE(message_.find("header checksum"), std::string::npos) << message_;
  f = good_;
  f[offsetof(FileHeader, header_checksum)] ^= 1;
  EXPECT_EQ(error_of(f), Errc::kSnapshotBadHeader);
}

TEST_F(CorruptionTest, HeaderFieldsInconsistentDespiteAGoodChecksum) {
  const FileHeader good = header_of(good_);
  auto check = [&](const char* what, auto mutate) {
    Bytes f = good_;
    FileHeader h = good;
    mutate(h);
    put_header(f, h);
    EXPECT_EQ(error_of(f), Errc::kSnapshotBadHeader) << what << ": " << message_;
  };
  check("block size", [](FileHeader& h) { h.block_size = 8192; });
  check("guest size", [](FileHeader& h) { h.guest_size += 100; });
  check("zero guest", [](FileHeader& h) { h.guest_size = 0; });
  check("flags", [](FileHeader& h) { h.flags = 1; });
  check("generation", [](FileHeader& h) { h.generation = 0; });
  check("header size", [](FileHeader& h) { h.header_size = 256; });
  check("data offset", [](FileHeader& h) { h.data_offset = 64; });
  check("data bytes", [](FileHeader& h) { h.data_bytes += 1; });
  check("map offset", [](FileHeader& h) { h.map_offset += 4096; });
  check("run count", [](FileHeader& h) { h.run_count = 0; });
  check("own parent", [](FileHeader& h) { h.parent_id = h.snapshot_id; });
  check("zero id", [](FileHeader& h) { h.snapshot_id = SnapshotId{}; });
  Bytes longer = good_;
  longer.push_back(0);
  EXPECT_EQ(error_of(longer), Errc::kSnapshotBadHeader);
  EXPECT_NE(message_.find("after the block map"), std::string::npos) << message_;
}

TEST_F(CorruptionTest, MapTampered) {
  Bytes f = good_;
  f[header_of(f).map_offset + 3] ^= 0x10;
  EXPECT_EQ(error_of(f), Errc::kSnapshotBadMap);
  EXPECT_NE(message_.find("map checksum"), std::string::npos) << message_;
}

TEST_F(CorruptionTest, MapInconsistentDespiteAGoodChecksum) {
  const std::vector<MapRun> good = map_of(good_);
  ASSERT_GE(good.size(), 3u);
  std::size_t data_run = 0;
  while (good[data_run].kind != RunKind::kData) ++data_run;
  std::size_t later_data = data_run + 1;
  while (later_data < good.size() && good[later_data].kind != RunKind::kData) ++later_data;
  ASSERT_LT(later_data, good.size());
  auto check = [&](const char* what, auto mutate) {
    Bytes f = good_;
    std::vector<MapRun> runs = good;
    mutate(runs);
    put_map(f, runs);
    EXPECT_EQ(error_of(f), Errc::kSnapshotBadMap) << what << ": " << message_;
  };
  check("gap", [](auto& runs) { runs[1].first_block += 1; });
  check("overlap", [](auto& runs) { runs[1].first_block -= 1; });
  check("unsorted", [](auto& runs) { std::swap(runs[0], runs[1]); });
  check("not covering", [](auto& runs) { runs.back().block_count -= 1; });
  check("beyond the guest", [](auto& runs) { runs.back().block_count += 1; });
  check("unknown kind", [](auto& runs) { runs[0].kind = static_cast<RunKind>(7); });
  check("reserved", [](auto& runs) { runs[0].reserved = 1; });
  check("parent in a base", [&](auto& runs) {
    runs[data_run] =
        MapRun{runs[data_run].first_block, runs[data_run].block_count, RunKind::kParent, 0, 0, 0};
  });
  check("data out of range", [&](auto& runs) { runs[later_data].data_offset += 1 << 20; });
  check("data overlapping", [&](auto& runs) { runs[later_data].data_offset = 0; });
}

TEST_F(CorruptionTest, FlippedDataByteIsAChecksumMismatchNamingTheOffset) {
  const std::vector<MapRun> runs = map_of(good_);
  const FileHeader h = header_of(good_);
  std::size_t victim = runs.size() - 1;
  while (runs[victim].kind != RunKind::kData) --victim;
  ASSERT_GT(runs[victim].first_block, 0u);
  Bytes f = good_;
  f[h.data_offset + runs[victim].data_offset + 100] ^= 0x01;

  EXPECT_EQ(error_of(f, Verify::kFull), Errc::kSnapshotChecksumMismatch);
  const std::string offset = "guest offset " + std::to_string(runs[victim].first_block * k4K);
  EXPECT_NE(message_.find(offset), std::string::npos) << message_;

  // Without data verification the file opens; the damage shows when it is checked.
  ASSERT_EQ(error_of(f, Verify::kHeaderAndMap), Errc::kOk);
  auto r = open_ok(path("bad.snap"), Verify::kHeaderAndMap);
  ASSERT_TRUE(r);
  const Status all = r->verify_data();
  ASSERT_FALSE(all.ok());
  EXPECT_EQ(code_of(all), Errc::kSnapshotChecksumMismatch);
  EXPECT_NE(all.error().message.find(offset), std::string::npos);
  EXPECT_EQ(code_of(r->verify_run(victim)), Errc::kSnapshotChecksumMismatch);
  for (std::size_t i = 0; i < victim; ++i) EXPECT_TRUE(r->verify_run(i).ok()) << i;
  EXPECT_EQ(code_of(r->verify_run(runs.size())), Errc::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Writer: contract, atomic commit, temporary file

TEST_F(SnapshotTest, CreateRejectsBadParamsAndRanges) {
  auto code = [&](SnapshotParams p, std::vector<plugin::ByteRange> dirty) {
    auto w = SnapshotWriter::create(path("x.snap"), p, std::move(dirty));
    return w.ok() ? Errc::kOk : w.error().code;
  };
  const std::uint64_t g = 64 * k4K;
  EXPECT_EQ(code(params_for(k4K, g), {{0, k4K}, {k4K, k4K}, {8 * k4K, 4 * k4K}}), Errc::kOk);
  EXPECT_EQ(code(params_for(8192, g), {}), Errc::kInvalidArgument);
  EXPECT_EQ(code(params_for(k4K, 0), {}), Errc::kInvalidArgument);
  EXPECT_EQ(code(params_for(k4K, g + 1), {}), Errc::kInvalidArgument);
  EXPECT_EQ(code(params_for(k2M, k4K * 3), {}), Errc::kInvalidArgument);
  EXPECT_EQ(code(params_for(k4K, g, 0), {}), Errc::kInvalidArgument);
  EXPECT_EQ(code(params_for(k4K, g), {{k4K, k4K}, {0, k4K}}), Errc::kInvalidArgument);
  EXPECT_EQ(code(params_for(k4K, g), {{0, 2 * k4K}, {k4K, k4K}}), Errc::kInvalidArgument);
  EXPECT_EQ(code(params_for(k4K, g), {{100, k4K}}), Errc::kInvalidArgument);
  EXPECT_EQ(code(params_for(k4K, g), {{0, 100}}), Errc::kInvalidArgument);
  EXPECT_EQ(code(params_for(k4K, g), {{0, 0}}), Errc::kInvalidArgument);
  EXPECT_EQ(code(params_for(k4K, g), {{g - k4K, 2 * k4K}}), Errc::kInvalidArgument);
  SnapshotParams self = params_for(k4K, g);
  self.snapshot_id[0] = 5;
  self.parent_id = self.snapshot_id;
  EXPECT_EQ(code(self, {}), Errc::kInvalidArgument);
  EXPECT_EQ(code(params_for(k4K, g), {}), Errc::kOk);
  EXPECT_EQ(files(), std::vector<std::string>{});  // every writer cleaned up after itself
}

TEST_F(SnapshotTest, TempFileIsHiddenNextToTheTargetAndRemovedByAbortAndDestructor) {
  const std::vector<plugin::ByteRange> dirty = {{0, 4 * k4K}};
  {
    auto w = SnapshotWriter::create(path("t.snap"), params_for(k4K, 8 * k4K), dirty);
    ASSERT_TRUE(w.ok());
    const std::string temp = (*w)->temp_path();
    EXPECT_EQ(fs::path(temp).parent_path(), fs::path(dir_));
    EXPECT_EQ(fs::path(temp).filename().string().rfind(
                  ".t.snap.tmp." + std::to_string(::getpid()) + ".", 0),
              0u)
        << temp;
    struct stat st {};
    ASSERT_EQ(::stat(temp.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0137, 0u);  // at most 0640
    (*w)->abort();
    EXPECT_FALSE(fs::exists(temp));
    EXPECT_EQ(code_of((*w)->commit()), Errc::kInvalidArgument);
    EXPECT_FALSE(write_one(**w, 0, Bytes(k4K, 1).data(), k4K).ok());
  }
  std::string temp;
  {
    auto w = SnapshotWriter::create(path("t.snap"), params_for(k4K, 8 * k4K), dirty);
    ASSERT_TRUE(w.ok());
    temp = (*w)->temp_path();
    ASSERT_TRUE(write_one(**w, 0, Bytes(k4K, 1).data(), k4K).ok());
    EXPECT_TRUE(fs::exists(temp));
  }
  EXPECT_FALSE(fs::exists(temp));
  EXPECT_EQ(files(), std::vector<std::string>{});
}

class ContractTest : public SnapshotTest {
 protected:
  void SetUp() override {
    SnapshotTest::SetUp();
    auto w = SnapshotWriter::create(path("k.snap"), params_for(k4K, 64 * k4K),
                                    {{0, 8 * k4K}, {16 * k4K, 8 * k4K}});
    ASSERT_TRUE(w.ok());
    writer_ = std::move(w).value();
    data_ = Bytes(16 * k4K, 0x5A);
  }
  // Expects `s` to be a refusal, the writer to stay poisoned and nothing to be committed.
  void expect_rejected_and_poisoned(const plugin::Status& s, const char* words) {
    EXPECT_EQ(s.code, plugin::StatusCode::kSinkError);
    EXPECT_NE(std::string(s.message).find(words), std::string::npos) << s.message;
    const plugin::Status again = write_one(*writer_, 20 * k4K, data_.data(), k4K);
    EXPECT_EQ(again.code, plugin::StatusCode::kSinkError);
    EXPECT_STREQ(again.message, s.message);
    EXPECT_EQ(writer_->make_durable().code, plugin::StatusCode::kSinkError);
    EXPECT_FALSE(writer_->commit().ok());
    EXPECT_FALSE(fs::exists(path("k.snap")));
    EXPECT_FALSE(fs::exists(writer_->temp_path()));
  }

  std::unique_ptr<SnapshotWriter> writer_;
  Bytes data_;
};

TEST_F(ContractTest, OutOfOrder) {
  ASSERT_TRUE(write_one(*writer_, 4 * k4K, data_.data(), k4K).ok());
  expect_rejected_and_poisoned(write_one(*writer_, 2 * k4K, data_.data(), k4K), "out of order");
}

TEST_F(ContractTest, OutOfOrderInsideOneCallWritesNothing) {
  const plugin::Chunk chunks[] = {{2 * k4K, data_.data(), k4K}, {0, data_.data(), k4K}};
  const plugin::Status s = writer_->write(chunks, 2);
  EXPECT_EQ(writer_->stats().data_blocks, 0u);
  expect_rejected_and_poisoned(s, "out of order");
}

TEST_F(ContractTest, Overlapping) {
  ASSERT_TRUE(write_one(*writer_, 0, data_.data(), 2 * k4K).ok());
  expect_rejected_and_poisoned(write_one(*writer_, k4K, data_.data(), 2 * k4K), "overlaps");
}

TEST_F(ContractTest, UnalignedOffset) {
  expect_rejected_and_poisoned(write_one(*writer_, 512, data_.data(), k4K), "not aligned");
}

TEST_F(ContractTest, UnalignedLength) {
  expect_rejected_and_poisoned(write_one(*writer_, 0, data_.data(), k4K + 1), "not aligned");
}

TEST_F(ContractTest, EmptyChunk) {
  expect_rejected_and_poisoned(write_one(*writer_, 0, data_.data(), 0), "empty");
}

TEST_F(ContractTest, OutsideTheDirtyRanges) {
  expect_rejected_and_poisoned(write_one(*writer_, 8 * k4K, data_.data(), k4K),
                               "not inside a dirty range");
}

TEST_F(ContractTest, SpanningPastADirtyRange) {
  expect_rejected_and_poisoned(write_one(*writer_, 6 * k4K, data_.data(), 4 * k4K),
                               "not inside a dirty range");
}

TEST_F(ContractTest, BeyondTheGuest) {
  expect_rejected_and_poisoned(write_one(*writer_, 64 * k4K, data_.data(), k4K),
                               "beyond the guest");
}

TEST_F(ContractTest, TheSameChunksInOrderAreAccepted) {
  ASSERT_TRUE(write_one(*writer_, 0, data_.data(), 8 * k4K).ok());
  const plugin::Chunk chunks[] = {{16 * k4K, data_.data(), 3 * k4K},
                                  {19 * k4K, data_.data(), 5 * k4K}};
  ASSERT_TRUE(writer_->write(chunks, 2).ok());
  ASSERT_TRUE(writer_->commit().ok());
  EXPECT_TRUE(fs::exists(path("k.snap")));
  EXPECT_EQ(writer_->stats().data_blocks, 16u);
  EXPECT_EQ(writer_->stats().zero_blocks, 48u);
}

TEST_F(SnapshotTest, CommitWithUnwrittenDirtyBytesIsIncomplete) {
  const Bytes data(4 * k4K, 3);
  auto w = SnapshotWriter::create(path("i.snap"), params_for(k4K, 32 * k4K),
                                  {{0, 4 * k4K}, {8 * k4K, 4 * k4K}});
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE(write_one(**w, 0, data.data(), 4 * k4K).ok());
  ASSERT_TRUE(write_one(**w, 8 * k4K, data.data(), 2 * k4K).ok());
  const Status s = (*w)->commit();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(code_of(s), Errc::kSnapshotIncomplete);
  EXPECT_NE(s.error().message.find("guest offset " + std::to_string(10 * k4K)), std::string::npos)
      << s.error().message;
  EXPECT_EQ(files(), std::vector<std::string>{});  // no final file, no temporary file
}

TEST_F(SnapshotTest, FailedCommitLeavesAnExistingFinalFileAlone) {
  write_file(path("f.snap"), Bytes{'o', 'l', 'd'});
  const Bytes data(4 * k4K, 3);
  {
    auto w = SnapshotWriter::create(path("f.snap"), params_for(k4K, 8 * k4K), {{0, 8 * k4K}});
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE(write_one(**w, 0, data.data(), 4 * k4K).ok());
    EXPECT_EQ(code_of((*w)->commit()), Errc::kSnapshotIncomplete);
  }
  EXPECT_EQ(read_file(path("f.snap")), (Bytes{'o', 'l', 'd'}));
  EXPECT_EQ(files(), std::vector<std::string>{"f.snap"});

}

// Two pauses naming the same file (or a local pause over an old base) must not replace a
// snapshot: the commit refuses with kAlreadyExists, the old file keeps its bytes and the
// temporary file is gone. This holds even when the file appears after create().
TEST_F(SnapshotTest, CommitNeverReplacesAnExistingSnapshot) {
  const Bytes data(4 * k4K, 3);
  const Bytes image = random_image(8, k4K, 5, 0);
  const std::vector<plugin::ByteRange> all = {{0, 8 * k4K}};
  write_snapshot(path("f.snap"), params_for(k4K, 8 * k4K), image, all);
  const Bytes before = read_file(path("f.snap"));

  auto w = SnapshotWriter::create(path("f.snap"), params_for(k4K, 8 * k4K), {{0, 4 * k4K}});
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE(write_one(**w, 0, data.data(), 4 * k4K).ok());
  const Status s = (*w)->commit();
  ASSERT_FALSE(s.ok()) << "the commit replaced an existing snapshot";
  EXPECT_EQ(s.error().code, Errc::kAlreadyExists) << s.error().to_string();
  EXPECT_NE(s.error().message.find(path("f.snap")), std::string::npos) << s.error().message;
  EXPECT_FALSE((*w)->committed());
  EXPECT_EQ(read_file(path("f.snap")), before);
  EXPECT_EQ(files(), std::vector<std::string>{"f.snap"});  // the temporary file is removed

  // The race itself: the name is free at create() and taken before commit().
  auto late = SnapshotWriter::create(path("g.snap"), params_for(k4K, 8 * k4K), {{0, 4 * k4K}});
  ASSERT_TRUE(late.ok());
  ASSERT_TRUE(write_one(**late, 0, data.data(), 4 * k4K).ok());
  write_snapshot(path("g.snap"), params_for(k4K, 8 * k4K), image, all);
  const Bytes other = read_file(path("g.snap"));
  EXPECT_EQ(code_of((*late)->commit()), Errc::kAlreadyExists);
  EXPECT_EQ(read_file(path("g.snap")), other);
  EXPECT_EQ(files(), (std::vector<std::string>{"f.snap", "g.snap"}));
}

TEST_F(SnapshotTest, ReadBackReturnsWrittenBytes) {
  const std::uint64_t blocks = 40;
  Bytes image = random_image(blocks, k4K, 7, 40);
  std::vector<bool> dirty_blocks(blocks, true);
  for (std::uint64_t b = 30; b < 34; ++b) dirty_blocks[b] = false;
  const auto dirty = ranges_of(dirty_blocks, k4K);
  auto w = SnapshotWriter::create(path("rb.snap"), params_for(k4K, image.size()), dirty);
  ASSERT_TRUE(w.ok());
  const plugin::Chunk first{0, image.data(), 20 * k4K};
  ASSERT_TRUE((*w)->write(&first, 1).ok());

  Bytes out(20 * k4K, 0xAA);
  ASSERT_TRUE((*w)->read_back(0, out.size(), out.data()).ok());
  EXPECT_TRUE(std::equal(out.begin(), out.end(), image.begin()));
  ASSERT_TRUE((*w)->read_back(3 * k4K + 7, 9000, out.data()).ok());
  EXPECT_TRUE(std::equal(out.begin(), out.begin() + 9000, image.begin() + 3 * k4K + 7));
  EXPECT_EQ(code_of((*w)->read_back(19 * k4K, 2 * k4K, out.data())), Errc::kNotFound);
  EXPECT_EQ(code_of((*w)->read_back(blocks * k4K, 1, out.data())), Errc::kInvalidArgument);
  // Blocks 20 and 21 are skipped: a hole between written runs does not read back either.
  const plugin::Chunk later{22 * k4K, image.data() + 22 * k4K, 4 * k4K};
  ASSERT_TRUE((*w)->write(&later, 1).ok());
  ASSERT_TRUE((*w)->read_back(22 * k4K, 4 * k4K, out.data()).ok());
  EXPECT_TRUE(std::equal(out.begin(), out.begin() + 4 * k4K, image.begin() + 22 * k4K));
  EXPECT_EQ(code_of((*w)->read_back(18 * k4K, 6 * k4K, out.data())), Errc::kNotFound);

  // The strategy released what it wrote; then the pause fails before everything was written.
  (*w)->released(0, 10 * k4K);
  (*w)->released(10 * k4K, 10 * k4K);
  (*w)->released(25 * k4K, k4K);
  ASSERT_EQ((*w)->released_ranges().size(), 2u);
  EXPECT_EQ((*w)->released_ranges()[0].length, 20 * k4K);
  EXPECT_EQ(code_of((*w)->commit()), Errc::kSnapshotIncomplete);
  // The unfinished file stays (it may be the only copy of released memory) and still reads.
  EXPECT_TRUE(fs::exists((*w)->temp_path()));
  EXPECT_FALSE(fs::exists(path("rb.snap")));
  ASSERT_TRUE((*w)->read_back(0, 20 * k4K, out.data()).ok());
  EXPECT_TRUE(std::equal(out.begin(), out.end(), image.begin()));
  (*w)->abort();
  EXPECT_EQ(files(), std::vector<std::string>{});
}

TEST_F(SnapshotTest, KeepTempFileSurvivesTheWriter) {
  const Bytes data(k4K, 1);
  std::string kept;
  {
    auto w = SnapshotWriter::create(path("kp.snap"), params_for(k4K, 4 * k4K), {{0, 2 * k4K}});
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE(write_one(**w, 0, data.data(), k4K).ok());
    (*w)->released(0, k4K);
    EXPECT_FALSE((*w)->commit().ok());
    kept = (*w)->keep_temp_file();
  }
  EXPECT_FALSE(kept.empty());
  EXPECT_TRUE(fs::exists(kept));
}

TEST_F(SnapshotTest, WriteErrorsCarryErrnoAndPoison) {
  // A file size limit makes pwritev fail part-way (first short, then EFBIG).
  const Bytes data(4 << 20, 0x33);
  auto w = SnapshotWriter::create(path("e.snap"), params_for(k4K, data.size()), {{0, data.size()}});
  ASSERT_TRUE(w.ok());
  struct sigaction ignore {
  }, old{};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGXFSZ, &ignore, &old), 0);
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  rlimit small = saved;
  small.rlim_cur = 1 << 20;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const plugin::Status s = write_one(**w, 0, data.data(), data.size());
  ::setrlimit(RLIMIT_FSIZE, &saved);
  ::sigaction(SIGXFSZ, &old, nullptr);

  EXPECT_EQ(s.code, plugin::StatusCode::kSinkError);
  EXPECT_EQ(s.sys_errno, EFBIG);
  EXPECT_NE(std::string(s.message).find("writing snapshot data"), std::string::npos) << s.message;
  EXPECT_EQ(write_one(**w, 0, data.data(), k4K).code, plugin::StatusCode::kSinkError);
  Bytes out(k4K);
  EXPECT_TRUE((*w)->read_back(0, k4K, out.data()).ok());  // what reached the file still reads
  EXPECT_EQ(code_of((*w)->read_back(data.size() - k4K, k4K, out.data())), Errc::kNotFound);
  const Status c = (*w)->commit();
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().sys_errno, EFBIG);
  EXPECT_EQ(files(), std::vector<std::string>{});
}

}  // namespace
}  // namespace memsnap
