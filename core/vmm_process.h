// What the host does to a VMM process around a pause: freeze it, take the memfd that backs its
// guest memory, and find where that memfd is mapped (the guest regions).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/file_io.h"
#include "core/base/result.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap {

// A task (thread) that still runs, with its state as in /proc/PID/task/TID/stat ('R', 'S', 'D'...).
struct RunningTask {
  pid_t tid = 0;
  char state = 0;
  std::string to_string() const { return std::to_string(tid) + ":" + std::string(1, state); }
};

// Every task of process pid that is not stopped; empty when every task is stopped or the process
// is gone. Exited and zombie tasks count as stopped: they write nothing.
std::vector<RunningTask> tasks_not_stopped(pid_t pid);

// Stops a process with SIGSTOP, waits until the kernel reports every one of its threads stopped
// (not only the leader: a vCPU thread inside a syscall may still write guest memory after the
// leader stopped), and sends SIGCONT when destroyed (or on thaw()), unless keep_stopped() was
// called. Move-only.
//
// Signals go through a pidfd, never the bare pid: a pid names whatever process holds it now, a
// pidfd only the process it was opened for. The caller that pinned the VMM (memsnapd, at
// registration) passes its pidfd; which must be the process `pid` names (checked), and is
// duplicated, not taken. Without one, freeze() opens its own at once.
class Freezer {
 public:
  static Result<Freezer> freeze(pid_t pid, int pidfd = -1,
                                std::chrono::milliseconds timeout = std::chrono::seconds(5));
  Freezer(Freezer&& other) noexcept;
  Freezer& operator=(Freezer&&) = delete;
  Freezer(const Freezer&) = delete;
  ~Freezer();
  // Continues the process; idempotent.
  Status thaw();
  // Leaves the process stopped for good (the caller kills it or continues it itself).
  void keep_stopped() noexcept {
    pid_ = -1;
    pidfd_.reset();
  }

 private:
  Freezer(pid_t pid, io::UniqueFd pidfd) : pid_(pid), pidfd_(std::move(pidfd)) {}
  pid_t pid_;
  io::UniqueFd pidfd_;
};

// The pid the kernel shows for a pidfd (the "Pid:" line of /proc/self/fdinfo/FD): -1 once the
// process has exited, 0 if it lives in a pid namespace we cannot see; nullopt if fd is not a
// pidfd (or its fdinfo cannot be read).
std::optional<pid_t> pid_of_pidfd(int pidfd);

// A copy of file descriptor target_fd of process pid (pidfd_open + pidfd_getfd; needs
// PTRACE_MODE_ATTACH_REALCREDS over it, e.g. root). The caller owns the returned fd.
Result<int> take_fd_of_process(pid_t pid, int target_fd);

// A memfd open in a process and the places it is mapped there.
struct ProcessMemfd {
  int fd_number = -1;                    // in the target process
  std::string name;                      // "memfd:guest" as the kernel names it
  std::uint64_t size = 0;                // st_size
  std::vector<plugin::Region> mappings;  // guest_offset = file offset of each shared mapping
};

// The memfds process pid holds, with their shared mappings from /proc/PID/maps. name_filter, when
// set, keeps only memfds whose name contains it.
Result<std::vector<ProcessMemfd>> find_memfds_of_process(
    pid_t pid, const std::optional<std::string>& name_filter);

// The sum of the "Key:   N kB" lines of /proc/PID/FILE named in keys, in bytes; 0 if the process
// is gone. One pass over the file.
std::uint64_t proc_kb_fields(pid_t pid, const char* file,
                             std::initializer_list<std::string_view> keys);

// Bytes of a process's memory mapped with 2 MiB pages: anonymous THP and shmem/memfd THP
// (smaps_rollup's AnonHugePages, ShmemPmdMapped, FilePmdMapped). Asking for THP is no promise of
// getting it (memfd THP also needs /sys/kernel/mm/transparent_hugepage/shmem_enabled).
std::uint64_t huge_page_bytes(pid_t pid);

// The kernel's THP setting in /sys/kernel/mm/transparent_hugepage/FILE ("enabled" or
// "shmem_enabled"): the bracketed choice, e.g. "always [madvise] never" -> "madvise"; "" if
// unreadable.
std::string thp_setting(const char* file);

}  // namespace memsnap
