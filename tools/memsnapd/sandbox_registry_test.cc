#include "tools/memsnapd/sandbox_registry.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

namespace memsnap::daemon {
namespace {

namespace fs = std::filesystem;

class RegistryFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/tmp/registry-test-XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_;
};

RegistryDocument sample() {
  RegistryDocument doc;
  doc.boot_id = "b00t";
  RegistryEntry paused;
  paused.id = "sb-1";
  paused.state = SandboxState::kPaused;
  paused.owner_uid = 1000;
  paused.attributes = {{"team", "a"}, {"memory_mib", 64}};
  paused.chain = {"/s/a.snap", "/s/b.snap"};
  paused.strategy = "memfd";
  paused.guest_size = 64 << 20;
  paused.vmm_pid = 4242;
  paused.vmm_start_time = 987654;
  paused.regions = {{0, 0x7f0000000000, 64 << 20}};
  doc.sandboxes.push_back(paused);
  RegistryEntry exporting = paused;
  exporting.id = "sb-2";
  exporting.state = SandboxState::kExporting;
  exporting.vmm_pid = -1;
  exporting.regions.clear();
  exporting.export_output = "/s/c.snap";
  exporting.export_chain = {"/s/a.snap"};
  doc.sandboxes.push_back(exporting);
  return doc;
}

TEST_F(RegistryFileTest, WhatIsSavedLoadsBackAndNoTemporaryFileStays) {
  const RegistryFile file(dir_ + "/state");  // created on the first save
  auto none = file.load();
  ASSERT_TRUE(none.ok()) << none.error().to_string();
  EXPECT_FALSE(none->has_value());
  const RegistryDocument doc = sample();
  ASSERT_TRUE(file.save(doc).ok());
  auto back = file.load();
  ASSERT_TRUE(back.ok()) << back.error().to_string();
  ASSERT_TRUE(back->has_value());
  EXPECT_EQ(to_json(**back), to_json(doc));
  const RegistryDocument& got = **back;
  ASSERT_EQ(got.sandboxes.size(), 2u);
  EXPECT_EQ(got.sandboxes[0].state, SandboxState::kPaused);
  EXPECT_EQ(got.sandboxes[0].vmm_start_time, 987654u);
  EXPECT_EQ(got.sandboxes[0].regions[0].host_addr, 0x7f0000000000u);
  EXPECT_EQ(got.sandboxes[1].export_output, "/s/c.snap");
  EXPECT_EQ(got.sandboxes[1].vmm_pid, -1);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir_ + "/state")) {
    names.push_back(e.path().filename());
  }
  EXPECT_EQ(names, std::vector<std::string>{"registry.json"});
  struct stat st {};
  ASSERT_EQ(::stat(file.path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

// A registry that cannot be read is an error naming the file, never an empty registry: a start
// that took it for one would forget every sandbox it records.
TEST_F(RegistryFileTest, ADamagedRegistryIsAnErrorNamingTheFile) {
  const RegistryFile file(dir_);
  ASSERT_TRUE(file.save(sample()).ok());
  const nlohmann::json good = to_json(sample());
  auto refused = [&](const std::string& text, const std::string& says) {
    std::ofstream(file.path(), std::ios::trunc) << text;
    auto r = file.load();
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_NE(r.error().message.find(file.path()), std::string::npos) << r.error().message;
    EXPECT_NE(r.error().message.find(says), std::string::npos) << r.error().message;
  };
  refused(good.dump().substr(0, 40), "not valid JSON");
  refused("{}", "not a memsnapd registry");
  nlohmann::json j = good;
  j["memsnapd_registry"] = 2;
  refused(j.dump(), "registry format 2");
  j = good;
  j["sandboxes"][0]["state"] = "sleeping";
  refused(j.dump(), "unknown state \"sleeping\"");
  j = good;
  j["sandboxes"][1].erase("chain");
  refused(j.dump(), "sandbox sb-2: \"chain\"");
}

}  // namespace
}  // namespace memsnap::daemon
