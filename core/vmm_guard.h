// The guardian of lazily served VMMs. A VMM whose memory memsnap serves through userfaultfd
// cannot run without it: if memsnap dies (kill -9, a crash), the VMM's next page fault blocks
// forever. Firecracker's documentation asks a handler to end its VMM in that case; a dead process
// cannot, so a small child process does it: memsnap hands it a pidfd of every VMM it serves, and
// when memsnap's end of their socket closes without a goodbye (memsnap is gone), the guardian
// sends SIGKILL through each pidfd it still holds, then exits. A graceful stop of memsnap ends
// served VMMs itself (ResumeSession::stop) and then says goodbye.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <mutex>

#include "core/base/file_io.h"
#include "core/base/result.h"

namespace memsnap {

class VmmGuard {
 public:
  // Forks the guardian. Call early, before other threads start (the child only makes system
  // calls); it closes every inherited descriptor but its socket.
  static Result<std::unique_ptr<VmmGuard>> start();
  // Says goodbye (nothing is killed) and reaps the guardian.
  ~VmmGuard();
  VmmGuard(const VmmGuard&) = delete;
  VmmGuard& operator=(const VmmGuard&) = delete;

  // The guardian keeps a duplicate of pidfd (at most 4096 at once); the token names it.
  Result<std::uint64_t> watch(int pidfd);
  // Forgets a watch (the VMM exited or no longer needs memsnap).
  void release(std::uint64_t token);

 private:
  VmmGuard(io::UniqueFd socket, pid_t pid) : socket_(std::move(socket)), pid_(pid) {}
  Status send(char op, std::uint64_t token, int fd);

  std::mutex mu_;
  io::UniqueFd socket_;
  pid_t pid_;
  std::uint64_t tokens_ = 0;
};

}  // namespace memsnap
