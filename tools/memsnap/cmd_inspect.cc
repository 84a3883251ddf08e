#include <cstdio>
#include <ctime>
#include <stdexcept>

#include "core/snapshot/snapshot_reader.h"
#include "tools/memsnap/cli.h"

namespace memsnap::cli {

int cmd_inspect(Args& args) {
  const bool json = args.flag("--json");
  const bool verify = !args.flag("--no-verify");
  const auto files = args.positional();
  args.expect_done();
  if (files.size() != 1)
    throw std::invalid_argument("usage: memsnap inspect FILE [--no-verify] [--json]");

  auto reader = SnapshotReader::open(files[0], Verify::kHeaderAndMap);
  if (!reader.ok()) {
    std::fprintf(stderr, "memsnap inspect: %s\n", reader.error().to_string().c_str());
    return 1;
  }
  const auto& r = **reader;
  const auto& h = r.header();
  const auto& s = r.summary();
  Status checked;
  if (verify) checked = r.verify_data();
  const std::string verdict = !verify        ? "not checked"
                              : checked.ok() ? "ok"
                                             : checked.error().to_string();

  if (json) {
    nlohmann::json j = {{"path", files[0]},
                        {"version", h.version},
                        {"block_size", h.block_size},
                        {"guest_size", h.guest_size},
                        {"generation", h.generation},
                        {"snapshot_id", to_hex(h.snapshot_id)},
                        {"parent_id", r.is_base() ? "" : to_hex(h.parent_id)},
                        {"created_unix_ns", h.created_unix_ns},
                        {"data_bytes", h.data_bytes},
                        {"runs", h.run_count},
                        {"data_blocks", s.data_blocks},
                        {"zero_blocks", s.zero_blocks},
                        {"parent_blocks", s.parent_blocks},
                        {"data_runs", s.data_runs},
                        {"zero_runs", s.zero_runs},
                        {"parent_runs", s.parent_runs},
                        {"checksums", verdict}};
    std::printf("%s\n", j.dump(2).c_str());
    return checked.ok() ? 0 : 1;
  }
  const std::time_t created = static_cast<std::time_t>(h.created_unix_ns / 1000000000ULL);
  char when[64];
  std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&created));
  std::printf("snapshot     %s\n", files[0].c_str());
  std::printf("format       memsnap v%u, %u-byte blocks\n", h.version, h.block_size);
  std::printf("guest        %s (%llu blocks)\n", format_bytes(double(h.guest_size)).c_str(),
              static_cast<unsigned long long>(r.block_count()));
  std::printf("generation   %llu%s\n", static_cast<unsigned long long>(h.generation),
              r.is_base() ? " (base)" : "");
  std::printf("id           %s\n", to_hex(h.snapshot_id).c_str());
  if (!r.is_base()) std::printf("parent       %s\n", to_hex(h.parent_id).c_str());
  std::printf("created      %s\n", when);
  std::printf(
      "block map    %llu runs: %llu data blocks in %llu runs, %llu zero blocks in %llu "
      "runs, %llu inherited blocks in %llu runs\n",
      static_cast<unsigned long long>(h.run_count), static_cast<unsigned long long>(s.data_blocks),
      static_cast<unsigned long long>(s.data_runs), static_cast<unsigned long long>(s.zero_blocks),
      static_cast<unsigned long long>(s.zero_runs),
      static_cast<unsigned long long>(s.parent_blocks),
      static_cast<unsigned long long>(s.parent_runs));
  std::printf("data         %s stored\n", format_bytes(double(h.data_bytes)).c_str());
  std::printf("checksums    %s\n", verdict.c_str());
  return checked.ok() ? 0 : 1;
}

}  // namespace memsnap::cli
