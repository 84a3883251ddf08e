#include "core/plugin_host/plugin_registry.h"

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <boost/dll/shared_library.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <system_error>
#include <type_traits>
#include <utility>

namespace memsnap {

namespace detail {
struct LoadedLibrary {
  boost::dll::shared_library library;
  plugin::CreateFn create = nullptr;
  std::string name;
};
}  // namespace detail

namespace {

namespace fs = std::filesystem;

constexpr std::size_t kMaxNameLength = 64;

std::string quote_path(std::string_view s) { return "'" + std::string(s) + "'"; }

std::string octal_mode(mode_t mode) {
  char buf[8];
  std::snprintf(buf, sizeof(buf), "%04o", static_cast<unsigned>(mode & 07777));
  return buf;
}

// What makes a file or directory unsafe to load code from, or nullopt if it is safe.
std::optional<std::string> unsafe_because(const struct stat& st) {
  if ((st.st_mode & S_IWOTH) != 0) {
    return "is writable by other users (mode " + octal_mode(st.st_mode) + ")";
  }
  if ((st.st_mode & S_IWGRP) != 0 && st.st_gid != 0) {
    return "is group-writable (mode " + octal_mode(st.st_mode) + ") and its group (gid " +
           std::to_string(st.st_gid) + ") is not root";
  }
  const uid_t euid = ::geteuid();
  if (st.st_uid != 0 && st.st_uid != euid) {
    return "is owned by uid " + std::to_string(st.st_uid) +
           ", which is neither root nor the current user (uid " + std::to_string(euid) + ")";
  }
  return std::nullopt;
}

// The first directory above `dir` (its parent, up to /) that someone other than root and the
// current user could use to swap `dir` for their own: owned by another user, or writable by
// others without the sticky bit (with it, as on /tmp, no one else may rename or remove what is
// inside). Returns that directory and why, or nullopt if every ancestor is safe.
std::optional<std::pair<fs::path, std::string>> unsafe_ancestor(const fs::path& dir) {
  for (fs::path p = dir.parent_path(); !p.empty(); p = p.parent_path()) {
    struct stat st {};
    if (::stat(p.c_str(), &st) != 0) {
      return std::make_pair(p, std::string("cannot be checked: ") + std::strerror(errno));
    }
    struct stat checked = st;
    if ((st.st_mode & S_ISVTX) != 0) checked.st_mode &= ~static_cast<mode_t>(S_IWOTH | S_IWGRP);
    if (auto why = unsafe_because(checked)) return std::make_pair(p, *why);
    if (p == p.root_path()) break;
  }
  return std::nullopt;
}

Error unsafe_error(const std::string& path, const std::string& what, const std::string& why) {
  return make_error(Errc::kPluginUnsafeFile,
                    "refusing to load plugin " + quote_path(path) + ": " + what + " " + why +
                        "; loading a library runs its code with memsnap's privileges, so it and "
                        "its directory must be owned by root or the current user and writable "
                        "by no one else");
}

// Checks the resolved file and the directory that holds it. The directory matters as much as the
// file: whoever can write it can swap the file between this check and dlopen.
std::optional<Error> check_safe(const std::string& path, const fs::path& real) {
  const fs::path dir = real.parent_path();
  struct stat st {};
  if (::stat(real.c_str(), &st) != 0) {
    const int err = errno;
    return make_error(Errc::kPluginCannotOpen,
                      "cannot load plugin " + quote_path(path) + ": stat: " + std::strerror(err),
                      err);
  }
  const std::string resolved =
      real.string() == path ? std::string() : " (resolved to " + quote_path(real.string()) + ")";
  if (auto why = unsafe_because(st)) return unsafe_error(path, "the file" + resolved, *why);
  if (::stat(dir.c_str(), &st) != 0) {
    const int err = errno;
    return make_error(Errc::kPluginCannotOpen,
                      "cannot load plugin " + quote_path(path) + ": stat of its directory " +
                          quote_path(dir.string()) + ": " + std::strerror(err),
                      err);
  }
  if (auto why = unsafe_because(st)) {
    return unsafe_error(path, "its directory " + quote_path(dir.string()), *why);
  }
  if (auto bad = unsafe_ancestor(dir)) {
    return unsafe_error(path, "its ancestor directory " + quote_path(bad->first.string()),
                        bad->second);
  }
  return std::nullopt;
}

std::optional<std::string> descriptor_problem(const plugin::PluginDescriptor& d,
                                              std::uint32_t abi) {
  if (d.abi_version != abi) {
    return "its abi_version is " + std::to_string(d.abi_version) + " but its " +
           plugin::kAbiVersionSymbol + " is " + std::to_string(abi);
  }
  if (d.name == nullptr) return std::string("its name is null");
  // strnlen: never read past the longest valid name, whatever the plugin points at.
  const std::size_t len = ::strnlen(d.name, kMaxNameLength + 1);
  const std::string_view name(d.name, len);
  if (len == 0) return std::string("its name is empty");
  const bool charset_ok = std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
  });
  if (len > kMaxNameLength || !charset_ok) {
    return "its name " + quote_path(name) + (len > kMaxNameLength ? "..." : "") +
           " is not 1 to 64 characters of [a-z0-9_]";
  }
  if (d.version == nullptr) return "plugin " + quote_path(name) + " has a null version";
  return std::nullopt;
}

const char* status_code_name(plugin::StatusCode code) {
  switch (code) {
    case plugin::StatusCode::kOk:
      return "ok";
    case plugin::StatusCode::kInvalidArgument:
      return "invalid_argument";
    case plugin::StatusCode::kUnsupported:
      return "unsupported";
    case plugin::StatusCode::kProcessGone:
      return "process_gone";
    case plugin::StatusCode::kBadAddress:
      return "bad_address";
    case plugin::StatusCode::kShortRead:
      return "short_read";
    case plugin::StatusCode::kIoError:
      return "io_error";
    case plugin::StatusCode::kNoMemory:
      return "no_memory";
    case plugin::StatusCode::kSinkError:
      return "sink_error";
    case plugin::StatusCode::kInternal:
      return "internal";
  }
  return "unknown";
}

// Opens and validates one file. On success fills info (except state) and returns the library.
Result<std::shared_ptr<detail::LoadedLibrary>> open_plugin(const std::string& path,
                                                           bool check_permissions,
                                                           PluginInfo& info) {
  std::error_code fs_ec;
  const fs::path real = fs::canonical(path, fs_ec);
  if (fs_ec) {
    return make_error(Errc::kPluginCannotOpen,
                      "cannot load plugin " + quote_path(path) + ": " + fs_ec.message(),
                      fs_ec.value());
  }
  if (check_permissions) {
    if (auto error = check_safe(path, real)) return std::move(*error);
  }
  // dlopen of a FIFO or device would block or worse; only regular files get that far.
  if (!fs::is_regular_file(real, fs_ec)) {
    return make_error(Errc::kPluginCannotOpen,
                      "cannot load plugin " + quote_path(path) + ": not a regular file");
  }

  boost::dll::fs::error_code dll_ec;
  boost::dll::shared_library library(
      boost::dll::fs::path(real.string()), dll_ec,
      boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local);
  if (dll_ec || !library.is_loaded()) {
    // Boost.DLL keeps only a generic error code; dlerror() still holds the loader's own text.
    const char* dl_text = ::dlerror();
    return make_error(Errc::kPluginCannotOpen,
                      "cannot load plugin " + quote_path(path) + ": " +
                          (dl_text != nullptr ? std::string(dl_text) : dll_ec.message()));
  }

  if (!library.has(plugin::kAbiVersionSymbol)) {
    return make_error(Errc::kPluginNoAbiSymbol, "cannot load plugin " + quote_path(path) +
                                                    ": it exports no " + plugin::kAbiVersionSymbol +
                                                    " symbol, so it is not a memsnap plugin");
  }
  // Nothing else in the library is looked at until its ABI is known to be ours.
  info.abi = library.get<const std::uint32_t>(plugin::kAbiVersionSymbol);
  if (info.abi != plugin::kAbiVersion) {
    return make_error(Errc::kPluginAbiMismatch, "cannot load plugin " + quote_path(path) +
                                                    ": built for ABI " + std::to_string(info.abi) +
                                                    ", host speaks " +
                                                    std::to_string(plugin::kAbiVersion) +
                                                    "; rebuild it against this memsnap");
  }

  if (!library.has(plugin::kDescriptorSymbol)) {
    return make_error(Errc::kPluginBadDescriptor, "cannot load plugin " + quote_path(path) +
                                                      ": it exports no " +
                                                      plugin::kDescriptorSymbol + " symbol");
  }
  const auto& descriptor = library.get<const plugin::PluginDescriptor>(plugin::kDescriptorSymbol);
  if (auto problem = descriptor_problem(descriptor, info.abi)) {
    return make_error(Errc::kPluginBadDescriptor,
                      "cannot load plugin " + quote_path(path) + ": bad descriptor: " + *problem);
  }
  // Copies: PluginInfo must outlive the library.
  info.name = descriptor.name;
  info.version = descriptor.version;
  info.description = descriptor.description != nullptr ? descriptor.description : "";
  info.capabilities = descriptor.capabilities;

  if (!library.has(plugin::kCreateSymbol)) {
    return make_error(Errc::kPluginNoFactory, "cannot load plugin " + quote_path(path) + " (" +
                                                  quote_path(info.name) + "): it exports no " +
                                                  plugin::kCreateSymbol + " symbol");
  }
  using CreateFnType = std::remove_pointer_t<plugin::CreateFn>;
  plugin::CreateFn create = &library.get<CreateFnType>(plugin::kCreateSymbol);

  auto loaded = std::make_shared<detail::LoadedLibrary>();
  loaded->library = std::move(library);
  loaded->create = create;
  loaded->name = info.name;
  return loaded;
}

}  // namespace

// ---- StrategyHandle ----

StrategyHandle::StrategyHandle(std::shared_ptr<const detail::LoadedLibrary> library,
                               std::unique_ptr<plugin::Strategy> strategy) noexcept
    : library_(std::move(library)), strategy_(std::move(strategy)) {}

StrategyHandle& StrategyHandle::operator=(StrategyHandle&& other) noexcept {
  if (this != &other) {
    // Not the defaulted member-wise move: it would drop our library before our strategy.
    reset();
    library_ = std::move(other.library_);
    strategy_ = std::move(other.strategy_);
  }
  return *this;
}

std::string_view StrategyHandle::plugin_name() const noexcept {
  return library_ != nullptr ? std::string_view(library_->name) : std::string_view();
}

void StrategyHandle::reset() noexcept {
  strategy_.reset();
  library_.reset();
}

// ---- PluginRegistry ----

PluginRegistry::PluginRegistry() : PluginRegistry(Options{}) {}
PluginRegistry::PluginRegistry(Options options) : options_(options) {}
PluginRegistry::PluginRegistry(PluginRegistry&&) noexcept = default;
PluginRegistry& PluginRegistry::operator=(PluginRegistry&&) noexcept = default;
PluginRegistry::~PluginRegistry() = default;

Status PluginRegistry::load_directory(const std::string& dir) {
  std::error_code ec;
  const fs::path real = fs::canonical(dir, ec);
  if (ec) {
    const Errc code = ec == std::errc::no_such_file_or_directory ? Errc::kNotFound : Errc::kIoError;
    return make_error(code, "cannot read plugin directory " + quote_path(dir) + ": " + ec.message(),
                      ec.value());
  }
  if (!fs::is_directory(real, ec)) {
    return make_error(Errc::kIoError,
                      "plugin directory " + quote_path(dir) + " is not a directory");
  }
  if (options_.check_permissions) {
    struct stat st {};
    if (::stat(real.c_str(), &st) != 0) {
      const int err = errno;
      return make_error(
          Errc::kIoError,
          "cannot read plugin directory " + quote_path(dir) + ": " + std::strerror(err), err);
    }
    if (auto why = unsafe_because(st)) {
      return make_error(Errc::kPluginUnsafeFile,
                        "refusing to load plugins from " + quote_path(dir) + ": the directory " +
                            *why +
                            "; loading a library runs its code with memsnap's privileges, so the "
                            "directory must be owned by root or the current user and writable by "
                            "no one else");
    }
    if (auto bad = unsafe_ancestor(real)) {
      return make_error(Errc::kPluginUnsafeFile,
                        "refusing to load plugins from " + quote_path(dir) +
                            ": its ancestor directory " + quote_path(bad->first.string()) + " " +
                            bad->second +
                            "; whoever can write a directory above the plugin directory can put "
                            "their own in its place");
    }
  }

  std::vector<std::string> names;
  fs::directory_iterator it(dir, ec);
  for (; !ec && it != fs::directory_iterator(); it.increment(ec)) {
    std::string name = it->path().filename().string();
    std::error_code type_ec;
    if (name.size() > 3 && name.front() != '.' && name.ends_with(".so") &&
        it->is_regular_file(type_ec)) {
      names.push_back(std::move(name));
    }
  }
  if (ec) {
    return make_error(Errc::kIoError,
                      "cannot read plugin directory " + quote_path(dir) + ": " + ec.message(),
                      ec.value());
  }
  std::sort(names.begin(), names.end());

  const fs::path base(dir);
  for (const std::string& name : names) {
    // A refusal is recorded in plugins_; one bad file does not stop the others.
    (void)load_file((base / name).string());
  }
  return {};
}

Result<const PluginInfo*> PluginRegistry::load_file(const std::string& path) {
  PluginInfo info;
  info.path = path;
  auto opened = open_plugin(path, options_.check_permissions, info);
  if (opened.ok()) {
    if (auto existing = loaded_.find(info.name); existing != loaded_.end()) {
      opened = make_error(Errc::kPluginDuplicateName,
                          "cannot load plugin " + quote_path(path) + ": its name " +
                              quote_path(info.name) + " is already taken by " +
                              quote_path(plugins_[existing->second.info_index].path) +
                              ", which stays loaded");
    }
  }
  if (!opened.ok()) {
    // The library, if it was opened, is unloaded when `opened` goes out of scope.
    Error error = std::move(opened).error();
    info.state = PluginState::kRefused;
    info.error = error.code;
    info.reason = error.message;
    plugins_.push_back(std::move(info));
    return error;
  }
  info.state = PluginState::kLoaded;
  plugins_.push_back(std::move(info));
  loaded_.emplace(plugins_.back().name, Loaded{plugins_.size() - 1, std::move(opened).value()});
  return &plugins_.back();
}

const PluginInfo* PluginRegistry::find(std::string_view name) const {
  const auto it = loaded_.find(name);
  return it == loaded_.end() ? nullptr : &plugins_[it->second.info_index];
}

Result<StrategyHandle> PluginRegistry::create(
    std::string_view name, const std::vector<std::pair<std::string, std::string>>& options) const {
  const auto it = loaded_.find(name);
  if (it == loaded_.end()) {
    std::string message = "no plugin named " + quote_path(name) + " is loaded";
    for (const PluginInfo& info : plugins_) {
      if (info.name == name)
        message += " (" + quote_path(info.path) + " was refused: " + info.reason + ")";
    }
    return make_error(Errc::kPluginNotLoaded, std::move(message));
  }
  const std::shared_ptr<const detail::LoadedLibrary>& library = it->second.library;
  const std::string& path = plugins_[it->second.info_index].path;

  std::vector<plugin::Option> plugin_options;
  plugin_options.reserve(options.size());
  for (const auto& [key, value] : options) plugin_options.push_back({key.c_str(), value.c_str()});

  plugin::Strategy* raw = nullptr;
  const plugin::Status status = library->create(&raw, plugin_options.data(), plugin_options.size());
  if (!status.ok()) {
    // raw is left alone: on failure the ABI promises nothing about *out, so deleting it could
    // free garbage.
    const std::string_view text(status.message, ::strnlen(status.message, sizeof(status.message)));
    return make_error(Errc::kPluginFactoryFailed,
                      "plugin " + quote_path(name) + " (" + quote_path(path) +
                          ") could not create a strategy: " + status_code_name(status.code) + ": " +
                          std::string(text),
                      status.sys_errno);
  }
  if (raw == nullptr) {
    return make_error(Errc::kPluginFactoryFailed, "plugin " + quote_path(name) + " (" +
                                                      quote_path(path) +
                                                      ") reported success but returned no "
                                                      "strategy");
  }
  return StrategyHandle(library, std::unique_ptr<plugin::Strategy>(raw));
}

std::vector<std::string_view> capability_names(std::uint32_t capabilities) {
  std::vector<std::string_view> out;
  for (auto [bit, name] : {std::pair{plugin::kCapNeedsPid, "needs-pid"},
                           std::pair{plugin::kCapNeedsMemfd, "needs-memfd"},
                           std::pair{plugin::kCapReleasesMemory, "releases-memory"},
                           std::pair{plugin::kCapExperimental, "experimental"}}) {
    if (capabilities & bit) out.emplace_back(name);
  }
  return out;
}

std::string capability_list(std::uint32_t capabilities) {
  std::string out;
  for (std::string_view name : capability_names(capabilities)) {
    if (!out.empty()) out += ',';
    out += name;
  }
  return out;
}

}  // namespace memsnap
