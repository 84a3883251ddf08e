// memsnap inspect FILE [--no-verify] [--json]: a snapshot's header, block map summary and a check
// of every DATA run's checksum.
//
// --json prints exactly one JSON document whatever happens: the fields below ("strategy": the one
// that wrote the snapshot, or null when not recorded; "origin": every field of the origin record,
// docs/snapshot-format.md), "checksums" as
// {"status": "ok" | "mismatch" | "not checked", "runs_checked", "failed": [{"run",
// "guest_offset", "blocks", "bytes", "code", "message"}]}, and "error": null or {"code",
// "message"} (a file that cannot be opened has only "path" and "error"; a usage error only
// "error"). Exit codes as in text form: 0 intact, 1 unreadable or damaged, 2 usage.
#include <cstdio>
#include <ctime>
#include <stdexcept>

#include "core/snapshot/snapshot_reader.h"
#include "tools/memsnap/cli.h"

namespace memsnap::cli {
namespace {

struct RunFailure {
  std::size_t run = 0;
  std::uint64_t first_block = 0, blocks = 0;
  Error error;
};

struct ChecksumResult {
  bool checked = false;
  std::uint64_t runs_checked = 0;  // DATA runs hashed
  std::vector<RunFailure> failed;
  bool ok() const { return failed.empty(); }
};

// Hashes every DATA run (not stopping at the first bad one).
ChecksumResult check_runs(const SnapshotReader& r) {
  ChecksumResult out;
  out.checked = true;
  const auto runs = r.runs();
  for (std::size_t i = 0; i < runs.size(); ++i) {
    if (runs[i].kind != RunKind::kData) continue;
    ++out.runs_checked;
    if (Status s = r.verify_run(i); !s.ok()) {
      out.failed.push_back({i, runs[i].first_block, runs[i].block_count, s.error()});
    }
  }
  return out;
}

nlohmann::json checksums_json(const ChecksumResult& c, std::uint64_t block_size) {
  nlohmann::json failed = nlohmann::json::array();
  for (const RunFailure& f : c.failed) {
    failed.push_back({{"run", f.run},
                      {"guest_offset", f.first_block * block_size},
                      {"blocks", f.blocks},
                      {"bytes", f.blocks * block_size},
                      {"code", std::string(errc_name(f.error.code))},
                      {"message", f.error.message}});
  }
  return {{"status", !c.checked ? "not checked"
                     : c.ok()   ? "ok"
                                : "mismatch"},
          {"runs_checked", c.runs_checked},
          {"failed", failed}};
}

// Every field of the origin record, as stored (an empty object for a version 1 file).
nlohmann::json origin_json(const SnapshotOrigin& origin) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [key, value] : origin.fields()) out[key] = value;
  return out;
}

// "memfd 0.1.0 (needs-memfd)", or why there is no answer.
std::string strategy_text(const SnapshotReader& r) {
  const SnapshotOrigin& o = r.origin();
  if (o.strategy().empty()) {
    return r.header().version == 1 ? "not recorded (format version 1: give it to register or "
                                     "resume)"
                                   : "not recorded";
  }
  std::string out = o.strategy();
  if (const std::string* v = o.find(kOriginStrategyVersion)) out += " " + *v;
  if (const std::string* caps = o.find(kOriginStrategyCapabilities); caps && !caps->empty()) {
    out += " (" + *caps + ")";
  }
  return out;
}

void print_json(const nlohmann::json& j) { std::printf("%s\n", j.dump(2).c_str()); }

nlohmann::json report_json(const std::string& path, const SnapshotReader& r,
                           const ChecksumResult& sums) {
  const auto& h = r.header();
  const auto& s = r.summary();
  return {{"path", path},
          {"version", h.version},
          {"block_size", h.block_size},
          {"guest_size", h.guest_size},
          {"generation", h.generation},
          {"snapshot_id", to_hex(h.snapshot_id)},
          {"parent_id", r.is_base() ? "" : to_hex(h.parent_id)},
          {"created_unix_ns", h.created_unix_ns},
          {"strategy", r.origin().strategy().empty() ? nlohmann::json(nullptr)
                                                     : nlohmann::json(r.origin().strategy())},
          {"origin", origin_json(r.origin())},
          {"data_bytes", h.data_bytes},
          {"runs", h.run_count},
          {"data_blocks", s.data_blocks},
          {"zero_blocks", s.zero_blocks},
          {"parent_blocks", s.parent_blocks},
          {"data_runs", s.data_runs},
          {"zero_runs", s.zero_runs},
          {"parent_runs", s.parent_runs},
          {"checksums", checksums_json(sums, r.block_size())},
          {"error", sums.ok() ? nlohmann::json(nullptr) : to_json(sums.failed.front().error)}};
}

std::string checksums_text(const ChecksumResult& c) {
  if (!c.checked) return "not checked";
  if (c.ok()) return "ok (" + std::to_string(c.runs_checked) + " data runs)";
  std::string out = "FAILED in " + std::to_string(c.failed.size()) + " of " +
                    std::to_string(c.runs_checked) + " data runs:";
  for (const RunFailure& f : c.failed) out += "\n             " + f.error.to_string();
  return out;
}

void print_text(const std::string& path, const SnapshotReader& r, const ChecksumResult& sums) {
  const auto& h = r.header();
  const auto& s = r.summary();
  const std::time_t created = static_cast<std::time_t>(h.created_unix_ns / 1000000000ULL);
  char when[64];
  std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&created));
  std::printf("snapshot     %s\n", path.c_str());
  std::printf("format       memsnap v%u, %u-byte blocks\n", h.version, h.block_size);
  std::printf("guest        %s (%llu blocks)\n", format_bytes(double(h.guest_size)).c_str(),
              static_cast<unsigned long long>(r.block_count()));
  std::printf("generation   %llu%s\n", static_cast<unsigned long long>(h.generation),
              r.is_base() ? " (base)" : "");
  std::printf("id           %s\n", to_hex(h.snapshot_id).c_str());
  if (!r.is_base()) std::printf("parent       %s\n", to_hex(h.parent_id).c_str());
  std::printf("created      %s\n", when);
  std::printf("strategy     %s\n", strategy_text(r).c_str());
  if (const std::string* v = r.origin().find(kOriginMemsnapVersion)) {
    std::printf("written by   memsnap %s\n", v->c_str());
  }
  std::printf(
      "block map    %llu runs: %llu data blocks in %llu runs, %llu zero blocks in %llu "
      "runs, %llu inherited blocks in %llu runs\n",
      static_cast<unsigned long long>(h.run_count), static_cast<unsigned long long>(s.data_blocks),
      static_cast<unsigned long long>(s.data_runs), static_cast<unsigned long long>(s.zero_blocks),
      static_cast<unsigned long long>(s.zero_runs),
      static_cast<unsigned long long>(s.parent_blocks),
      static_cast<unsigned long long>(s.parent_runs));
  std::printf("data         %s stored\n", format_bytes(double(h.data_bytes)).c_str());
  std::printf("checksums    %s\n", checksums_text(sums).c_str());
}

int inspect(const std::string& path, bool verify, bool json) {
  auto reader = SnapshotReader::open(path, Verify::kHeaderAndMap);
  if (!reader.ok()) {
    if (json) print_json({{"path", path}, {"error", to_json(reader.error())}});
    std::fprintf(stderr, "memsnap inspect: %s\n", reader.error().to_string().c_str());
    return 1;
  }
  const SnapshotReader& r = **reader;
  const ChecksumResult sums = verify ? check_runs(r) : ChecksumResult{};
  if (json) {
    print_json(report_json(path, r, sums));
  } else {
    print_text(path, r, sums);
  }
  return sums.ok() ? 0 : 1;
}

}  // namespace

int cmd_inspect(Args& args) {
  // The table checked the words (one FILE); a refusal with --json is JSON through main's refuse().
  const bool json = args.flag("--json");
  const bool verify = !args.flag("--no-verify");
  const std::vector<std::string> files = args.positional();
  args.expect_done();
  return inspect(files.at(0), verify, json);
}

}  // namespace memsnap::cli
