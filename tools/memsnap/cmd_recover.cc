// memsnap recover: puts guest memory that a pause released back into the VMM's memfd, from the
// temporary snapshot file and recovery journal that the pause left (core/snapshot/
// recovery_journal.h). For a pause that failed with data_at_risk, or a memsnapd killed in the
// middle of a hole-punching pause; the VMM is still stopped in both cases.
#include <unistd.h>

#include <cstdio>
#include <stdexcept>

#include "core/snapshot/recovery_journal.h"
#include "core/vmm_process.h"
#include "tools/memsnap/cli.h"

namespace memsnap::cli {

int cmd_recover(Args& args) {
  const std::string pid_text = args.value("--memfd-of-pid");
  const std::string fd_text = args.value("--memfd-fd");
  const bool remove = args.flag("--remove");
  const auto files = args.positional();
  args.expect_done();
  if (files.size() != 1 || pid_text.empty()) {
    throw std::invalid_argument(
        "usage: memsnap recover TEMPORARY-FILE --memfd-of-pid PID [--memfd-fd N] [--remove]");
  }
  std::string temp = files[0];
  const std::string suffix = kRecoveryJournalSuffix;
  if (temp.size() > suffix.size() &&
      temp.compare(temp.size() - suffix.size(), suffix.size(), suffix) == 0) {
    temp.resize(temp.size() - suffix.size());  // the journal named instead of its file
  }
  auto journal = read_recovery_journal(temp + suffix);
  if (!journal.ok()) {
    std::fprintf(stderr, "memsnap recover: %s\n", journal.error().to_string().c_str());
    return 1;
  }
  const pid_t pid = static_cast<pid_t>(std::stol(pid_text));
  auto memfds = find_memfds_of_process(pid, std::nullopt);
  if (!memfds.ok()) {
    std::fprintf(stderr, "memsnap recover: %s\n", memfds.error().to_string().c_str());
    return 1;
  }
  const ProcessMemfd* chosen = nullptr;
  for (const auto& m : *memfds) {
    if (!fd_text.empty() && m.fd_number != std::stoi(fd_text)) continue;
    if (fd_text.empty() && m.size != journal->guest_size) continue;
    if (chosen != nullptr) {
      throw std::invalid_argument("process " + pid_text +
                                  " holds several memfds of the guest's size; pick one with "
                                  "--memfd-fd");
    }
    chosen = &m;
  }
  if (chosen == nullptr) {
    std::fprintf(stderr, "memsnap recover: process %d holds no memfd of %llu bytes\n", pid,
                 static_cast<unsigned long long>(journal->guest_size));
    return 1;
  }
  auto fd = take_fd_of_process(pid, chosen->fd_number);
  if (!fd.ok()) {
    std::fprintf(stderr, "memsnap recover: %s\n", fd.error().to_string().c_str());
    return 1;
  }
  auto restored = restore_from_journal(*journal, temp, *fd);
  ::close(*fd);
  if (!restored.ok()) {
    std::fprintf(stderr, "memsnap recover: %s (nothing removed)\n",
                 restored.error().to_string().c_str());
    return 1;
  }
  std::printf(
      "restored %s of guest memory (%zu runs recorded for %s) into fd %d of process %d; the VMM "
      "is still stopped: continue it (kill -CONT %d) or pause it again\n",
      format_bytes(double(*restored)).c_str(), journal->runs.size(),
      journal->snapshot_path.c_str(), chosen->fd_number, pid, pid);
  if (remove) {
    ::unlink((temp + suffix).c_str());
    ::unlink(temp.c_str());
    std::printf("removed %s and its journal\n", temp.c_str());
  }
  return 0;
}

}  // namespace memsnap::cli
