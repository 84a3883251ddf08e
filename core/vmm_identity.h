// A VMM process pinned by a pidfd, and what memsnapd checks of it before trusting it: who owns
// it, whether the guest regions named for it are mapped in it, and whether an fd it holds really
// is a memfd (and open for writing). Used by memsnapd's registration; the region check also by
// the pause pipeline's dirty-set scan, so an unmapped range is an error, never zeros.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/base/file_io.h"
#include "core/base/result.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap {

// pidfd_open(pid). kProcessGone if there is no such process.
Result<io::UniqueFd> open_pidfd(pid_t pid);

// Whether the process behind pidfd has not exited (pidfd_send_signal with signal 0). A pid may
// be reused once its process is gone; a pidfd never names another process.
bool pidfd_alive(int pidfd);

// Sends sig to the process behind pidfd (kProcessGone once it exited).
Status pidfd_signal(int pidfd, int sig);

// Whether uid owns process pid as the kernel's ptrace check would have it: its real, effective
// and saved uids are all uid, and it is dumpable (a process that ran a setuid/setgid program or
// made itself non-dumpable is not its user's to read). kForbidden if not, kProcessGone if gone.
// Check pidfd_alive on a pidfd opened before this call afterwards: then the answer was about that
// process and not a successor with the same pid.
Status check_process_owner(pid_t pid, uid_t uid);

// Every [host_addr, host_addr + size) of regions lies in mappings of process pid with no gaps
// (/proc/PID/maps). kInvalidArgument naming the first range that is not mapped.
Status check_regions_mapped(pid_t pid, const std::vector<plugin::Region>& regions);

// Fields of /proc/PID/stat: the state letter (R, S, D, T, t, Z, X, ...) and when the process
// started, in clock ticks after boot (field 22).
struct ProcessStat {
  char state = '?';
  std::uint64_t start_time = 0;
};
Result<ProcessStat> process_stat(pid_t pid);
// When process pid started. With the boot's id (boot_id()), pid and start time name one process
// for good: how memsnapd recognises a VMM again after a restart. kProcessGone if there is no such
// process, or it has exited and is not reaped yet (a zombie).
Result<std::uint64_t> process_start_time(pid_t pid);
// /proc/sys/kernel/random/boot_id: differs after every reboot. Empty if unreadable.
std::string boot_id();

// Whether any byte of regions lies in a shared mapping of process pid (/proc/PID/maps). The
// pages of a shared file mapping (a memfd) hold data whether or not the process's page tables
// map them: its page tables do not tell which pages are populated.
Result<bool> regions_in_shared_mapping(pid_t pid, const std::vector<plugin::Region>& regions);

// The file behind every region of process pid, opened read-write through /proc/PID/map_files
// (which needs CAP_SYS_ADMIN): how memsnapd takes back the memfd of a VMM it no longer holds.
// Each region must lie in one shared mapping of that same file at file offset == guest offset
// (kInvalidArgument otherwise). Check it with check_guest_memfd before use.
Result<io::UniqueFd> take_mapped_memfd(pid_t pid, const std::vector<plugin::Region>& regions);

// pidfd_getfd(pidfd, target_fd): a copy of the process's fd.
Result<io::UniqueFd> take_fd_of_pidfd(int pidfd, int target_fd);

// fd (taken from a VMM) is a memfd usable as guest memory of guest_size bytes: a regular file on
// shmem or hugetlbfs whose name is "memfd:...", at least guest_size long, and open read-write
// (the access mode is kept as is, never widened: a read-only one is refused).
// kInvalidArgument saying what it is instead.
Status check_guest_memfd(int fd, std::uint64_t guest_size);

}  // namespace memsnap
