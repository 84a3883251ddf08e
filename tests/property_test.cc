// Property test of the whole pause/resume path (issue 16): random sequences of pauses (every
// `parent` and `after` choice, every strategy), resumes (every mode, write tracking on and off),
// guest writes and discards, on a 64 MiB stand-in served by a real memsnapd. After every
// committed pause the sandbox's chain is read back and every page compared with what the guest
// held; after every resume the guest checks its own memory, now or after more steps (so that
// pauses of partly served memory are exercised too); at the end every page once more.
//
// CI runs a bounded number of seeds; by hand, for longer:
//   MEMSNAP_PROPERTY_SEEDS=200 MEMSNAP_PROPERTY_STEPS=40 build/release/tests/property_test
// A failure names its seed and step: MEMSNAP_PROPERTY_FIRST_SEED=<seed> with SEEDS=1 replays it.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/pattern/pattern.h"
#include "core/snapshot/snapshot_chain.h"
#include "tools/fleet/fleet.h"

namespace memsnap::fleet {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::uint64_t kGuest = 64ULL << 20;
constexpr std::uint64_t kPages = kGuest / 4096;

std::uint64_t env_or(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::strtoull(v, nullptr, 10) : fallback;
}

// Routes sandboxes to strategies by team, so that a pause without a forced strategy still varies.
const char* kFlags = R"({"flags": {"memory-export-strategy": {
    "state": "ENABLED",
    "variants": {"process_vm_readv": "process_vm_readv", "memfd": "memfd",
                 "hole_punch": "hole_punch"},
    "defaultVariant": "memfd",
    "targeting": {"if": [
      {"==": [{"var": "team"}, "a"]}, "process_vm_readv",
      {"==": [{"var": "team"}, "c"]}, "hole_punch", null]}}}})";

class PropertyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/var/tmp/memsnap-property-XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
    std::ofstream(dir_ + "/flags.json") << kFlags;
    DaemonOptions o;
    o.dir = dir_;
    o.flags_file = dir_ + "/flags.json";
    auto d = Daemon::start(o);
    ASSERT_TRUE(d.ok()) << d.error().to_string();
    daemon_ = std::move(*d);
  }
  void TearDown() override {
    if (daemon_ && HasFailure()) {
      std::ifstream log(daemon_->log_path());
      std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
      if (text.size() > 20000) text = "..." + text.substr(text.size() - 20000);
      std::cerr << "---- memsnapd log (tail) ----\n" << text << "\n";
    }
    daemon_.reset();
    fs::remove_all(dir_);
  }

  json state_of(const std::string& id) {
    auto a = daemon_->call("GET", "/v1/sandboxes/" + id);
    EXPECT_TRUE(a.ok() && a->ok());
    return a.ok() ? a->body : json();
  }

  // Every page of the sandbox's committed chain against what the guest held when it paused.
  void check_chain(const std::string& id, const std::vector<std::uint32_t>& expected,
                   std::uint64_t seed) {
    const json s = state_of(id);
    std::vector<std::string> chain = s.at("snapshots").get<std::vector<std::string>>();
    auto opened = SnapshotChain::open(chain, Verify::kFull);
    ASSERT_TRUE(opened.ok()) << opened.error().to_string();
    std::vector<std::uint8_t> page(4096);
    std::uint64_t bad = 0, first_bad = 0;
    for (std::uint64_t p = 0; p < expected.size(); ++p) {
      ASSERT_TRUE(opened->read(p * 4096, 4096, page.data()).ok());
      if (!pattern::check_page(page.data(), 4096, seed, p, expected[p]).ok && bad++ == 0) {
        first_bad = p;
      }
    }
    EXPECT_EQ(bad, 0u) << "the committed chain of " << id << " (" << chain.size()
                       << " snapshots) differs from the guest in " << bad
                       << " pages, the first at page " << first_bad;
  }

  std::string dir_;
  std::unique_ptr<Daemon> daemon_;
};

TEST_F(PropertyTest, RandomPausesResumesWritesAndDiscardsLoseNothing) {
  const std::uint64_t seeds = env_or("MEMSNAP_PROPERTY_SEEDS", 6);
  const std::uint64_t steps = env_or("MEMSNAP_PROPERTY_STEPS", 14);
  const std::uint64_t first_seed = env_or("MEMSNAP_PROPERTY_FIRST_SEED", 1);
  const std::vector<std::string> strategies = {"", "process_vm_readv", "memfd", "hole_punch"};
  const std::vector<std::string> modes = {"", "lazy", "background", "eager", "warm"};
  const std::vector<std::string> teams = {"a", "b", "c"};
  std::uint64_t pauses = 0, resumes = 0, refusals = 0;
  for (std::uint64_t seed = first_seed; seed < first_seed + seeds; ++seed) {
    std::mt19937_64 rng(seed);
    auto pick = [&](std::size_t n) { return static_cast<std::size_t>(rng() % n); };
    SandboxSpec spec;
    spec.id = "prop-" + std::to_string(seed);
    spec.size = kGuest;
    spec.backing = pick(3) == 0 ? "anon" : "memfd";
    spec.attributes = {{"team", teams[pick(teams.size())]}};
    spec.seed = seed;
    auto launched = Sandbox::launch(*daemon_, spec);
    ASSERT_TRUE(launched.ok()) << launched.error().to_string();
    Sandbox& sb = **launched;
    bool paused = false;
    std::vector<std::uint32_t> expected;  // what the guest held at the last committed pause
    for (std::uint64_t step = 0; step < steps; ++step) {
      const std::string where = "seed " + std::to_string(seed) + " step " + std::to_string(step) +
                                " (" + spec.backing + ", team " +
                                spec.attributes["team"].get<std::string>() + ")";
      SCOPED_TRACE(where);
      if (paused) {
        json body = json::object();
        if (const std::string& m = modes[pick(modes.size())]; !m.empty()) body["mode"] = m;
        if (pick(3) == 0) body["track_writes"] = false;
        auto r = sb.resume(body);
        if (!r.ok() && body.value("mode", "") == "warm" &&
            r.error().message.find("generation_mismatch") != std::string::npos) {
          ++refusals;  // no kept memfd for a warm resume: refused, nothing changed
          EXPECT_EQ(state_of(spec.id)["state"], "paused") << r.error().to_string();
          continue;
        }
        ASSERT_TRUE(r.ok()) << where << " resume " << body.dump() << ": "
                            << r.error().to_string();
        ++resumes;
        paused = false;
        if (pick(2) == 0) {
          auto bad = sb.verify();
          ASSERT_TRUE(bad.ok()) << bad.error().to_string();
          ASSERT_EQ(*bad, 0u) << where << ": the resumed guest (" << body.dump()
                              << ") lost pages";
        }
        continue;
      }
      switch (pick(4)) {
        case 0: {
          ASSERT_TRUE(sb.dirty(0.01 + 0.05 * double(pick(4)), rng(), pick(3) == 0).ok());
          break;
        }
        case 1: {
          const std::uint64_t count = 1 + pick(512);
          auto d = sb.vmm()->discard(pick(kPages - count), count);
          ASSERT_TRUE(d.ok()) << d.error().to_string();
          break;
        }
        default: {
          json body = json::object();
          if (const std::string& s = strategies[pick(strategies.size())]; !s.empty()) {
            body["strategy"] = s;
          }
          const json before = state_of(spec.id);
          const auto chain = before.at("snapshots").get<std::vector<std::string>>();
          switch (pick(5)) {
            case 0: body["parent"] = "latest"; break;
            case 1: body["parent"] = "none"; break;
            case 2:
              if (!chain.empty()) body["parent"] = chain[pick(chain.size())];
              break;
            default: break;  // the default parent
          }
          if (chain.empty()) body.erase("parent");
          const bool stop = pick(3) != 0;
          if (!stop) body["after"] = "continue";
          if (pick(2) == 0) body["sync"] = false;
          const std::vector<std::uint32_t> now = sb.vmm()->expected_generations();
          auto r = sb.pause(body);
          if (!r.ok()) {
            // The refusals a valid request may get, with nothing changed: a memory-releasing
            // strategy with after=continue (the flag or the request chose hole_punch), and a
            // diff of a VMM memsnapd never resumed (it has no write tracking to cut it from).
            const std::string& m = r.error().message;
            const bool invalid = m.find("invalid_argument") != std::string::npos;
            const bool releasing_continue = !stop && invalid && m.find("releases") != std::string::npos;
            const bool untracked_diff = invalid && m.find("a diff needs a dirty set") != std::string::npos;
            ASSERT_TRUE(releasing_continue || untracked_diff)
                << where << " pause " << body.dump() << ": " << r.error().to_string();
            ++refusals;
            EXPECT_EQ(state_of(spec.id)["snapshots"], before["snapshots"]);
            auto bad = sb.verify();
            ASSERT_TRUE(bad.ok()) << bad.error().to_string();
            ASSERT_EQ(*bad, 0u) << where << ": a refused pause changed the guest";
            break;
          }
          ++pauses;
          expected = now;
          check_chain(spec.id, expected, spec.seed);
          if (HasFailure()) FAIL() << where << " pause " << body.dump() << " -> " << r->dump();
          paused = stop;
          break;
        }
      }
    }
    if (paused) {
      auto r = sb.resume();
      ASSERT_TRUE(r.ok()) << r.error().to_string();
    }
    auto bad = sb.verify();
    ASSERT_TRUE(bad.ok()) << bad.error().to_string();
    ASSERT_EQ(*bad, 0u) << "seed " << seed << ": the guest lost pages by the end";
  }
  std::printf("property: %llu seeds, %llu pauses, %llu resumes, %llu refusals\n",
              static_cast<unsigned long long>(seeds), static_cast<unsigned long long>(pauses),
              static_cast<unsigned long long>(resumes), static_cast<unsigned long long>(refusals));
}

}  // namespace
}  // namespace memsnap::fleet
