// Runtime reload: a store watching a file (editor-style write-and-rename) and a Kubernetes
// ConfigMap-style directory (visible file -> ..data/flags.yaml, ..data swapped by rename) is
// rewritten 1,000 times in all, some versions invalid, while 4 threads evaluate continuously.
// Every evaluation must see one whole version (no torn read), and the final state must be the
// last valid version.
#include <gtest/gtest.h>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "flags/flag_store.h"

namespace memsnap::flags {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// Version n: two flags that must always agree, and a fractional rollout whose weights change
// with n. Invalid versions are a syntax error, or a semantic error (strict mode rejects them).
std::string version_text(int n, int kind) {
  if (kind == 1) return "flags:\n  gen: {state: ENABLED, variants: [oops\n";
  if (kind == 2) {
    return "flags:\n  gen:\n    state: ENABLED\n    variants: {v: " + std::to_string(n) +
           "}\n    targeting: {no_such_op: []}\n";
  }
  const std::string v = std::to_string(n);
  return "flags:\n"
         "  gen:\n"
         "    state: ENABLED\n"
         "    variants: {v: " +
         v +
         "}\n"
         "    defaultVariant: v\n"
         "  twin:\n"
         "    state: ENABLED\n"
         "    variants: {v: \"twin-" +
         v +
         "\"}\n"
         "    defaultVariant: v\n"
         "  rollout:\n"
         "    state: ENABLED\n"
         "    variants: {on: true, off: false}\n"
         "    defaultVariant: off\n"
         "    targeting:\n"
         "      fractional: [[\"on\", " +
         std::to_string(n % 100) + "], [\"off\", " + std::to_string(100 - n % 100) + "]]\n";
}

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::trunc);
  out << text;
}

struct Readers {
  std::atomic<bool> stop{false};
  std::atomic<long> evaluations{0};
  std::atomic<long> torn{0};
  std::atomic<long> errors{0};
  std::vector<std::thread> threads;

  void start(const FlagStore& store) {
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([this, &store, t] {
        long i = 0;
        while (!stop.load(std::memory_order_relaxed)) {
          const auto snap = store.snapshot();
          const Json ctx = {{"targetingKey", "sandbox-" + std::to_string(t * 100000 + i++)}};
          const Resolution gen = snap->evaluate("gen", ctx, FlagType::kInteger, -1);
          const Resolution twin = snap->evaluate("twin", ctx, FlagType::kString, "");
          const Resolution roll = snap->evaluate("rollout", ctx, FlagType::kBoolean, false);
          if (!gen.ok() || !twin.ok() || !roll.ok()) {
            errors.fetch_add(1);
          } else if (twin.value != "twin-" + std::to_string(gen.value.get<int>())) {
            torn.fetch_add(1);
          }
          evaluations.fetch_add(1, std::memory_order_relaxed);
        }
      });
    }
  }
  void join() {
    stop = true;
    for (auto& t : threads) t.join();
  }
};

bool wait_for_generation_value(const FlagStore& store, int expected) {
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (std::chrono::steady_clock::now() < deadline) {
    const Resolution r = store.snapshot()->evaluate("gen", {}, FlagType::kInteger, -1);
    if (r.value == expected) return true;
    std::this_thread::sleep_for(5ms);
  }
  return false;
}

class ReloadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/tmp/memsnap-flags-reload-XXXXXX";
    ASSERT_NE(mkdtemp(templ), nullptr);
    dir_ = templ;
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

// kind of write i: every 7th a syntax error, every 11th a semantic error, otherwise valid. The
// last write of a run is valid, so "the final state is the last valid file" is well defined (a
// watcher cannot load a version that was overwritten before it could read it).
constexpr int kWrites = 500;
int kind_of(int i) {
  if (i == kWrites) return 0;
  return i % 7 == 3 ? 1 : i % 11 == 5 ? 2 : 0;
}

TEST_F(ReloadTest, RenameStyleRewritesWhileFourThreadsEvaluate) {
  const fs::path file = dir_ / "flags.yaml";
  write_file(file, version_text(0, 0));
  std::string err;
  auto store = FlagStore::open(file.string(), {}, &err);
  ASSERT_NE(store, nullptr) << err;
  ASSERT_TRUE(store->watch(&err)) << err;
  Readers readers;
  readers.start(*store);

  int last_valid = 0;
  for (int i = 1; i <= kWrites; ++i) {
    const int kind = kind_of(i);
    const fs::path tmp = dir_ / ".flags.yaml.tmp";
    write_file(tmp, version_text(i, kind));
    fs::rename(tmp, file);  // what editors and config management tools do
    if (kind == 0) last_valid = i;
    if (i % 10 == 0) std::this_thread::sleep_for(2ms);  // let some reloads land mid-stream
  }
  EXPECT_TRUE(wait_for_generation_value(*store, last_valid)) << "never reached " << last_valid;
  // One more invalid write after the last valid one: it must be rejected and counted.
  const auto failed_before = store->stats().reloads_failed;
  write_file(dir_ / ".tmp", version_text(999, 1));
  fs::rename(dir_ / ".tmp", file);
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (store->stats().reloads_failed == failed_before &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
  }
  readers.join();

  const ReloadStats stats = store->stats();
  EXPECT_GT(stats.reloads_failed, failed_before);
  EXPECT_NE(stats.last_error.find("flags.yaml:"), std::string::npos) << stats.last_error;
  EXPECT_NE(stats.last_error.find("invalid YAML"), std::string::npos) << stats.last_error;
  EXPECT_EQ(store->snapshot()->evaluate("gen", {}, FlagType::kInteger, -1).value, last_valid);
  EXPECT_EQ(readers.torn.load(), 0);
  EXPECT_EQ(readers.errors.load(), 0);
  EXPECT_GT(readers.evaluations.load(), 1000);
  // The watcher may coalesce the whole burst into one reload (a busy CI machine did): at least
  // one must have landed; how many is timing, not correctness.
  EXPECT_GE(stats.reloads_ok, 1U);
  std::printf("rename style: %ld evaluations, %llu reloads ok, %llu failed, %llu unchanged\n",
              readers.evaluations.load(), static_cast<unsigned long long>(stats.reloads_ok),
              static_cast<unsigned long long>(stats.reloads_failed),
              static_cast<unsigned long long>(stats.reloads_unchanged));
}

TEST_F(ReloadTest, ConfigMapSymlinkSwapWhileFourThreadsEvaluate) {
  // The kubelet's layout: <mount>/flags.yaml -> ..data/flags.yaml, ..data -> ..<timestamp dir>.
  auto publish = [&](int i, const std::string& text) {
    const std::string ts = "..v" + std::to_string(i);
    fs::create_directory(dir_ / ts);
    write_file(dir_ / ts / "flags.yaml", text);
    fs::create_directory_symlink(ts, dir_ / "..data_tmp");
    fs::rename(dir_ / "..data_tmp", dir_ / "..data");  // the atomic swap
  };
  publish(0, version_text(0, 0));
  fs::create_symlink("..data/flags.yaml", dir_ / "flags.yaml");

  std::string err;
  auto store = FlagStore::open(dir_.string(), {}, &err);  // the mount directory as the source
  ASSERT_NE(store, nullptr) << err;
  ASSERT_TRUE(store->watch(&err)) << err;
  Readers readers;
  readers.start(*store);

  int last_valid = 0;
  std::string previous = "..v0";
  for (int i = 1; i <= kWrites; ++i) {
    const int kind = kind_of(i);
    publish(i, version_text(i, kind));
    fs::remove_all(dir_ / previous);  // the kubelet removes the old timestamp directory
    previous = "..v" + std::to_string(i);
    if (kind == 0) last_valid = i;
    if (i % 10 == 0) std::this_thread::sleep_for(2ms);
  }
  EXPECT_TRUE(wait_for_generation_value(*store, last_valid)) << "never reached " << last_valid;
  readers.join();

  const ReloadStats stats = store->stats();
  EXPECT_EQ(store->snapshot()->evaluate("gen", {}, FlagType::kInteger, -1).value, last_valid);
  EXPECT_EQ(readers.torn.load(), 0);
  EXPECT_EQ(readers.errors.load(), 0);
  EXPECT_GE(stats.reloads_ok, 1U);  // a burst may land as one reload (timing)
  std::printf("symlink swap: %ld evaluations, %llu reloads ok, %llu failed, %llu unchanged\n",
              readers.evaluations.load(), static_cast<unsigned long long>(stats.reloads_ok),
              static_cast<unsigned long long>(stats.reloads_failed),
              static_cast<unsigned long long>(stats.reloads_unchanged));
}

TEST_F(ReloadTest, BadFileAtStartIsAnErrorAndBadReloadKeepsLastGood) {
  const fs::path file = dir_ / "flags.json";
  write_file(file,
             "{\"flags\": {\n  \"a\": {\"state\": \"ENABLED\", \"variants\": {\"v\": 1},,}}}");
  std::string err;
  EXPECT_EQ(FlagStore::open(file.string(), {}, &err), nullptr);
  EXPECT_NE(err.find("flags.json:2:"), std::string::npos) << err;

  write_file(
      file,
      R"({"flags": {"a": {"state": "ENABLED", "variants": {"v": 1}, "defaultVariant": "v"}}})");
  auto store = FlagStore::open(file.string(), {}, &err);
  ASSERT_NE(store, nullptr) << err;
  const auto first = store->snapshot();
  write_file(file, R"({"flags": {"a": {"state": "MAYBE", "variants": {"v": 2}}}})");
  EXPECT_FALSE(store->reload());
  EXPECT_EQ(store->snapshot(), first);
  EXPECT_EQ(store->stats().reloads_failed, 1U);
  EXPECT_NE(store->stats().last_error.find("flags.json:1:"), std::string::npos);
  EXPECT_TRUE(store->reload() == false);  // still bad: counted again
  write_file(
      file,
      R"({"flags": {"a": {"state": "ENABLED", "variants": {"v": 2}, "defaultVariant": "v"}}})");
  EXPECT_TRUE(store->reload());
  EXPECT_EQ(store->snapshot()->evaluate("a", {}, {}, 0).value, 2);
  EXPECT_TRUE(store->reload());  // unchanged content: no new generation
  EXPECT_EQ(store->stats().generation, 2U);
  EXPECT_EQ(store->stats().reloads_unchanged, 1U);
  // An old snapshot stays valid for whoever still holds it.
  EXPECT_EQ(first->evaluate("a", {}, {}, 0).value, 1);
}

// A good load after a failed one is the state an operator must see: the flag file on disk is in
// force again, so last_error is cleared (reloads_failed still counts what happened). A re-read
// whose content is what is already loaded is not a reload: it is counted apart and leaves the
// generation alone.
TEST_F(ReloadTest, AGoodLoadAfterABadOneClearsTheErrorAndAnUnchangedReReadIsNoReload) {
  const fs::path file = dir_ / "flags.json";
  const std::string a =
      R"({"flags": {"a": {"state": "ENABLED", "variants": {"v": 1}, "defaultVariant": "v"}}})";
  const std::string b =
      R"({"flags": {"a": {"state": "ENABLED", "variants": {"v": 2}, "defaultVariant": "v"}}})";
  const std::string bad = R"({"flags": {"a": {"state": "MAYBE"}}})";
  write_file(file, a);
  std::string err;
  auto store = FlagStore::open(file.string(), {}, &err);
  ASSERT_NE(store, nullptr) << err;

  // Bad, then the same good content back: unchanged, but healthy again.
  write_file(file, bad);
  EXPECT_FALSE(store->reload());
  EXPECT_FALSE(store->stats().last_error.empty());
  write_file(file, a);
  EXPECT_TRUE(store->reload());
  ReloadStats s = store->stats();
  EXPECT_EQ(s.last_error, "") << "the file in force is good, yet an old error is shown";
  EXPECT_EQ(s.reloads_failed, 1U);
  EXPECT_EQ(s.reloads_unchanged, 1U);
  EXPECT_EQ(s.reloads_ok, 0U) << "a re-read of unchanged content counted as a reload";
  EXPECT_EQ(s.generation, 1U);

  // Bad, then new good content: a reload, and healthy again.
  write_file(file, bad);
  EXPECT_FALSE(store->reload());
  EXPECT_FALSE(store->stats().last_error.empty());
  write_file(file, b);
  EXPECT_TRUE(store->reload());
  s = store->stats();
  EXPECT_EQ(s.last_error, "");
  EXPECT_EQ(s.reloads_failed, 2U);
  EXPECT_EQ(s.reloads_ok, 1U);
  EXPECT_EQ(s.reloads_unchanged, 1U);
  EXPECT_EQ(s.generation, 2U);
  EXPECT_EQ(store->snapshot()->evaluate("a", {}, {}, 0).value, 2);
}

}  // namespace
}  // namespace memsnap::flags
