#include "core/vmm_identity.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

namespace memsnap {
namespace {

using io::errno_message;

std::string hex(std::uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
  return buf;
}

// The four ids of a "Uid:" (or "Gid:") line of /proc/PID/status.
bool status_ids(pid_t pid, const char* key, std::uint64_t ids[4]) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  const std::size_t key_len = std::strlen(key);
  while (std::getline(in, line)) {
    if (line.compare(0, key_len, key) != 0) continue;
    std::istringstream fields(line.substr(key_len));
    for (int i = 0; i < 4; ++i) {
      if (!(fields >> ids[i])) return false;
    }
    return true;
  }
  return false;
}

}  // namespace

Result<ProcessStat> process_stat(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!std::getline(in, stat)) {
    return make_error(Errc::kProcessGone, "no process " + std::to_string(pid));
  }
  // The command name (field 2) is in parentheses and may hold anything, ')' and spaces too: the
  // fields that follow start after the last ')'. Field 3 is then the first, field 22 the 20th.
  const std::size_t close = stat.rfind(')');
  std::istringstream fields(close == std::string::npos ? std::string() : stat.substr(close + 1));
  ProcessStat out;
  std::string field;
  if (!(fields >> out.state)) {
    return make_error(Errc::kIoError, "/proc/" + std::to_string(pid) + "/stat: no state");
  }
  for (int i = 4; i < 22 && (fields >> field); ++i) {
  }
  if (!(fields >> out.start_time)) {
    return make_error(Errc::kIoError, "/proc/" + std::to_string(pid) + "/stat: no start time");
  }
  return out;
}

Result<std::uint64_t> process_start_time(pid_t pid) {
  MEMSNAP_ASSIGN_OR_RETURN(const ProcessStat st, process_stat(pid));
  // A process that has exited but is not reaped yet (a zombie) is gone: it runs nothing.
  if (st.state == 'Z' || st.state == 'X') {
    return make_error(Errc::kProcessGone, "process " + std::to_string(pid) + " has exited");
  }
  return st.start_time;
}

std::string boot_id() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  return id;
}

Result<io::UniqueFd> open_pidfd(pid_t pid) {
  if (pid <= 0) return make_error(Errc::kInvalidArgument, "not a pid: " + std::to_string(pid));
  const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) {
    const int err = errno;
    return make_error(err == ESRCH ? Errc::kProcessGone : Errc::kIoError,
                      err == ESRCH ? "no process " + std::to_string(pid)
                                   : errno_message("pidfd_open(" + std::to_string(pid) + ")", err),
                      err);
  }
  return io::UniqueFd(fd);
}

bool pidfd_alive(int pidfd) {
  return pidfd >= 0 && ::syscall(SYS_pidfd_send_signal, pidfd, 0, nullptr, 0) == 0;
}

Status pidfd_signal(int pidfd, int sig) {
  if (::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0) == 0) return {};
  const int err = errno;
  return make_error(err == ESRCH ? Errc::kProcessGone : Errc::kIoError,
                    errno_message("pidfd_send_signal(" + std::to_string(sig) + ")", err), err);
}

Status check_process_owner(pid_t pid, uid_t uid) {
  std::uint64_t ids[4] = {};
  if (!status_ids(pid, "Uid:", ids)) {
    return make_error(Errc::kProcessGone, "no process " + std::to_string(pid));
  }
  // Real, effective, saved (the fourth is the filesystem uid).
  for (int i = 0; i < 3; ++i) {
    if (ids[i] != uid) {
      return make_error(Errc::kForbidden, "process " + std::to_string(pid) + " belongs to uid " +
                                              std::to_string(ids[i]) + ", not to uid " +
                                              std::to_string(uid));
    }
  }
  // /proc/PID belongs to root while the process is not dumpable.
  struct stat st {};
  if (::stat(("/proc/" + std::to_string(pid)).c_str(), &st) != 0) {
    return make_error(Errc::kProcessGone, "no process " + std::to_string(pid));
  }
  if (st.st_uid != uid) {
    return make_error(Errc::kForbidden, "process " + std::to_string(pid) +
                                            " is not dumpable (it changed credentials or asked "
                                            "not to be read): only root may register it");
  }
  return {};
}

namespace {

// One line of /proc/PID/maps: its range, whether it is a shared mapping ("rw-s"), and the file
// offset it starts at.
struct Mapping {
  std::uint64_t start, end;
  bool shared;
  std::uint64_t offset;
  bool writable;
};

// The process's mappings, sorted by start.
Result<std::vector<Mapping>> read_mappings(pid_t pid) {
  std::vector<Mapping> maps;
  std::ifstream in("/proc/" + std::to_string(pid) + "/maps");
  if (!in) return make_error(Errc::kProcessGone, "no process " + std::to_string(pid));
  std::string line;
  while (std::getline(in, line)) {
    std::uint64_t start = 0, end = 0, offset = 0;
    char perms[5] = {};
    if (std::sscanf(line.c_str(), "%" SCNx64 "-%" SCNx64 " %4s %" SCNx64, &start, &end, perms,
                    &offset) == 4 &&
        end > start) {
      maps.push_back({start, end, perms[3] == 's', offset, perms[1] == 'w'});
    }
  }
  std::sort(maps.begin(), maps.end(),
            [](const Mapping& a, const Mapping& b) { return a.start < b.start; });
  return maps;
}

}  // namespace

Result<bool> regions_in_shared_mapping(pid_t pid, const std::vector<plugin::Region>& regions) {
  MEMSNAP_ASSIGN_OR_RETURN(const std::vector<Mapping> maps, read_mappings(pid));
  for (const auto& r : regions) {
    for (const Mapping& m : maps) {
      if (m.shared && m.start < r.host_addr + r.size && r.host_addr < m.end) return true;
    }
  }
  return false;
}

Result<io::UniqueFd> take_mapped_memfd(pid_t pid, const std::vector<plugin::Region>& regions) {
  MEMSNAP_ASSIGN_OR_RETURN(const std::vector<Mapping> maps, read_mappings(pid));
  io::UniqueFd taken;
  struct stat first {};
  for (const auto& r : regions) {
    const Mapping* m = nullptr;
    for (const Mapping& candidate : maps) {
      if (candidate.start <= r.host_addr && r.host_addr < candidate.end) m = &candidate;
    }
    const std::string where = "region " + hex(r.host_addr) + " of process " + std::to_string(pid);
    if (m == nullptr || !m->shared || r.host_addr + r.size > m->end) {
      return make_error(Errc::kInvalidArgument, where + " is not within one shared mapping");
    }
    // memsnap's rule: guest offset == memfd offset.
    if (m->offset + (r.host_addr - m->start) != r.guest_offset) {
      return make_error(Errc::kInvalidArgument,
                        where + " maps file offset " + hex(m->offset + (r.host_addr - m->start)) +
                            ", not its guest offset " + hex(r.guest_offset));
    }
    // Never opened wider than the VMM maps it, and only a memfd: a read-write mapping of
    // "/memfd:..." (what the link names, read before anything is opened).
    if (!m->writable) {
      return make_error(Errc::kInvalidArgument, where + " is not mapped writable");
    }
    char name[64];
    std::snprintf(name, sizeof(name), "%" PRIx64 "-%" PRIx64, m->start, m->end);
    const std::string path = "/proc/" + std::to_string(pid) + "/map_files/" + name;
    char target[256] = {};
    const ssize_t n = ::readlink(path.c_str(), target, sizeof(target) - 1);
    if (n < 0 || std::strncmp(target, "/memfd:", 7) != 0) {
      return make_error(Errc::kInvalidArgument, where + " does not map a memfd");
    }
    io::UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    struct stat st {};
    if (fd.get() < 0 || ::fstat(fd.get(), &st) != 0) {
      const int err = errno;
      return make_error(Errc::kIoError, errno_message("opening " + path, err), err);
    }
    if (taken.get() < 0) {
      taken = std::move(fd);
      first = st;
    } else if (st.st_dev != first.st_dev || st.st_ino != first.st_ino) {
      return make_error(Errc::kInvalidArgument, where + " maps another file than the first region");
    }
  }
  if (taken.get() < 0) return make_error(Errc::kInvalidArgument, "no regions");
  return taken;
}

Status check_regions_mapped(pid_t pid, const std::vector<plugin::Region>& regions) {
  MEMSNAP_ASSIGN_OR_RETURN(const std::vector<Mapping> maps, read_mappings(pid));
  for (const auto& r : regions) {
    const std::uint64_t end = r.host_addr + r.size;
    if (end < r.host_addr) {
      return make_error(Errc::kInvalidArgument,
                        "region at " + hex(r.host_addr) + " wraps around the address space");
    }
    std::uint64_t at = r.host_addr;
    for (const auto& m : maps) {
      if (at >= end) break;
      if (m.end <= at) continue;
      if (m.start > at) break;  // a gap
      at = m.end;
    }
    if (at < end) {
      return make_error(Errc::kInvalidArgument,
                        "region " + hex(r.host_addr) + "+" + hex(r.size) + " (guest offset " +
                            hex(r.guest_offset) + ") is not mapped in process " +
                            std::to_string(pid) + " from " + hex(at) +
                            " on: it would be exported as zeros");
    }
  }
  return {};
}

Result<io::UniqueFd> take_fd_of_pidfd(int pidfd, int target_fd) {
  const int fd = static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd, target_fd, 0));
  if (fd < 0) {
    const int err = errno;
    return make_error(err == ESRCH ? Errc::kProcessGone
                      : err == EBADF ? Errc::kInvalidArgument
                                     : Errc::kIoError,
                      errno_message("pidfd_getfd(fd " + std::to_string(target_fd) + ")", err),
                      err);
  }
  return io::UniqueFd(fd);
}

Status check_guest_memfd(int fd, std::uint64_t guest_size) {
  struct stat st {};
  struct statfs fs {};
  if (::fstat(fd, &st) != 0 || ::fstatfs(fd, &fs) != 0) {
    return make_error(Errc::kIoError, errno_message("fstat of the memfd", errno), errno);
  }
  char link[256] = {};
  const std::string self = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = ::readlink(self.c_str(), link, sizeof(link) - 1);
  const std::string name = n > 0 ? std::string(link, static_cast<std::size_t>(n)) : "";
  const bool shmem = static_cast<unsigned long>(fs.f_type) == TMPFS_MAGIC ||
                     static_cast<unsigned long>(fs.f_type) == HUGETLBFS_MAGIC;
  if (!S_ISREG(st.st_mode) || !shmem || name.rfind("/memfd:", 0) != 0) {
    return make_error(Errc::kInvalidArgument,
                      "it is not a memfd (it is \"" + name + "\"): guest memory must be a memfd");
  }
  if (static_cast<std::uint64_t>(st.st_size) < guest_size) {
    return make_error(Errc::kInvalidArgument, "the memfd holds " + std::to_string(st.st_size) +
                                                  " bytes, less than the guest's " +
                                                  std::to_string(guest_size));
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || (flags & O_ACCMODE) != O_RDWR) {
    return make_error(Errc::kInvalidArgument,
                      "the memfd is open read-only in the VMM: guest memory is open read-write, "
                      "and memsnapd never opens it wider than the VMM did");
  }
  return {};
}

}  // namespace memsnap
