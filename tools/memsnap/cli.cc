#include "tools/memsnap/cli.h"

#include <stdlib.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>

namespace memsnap::cli {

Args::Args(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) words_.emplace_back(argv[i]);
  used_.assign(words_.size(), false);
}

bool Args::flag(const std::string& name) {
  bool found = false;
  for (std::size_t i = 0; i < words_.size(); ++i) {
    if (!used_[i] && words_[i] == name) used_[i] = found = true;
  }
  return found;
}

std::string Args::value(const std::string& name, const std::string& fallback) {
  auto all = values(name);
  if (all.size() > 1) throw std::invalid_argument(name + " given more than once");
  return all.empty() ? fallback : all.front();
}

std::vector<std::string> Args::values(const std::string& name) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < words_.size(); ++i) {
    if (used_[i] || words_[i] != name) continue;
    if (i + 1 >= words_.size()) throw std::invalid_argument(name + " needs a value");
    used_[i] = used_[i + 1] = true;
    out.push_back(words_[i + 1]);
  }
  return out;
}

std::vector<std::string> Args::positional() {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < words_.size(); ++i) {
    if (!used_[i] && words_[i].rfind("--", 0) != 0) {
      used_[i] = true;
      out.push_back(words_[i]);
    }
  }
  return out;
}

void Args::expect_done() {
  for (std::size_t i = 0; i < words_.size(); ++i) {
    if (!used_[i]) throw std::invalid_argument("unexpected argument '" + words_[i] + "'");
  }
}

std::uint64_t parse_size(const std::string& text) {
  std::size_t end = 0;
  std::uint64_t v = 0;
  try {
    v = std::stoull(text, &end, 0);
  } catch (const std::exception&) {
    throw std::invalid_argument("'" + text + "' is not a size");
  }
  const std::string suffix = text.substr(end);
  if (suffix.empty()) return v;
  if (suffix == "K" || suffix == "k" || suffix == "KiB") return v << 10;
  if (suffix == "M" || suffix == "MiB") return v << 20;
  if (suffix == "G" || suffix == "GiB") return v << 30;
  throw std::invalid_argument("'" + text + "' is not a size (suffixes: K, M, G)");
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return buf;
}

std::string work_dir(const std::string& keep, const std::string& prefix) {
  if (!keep.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(keep, ec);
    if (ec) {
      std::fprintf(stderr, "memsnap: cannot create %s: %s\n", keep.c_str(), ec.message().c_str());
      return {};
    }
    return keep;
  }
  std::string templ = "/var/tmp/" + prefix + "-XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) {
    std::perror("mkdtemp");
    return {};
  }
  return templ;
}

std::string plugin_dir(Args& args) {
  std::string dir = args.value("--plugin-dir");
  if (!dir.empty()) return dir;
  if (const char* env = std::getenv("MEMSNAP_PLUGIN_DIR"); env != nullptr && *env != '\0')
    return env;
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  return (self.parent_path().parent_path() / "lib" / "memsnap" / "plugins").string();
}

void load_plugins(PluginRegistry& registry, const std::string& dir) {
  if (auto s = registry.load_directory(dir); !s.ok()) {
    std::fprintf(stderr, "memsnap: cannot load plugins from %s: %s\n", dir.c_str(),
                 s.error().to_string().c_str());
    std::exit(1);
  }
}

std::string capabilities_text(std::uint32_t caps) {
  std::string out;
  auto add = [&](std::uint32_t bit, const char* name) {
    if ((caps & bit) == 0) return;
    if (!out.empty()) out += ",";
    out += name;
  };
  add(plugin::kCapNeedsPid, "needs-pid");
  add(plugin::kCapNeedsMemfd, "needs-memfd");
  add(plugin::kCapReleasesMemory, "releases-memory");
  add(plugin::kCapExperimental, "experimental");
  return out;
}

nlohmann::json to_json(const PluginInfo& info) {
  const bool loaded = info.state == PluginState::kLoaded;
  nlohmann::json caps = nlohmann::json::array();
  for (auto [bit, name] : {std::pair{plugin::kCapNeedsPid, "needs-pid"},
                           std::pair{plugin::kCapNeedsMemfd, "needs-memfd"},
                           std::pair{plugin::kCapReleasesMemory, "releases-memory"},
                           std::pair{plugin::kCapExperimental, "experimental"}}) {
    if (info.capabilities & bit) caps.push_back(name);
  }
  return {{"name", info.name},
          {"version", info.version},
          {"abi", info.abi},
          {"status", loaded ? "loaded" : "refused"},
          {"reason", loaded ? "" : info.reason},
          {"error", loaded ? "" : std::string(errc_name(info.error))},
          {"experimental", (info.capabilities & plugin::kCapExperimental) != 0},
          {"capabilities", caps},
          {"description", info.description},
          {"path", info.path}};
}

nlohmann::json to_json(const PauseReport& r) {
  nlohmann::json phases = nlohmann::json::object();
  for (const auto& p : r.phases) {
    phases[p.name] = {{"wall_seconds", p.wall_seconds}, {"cpu_seconds", p.cpu_seconds}};
  }
  return {{"requested_strategy", r.requested_strategy},
          {"strategy", r.strategy},
          {"fallback", r.fallback_reason.empty() ? nlohmann::json(nullptr)
                                                 : nlohmann::json{{"from", r.requested_strategy},
                                                                  {"to", r.strategy},
                                                                  {"reason", r.fallback_reason}}},
          {"snapshot", r.snapshot_path},
          {"snapshot_id", r.snapshot_id},
          {"parent_id", r.parent_id},
          {"generation", r.generation},
          {"guest_size", r.guest_size},
          {"block_size", r.block_size},
          {"dirty_bytes", r.dirty_bytes},
          {"dirty_set_source", r.dirty_set_source},
          {"bytes_exported", r.export_stats.bytes_read},
          {"data_bytes", r.data_bytes},
          {"data_blocks", r.data_blocks},
          {"zero_blocks", r.zero_blocks},
          {"parent_blocks", r.parent_blocks},
          {"memory_released", r.export_stats.bytes_released},
          {"read_calls", r.export_stats.read_calls},
          {"retries", r.export_stats.retries},
          {"partial_reads", r.export_stats.partial_reads},
          {"wall_seconds", r.wall_seconds},
          {"cpu_seconds", r.cpu_seconds},
          {"phases", phases}};
}

nlohmann::json to_json(const ResumeReport& r) {
  nlohmann::json phases = nlohmann::json::object();
  for (const auto& p : r.phases) {
    phases[p.name] = {{"wall_seconds", p.wall_seconds}, {"cpu_seconds", p.cpu_seconds}};
  }
  return {{"strategy", r.strategy},
          {"mode", resume_mode_name(r.mode)},
          {"mode_reason", r.mode_reason},
          {"vmm_pid", r.vmm_pid},
          {"vmm_memfd", r.vmm_memfd},
          {"guest_size", r.guest_size},
          {"block_size", r.block_size},
          {"generation", r.generation},
          {"snapshot_id", r.snapshot_id},
          {"chain_length", r.chain_length},
          {"write_tracking", r.write_tracking},
          {"write_tracking_reason", r.write_tracking_reason},
          {"ready_seconds", r.ready_seconds},
          {"eager_bytes", r.eager_bytes},
          {"phases", phases}};
}

nlohmann::json to_json(const FaultStats& f) {
  return {{"faults", f.faults},
          {"minor_faults", f.minor_faults},
          {"copies", f.copies},
          {"zeropages", f.zeropages},
          {"continues", f.continues},
          {"eexist", f.eexist},
          {"eagain_retries", f.eagain_retries},
          {"remove_events", f.remove_events},
          {"removed_bytes", f.removed_bytes},
          {"filled_bytes", f.filled_bytes},
          {"fill_done", f.fill_done},
          {"fill_seconds", f.fill_seconds},
          {"vmm_gone", f.vmm_gone},
          {"service_seconds", f.service_seconds},
          {"mean_service_seconds", f.faults ? f.service_seconds / double(f.faults) : 0.0},
          {"max_service_seconds", f.max_service_seconds}};
}

}  // namespace memsnap::cli
