#include "core/snapshot/recovery_journal.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "core/base/file_io.h"

namespace memsnap {

Result<RecoveryJournal> read_recovery_journal(const std::string& journal_path) {
  std::ifstream in(journal_path);
  if (!in) {
    return make_error(Errc::kNotFound, "cannot open the recovery journal " + journal_path);
  }
  RecoveryJournal j;
  std::map<std::uint64_t, RecoveredRun> runs;
  std::string line;
  int line_no = 0;
  auto bad = [&](const std::string& why) {
    return make_error(Errc::kSnapshotBadHeader,
                      journal_path + ":" + std::to_string(line_no) + ": " + why);
  };
  while (std::getline(in, line)) {
    ++line_no;
    std::istringstream ls(line);
    std::string key;
    ls >> key;
    if (line_no == 1) {
      int version = 0;
      if (key != "memsnap-recovery" || !(ls >> version) || version != 1) {
        return bad("not a memsnap recovery journal (version 1)");
      }
      continue;
    }
    if (key == "snapshot") {
      std::getline(ls >> std::ws, j.snapshot_path);
    } else if (key == "block_size") {
      std::string k2, k3, k4;
      if (!(ls >> j.block_size >> k2 >> j.guest_size >> k3 >> j.generation >> k4 >>
            j.data_area_offset) ||
          k2 != "guest_size" || k3 != "generation" || k4 != "data_offset") {
        return bad("malformed parameters");
      }
    } else if (key == "run") {
      RecoveredRun r;
      std::string kind;
      if (!(ls >> r.first_block >> r.block_count >> kind >> r.data_offset) ||
          (kind != "data" && kind != "zero") || r.block_count == 0) {
        return bad("malformed run");
      }
      r.zero = kind == "zero";
      runs[r.first_block] = r;  // a later record of the same run supersedes the earlier one
    } else if (!key.empty()) {
      return bad("unknown record \"" + key + "\"");
    }
  }
  if (j.block_size == 0 || j.guest_size == 0 || j.guest_size % j.block_size != 0) {
    return bad("no valid parameters");
  }
  const std::uint64_t blocks = j.guest_size / j.block_size;
  std::uint64_t next = 0;
  for (const auto& [first, r] : runs) {
    if (first < next || r.block_count > blocks || first > blocks - r.block_count) {
      return bad("runs overlap or lie outside the guest");
    }
    next = first + r.block_count;
    j.runs.push_back(r);
  }
  return j;
}

Result<std::uint64_t> restore_from_journal(const RecoveryJournal& journal,
                                           const std::string& temp_path, int memfd) {
  struct stat st {};
  if (::fstat(memfd, &st) != 0) {
    return make_error(Errc::kIoError, std::string("fstat on the memfd: ") + std::strerror(errno),
                      errno);
  }
  if (static_cast<std::uint64_t>(st.st_size) != journal.guest_size) {
    return make_error(Errc::kInvalidArgument,
                      "the memfd holds " + std::to_string(st.st_size) + " bytes; the journal's " +
                          "guest has " + std::to_string(journal.guest_size));
  }
  io::UniqueFd temp(::open(temp_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (temp.get() < 0) {
    return make_error(Errc::kIoError, "open " + temp_path + ": " + std::strerror(errno), errno);
  }
  std::vector<char> buf(1 << 20);
  std::uint64_t restored = 0;
  for (const RecoveredRun& r : journal.runs) {
    if (r.zero) continue;
    const std::uint64_t length = r.block_count * journal.block_size;
    for (std::uint64_t done = 0; done < length;) {
      const std::uint64_t n = std::min<std::uint64_t>(buf.size(), length - done);
      const ssize_t got =
          ::pread(temp.get(), buf.data(), n,
                  static_cast<off_t>(journal.data_area_offset + r.data_offset + done));
      if (got != static_cast<ssize_t>(n)) {
        return make_error(Errc::kSnapshotTruncated,
                          temp_path + " ends before the data its journal records (run at block " +
                              std::to_string(r.first_block) + ")");
      }
      MEMSNAP_RETURN_IF_ERROR(io::pwrite_all(memfd, buf.data(), n,
                                             r.first_block * journal.block_size + done,
                                             "writing recovered memory into the memfd"));
      done += n;
      restored += n;
    }
  }
  return restored;
}

}  // namespace memsnap
