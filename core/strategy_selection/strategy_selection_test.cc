// Strategy selection against the real plugins of the build (MEMSNAP_PLUGIN_DIR) and the flags
// files that ship: config/flags.yaml and docs/experiments/strategy-ab-flag.yaml.
#include "core/strategy_selection/strategy_selection.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <string>

namespace memsnap {
namespace {

std::string plugin_dir() {
  const char* dir = std::getenv("MEMSNAP_PLUGIN_DIR");
  return dir != nullptr ? dir : "";
}

class StrategySelectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const Status s = registry_.load_directory(plugin_dir());
    ASSERT_TRUE(s.ok()) << s.error().to_string();
    ASSERT_NE(registry_.find("memfd"), nullptr);
    ASSERT_NE(registry_.find("process_vm_readv"), nullptr);
  }

  static std::unique_ptr<flags::FlagStore> store_of(const std::string& yaml) {
    flags::LoadResult r = flags::load_flag_text(yaml, "test.yaml", {.strict = true});
    EXPECT_TRUE(r.ok()) << r.error_text();
    return std::make_unique<flags::FlagStore>(r.flags);
  }

  static std::unique_ptr<flags::FlagStore> store_from(const std::string& path) {
    std::string err;
    auto store = flags::FlagStore::open(path, {}, &err);
    EXPECT_NE(store, nullptr) << err;
    return store;
  }

  static SandboxAttributes sandbox(std::string id, std::string team, bool memfd) {
    SandboxAttributes s;
    s.id = std::move(id);
    s.team = std::move(team);
    s.template_name = "python-3.12";
    s.vmm = "firecracker";
    s.vmm_version = "1.7.0";
    s.kernel_version = "6.1.0";
    s.memory_mib = 2048;
    s.hugepages = false;
    s.host = "host-a";
    s.has_memfd = memfd;
    return s;
  }

  PluginRegistry registry_;
};

const char* kByTeam = R"(
flags:
  memory-export-strategy:
    state: ENABLED
    variants: {pvr: process_vm_readv, memfd: memfd, hp: hole_punch, bogus: no_such_plugin}
    defaultVariant: pvr
    targeting:
      if:
        - {"==": [{var: team}, memfd-team]}
        - memfd
        - {"==": [{var: team}, bogus-team]}
        - bogus
        - {sem_ver: [{var: vmm_version}, "<", "1.0.0"]}
        - hp
        - null
)";

TEST_F(StrategySelectionTest, ContextHasEverySandboxAttribute) {
  const nlohmann::json ctx = sandbox_context(sandbox("sb-1", "t", true));
  for (const char* key : {"targetingKey", "team", "template", "vmm", "vmm_version",
                          "kernel_version", "memory_mib", "hugepages", "host", "has_memfd"}) {
    EXPECT_TRUE(ctx.contains(key)) << key;
  }
  EXPECT_EQ(ctx["targetingKey"], "sb-1");
  EXPECT_EQ(ctx["memory_mib"], 2048);
}

TEST_F(StrategySelectionTest, FlagPicksAUsableStrategy) {
  auto store = store_of(kByTeam);
  StrategySelector selector(*store, registry_);
  const StrategyChoice c = selector.select(sandbox("sb-1", "memfd-team", true));
  EXPECT_EQ(c.strategy, "memfd");
  EXPECT_FALSE(c.fell_back);
  EXPECT_EQ(c.resolution.reason, flags::Reason::kTargetingMatch);
  EXPECT_EQ(c.resolution.variant, "memfd");

  const StrategyChoice d = selector.select(sandbox("sb-2", "other", true));
  EXPECT_EQ(d.strategy, "process_vm_readv");
  EXPECT_FALSE(d.fell_back);
  EXPECT_EQ(d.resolution.reason, flags::Reason::kDefault);
  EXPECT_EQ(selector.fallbacks(), 0U);
}

TEST_F(StrategySelectionTest, NoMemfdFallsBackWithReason) {
  auto store = store_of(kByTeam);
  StrategySelector selector(*store, registry_);
  const StrategyChoice c = selector.select(sandbox("sb-3", "memfd-team", false));
  EXPECT_EQ(c.requested, "memfd");
  EXPECT_EQ(c.strategy, "process_vm_readv");
  EXPECT_TRUE(c.fell_back);
  EXPECT_NE(c.fallback_reason.find("needs a memfd"), std::string::npos) << c.fallback_reason;
  EXPECT_EQ(c.fallback, FallbackCause::kMissingMemfd);
  EXPECT_EQ(selector.fallbacks(), 1U);
}

// A needs-pid strategy (process_vm_readv) for a sandbox whose VMM pid and regions are unknown
// (a CLI pause of a memfd alone): the selector says so, under its own cause.
TEST_F(StrategySelectionTest, NoPidFallsBackWithReason) {
  auto store = store_of(
      "flags:\n  memory-export-strategy:\n    state: ENABLED\n"
      "    variants: {pvr: process_vm_readv}\n    defaultVariant: pvr\n");
  StrategySelectionOptions opts;
  opts.safe_strategy = "memfd";
  StrategySelector selector(*store, registry_, opts);
  SandboxAttributes s = sandbox("sb-9", "t", true);
  EXPECT_FALSE(selector.select(s).fell_back);
  s.has_pid = false;
  const StrategyChoice c = selector.select(s);
  EXPECT_EQ(c.requested, "process_vm_readv");
  EXPECT_EQ(c.strategy, "memfd");
  EXPECT_TRUE(c.fell_back);
  EXPECT_EQ(c.fallback, FallbackCause::kMissingPid);
  EXPECT_NE(c.fallback_reason.find("needs the VMM's pid"), std::string::npos) << c.fallback_reason;
}

TEST_F(StrategySelectionTest, UnknownPluginFallsBackWithReason) {
  auto store = store_of(kByTeam);
  StrategySelector selector(*store, registry_);
  const StrategyChoice c = selector.select(sandbox("sb-4", "bogus-team", true));
  EXPECT_EQ(c.requested, "no_such_plugin");
  EXPECT_EQ(c.strategy, "process_vm_readv");
  EXPECT_TRUE(c.fell_back);
  EXPECT_NE(c.fallback_reason.find("no loaded plugin is named \"no_such_plugin\""),
            std::string::npos)
      << c.fallback_reason;
  EXPECT_EQ(c.fallback, FallbackCause::kPluginNotLoaded);
}

TEST_F(StrategySelectionTest, MinimumVmmVersionIsAPrerequisite) {
  auto store = store_of(kByTeam);
  StrategySelectionOptions opts;
  opts.min_vmm_version["memfd"] = "1.8.0";
  StrategySelector selector(*store, registry_, opts);
  SandboxAttributes s = sandbox("sb-5", "memfd-team", true);
  StrategyChoice c = selector.select(s);
  EXPECT_TRUE(c.fell_back);
  EXPECT_NE(c.fallback_reason.find("needs VMM version >= 1.8.0"), std::string::npos);
  EXPECT_EQ(c.fallback, FallbackCause::kVmmVersion);
  s.vmm_version = "v1.9.1";
  c = selector.select(s);
  EXPECT_FALSE(c.fell_back) << c.fallback_reason;
  EXPECT_EQ(c.strategy, "memfd");
  s.vmm_version = "unknown";
  EXPECT_TRUE(selector.select(s).fell_back);
}

TEST_F(StrategySelectionTest, FlagErrorsFallBackAndDisabledIsNotAFallback) {
  auto missing = store_of("flags: {}\n");
  StrategySelector a(*missing, registry_);
  StrategyChoice c = a.select(sandbox("sb-6", "t", true));
  EXPECT_TRUE(c.fell_back);
  EXPECT_NE(c.fallback_reason.find("FLAG_NOT_FOUND"), std::string::npos);
  EXPECT_EQ(c.strategy, "process_vm_readv");

  auto wrong_type = store_of(
      "flags:\n  memory-export-strategy:\n    state: ENABLED\n    variants: {a: 1}\n"
      "    defaultVariant: a\n");
  StrategySelector b(*wrong_type, registry_);
  c = b.select(sandbox("sb-7", "t", true));
  EXPECT_TRUE(c.fell_back);
  EXPECT_NE(c.fallback_reason.find("TYPE_MISMATCH"), std::string::npos);

  auto disabled = store_of(
      "flags:\n  memory-export-strategy:\n    state: DISABLED\n    variants: {m: memfd}\n"
      "    defaultVariant: m\n");
  StrategySelector d(*disabled, registry_);
  c = d.select(sandbox("sb-8", "t", true));
  EXPECT_FALSE(c.fell_back);
  EXPECT_EQ(c.strategy, "process_vm_readv");
  EXPECT_EQ(c.resolution.reason, flags::Reason::kDisabled);

  StrategySelectionOptions opts;
  opts.safe_strategy = "memfd";
  StrategySelector e(*missing, registry_, opts);
  EXPECT_EQ(e.select(sandbox("sb-9", "t", true)).strategy, "memfd");
}

TEST_F(StrategySelectionTest, ShippedConfigIsAZeroPercentRollout) {
  auto store = store_from(std::string(MEMSNAP_SOURCE_DIR) + "/config/flags.yaml");
  ASSERT_NE(store, nullptr);
  StrategySelector selector(*store, registry_);
  for (int i = 0; i < 2000; ++i) {
    const StrategyChoice c = selector.select(sandbox("sb-" + std::to_string(i), "t", true));
    ASSERT_EQ(c.strategy, "process_vm_readv") << i;
    ASSERT_FALSE(c.fell_back);
    ASSERT_EQ(c.resolution.reason, flags::Reason::kTargetingMatch);
  }
}

TEST_F(StrategySelectionTest, ExperimentFlagSplitsEvenlyAcrossThreeStrategies) {
  auto store =
      store_from(std::string(MEMSNAP_SOURCE_DIR) + "/docs/experiments/strategy-ab-flag.yaml");
  ASSERT_NE(store, nullptr);
  StrategySelector selector(*store, registry_);
  std::map<std::string, int> counts;
  constexpr int kSandboxes = 6000;
  for (int i = 0; i < kSandboxes; ++i) {
    const StrategyChoice c = selector.select(sandbox("sb-" + std::to_string(i), "t", true));
    ++counts[c.strategy];
    ASSERT_FALSE(c.fell_back) << c.fallback_reason;
    // Deterministic: the same sandbox gets the same strategy again.
    ASSERT_EQ(selector.select(sandbox("sb-" + std::to_string(i), "t", true)).strategy, c.strategy);
  }
  ASSERT_EQ(counts.size(), 3U);
  for (const auto& [name, n] : counts) EXPECT_NEAR(n, kSandboxes / 3, 200) << name;
}

// What `memsnap flags check` reports: variants of the strategy flag that name no loaded plugin.
TEST_F(StrategySelectionTest, VariantsNamingNoLoadedPluginAreFound) {
  const char* yaml = R"(
flags:
  memory-export-strategy:
    state: ENABLED
    variants: {process_vm_readv: process_vm_readv, memfd: memfdd}
    defaultVariant: process_vm_readv
  other:
    state: ENABLED
    variants: {a: nosuch}
    defaultVariant: a
)";
  const auto set = flags::load_flag_text(yaml, "test.yaml", {.strict = true});
  ASSERT_TRUE(set.ok()) << set.error_text();
  const auto problems = check_strategy_variants(*set.flags, registry_);
  ASSERT_EQ(problems.size(), 1u);  // "other" is not the strategy flag
  EXPECT_EQ(problems[0].variant, "memfd");
  EXPECT_EQ(problems[0].value, "\"memfdd\"");
  EXPECT_NE(problems[0].why.find("no loaded strategy plugin"), std::string::npos);
  EXPECT_EQ(loaded_strategy_names(registry_), "hole_punch, memfd, process_vm_readv");
  const auto shipped =
      flags::load_flag_source(std::string(MEMSNAP_SOURCE_DIR) + "/config/flags.yaml");
  ASSERT_TRUE(shipped.ok());
  EXPECT_TRUE(check_strategy_variants(*shipped.flags, registry_).empty());
}

}  // namespace
}  // namespace memsnap
