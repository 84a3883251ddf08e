#include "core/plugin_host/plugin_registry.h"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace memsnap {
namespace {

namespace fs = std::filesystem;

using Options = std::vector<std::pair<std::string, std::string>>;

constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;

// A fresh directory (mode 0700, ours) that fixtures are copied into, so every test controls the
// modes and owners it checks, whatever the build tree's umask was.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "memsnap_plugin_host.XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) ADD_FAILURE() << "mkdtemp: " << std::strerror(errno);
    path_ = fs::canonical(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, ec);
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const fs::path& path() const { return path_; }
  std::string str() const { return path_.string(); }

  // Copies fixture_<fixture>.so here as <as> (default: its own file name) with the given mode.
  std::string add(const std::string& fixture, const std::string& as = "",
                  fs::perms mode = fs::perms(0644)) const {
    const fs::path from = fs::path(MEMSNAP_FIXTURE_DIR) / ("fixture_" + fixture + ".so");
    const fs::path to = path_ / (as.empty() ? from.filename().string() : as);
    fs::copy_file(from, to, fs::copy_options::overwrite_existing);
    fs::permissions(to, mode);
    return to.string();
  }

 private:
  fs::path path_;
};

bool is_root() { return ::geteuid() == 0; }

// True while a file at this path is mapped into the process (i.e. its library is loaded).
bool is_mapped(const std::string& path) {
  std::ifstream maps("/proc/self/maps");
  const std::string all((std::istreambuf_iterator<char>(maps)), std::istreambuf_iterator<char>());
  return all.find(path) != std::string::npos;
}

// The good fixture's live-strategy counter, looked up without keeping a reference: the pointer is
// valid only while something else keeps that library loaded.
std::atomic<int>* live_counter(const std::string& path) {
  void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) return nullptr;
  void* symbol = ::dlsym(handle, "memsnap_fixture_live_strategies");
  ::dlclose(handle);
  return static_cast<std::atomic<int>*>(symbol);
}

class CountingSink final : public plugin::BlockSink {
 public:
  virtual ~CountingSink() = default;
  plugin::Status write(const plugin::Chunk* chunks, std::size_t count) noexcept override {
    for (std::size_t i = 0; i < count; ++i) bytes += chunks[i].length;
    return plugin::Status::Ok();
  }
  plugin::Status make_durable() noexcept override { return plugin::Status::Ok(); }
  void released(std::uint64_t, std::uint64_t) noexcept override {}
  std::uint64_t bytes = 0;
};

plugin::Status export_ranges(plugin::Strategy& strategy, std::vector<plugin::ByteRange> ranges,
                             CountingSink& sink) {
  plugin::ExportRequest request;
  request.guest_size = 1 << 20;
  request.block_size = 4096;
  request.ranges = ranges.data();
  request.range_count = ranges.size();
  plugin::ExportStats stats;
  return strategy.export_ranges(request, sink, stats);
}

// ---- loading a good plugin ----

TEST(PluginRegistryTest, LoadsGoodPluginAndCopiesItsDescriptor) {
  TempDir dir;
  const std::string path = dir.add("good");
  PluginRegistry registry;
  auto loaded = registry.load_file(path);
  ASSERT_TRUE(loaded.ok()) << loaded.error().to_string();
  const PluginInfo& info = **loaded;
  EXPECT_EQ(info.path, path);
  EXPECT_EQ(info.name, "fixture_good");
  EXPECT_EQ(info.version, "1.0.0");
  EXPECT_EQ(info.description, "test fixture that exports zeros");
  EXPECT_EQ(info.abi, plugin::kAbiVersion);
  EXPECT_EQ(info.state, PluginState::kLoaded);
  EXPECT_EQ(info.error, Errc::kOk);
  EXPECT_TRUE(info.reason.empty());
  EXPECT_TRUE(info.experimental());
  EXPECT_TRUE(info.needs_pid());
  EXPECT_FALSE(info.needs_memfd());
  EXPECT_FALSE(info.releases_memory());
  EXPECT_EQ(registry.find("fixture_good"), &info);
  EXPECT_EQ(registry.find("fixture_goo"), nullptr);
  ASSERT_EQ(registry.plugins().size(), 1u);
  EXPECT_TRUE(is_mapped(path));
}

// ---- one broken fixture per load failure ----

struct BrokenCase {
  std::string fixture;
  Errc code;
  std::string in_message;
};

class BrokenPluginTest : public ::testing::TestWithParam<BrokenCase> {};

TEST_P(BrokenPluginTest, IsRefusedWithItsOwnCodeAndUnloaded) {
  const BrokenCase& c = GetParam();
  TempDir dir;
  const std::string path = dir.add(c.fixture);
  PluginRegistry registry;
  auto loaded = registry.load_file(path);
  ASSERT_FALSE(loaded.ok());
  const Error& error = loaded.error();
  EXPECT_EQ(error.code, c.code) << error.to_string();
  EXPECT_NE(error.message.find(path), std::string::npos) << error.message;
  EXPECT_NE(error.message.find(c.in_message), std::string::npos) << error.message;

  ASSERT_EQ(registry.plugins().size(), 1u);
  const PluginInfo& info = registry.plugins()[0];
  EXPECT_EQ(info.path, path);
  EXPECT_EQ(info.state, PluginState::kRefused);
  EXPECT_FALSE(info.loaded());
  EXPECT_EQ(info.error, c.code);
  EXPECT_EQ(info.reason, error.message);
  for (const PluginInfo& p : registry.plugins()) EXPECT_EQ(registry.find(p.name), nullptr);
  EXPECT_FALSE(is_mapped(path)) << "a refused library must be unloaded";
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, BrokenPluginTest,
    ::testing::Values(
        BrokenCase{"not_a_library", Errc::kPluginCannotOpen, "invalid ELF header"},
        BrokenCase{"missing_dep", Errc::kPluginCannotOpen, "libmemsnap_fixture_dep.so"},
        BrokenCase{"no_abi_symbol", Errc::kPluginNoAbiSymbol, "memsnap_plugin_abi_version"},
        BrokenCase{"abi_mismatch", Errc::kPluginAbiMismatch, "built for ABI 7, host speaks 1"},
        BrokenCase{"bad_descriptor_empty_name", Errc::kPluginBadDescriptor, "name is empty"},
        BrokenCase{"bad_descriptor_null_name", Errc::kPluginBadDescriptor, "name is null"},
        BrokenCase{"bad_descriptor_bad_chars", Errc::kPluginBadDescriptor,
                   "'Bad-Name' is not 1 to 64 characters of [a-z0-9_]"},
        BrokenCase{"bad_descriptor_long_name", Errc::kPluginBadDescriptor,
                   "is not 1 to 64 characters"},
        BrokenCase{"bad_descriptor_null_version", Errc::kPluginBadDescriptor, "null version"},
        BrokenCase{"bad_descriptor_abi_field", Errc::kPluginBadDescriptor, "abi_version is 2"},
        BrokenCase{"bad_descriptor_missing", Errc::kPluginBadDescriptor,
                   "memsnap_plugin_descriptor"},
        BrokenCase{"no_factory", Errc::kPluginNoFactory, "memsnap_plugin_create"}),
    [](const ::testing::TestParamInfo<BrokenCase>& p) { return p.param.fixture; });

TEST(PluginRegistryTest, MissingFileCannotBeOpened) {
  TempDir dir;
  const std::string path = dir.str() + "/nothing_here.so";
  PluginRegistry registry;
  auto loaded = registry.load_file(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.error().code, Errc::kPluginCannotOpen);
  EXPECT_NE(loaded.error().message.find(path), std::string::npos);
  EXPECT_EQ(registry.plugins().size(), 1u);
}

TEST(PluginRegistryTest, DirectoryNamedSoCannotBeOpened) {
  TempDir dir;
  const std::string path = dir.str() + "/dir.so";
  fs::create_directory(path);
  PluginRegistry registry;
  auto loaded = registry.load_file(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.error().code, Errc::kPluginCannotOpen);
  EXPECT_NE(loaded.error().message.find("not a regular file"), std::string::npos);
}

// ---- unsafe files: refused before dlopen ----

void expect_unsafe(PluginRegistry& registry, const std::string& path, const std::string& detail) {
  auto loaded = registry.load_file(path);
  ASSERT_FALSE(loaded.ok()) << path << " was loaded";
  EXPECT_EQ(loaded.error().code, Errc::kPluginUnsafeFile) << loaded.error().to_string();
  EXPECT_NE(loaded.error().message.find(path), std::string::npos) << loaded.error().message;
  EXPECT_NE(loaded.error().message.find(detail), std::string::npos) << loaded.error().message;
  EXPECT_NE(loaded.error().message.find("runs its code"), std::string::npos);
  EXPECT_FALSE(is_mapped(path));
  ASSERT_FALSE(registry.plugins().empty());
  EXPECT_EQ(registry.plugins().back().error, Errc::kPluginUnsafeFile);
}

TEST(PluginRegistryUnsafeTest, WorldWritableFile) {
  TempDir dir;
  PluginRegistry registry;
  expect_unsafe(registry, dir.add("good", "", fs::perms(0646)), "writable by other users");
}

TEST(PluginRegistryUnsafeTest, CheckComesBeforeDlopen) {
  // A text file would fail dlopen; refusing it as unsafe shows dlopen was never reached.
  TempDir dir;
  PluginRegistry registry;
  expect_unsafe(registry, dir.add("not_a_library", "", fs::perms(0666)), "writable by other");
}

TEST(PluginRegistryUnsafeTest, WorldWritableDirectory) {
  TempDir dir;
  const std::string path = dir.add("good");
  fs::permissions(dir.path(), fs::perms(0757));
  PluginRegistry registry;
  expect_unsafe(registry, path, "its directory '" + dir.str() + "' is writable by other users");

  PluginRegistry for_dir;
  const Status status = for_dir.load_directory(dir.str());
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.error().code, Errc::kPluginUnsafeFile);
  EXPECT_NE(status.error().message.find(dir.str()), std::string::npos);
  EXPECT_TRUE(for_dir.plugins().empty());
}

TEST(PluginRegistryUnsafeTest, GroupWritableWithNonRootGroup) {
  TempDir dir;
  const std::string path = dir.add("good", "", fs::perms(0664));
  if (::chown(path.c_str(), static_cast<uid_t>(-1), kNogroup) != 0) {
    GTEST_SKIP() << "cannot chgrp to " << kNogroup << ": " << std::strerror(errno);
  }
  PluginRegistry registry;
  expect_unsafe(registry, path, "is group-writable (mode 0664) and its group (gid 65534)");
}

TEST(PluginRegistryUnsafeTest, GroupWritableDirectoryWithNonRootGroup) {
  TempDir dir;
  const std::string path = dir.add("good");
  fs::permissions(dir.path(), fs::perms(0775));
  if (::chown(dir.str().c_str(), static_cast<uid_t>(-1), kNogroup) != 0) {
    GTEST_SKIP() << "cannot chgrp to " << kNogroup << ": " << std::strerror(errno);
  }
  PluginRegistry registry;
  expect_unsafe(registry, path, "its directory");
}

TEST(PluginRegistryUnsafeTest, GroupWritableWithRootGroupIsAccepted) {
  if (!is_root()) GTEST_SKIP() << "needs root to chgrp to 0";
  TempDir dir;
  const std::string path = dir.add("good", "", fs::perms(0664));
  ASSERT_EQ(::chown(path.c_str(), static_cast<uid_t>(-1), 0), 0);
  PluginRegistry registry;
  EXPECT_TRUE(registry.load_file(path).ok());
}

TEST(PluginRegistryUnsafeTest, OwnedByAnotherUser) {
  if (!is_root()) GTEST_SKIP() << "needs root to chown to another user";
  TempDir dir;
  const std::string path = dir.add("good");
  ASSERT_EQ(::chown(path.c_str(), kNobody, static_cast<gid_t>(-1)), 0);
  PluginRegistry registry;
  expect_unsafe(registry, path, "is owned by uid 65534, which is neither root nor the current");
}

TEST(PluginRegistryUnsafeTest, DirectoryOwnedByAnotherUser) {
  if (!is_root()) GTEST_SKIP() << "needs root to chown to another user";
  TempDir dir;
  const std::string path = dir.add("good");
  ASSERT_EQ(::chown(dir.str().c_str(), kNobody, static_cast<gid_t>(-1)), 0);
  PluginRegistry registry;
  expect_unsafe(registry, path, "its directory");
}

// Whoever can write any directory above the plugin directory can rename it away and put their
// own in its place between the check and dlopen: every ancestor is checked as well.
TEST(PluginRegistryUnsafeTest, WritableAncestorDirectory) {
  TempDir dir;
  const fs::path open_dir = dir.path() / "open";
  const fs::path inner = open_dir / "plugins";
  fs::create_directories(inner);
  fs::permissions(inner, fs::perms(0755));
  fs::copy_file(fs::path(MEMSNAP_FIXTURE_DIR) / "fixture_good.so", inner / "good.so");
  fs::permissions(inner / "good.so", fs::perms(0644));
  fs::permissions(open_dir, fs::perms(0757));
  const std::string path = (inner / "good.so").string();
  PluginRegistry registry;
  expect_unsafe(registry, path,
                "its ancestor directory '" + open_dir.string() + "' is writable by other users");

  PluginRegistry for_dir;
  const Status status = for_dir.load_directory(inner.string());
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.error().code, Errc::kPluginUnsafeFile);
  EXPECT_NE(status.error().message.find(open_dir.string()), std::string::npos)
      << status.error().message;
  EXPECT_TRUE(for_dir.plugins().empty());

  // With the sticky bit (as /tmp has) no one else may rename or remove what is inside: accepted.
  fs::permissions(open_dir, fs::perms(01777));
  PluginRegistry sticky;
  EXPECT_TRUE(sticky.load_file(path).ok());
}

TEST(PluginRegistryUnsafeTest, AncestorDirectoryOwnedByAnotherUser) {
  if (!is_root()) GTEST_SKIP() << "needs root to chown to another user";
  TempDir dir;
  const fs::path theirs = dir.path() / "theirs";
  const fs::path inner = theirs / "plugins";
  fs::create_directories(inner);
  fs::copy_file(fs::path(MEMSNAP_FIXTURE_DIR) / "fixture_good.so", inner / "good.so");
  fs::permissions(inner / "good.so", fs::perms(0644));
  fs::permissions(theirs, fs::perms(0755));
  fs::permissions(inner, fs::perms(0755));
  ASSERT_EQ(::chown(theirs.c_str(), kNobody, static_cast<gid_t>(-1)), 0);
  PluginRegistry registry;
  expect_unsafe(registry, (inner / "good.so").string(),
                "its ancestor directory '" + theirs.string() + "' is owned by uid 65534");
}

TEST(PluginRegistryUnsafeTest, SymlinkIsResolvedBeforeTheCheck) {
  TempDir safe;
  TempDir unsafe;
  const std::string target = unsafe.add("good", "", fs::perms(0646));
  const std::string link = safe.str() + "/link.so";
  fs::create_symlink(target, link);
  PluginRegistry registry;
  expect_unsafe(registry, link, "resolved to '" + target + "'");
}

TEST(PluginRegistryUnsafeTest, ChecksCanBeTurnedOff) {
  TempDir dir;
  const std::string path = dir.add("good", "", fs::perms(0646));
  PluginRegistry registry(PluginRegistry::Options{.check_permissions = false});
  EXPECT_TRUE(registry.load_file(path).ok());
}

// ---- directories ----

TEST(PluginRegistryTest, DirectoryLoadsTheGoodAndRecordsEveryRefusal) {
  TempDir dir;
  const std::map<std::string, Errc> expected = {
      {"fixture_abi_mismatch.so", Errc::kPluginAbiMismatch},
      {"fixture_bad_descriptor_abi_field.so", Errc::kPluginBadDescriptor},
      {"fixture_bad_descriptor_bad_chars.so", Errc::kPluginBadDescriptor},
      {"fixture_bad_descriptor_empty_name.so", Errc::kPluginBadDescriptor},
      {"fixture_bad_descriptor_long_name.so", Errc::kPluginBadDescriptor},
      {"fixture_bad_descriptor_missing.so", Errc::kPluginBadDescriptor},
      {"fixture_bad_descriptor_null_name.so", Errc::kPluginBadDescriptor},
      {"fixture_bad_descriptor_null_version.so", Errc::kPluginBadDescriptor},
      // The factory fixtures load fine: they only fail in create().
      {"fixture_factory_fails.so", Errc::kOk},
      {"fixture_factory_returns_null.so", Errc::kOk},
      {"fixture_factory_throws.so", Errc::kOk},
      {"fixture_good.so", Errc::kOk},
      {"fixture_good_dup.so", Errc::kPluginDuplicateName},
      {"fixture_missing_dep.so", Errc::kPluginCannotOpen},
      {"fixture_no_abi_symbol.so", Errc::kPluginNoAbiSymbol},
      {"fixture_no_factory.so", Errc::kPluginNoFactory},
      {"fixture_not_a_library.so", Errc::kPluginCannotOpen},
  };
  for (const auto& [file, code] : expected) {
    dir.add(file.substr(std::string("fixture_").size(), file.size() - 11));
  }
  // Not loaded: not *.so, hidden, and not a regular file.
  dir.add("good", "fixture_good.so.bak");
  dir.add("good_dup", ".hidden.so");
  fs::create_directory(dir.path() / "subdir.so");

  PluginRegistry registry;
  const Status status = registry.load_directory(dir.str());
  ASSERT_TRUE(status.ok()) << status.error().to_string();

  ASSERT_EQ(registry.plugins().size(), expected.size());
  auto want = expected.begin();  // std::map: sorted by file name, like the load order
  for (const PluginInfo& info : registry.plugins()) {
    EXPECT_EQ(info.path, dir.str() + "/" + want->first);
    EXPECT_EQ(info.error, want->second) << info.path << ": " << info.reason;
    EXPECT_EQ(info.loaded(), want->second == Errc::kOk) << info.path;
    if (!info.loaded()) {
      EXPECT_NE(info.reason.find(info.path), std::string::npos) << info.reason;
    }
    ++want;
  }
  std::set<std::string> loaded_names;
  for (const PluginInfo& info : registry.plugins()) {
    if (info.loaded()) loaded_names.insert(info.name);
  }
  EXPECT_EQ(loaded_names,
            (std::set<std::string>{"fixture_factory_fails", "fixture_factory_returns_null",
                                   "fixture_factory_throws", "fixture_good"}));
  EXPECT_EQ(registry.find("fixture_good")->version, "1.0.0");
}

TEST(PluginRegistryTest, DirectoryThatCannotBeRead) {
  TempDir dir;
  PluginRegistry registry;
  const Status missing = registry.load_directory(dir.str() + "/absent");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, Errc::kNotFound);
  EXPECT_NE(missing.error().message.find(dir.str() + "/absent"), std::string::npos);

  const Status not_dir = registry.load_directory(dir.add("good"));
  ASSERT_FALSE(not_dir.ok());
  EXPECT_EQ(not_dir.error().code, Errc::kIoError);
  EXPECT_TRUE(registry.plugins().empty());
}

TEST(PluginRegistryTest, EmptyDirectoryIsFine) {
  TempDir dir;
  PluginRegistry registry;
  EXPECT_TRUE(registry.load_directory(dir.str()).ok());
  EXPECT_TRUE(registry.plugins().empty());
}

// ---- duplicates ----

TEST(PluginRegistryTest, DuplicateNameKeepsTheFirst) {
  TempDir dir;
  const std::string first = dir.add("good");
  const std::string second = dir.add("good_dup");
  PluginRegistry registry;
  ASSERT_TRUE(registry.load_file(first).ok());
  auto dup = registry.load_file(second);
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().code, Errc::kPluginDuplicateName);
  EXPECT_NE(dup.error().message.find(second), std::string::npos) << dup.error().message;
  EXPECT_NE(dup.error().message.find(first), std::string::npos) << dup.error().message;
  EXPECT_FALSE(is_mapped(second));

  ASSERT_EQ(registry.plugins().size(), 2u);
  // The refused entry keeps copies of the descriptor's strings after its library is gone.
  EXPECT_EQ(registry.plugins()[1].name, "fixture_good");
  EXPECT_EQ(registry.plugins()[1].version, "2.0.0");
  EXPECT_EQ(registry.find("fixture_good")->version, "1.0.0");
  EXPECT_EQ(registry.find("fixture_good")->path, first);

  auto handle = registry.create("fixture_good", {});
  ASSERT_TRUE(handle.ok());
  std::atomic<int>* live = live_counter(first);
  ASSERT_NE(live, nullptr);
  EXPECT_EQ(live->load(), 1);
}

TEST(PluginRegistryTest, SameFileTwiceIsADuplicateAndStaysLoaded) {
  TempDir dir;
  const std::string path = dir.add("good");
  PluginRegistry registry;
  ASSERT_TRUE(registry.load_file(path).ok());
  auto again = registry.load_file(path);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, Errc::kPluginDuplicateName);
  EXPECT_TRUE(is_mapped(path));
  EXPECT_TRUE(registry.create("fixture_good", {}).ok());
}

// ---- create ----

TEST(PluginRegistryTest, CreateUnknownNameIsNotLoaded) {
  TempDir dir;
  PluginRegistry registry;
  ASSERT_TRUE(registry.load_file(dir.add("good")).ok());
  auto handle = registry.create("nope", {});
  ASSERT_FALSE(handle.ok());
  EXPECT_EQ(handle.error().code, Errc::kPluginNotLoaded);
  EXPECT_NE(handle.error().message.find("'nope'"), std::string::npos);
}

TEST(PluginRegistryTest, CreateRefusedPluginIsNotLoadedAndSaysWhy) {
  TempDir dir;
  PluginRegistry registry;
  ASSERT_TRUE(registry.load_file(dir.add("good")).ok());
  ASSERT_FALSE(registry.load_file(dir.add("good_dup")).ok());
  PluginRegistry other;
  ASSERT_FALSE(other.load_file(dir.add("no_factory")).ok());
  auto handle = other.create("fixture_no_factory", {});
  ASSERT_FALSE(handle.ok());
  EXPECT_EQ(handle.error().code, Errc::kPluginNotLoaded);
  EXPECT_NE(handle.error().message.find("was refused"), std::string::npos);
}

TEST(PluginRegistryTest, CreatePassesOptionsAndReportsTheirRejection) {
  TempDir dir;
  PluginRegistry registry;
  ASSERT_TRUE(registry.load_file(dir.add("good")).ok());
  auto ok = registry.create("fixture_good", {{"tag", "x"}});
  ASSERT_TRUE(ok.ok()) << ok.error().to_string();
  EXPECT_EQ(ok->plugin_name(), "fixture_good");

  auto bad = registry.create("fixture_good", {{"tag", "x"}, {"bogus", "1"}});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, Errc::kPluginFactoryFailed);
  EXPECT_NE(bad.error().message.find("invalid_argument: unknown option 'bogus'='1'"),
            std::string::npos)
      << bad.error().message;
}

struct FactoryCase {
  std::string fixture;
  std::string in_message;
  int sys_errno;
};

class FactoryFailureTest : public ::testing::TestWithParam<FactoryCase> {};

TEST_P(FactoryFailureTest, IsFactoryFailedWithThePluginsMessage) {
  const FactoryCase& c = GetParam();
  TempDir dir;
  const std::string path = dir.add(c.fixture);
  PluginRegistry registry;
  ASSERT_TRUE(registry.load_file(path).ok());
  auto handle = registry.create("fixture_" + c.fixture, {});
  ASSERT_FALSE(handle.ok());
  EXPECT_EQ(handle.error().code, Errc::kPluginFactoryFailed) << handle.error().to_string();
  EXPECT_NE(handle.error().message.find(c.in_message), std::string::npos) << handle.error().message;
  EXPECT_NE(handle.error().message.find(path), std::string::npos) << handle.error().message;
  EXPECT_EQ(handle.error().sys_errno, c.sys_errno);
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, FactoryFailureTest,
    ::testing::Values(
        FactoryCase{"factory_fails", "unsupported: fixture factory always fails", ENOSYS},
        FactoryCase{"factory_throws",
                    "internal: factory of fixture_factory_throws threw an exception", 0},
        FactoryCase{"factory_returns_null", "reported success but returned no strategy", 0}),
    [](const ::testing::TestParamInfo<FactoryCase>& p) { return p.param.fixture; });

TEST(PluginRegistryTest, CreateIsThreadSafe) {
  TempDir dir;
  const std::string path = dir.add("good");
  PluginRegistry registry;
  ASSERT_TRUE(registry.load_file(path).ok());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&registry, &failures] {
      for (int i = 0; i < 200; ++i) {
        auto handle = registry.create("fixture_good", {{"tag", std::to_string(i)}});
        if (!handle.ok()) ++failures;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(live_counter(path)->load(), 0);
}

// ---- lifetime ----

TEST(PluginRegistryTest, HandleKeepsLibraryLoadedAfterRegistryIsGone) {
  TempDir dir;
  const std::string path = dir.add("good");
  StrategyHandle handle;
  std::atomic<int>* live = nullptr;
  {
    PluginRegistry registry;
    ASSERT_TRUE(registry.load_file(path).ok());
    live = live_counter(path);
    ASSERT_NE(live, nullptr);
    EXPECT_EQ(live->load(), 0);

    auto first = registry.create("fixture_good", {});
    ASSERT_TRUE(first.ok());
    auto second = registry.create("fixture_good", {});
    ASSERT_TRUE(second.ok());
    EXPECT_EQ(live->load(), 2);
    second->reset();
    EXPECT_FALSE(static_cast<bool>(*second));
    EXPECT_EQ(live->load(), 1);
    handle = std::move(first).value();
  }
  ASSERT_TRUE(is_mapped(path)) << "the handle must keep the library loaded";
  EXPECT_EQ(live->load(), 1);
  ASSERT_TRUE(static_cast<bool>(handle));

  CountingSink sink;
  const plugin::Status empty = export_ranges(*handle, {}, sink);
  EXPECT_TRUE(empty.ok()) << empty.message;
  EXPECT_EQ(sink.bytes, 0u);
  const plugin::Status two_blocks = export_ranges(*handle, {{4096, 8192}}, sink);
  EXPECT_TRUE(two_blocks.ok()) << two_blocks.message;
  EXPECT_EQ(sink.bytes, 8192u);

  handle.reset();
  EXPECT_FALSE(static_cast<bool>(handle));
  EXPECT_FALSE(is_mapped(path)) << "the last handle must unload the library";
}

TEST(PluginRegistryTest, LibraryUnloadedWithRegistryWhenNoHandleIsLeft) {
  TempDir dir;
  const std::string path = dir.add("good");
  {
    PluginRegistry registry;
    ASSERT_TRUE(registry.load_file(path).ok());
    EXPECT_TRUE(registry.create("fixture_good", {}).ok());
    EXPECT_TRUE(is_mapped(path));
  }
  EXPECT_FALSE(is_mapped(path));
}

TEST(PluginRegistryTest, MoveAssignmentDestroysTheOldStrategyBeforeItsLibrary) {
  // Two copies are two libraries. Overwriting the only handle to the first must run the old
  // strategy's destructor (code in the first library) before that library is unloaded; the
  // wrong order would crash here.
  TempDir dir_a;
  TempDir dir_b;
  const std::string path_a = dir_a.add("good");
  const std::string path_b = dir_b.add("good");
  StrategyHandle a;
  StrategyHandle b;
  {
    PluginRegistry registry_a;
    PluginRegistry registry_b;
    ASSERT_TRUE(registry_a.load_file(path_a).ok());
    ASSERT_TRUE(registry_b.load_file(path_b).ok());
    a = std::move(registry_a.create("fixture_good", {})).value();
    b = std::move(registry_b.create("fixture_good", {})).value();
  }
  std::atomic<int>* live_b = live_counter(path_b);
  ASSERT_NE(live_b, nullptr);
  ASSERT_TRUE(is_mapped(path_a));

  a = std::move(b);
  EXPECT_FALSE(is_mapped(path_a));
  EXPECT_TRUE(is_mapped(path_b));
  EXPECT_FALSE(
      static_cast<bool>(b));  // NOLINT(bugprone-use-after-move): moved-from is documented as empty
  EXPECT_EQ(live_b->load(), 1);

  StrategyHandle c(std::move(a));
  EXPECT_FALSE(static_cast<bool>(a));  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(live_b->load(), 1);
  c.reset();
  EXPECT_FALSE(is_mapped(path_b));
}

}  // namespace
}  // namespace memsnap
