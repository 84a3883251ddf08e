// The registry memsnapd keeps of its sandboxes on disk, so that a restart (an upgrade, a crash)
// does not forget them (issue 20 item 1; docs/operations.md).
//
// One JSON file, <state directory>/registry.json, replaced atomically at every change: written
// to a temporary file, fsynced, renamed over the old one, and the directory fsynced. A reader
// (the next memsnapd) thus sees one whole version, the newest one whose rename completed; a crash
// mid-write leaves the previous one. What it holds per sandbox is what a restart needs to take
// it back: its identity, owner and attributes, its state, its snapshot chain and strategy, its
// VMM (pid, start time, guest regions) and a handover export not yet durable. It holds no
// memory: a sandbox comes back from its snapshots, or, when its VMM still runs, from that VMM.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/base/result.h"
#include "plugins/plugin_api/plugin_api.h"
#include "tools/memsnapd/sandbox_lifecycle.h"

namespace memsnap::daemon {

struct RegistryEntry {
  std::string id;
  SandboxState state = SandboxState::kPaused;
  uid_t owner_uid = 0;
  nlohmann::json attributes = nlohmann::json::object();  // as a registration gives them
  std::vector<std::string> chain;                        // committed snapshots, base first
  std::string strategy;                                  // of the newest snapshot
  std::uint64_t guest_size = 0;
  // The VMM memsnapd knew, if any: with the boot id, its pid and start time name it for good.
  pid_t vmm_pid = -1;
  std::uint64_t vmm_start_time = 0;  // clock ticks after boot (process_start_time)
  std::vector<plugin::Region> regions;
  // A handover pause answered whose snapshot was not durable yet: the file its export commits,
  // after the chain it extends.
  std::string export_output;
  std::vector<std::string> export_chain;
};

struct RegistryDocument {
  std::string boot_id;  // of the boot the VMMs ran in (no VMM survives a reboot)
  std::vector<RegistryEntry> sandboxes;
};

// Regions as the API and the registry write them: [{guest_offset, host_addr, size}, ...].
nlohmann::json regions_json(const std::vector<plugin::Region>& regions);

nlohmann::json to_json(const RegistryDocument& doc);
// kInvalidArgument naming what is wrong (a sandbox's field, an unknown state).
Result<RegistryDocument> registry_from_json(const nlohmann::json& j);

class RegistryFile {
 public:
  explicit RegistryFile(std::string directory);
  // The directory is created if missing; the file is 0600. With sync, the file and its
  // directory are fsynced (durable against a power loss); without, the rename alone makes it
  // what the next reader sees, also after memsnapd is killed (not after the host goes down).
  Status save(const RegistryDocument& doc, bool sync = true) const;
  // nullopt when there is no file (a first start). A file that cannot be read or parsed is an
  // error naming it: memsnapd then refuses to start rather than forget sandboxes.
  Result<std::optional<RegistryDocument>> load() const;
  const std::string& path() const { return path_; }

 private:
  std::string directory_;
  std::string path_;
};

}  // namespace memsnap::daemon
