// The QEMU adapter (core/vmm_adapter.h): a microVM under QEMU, stopped and continued over QMP,
// its device state saved and loaded by migration with the x-ignore-shared capability (RAM is
// shared memory, so QEMU skips it: memsnap moves it). Guest RAM is either a memfd memsnap
// creates and hands to QEMU (memory-backend-file on /proc/self/fd/N), or QEMU's own
// memory-backend-memfd, which memsnap reaches through the process (or takes with pidfd_getfd).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/base/file_io.h"
#include "core/base/result.h"
#include "core/vmm_adapter.h"
#include "tools/qemu/qmp.h"

namespace memsnap::qemu {

struct Machine {
  std::string binary = "qemu-system-x86_64";
  std::string kernel;  // an uncompressed ELF vmlinux (tools/qemu-guest builds one)
  std::string initrd;
  std::string append;  // the kernel command line; default_append() gives a working one
  std::uint64_t memory_bytes = 256ULL << 20;
  bool memsnap_owns_ram = true;
  std::string accel = "tcg";  // "kvm" only where a probe boot worked (see docs)
  std::string work_dir;       // QMP sockets, consoles and logs of every instance
  std::chrono::milliseconds start_timeout{20000};
};

// "console=ttyS0 ... tsc_early_khz=<host>" plus extra: the line that boots Debian's kernel
// quickly and reliably under microvm (the early TSC value avoids a calibration hang).
std::string default_append(const std::string& extra);

class QemuVm final : public VmmAdapter {
 public:
  // Starts QEMU for `machine`. ram: memsnap's memfd for guest RAM (machine.memsnap_owns_ram),
  // else empty. incoming: the VM waits (-incoming defer, -S) for load_device_state() and run().
  static Result<std::unique_ptr<QemuVm>> start(const Machine& machine, io::UniqueFd ram,
                                               bool incoming);
  ~QemuVm() override;

  std::string_view kind() const noexcept override { return "qemu"; }
  pid_t pid() const noexcept override { return pid_; }
  Result<GuestMemoryAccess> guest_memory() override;
  Status stop() override;
  Status run() override;
  Status save_device_state(const std::string& path) override;
  Status load_device_state(const std::string& path) override;
  io::UniqueFd release_ram() override;
  void terminate() override;

  // Every complete console line so far.
  std::vector<std::string> console_lines() const;
  bool alive();
  // QEMU's own migration of the whole VM, RAM included, to a file and back (the reference a
  // user would otherwise pick): migrate_to_file on a stopped VM; load_from_file on one started
  // incoming, which then waits, paused, for run().
  Status migrate_to_file(const std::string& path);
  Status load_from_file(const std::string& path);
  // The last lines QEMU printed on stdout/stderr (for error messages).
  std::string log_tail() const;
  // "running (pid N)", "exited with status N", "killed by signal N" (for error messages).
  std::string state_text();

 private:
  QemuVm() = default;
  Result<nlohmann::json> qmp(const std::string& command, const nlohmann::json& arguments = nullptr);
  Status migrate_file(const std::string& path, bool incoming, bool ignore_shared);

  Machine machine_;
  pid_t pid_ = -1;
  int wait_status_ = -1;  // from waitpid, once reaped by alive()
  io::UniqueFd ram_;    // memsnap's memfd, when memsnap owns RAM
  io::UniqueFd taken_;  // QEMU's own memfd, taken with pidfd_getfd when asked for
  std::optional<QmpClient> qmp_;
  std::string qmp_socket_;
  std::string console_;
  std::string log_;
};

class Launcher final : public VmmLauncher {
 public:
  explicit Launcher(Machine machine) : machine_(std::move(machine)) {}
  bool memsnap_owns_ram() const noexcept override { return machine_.memsnap_owns_ram; }
  std::uint64_t guest_size() const noexcept override { return machine_.memory_bytes; }
  Result<std::unique_ptr<VmmAdapter>> start_incoming(io::UniqueFd ram) override;

 private:
  Machine machine_;
};

// A fresh memfd of `size` bytes for guest RAM, named so the adapter finds its mapping.
Result<io::UniqueFd> create_guest_ram(std::uint64_t size);

}  // namespace memsnap::qemu
