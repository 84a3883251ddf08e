// The memsnap strategy plugin ABI: the only header a plugin includes.
//
// A plugin is a MODULE library that exports, through MEMSNAP_PLUGIN(), three C symbols:
//   memsnap_plugin_abi_version  const std::uint32_t       checked by the host before anything else
//   memsnap_plugin_descriptor   const PluginDescriptor    plain data: name, version, capabilities
//   memsnap_plugin_create       CreateFn                  builds a Strategy from string options
//
// Rules of the boundary:
// - Nothing throws across it: every entry point and virtual method is noexcept and reports
//   failure in a plain Status. MEMSNAP_PLUGIN() catches whatever the factory throws.
// - Only plain data and the two abstract classes below cross it; no std:: containers, no
//   exceptions, no std::function, no shared_ptr deleters made inside the plugin.
// - The host keeps the library loaded until every Strategy it created is destroyed.
// - Plugins never log, count metrics or read flags: the host times every call the same way so
//   that strategies are compared fairly; a plugin reports what it did in ExportStats.
//
// Bump kAbiVersion on any change to a type or signature in this file.
#pragma once

#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>

namespace memsnap::plugin {

inline constexpr std::uint32_t kAbiVersion = 1;

// Capability bits of PluginDescriptor::capabilities.
enum Capability : std::uint32_t {
  kCapNeedsPid = 1u << 0,    // reads guest memory through the VMM's address space (pid + regions)
  kCapNeedsMemfd = 1u << 1,  // reads the memfd that backs guest memory
  kCapReleasesMemory = 1u << 2,  // frees source memory once it is safely in the snapshot
  kCapExperimental = 1u << 3,    // not for production rollouts
};

struct PluginDescriptor {
  std::uint32_t abi_version;  // must equal memsnap_plugin_abi_version
  const char* name;           // unique strategy name, [a-z0-9_]+, e.g. "memfd"
  const char* version;        // the plugin's own version, e.g. "1.0.0"
  std::uint32_t capabilities;
  const char* description;  // one line for `memsnap plugins list`
};

enum class StatusCode : std::int32_t {
  kOk = 0,
  kInvalidArgument = 1,  // the request or an option is malformed
  kUnsupported = 2,      // a prerequisite is missing (no memfd, no pid, kernel lacks a feature)
  kProcessGone = 3,      // the VMM process no longer exists (ESRCH)
  kBadAddress = 4,       // a range is not mapped in the VMM (EFAULT)
  kShortRead = 5,        // the source ended before the requested range did (EOF)
  kIoError = 6,          // any other failed system call
  kNoMemory = 7,         // the kernel kept failing with ENOMEM after backing off
  kSinkError = 8,        // the host's BlockSink refused the data; its message is carried along
  kInternal = 9,         // a bug or an exception inside the plugin
};

// Plain-data result of every call across the boundary.
struct Status {
  StatusCode code = StatusCode::kOk;
  std::int32_t sys_errno = 0;  // errno of the failing system call, 0 if none
  char message[240] = {};

  [[nodiscard]] bool ok() const noexcept { return code == StatusCode::kOk; }
  [[nodiscard]] static Status Ok() noexcept { return Status{}; }
  [[nodiscard]] static Status Error(StatusCode code, int sys_errno, const char* format,
                                    ...) noexcept __attribute__((format(printf, 3, 4))) {
    Status s;
    s.code = code;
    s.sys_errno = sys_errno;
    va_list args;
    va_start(args, format);
    std::vsnprintf(s.message, sizeof(s.message), format, args);
    va_end(args);
    return s;
  }
};

// A piece of guest memory mapped into the VMM: guest offsets [guest_offset, guest_offset+size)
// live at host virtual addresses [host_addr, host_addr+size) of the VMM process.
struct Region {
  std::uint64_t guest_offset;
  std::uint64_t host_addr;
  std::uint64_t size;
};

// A byte range in guest-offset space.
struct ByteRange {
  std::uint64_t offset;
  std::uint64_t length;
};

// A strategy setting, e.g. {"chunk_bytes", "2097152"}. Unknown keys are an error.
struct Option {
  const char* key;
  const char* value;
};

// What to export. Everything is owned by the host and valid for the duration of the call.
struct ExportRequest {
  std::int32_t pid = -1;            // the VMM, or -1
  const Region* regions = nullptr;  // sorted by guest_offset, disjoint
  std::size_t region_count = 0;
  std::int32_t memfd =
      -1;  // the memfd that backs guest memory (guest offset == file offset), or -1
  std::uint64_t guest_size = 0;
  std::uint64_t block_size = 0;  // 4096 or 2097152
  const ByteRange* ranges =
      nullptr;  // what to export: sorted, disjoint, block-aligned, in the guest
  std::size_t range_count = 0;
};

// Bytes of guest memory handed to the sink: [guest_offset, guest_offset+length) is at data.
struct Chunk {
  std::uint64_t guest_offset;
  const void* data;
  std::uint64_t length;
};

// Implemented by the host (the snapshot writer). Not thread-safe: one export calls it from one
// thread at a time.
class BlockSink {
 public:
  // Takes a copy of the chunks, which must come in ascending guest order, block-aligned, without
  // overlap, each inside a requested range; every requested byte must be written exactly once.
  // The data need only stay valid until the call returns.
  virtual Status write(const Chunk* chunks, std::size_t count) noexcept = 0;

  // Makes everything written so far safe to release from the source: in the snapshot's file and
  // recorded where it can be found again if the host process dies before the commit (memsnap's
  // recovery journal). Not a disk flush: the released memory was RAM, no more durable than the
  // page cache holding its copy; the snapshot reaches the disk at commit, where sync is on.
  // A plugin that releases source memory calls it first, and releases nothing that was not
  // written before the call.
  virtual Status make_durable() noexcept = 0;

  // Tells the host that the source memory for [guest_offset, guest_offset+length) was released.
  // The host keeps the list so that, if the pause fails later, it can put those bytes back.
  virtual void released(std::uint64_t guest_offset, std::uint64_t length) noexcept = 0;

 protected:
  ~BlockSink() = default;
};

// What a strategy did, counted by the plugin itself (the host measures time and CPU).
struct ExportStats {
  std::uint64_t bytes_read = 0;      // guest bytes copied out of the source
  std::uint64_t bytes_released = 0;  // source memory freed (kCapReleasesMemory)
  std::uint64_t read_calls = 0;      // system calls that moved data
  std::uint64_t retries = 0;         // EINTR / EAGAIN / ENOMEM retries
  std::uint64_t partial_reads = 0;   // calls that moved less than asked and were continued
};

// One configured strategy. export_ranges() may be called many times (one per pause), never
// concurrently on the same object.
class Strategy {
 public:
  virtual ~Strategy() = default;
  virtual Status export_ranges(const ExportRequest& request, BlockSink& sink,
                               ExportStats& stats) noexcept = 0;
};

// memsnap_plugin_create: on success stores a new Strategy (to be deleted by the host through its
// virtual destructor, while the library is loaded) in *out and returns Ok.
using CreateFn = Status (*)(Strategy** out, const Option* options,
                            std::size_t option_count) noexcept;

inline constexpr const char* kAbiVersionSymbol = "memsnap_plugin_abi_version";
inline constexpr const char* kDescriptorSymbol = "memsnap_plugin_descriptor";
inline constexpr const char* kCreateSymbol = "memsnap_plugin_create";

}  // namespace memsnap::plugin

#define MEMSNAP_PLUGIN_EXPORT extern "C" __attribute__((visibility("default")))

// Exports a plugin. FACTORY is a function
//   memsnap::plugin::Status FACTORY(Strategy** out, const Option* options, std::size_t count);
// Use once, in the plugin's registration file.
#define MEMSNAP_PLUGIN(NAME, VERSION, CAPABILITIES, DESCRIPTION, FACTORY)                       \
  MEMSNAP_PLUGIN_EXPORT const std::uint32_t memsnap_plugin_abi_version =                        \
      ::memsnap::plugin::kAbiVersion;                                                           \
  MEMSNAP_PLUGIN_EXPORT const ::memsnap::plugin::PluginDescriptor memsnap_plugin_descriptor = { \
      ::memsnap::plugin::kAbiVersion, NAME, VERSION, CAPABILITIES, DESCRIPTION};                \
  MEMSNAP_PLUGIN_EXPORT ::memsnap::plugin::Status memsnap_plugin_create(                        \
      ::memsnap::plugin::Strategy** out, const ::memsnap::plugin::Option* options,              \
      std::size_t option_count) noexcept {                                                      \
    try {                                                                                       \
      return FACTORY(out, options, option_count);                                               \
    } catch (...) {                                                                             \
      return ::memsnap::plugin::Status::Error(::memsnap::plugin::StatusCode::kInternal, 0,      \
                                              "factory of %s threw an exception", NAME);        \
    }                                                                                           \
  }
