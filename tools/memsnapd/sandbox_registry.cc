#include "tools/memsnapd/sandbox_registry.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/base/file_io.h"

namespace memsnap::daemon {
namespace {

using nlohmann::json;

constexpr int kFormat = 1;

Status fsync_path(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("opening " + path, err), err);
  }
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return make_error(Errc::kIoError, io::errno_message("fsync " + path, err), err);
  return {};
}

template <typename T>
Result<T> get(const json& j, const char* key, const std::string& where) {
  try {
    return j.at(key).get<T>();
  } catch (const json::exception&) {
    return make_error(Errc::kInvalidArgument, where + ": \"" + key +
                                                  "\" is missing or of the "
                                                  "wrong type");
  }
}

Result<RegistryEntry> entry_from_json(const json& s, std::size_t index) {
  const std::string where = "sandbox #" + std::to_string(index);
  if (!s.is_object()) return make_error(Errc::kInvalidArgument, where + " is not an object");
  RegistryEntry e;
  MEMSNAP_ASSIGN_OR_RETURN(e.id, get<std::string>(s, "id", where));
  const std::string at = "sandbox " + e.id;
  MEMSNAP_ASSIGN_OR_RETURN(const std::string state, get<std::string>(s, "state", at));
  const auto parsed = parse_sandbox_state(state);
  if (!parsed) return make_error(Errc::kInvalidArgument, at + ": unknown state \"" + state + "\"");
  e.state = *parsed;
  MEMSNAP_ASSIGN_OR_RETURN(e.owner_uid, get<uid_t>(s, "owner_uid", at));
  MEMSNAP_ASSIGN_OR_RETURN(e.attributes, get<json>(s, "attributes", at));
  MEMSNAP_ASSIGN_OR_RETURN(e.chain, get<std::vector<std::string>>(s, "chain", at));
  MEMSNAP_ASSIGN_OR_RETURN(e.strategy, get<std::string>(s, "strategy", at));
  MEMSNAP_ASSIGN_OR_RETURN(e.guest_size, get<std::uint64_t>(s, "guest_size", at));
  MEMSNAP_ASSIGN_OR_RETURN(const json vmm, get<json>(s, "vmm", at));
  if (!vmm.is_null()) {
    MEMSNAP_ASSIGN_OR_RETURN(e.vmm_pid, get<pid_t>(vmm, "pid", at + " vmm"));
    MEMSNAP_ASSIGN_OR_RETURN(e.vmm_start_time, get<std::uint64_t>(vmm, "start_time", at + " vmm"));
    MEMSNAP_ASSIGN_OR_RETURN(const json regions, get<json>(vmm, "regions", at + " vmm"));
    if (!regions.is_array()) return make_error(Errc::kInvalidArgument, at + ": regions");
    for (const json& r : regions) {
      plugin::Region region{};
      MEMSNAP_ASSIGN_OR_RETURN(region.guest_offset, get<std::uint64_t>(r, "guest_offset", at));
      MEMSNAP_ASSIGN_OR_RETURN(region.host_addr, get<std::uint64_t>(r, "host_addr", at));
      MEMSNAP_ASSIGN_OR_RETURN(region.size, get<std::uint64_t>(r, "size", at));
      e.regions.push_back(region);
    }
  }
  MEMSNAP_ASSIGN_OR_RETURN(const json exp, get<json>(s, "export", at));
  if (!exp.is_null()) {
    MEMSNAP_ASSIGN_OR_RETURN(e.export_output, get<std::string>(exp, "output", at + " export"));
    MEMSNAP_ASSIGN_OR_RETURN(e.export_chain,
                             get<std::vector<std::string>>(exp, "chain", at + " export"));
  }
  return e;
}

}  // namespace

json regions_json(const std::vector<plugin::Region>& regions) {
  json out = json::array();
  for (const plugin::Region& r : regions) {
    out.push_back({{"guest_offset", r.guest_offset}, {"host_addr", r.host_addr}, {"size", r.size}});
  }
  return out;
}

json to_json(const RegistryDocument& doc) {
  json sandboxes = json::array();
  for (const RegistryEntry& e : doc.sandboxes) {
    json vmm = nullptr;
    if (e.vmm_pid > 0) {
      vmm = {{"pid", e.vmm_pid},
             {"start_time", e.vmm_start_time},
             {"regions", regions_json(e.regions)}};
    }
    json exp = nullptr;
    if (!e.export_output.empty()) exp = {{"output", e.export_output}, {"chain", e.export_chain}};
    sandboxes.push_back({{"id", e.id},
                         {"state", std::string(state_name(e.state))},
                         {"owner_uid", e.owner_uid},
                         {"attributes", e.attributes},
                         {"chain", e.chain},
                         {"strategy", e.strategy},
                         {"guest_size", e.guest_size},
                         {"vmm", vmm},
                         {"export", exp}});
  }
  return {{"memsnapd_registry", kFormat}, {"boot_id", doc.boot_id}, {"sandboxes", sandboxes}};
}

Result<RegistryDocument> registry_from_json(const json& j) {
  if (!j.is_object() || !j.contains("memsnapd_registry")) {
    return make_error(Errc::kInvalidArgument, "not a memsnapd registry (no \"memsnapd_registry\")");
  }
  MEMSNAP_ASSIGN_OR_RETURN(const int format, get<int>(j, "memsnapd_registry", "the registry"));
  if (format != kFormat) {
    return make_error(Errc::kInvalidArgument, "registry format " + std::to_string(format) +
                                                  "; this memsnapd reads format " +
                                                  std::to_string(kFormat));
  }
  RegistryDocument doc;
  MEMSNAP_ASSIGN_OR_RETURN(doc.boot_id, get<std::string>(j, "boot_id", "the registry"));
  MEMSNAP_ASSIGN_OR_RETURN(const json sandboxes, get<json>(j, "sandboxes", "the registry"));
  if (!sandboxes.is_array()) return make_error(Errc::kInvalidArgument, "sandboxes: not an array");
  for (std::size_t i = 0; i < sandboxes.size(); ++i) {
    MEMSNAP_ASSIGN_OR_RETURN(RegistryEntry e, entry_from_json(sandboxes[i], i));
    doc.sandboxes.push_back(std::move(e));
  }
  return doc;
}

RegistryFile::RegistryFile(std::string directory)
    : directory_(std::move(directory)), path_(directory_ + "/registry.json") {}

Status RegistryFile::save(const RegistryDocument& doc, bool sync) const {
  std::error_code ec;
  std::filesystem::create_directories(directory_, ec);
  if (ec) return make_error(Errc::kIoError, "creating " + directory_ + ": " + ec.message());
  const std::string text = to_json(doc).dump(1) + "\n";
  const std::string temp = path_ + ".tmp";
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("creating " + temp, err), err);
  }
  Status written = io::pwrite_all(fd, text.data(), text.size(), 0, "writing " + temp);
  if (written.ok() && sync && ::fsync(fd) != 0) {
    const int err = errno;
    written = make_error(Errc::kIoError, io::errno_message("fsync " + temp, err), err);
  }
  ::close(fd);
  if (!written.ok()) return written;
  if (::rename(temp.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    return make_error(Errc::kIoError, io::errno_message("renaming " + temp, err), err);
  }
  return sync ? fsync_path(directory_, O_RDONLY | O_DIRECTORY) : Status();
}

Result<std::optional<RegistryDocument>> RegistryFile::load() const {
  struct stat st {};
  if (::stat(path_.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOENT) return std::optional<RegistryDocument>();
    return make_error(Errc::kIoError, io::errno_message("reading " + path_, err), err);
  }
  std::ifstream in(path_);
  if (!in) return make_error(Errc::kIoError, "cannot read " + path_);
  std::stringstream text;
  text << in.rdbuf();
  const json j = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return make_error(Errc::kInvalidArgument, path_ + " is not valid JSON");
  }
  auto doc = registry_from_json(j);
  if (!doc.ok()) return make_error(doc.error().code, path_ + ": " + doc.error().message);
  return std::optional<RegistryDocument>(std::move(*doc));
}

}  // namespace memsnap::daemon
