// The plugin host: finds strategy plugins (MODULE libraries speaking plugins/plugin_api), checks
// them, keeps the good ones loaded and builds configured strategies from them.
//
// Loading a library runs its code with memsnap's privileges, so before dlopen the host refuses a
// file that someone other than root or the current user could have written. Every refusal has
// its own Errc (see load_file) and a message naming the file.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/base/result.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap {

namespace detail {
struct LoadedLibrary;  // the dlopen'ed library and its factory; defined in plugin_registry.cc
}  // namespace detail

enum class PluginState { kLoaded, kRefused };

// The names of plugin::Capability bits, as `memsnap plugins list`, the API and a snapshot's
// origin record give them: needs-pid, needs-memfd, releases-memory, experimental.
[[nodiscard]] std::vector<std::string_view> capability_names(std::uint32_t capabilities);
// The same joined by commas ("" for none).
[[nodiscard]] std::string capability_list(std::uint32_t capabilities);

// What the host learnt about one plugin file. Plain data: it owns copies of the descriptor's
// strings, so it stays valid after the library is unloaded.
struct PluginInfo {
  std::string path;  // as given to load_file, or <dir>/<file name> for load_directory
  std::string name;  // empty if the file was refused before its descriptor was read
  std::string version;
  std::string description;
  std::uint32_t abi = 0;           // the library's memsnap_plugin_abi_version, 0 if not read
  std::uint32_t capabilities = 0;  // plugin::Capability bits
  PluginState state = PluginState::kRefused;
  Errc error = Errc::kOk;  // why it was refused; kOk when loaded
  std::string reason;      // human message for error; empty when loaded

  [[nodiscard]] bool loaded() const noexcept { return state == PluginState::kLoaded; }
  [[nodiscard]] bool experimental() const noexcept { return has(plugin::kCapExperimental); }
  [[nodiscard]] bool needs_pid() const noexcept { return has(plugin::kCapNeedsPid); }
  [[nodiscard]] bool needs_memfd() const noexcept { return has(plugin::kCapNeedsMemfd); }
  [[nodiscard]] bool releases_memory() const noexcept { return has(plugin::kCapReleasesMemory); }

 private:
  [[nodiscard]] bool has(plugin::Capability c) const noexcept { return (capabilities & c) != 0; }
};

// Owns one plugin::Strategy and keeps the library that implements it loaded, even after the
// PluginRegistry that created it is gone. Movable, not copyable; a default-constructed or
// moved-from handle is empty. Not thread-safe (like the Strategy it holds).
class StrategyHandle {
 public:
  StrategyHandle() = default;
  StrategyHandle(StrategyHandle&& other) noexcept = default;
  StrategyHandle& operator=(StrategyHandle&& other) noexcept;
  StrategyHandle(const StrategyHandle&) = delete;
  StrategyHandle& operator=(const StrategyHandle&) = delete;
  ~StrategyHandle() { reset(); }

  [[nodiscard]] plugin::Strategy* get() const noexcept { return strategy_.get(); }
  plugin::Strategy& operator*() const noexcept { return *strategy_; }
  plugin::Strategy* operator->() const noexcept { return strategy_.get(); }
  explicit operator bool() const noexcept { return strategy_ != nullptr; }

  // The name of the plugin that made the strategy; empty for an empty handle.
  [[nodiscard]] std::string_view plugin_name() const noexcept;

  // Destroys the strategy, then drops the library reference (which may unload it).
  void reset() noexcept;

 private:
  friend class PluginRegistry;
  StrategyHandle(std::shared_ptr<const detail::LoadedLibrary> library,
                 std::unique_ptr<plugin::Strategy> strategy) noexcept;

  // Members are destroyed in reverse order: the strategy, whose destructor is code inside the
  // library, goes first, and only then the reference that keeps the library mapped.
  std::shared_ptr<const detail::LoadedLibrary> library_;
  std::unique_ptr<plugin::Strategy> strategy_;
};

// The set of plugins a process knows about. Loading (load_directory, load_file) is not
// thread-safe; once it is done, the const methods may be called from any number of threads.
// Libraries stay loaded while the registry or any StrategyHandle made from them exists.
class PluginRegistry {
 public:
  struct Options {
    // Refuse files (and their directory) that others could have written. Only tests turn it off.
    bool check_permissions = true;
  };

  PluginRegistry();
  explicit PluginRegistry(Options options);
  PluginRegistry(PluginRegistry&&) noexcept;
  PluginRegistry& operator=(PluginRegistry&&) noexcept;
  PluginRegistry(const PluginRegistry&) = delete;
  PluginRegistry& operator=(const PluginRegistry&) = delete;
  ~PluginRegistry();

  // Loads every regular file (symlinks followed) whose name ends in ".so" and does not start with
  // '.', in dir, sorted by file name. A refused plugin is recorded in plugins(), not returned.
  // Errors: kNotFound / kIoError if dir cannot be read, kPluginUnsafeFile if dir is unsafe.
  Status load_directory(const std::string& dir);

  // Loads one file, checked in this order, each failure with its own code:
  //   kPluginUnsafeFile     the file (symlinks resolved) or its directory is writable by others,
  //                         group-writable with a non-root group, or owned by another user
  //   kPluginCannotOpen     missing, not a regular file, or dlopen failed (dlerror text)
  //   kPluginNoAbiSymbol    no memsnap_plugin_abi_version
  //   kPluginAbiMismatch    its value is not plugin::kAbiVersion (read before anything else)
  //   kPluginBadDescriptor  memsnap_plugin_descriptor missing or invalid
  //   kPluginNoFactory      no memsnap_plugin_create
  //   kPluginDuplicateName  a plugin of that name is already loaded (it stays loaded)
  // A refused file is recorded in plugins() and unloaded, and its Error is returned. The pointer
  // is valid until the next load_* call or the registry's destruction.
  Result<const PluginInfo*> load_file(const std::string& path);

  // Every file tried, loaded or refused, in load order. Invalidated by the next load_* call.
  [[nodiscard]] const std::vector<PluginInfo>& plugins() const noexcept { return plugins_; }

  // The loaded plugin of that name, or nullptr (also for a refused one).
  [[nodiscard]] const PluginInfo* find(std::string_view name) const;

  // Builds a strategy with the given options. The Option array handed to the plugin points into
  // `options` and lives only for the factory call. Thread-safe once loading is done (the factory
  // may then be called concurrently). Errors: kPluginNotLoaded for a name that is not loaded;
  // kPluginFactoryFailed with the plugin's message if the factory fails or returns no strategy.
  Result<StrategyHandle> create(
      std::string_view name, const std::vector<std::pair<std::string, std::string>>& options) const;

 private:
  struct Loaded {
    std::size_t info_index;
    std::shared_ptr<const detail::LoadedLibrary> library;
  };

  Options options_;
  std::vector<PluginInfo> plugins_;
  std::map<std::string, Loaded, std::less<>> loaded_;
};

}  // namespace memsnap
