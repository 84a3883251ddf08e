// What memsnap needs of a VMM to pause and resume it, whatever the VMM: an adapter per VMM
// (tools/qemu for QEMU; the stand-in, tools/sandbox-guest, speaks the Firecracker handshake
// instead and is driven by core/resume.h). core never names a VMM: it calls these.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <string_view>

#include "core/base/file_io.h"
#include "core/base/result.h"
#include "core/guest_image.h"

namespace memsnap {

// One running VMM process.
class VmmAdapter {
 public:
  virtual ~VmmAdapter() = default;

  virtual std::string_view kind() const noexcept = 0;  // "qemu"
  virtual pid_t pid() const noexcept = 0;

  // Where its guest memory is now: the VMM's pid and the regions where guest memory is mapped in
  // it, and the memfd behind it when memsnap can reach one (memsnap's own, or the VMM's taken
  // with pidfd_getfd; the adapter keeps owning it). Valid until the adapter is destroyed.
  virtual Result<GuestMemoryAccess> guest_memory() = 0;

  // Stops the guest (vCPUs and devices): its memory no longer changes until run().
  virtual Status stop() = 0;
  // Lets a stopped guest run (after a pause that keeps it, or after a resume).
  virtual Status run() = 0;
  // A stopped guest's device state (everything but RAM) into path, which it creates.
  virtual Status save_device_state(const std::string& path) = 0;
  // For a VMM started to receive (VmmLauncher::start_incoming): loads the device state saved by
  // save_device_state. Guest memory must be in place before run().
  virtual Status load_device_state(const std::string& path) = 0;

  // The memfd memsnap gave the VMM for its RAM, handed back (empty when the VMM owns its RAM).
  // Call after the VMM has stopped for good: a memfd pause keeps it for a warm resume.
  virtual io::UniqueFd release_ram() = 0;

  // Ends the VMM process (SIGKILL) and reaps it. Idempotent.
  virtual void terminate() = 0;
};

// Starts VMMs of one kind and configuration (the same machine as the one paused).
class VmmLauncher {
 public:
  virtual ~VmmLauncher() = default;
  // Whether guest RAM is a memfd memsnap creates and hands to the VMM (true), or memory the VMM
  // allocates itself (false: memsnap reaches it through the process).
  virtual bool memsnap_owns_ram() const noexcept = 0;
  virtual std::uint64_t guest_size() const noexcept = 0;
  // A VMM that waits, not running, for its device state: ram is memsnap's memfd when
  // memsnap_owns_ram(), else empty.
  virtual Result<std::unique_ptr<VmmAdapter>> start_incoming(io::UniqueFd ram) = 0;
};

}  // namespace memsnap
