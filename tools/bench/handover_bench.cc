// memsnap-handover-bench (issue 19, "Targets"): what a handover pause changes for its caller and
// for the disk, through a real memsnapd and memfd-backed stand-in VMMs (tools/fleet), against
// copy pauses and the machine's own best durable write in the same run.
//
//   memsnap-handover-bench [--sizes 256M,1G,4G] [--reps 10,7,5]
//                          [--refs write1m,write4m,write16m,direct4m] [--kinds copy,handover]
//                          [--out handover.json] [--no-warmup]
//   tools/bench/handover_ratios.py handover.json
//
// For every size, `reps` rounds; each round runs, in an order rotated from round to round, one
// copy pause, one handover pause and each reference way once:
//
// - copy / handover: a fresh stand-in (memsnap-guest, memfd backing, every page written with the
//   pattern: zero_fraction 0) is registered, then POST /pause {strategy: memfd, mode, sync: true,
//   parent: none, after: stop}. The client-side wall is from sending the request to having its
//   answer (a new connection, as every Daemon::call). Then the VMM is killed at once, as an
//   orchestrator would after either answer (for handover: while its export runs), a handover
//   pause is waited for with GET ?wait_while=exporting&timeout_ms=600000, the sandbox is
//   deleted (memsnapd lets go of the memfd it keeps for a warm resume) and its snapshot removed.
// - ref: the same bytes (the pattern of the same seed, generation 1, in an anonymous mapping of
//   the bench) written into a new file on the same file system as the snapshots, then fsync:
//   write() in 1, 4 or 16 MiB calls, or O_DIRECT in 4 MiB calls (durable_bench.cc's references;
//   16 MiB calls were the fastest at 1 GiB in memsnap-bench, so they are in the default set).
// - early / late (--kinds ...,early,late; issue 19 item 3): a handover pause of a fresh stand-in,
//   then a resume of it, as a user who pauses and comes back at once would see it. early: the
//   resume is asked as soon as the pause answered, and is served from the memory held for the
//   export (background fill) while the export runs; late: the way without that, wait until
//   durable, then a warm resume. Each records the resume's ready_seconds (handshake to VMM
//   runnable, memsnapd's figure), the client's wall time from the pause request until the new
//   VMM runs (pause_to_running_s), and until the guest has read every one of its pages and
//   found them right (pause_to_work_s: the guest's whole working set at full speed), the fill's
//   time, and the export's durable_seconds (early: contended by the fill). early is asked with
//   map_ahead false, early_map with map_ahead true (the fill also maps every page it writes into
//   the VMM; the default of such a resume).
// - live / copy_continue (--kinds ...,live,copy_continue; issue 19 item 4): a pause with after
//   "continue" of a sandbox memsnapd serves, whose VMM sends it its write-protect faults (a
//   stand-in with --track-writes sync, paused once and resumed warm). Before the pause the guest
//   writes a quarter of its pages (scattered: the dirty set), then a thread of it writes 4096
//   pages round after round (write-loop) through the pause. live runs in mode live (the guest
//   stops only while its dirty set is protected), copy_continue in mode copy (stopped for the
//   whole export): the user-side figures are how long the VMM was stopped (stopped_s, memsnapd's
//   figure from the freeze to the thaw) and the loop's writes per second during the pause
//   against the same for as long just before it (loop_rate_ratio); the price is the
//   copy-before-write count (live_copies) and the pause's CPU.
//
// CPU, per operation: copy: the answer's cpu_seconds (the pipeline's threads) and memsnapd's
// whole-process CPU over the call (utime + stime of /proc/<memsnapd>/stat, 10 ms ticks);
// handover: export.cpu_seconds (memsnap-exporter's rusage, every thread, every attempt), plus
// memsnapd's whole-process CPU from sending the pause until the durable wait returned (ticks),
// plus, for the answer alone, the sum of memsnapd's threads' run time (/proc/<pid>/task/*/
// schedstat, ns) over the pause call. Not counted anywhere: kernel writeback done by flusher
// threads, and the bench's own CPU (the kill of the VMM, the HTTP client).
//
// The VMM is stopped for good by both modes from the freeze on (after: stop), so its downtime
// is the same; it is not measured here.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/pattern/pattern.h"
#include "tools/fleet/fleet.h"

namespace memsnap {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kSeed = 7;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

[[noreturn]] void die(const std::string& what) {
  std::cerr << "memsnap-handover-bench: " << what << "\n";
  std::exit(1);
}

std::string loadavg() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return a + " " + b + " " + c;
}

// utime + stime of a process, every thread it ever had (10 ms ticks here).
double process_cpu_ticks_seconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  std::getline(in, stat);
  const auto close = stat.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream rest(stat.substr(close + 2));
  std::vector<std::string> f;
  for (std::string s; rest >> s;) f.push_back(s);
  // f[0] is field 3 (state): utime is field 14, stime 15.
  if (f.size() < 13) return -1;
  const double tick = double(::sysconf(_SC_CLK_TCK));
  return (std::stod(f[11]) + std::stod(f[12])) / tick;
}

// Sum of the run time of the threads a process has now (ns precision; a thread that ended is
// not in it).
double threads_runtime_seconds(pid_t pid) {
  double sum = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec)) {
    std::ifstream in(e.path() / "schedstat");
    unsigned long long ns = 0;
    if (in >> ns) sum += double(ns) * 1e-9;
  }
  return sum;
}

double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

std::uint64_t parse_size(const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  std::uint64_t mult = 1;
  switch (end && *end ? std::toupper(static_cast<unsigned char>(*end)) : 0) {
    case 0:
      break;
    case 'K':
      mult = 1ULL << 10;
      break;
    case 'M':
      mult = 1ULL << 20;
      break;
    case 'G':
      mult = 1ULL << 30;
      break;
    default:
      die("bad size " + s + " (a number with K, M or G)");
  }
  const auto bytes = std::uint64_t(v * double(mult));
  if (bytes == 0 || bytes % kPage != 0) die("size " + s + " is not a positive multiple of 4 KiB");
  return bytes;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, ',');) {
    if (!part.empty()) out.push_back(part);
  }
  return out;
}

std::string size_name(std::uint64_t bytes) {
  if (bytes % (1ULL << 30) == 0) return std::to_string(bytes >> 30) + "G";
  if (bytes % (1ULL << 20) == 0) return std::to_string(bytes >> 20) + "M";
  return std::to_string(bytes >> 10) + "K";
}

// Repetitions for a size when none are given: the brief's 10 / 7 / 5.
int default_reps(std::uint64_t bytes) {
  if (bytes <= (256ULL << 20)) return 10;
  if (bytes <= (1ULL << 30)) return 7;
  return 5;
}

struct RefWay {
  std::string name;
  std::uint64_t chunk;
  bool direct;
  std::string label;
};

const std::vector<RefWay>& all_ref_ways() {
  static const std::vector<RefWay> ways = {
      {"write1m", 1ULL << 20, false, "write() 1 MiB calls + fsync"},
      {"write4m", 4ULL << 20, false, "write() 4 MiB calls + fsync"},
      {"write16m", 16ULL << 20, false, "write() 16 MiB calls + fsync"},
      {"direct4m", 4ULL << 20, true, "O_DIRECT 4 MiB calls + fsync"},
  };
  return ways;
}

struct Options {
  std::vector<std::uint64_t> sizes;
  std::vector<int> reps;  // one per size
  std::vector<RefWay> refs;
  std::vector<std::string> kinds = {"copy", "handover"};  // and early, late
  std::string out = "handover.json";
  std::string base_dir;
  bool warmup = true;
  // memsnapd settings for the run (--daemon-set KEY=VALUE), e.g. state.directory= to compare
  // pauses without the registry's writes.
  std::vector<std::string> daemon_sets;
};

void usage() {
  std::cerr
      << "usage: memsnap-handover-bench [--sizes 256M,1G,4G] [--reps N | N1,N2,...]\n"
         "           [--refs write1m,write4m,write16m,direct4m | none]\n"
         "           [--kinds copy,handover,early,early_map,late,live,copy_continue]\n"
         "           [--out FILE] [--dir DIR] [--no-warmup] [--daemon-set KEY=VALUE]...\n"
         "  defaults from $MEMSNAP_HANDOVER_SIZES, $MEMSNAP_HANDOVER_REPS; reps default 10 up to\n"
         "  256M, 7 up to 1G, 5 above; DIR (snapshots, reference files) $MEMSNAP_BENCH_DIR or "
         "/var/tmp\n";
}

Options parse(int argc, char** argv) {
  Options o;
  std::string sizes =
      std::getenv("MEMSNAP_HANDOVER_SIZES") ? std::getenv("MEMSNAP_HANDOVER_SIZES") : "256M,1G,4G";
  std::string reps =
      std::getenv("MEMSNAP_HANDOVER_REPS") ? std::getenv("MEMSNAP_HANDOVER_REPS") : "";
  std::string refs = "write1m,write4m,write16m,direct4m";
  std::string kinds = "copy,handover";
  o.base_dir = std::getenv("MEMSNAP_BENCH_DIR") ? std::getenv("MEMSNAP_BENCH_DIR") : "/var/tmp";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        usage();
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--sizes")
      sizes = next();
    else if (a == "--reps")
      reps = next();
    else if (a == "--refs")
      refs = next();
    else if (a == "--kinds")
      kinds = next();
    else if (a == "--out")
      o.out = next();
    else if (a == "--dir")
      o.base_dir = next();
    else if (a == "--no-warmup")
      o.warmup = false;
    else if (a == "--daemon-set")
      o.daemon_sets.push_back(next());
    else if (a == "-h" || a == "--help") {
      usage();
      std::exit(0);
    } else {
      usage();
      std::exit(2);
    }
  }
  for (const auto& s : split(sizes)) o.sizes.push_back(parse_size(s));
  if (o.sizes.empty()) die("no sizes");
  const auto r = split(reps);
  for (std::size_t i = 0; i < o.sizes.size(); ++i) {
    if (r.empty())
      o.reps.push_back(default_reps(o.sizes[i]));
    else if (r.size() == 1)
      o.reps.push_back(std::stoi(r[0]));
    else if (r.size() == o.sizes.size())
      o.reps.push_back(std::stoi(r[i]));
    else
      die("--reps: one number, or one per size");
    if (o.reps.back() < 1) die("--reps must be >= 1");
  }
  o.kinds = split(kinds);
  for (const auto& k : o.kinds) {
    if (k != "copy" && k != "handover" && k != "early" && k != "early_map" && k != "late" &&
        k != "live" && k != "copy_continue") {
      die("unknown kind " + k + " (copy, handover, early, early_map, late, live, copy_continue)");
    }
  }
  if (o.kinds.empty()) die("no kinds");
  if (refs != "none") {
    for (const auto& name : split(refs)) {
      auto it = std::find_if(all_ref_ways().begin(), all_ref_ways().end(),
                             [&](const RefWay& w) { return w.name == name; });
      if (it == all_ref_ways().end()) die("unknown reference way " + name);
      o.refs.push_back(*it);
    }
  }
  return o;
}

// The guest's bytes in the bench's own memory: the reference's source.
struct Buffer {
  char* data = nullptr;
  std::uint64_t size = 0;
  explicit Buffer(std::uint64_t bytes) : size(bytes) {
    data = static_cast<char*>(
        ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (data == MAP_FAILED)
      die("mmap of the reference buffer: " + std::string(std::strerror(errno)));
    ::madvise(data, size, MADV_NOHUGEPAGE);  // as the stand-in's guest memory
    for (std::uint64_t p = 0; p < size / kPage; ++p) {
      pattern::fill_page(data + p * kPage, kPage, kSeed, p, 1);
    }
  }
  ~Buffer() { ::munmap(data, size); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

json run_reference(const RefWay& way, const Buffer& buf, const std::string& dir) {
  const std::string path = dir + "/reference";
  ::unlink(path.c_str());
  const double c0 = thread_cpu_seconds();
  const auto t0 = Clock::now();
  const int fd = ::open(
      path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | (way.direct ? O_DIRECT : 0), 0600);
  if (fd < 0) die("open " + path + ": " + std::strerror(errno));
  for (std::uint64_t done = 0; done < buf.size;) {
    const std::uint64_t want = std::min(way.chunk, buf.size - done);
    const ssize_t n = ::write(fd, buf.data + done, want);
    if (n != static_cast<ssize_t>(want)) die("write " + path + ": " + std::strerror(errno));
    done += want;
  }
  if (::fsync(fd) != 0) die("fsync " + path + ": " + std::strerror(errno));
  ::close(fd);
  const double wall = seconds_since(t0);
  const double cpu = thread_cpu_seconds() - c0;
  ::unlink(path.c_str());
  return {{"kind", "ref"},     {"way", way.name},          {"label", way.label},
          {"durable_s", wall}, {"client_durable_s", wall}, {"cpu_s", cpu},
          {"bytes", buf.size}};
}

// A memfd-backed stand-in whose every page holds the pattern (all of guest memory is data).
fleet::SandboxSpec bench_spec(const std::string& id, std::uint64_t size) {
  fleet::SandboxSpec spec;
  spec.id = id;
  spec.size = size;
  spec.backing = "memfd";
  spec.seed = kSeed;
  spec.zero_fraction = 0;
  return spec;
}

// Ends a sandbox with its VMM (?force=true) and frees its snapshots' disk.
void remove_sandbox(fleet::Daemon& daemon, std::unique_ptr<fleet::Sandbox>& sb,
                    const std::string& id) {
  auto removed = daemon.call("DELETE", "/v1/sandboxes/" + id + "?force=true");
  if (!removed.ok() || !removed->ok()) die("delete " + id);
  sb.reset();
  std::error_code ec;
  fs::remove_all(fs::path(daemon.snapshot_dir()) / id, ec);
}

// One pause of a fresh stand-in through memsnapd, in `mode`.
json run_pause(fleet::Daemon& daemon, const std::string& mode, std::uint64_t size,
               const std::string& id) {
  const fleet::SandboxSpec spec = bench_spec(id, size);
  const auto l0 = Clock::now();
  auto launched = fleet::Sandbox::launch(daemon, spec);
  const double launch = seconds_since(l0);
  if (!launched.ok()) die("launch " + id + ": " + launched.error().to_string());
  std::unique_ptr<fleet::Sandbox> sb = std::move(*launched);

  const json body = {
      {"strategy", "memfd"}, {"mode", mode}, {"sync", true}, {"parent", "none"}, {"after", "stop"}};
  // The API's floor for this caller: a GET of the same sandbox, just before (a new connection,
  // as the pause's).
  const auto g0 = Clock::now();
  auto got = daemon.call("GET", "/v1/sandboxes/" + id);
  const double client_get = seconds_since(g0);
  if (!got.ok() || !got->ok()) die("get " + id);

  const pid_t d = daemon.pid();
  const double ticks0 = process_cpu_ticks_seconds(d);
  const double rt0 = threads_runtime_seconds(d);
  const auto t0 = Clock::now();
  auto answer =
      daemon.call("POST", "/v1/sandboxes/" + id + "/pause", body, std::chrono::seconds(600));
  const double client_answer = seconds_since(t0);
  const double rt1 = threads_runtime_seconds(d);
  const double ticks1 = process_cpu_ticks_seconds(d);
  if (!answer.ok()) die("pause " + id + ": " + answer.error().to_string());
  if (!answer->ok()) die("pause " + id + ": " + answer->error_text());
  const json a = answer->body;
  if (a.value("mode", "") != mode) {
    die("pause " + id + " ran as " + a.value("mode", "?") + ", not " + mode + ": " +
        a["mode_fallback"].dump());
  }
  // The orchestrator ends the stopped VMM as soon as it has the answer.
  sb->vmm()->kill();

  json r = {{"kind", mode},
            {"client_answer_s", client_answer},
            {"client_get_s", client_get},
            {"launch_s", launch},  // spawn, fill every page, register (not part of any figure)
            {"handover_s", a.at("handover_seconds").get<double>()},
            {"memsnapd_threads_cpu_answer_s", rt1 - rt0}};
  json last;
  double client_durable = client_answer;
  double ticks2 = ticks1;
  if (mode == "handover") {
    if (a.value("durable", true)) die("a handover answer that says durable");
    auto waited =
        daemon.call("GET", "/v1/sandboxes/" + id + "?wait_while=exporting&timeout_ms=600000",
                    nullptr, std::chrono::seconds(610));
    client_durable = seconds_since(t0);
    ticks2 = process_cpu_ticks_seconds(d);
    if (!waited.ok()) die("wait " + id + ": " + waited.error().to_string());
    if (!waited->ok()) die("wait " + id + ": " + waited->error_text());
    last = waited->body.at("last_pause");
    if (!last.value("durable", false) || waited->body.value("state", "") != "paused") {
      die("export of " + id + " ended " + waited->body.value("state", "?") + ": " +
          waited->body.value("last_error", json("")).dump());
    }
    r["durable_s"] = last.at("durable_seconds").get<double>();
    r["export_cpu_s"] = last.at("export").at("cpu_seconds").get<double>();
    r["export_attempts"] = last.at("export").value("attempts", 0);
    r["memsnapd_cpu_s"] = ticks2 - ticks0;  // answer + following the export + the wait
    r["bytes"] = last.value("bytes", std::uint64_t(0));
    r["data_bytes"] = last.value("data_bytes", std::uint64_t(0));
  } else {
    last = a;
    r["durable_s"] = a.at("handover_seconds").get<double>();  // the whole pause, server side
    r["pause_cpu_s"] = a.at("cpu_seconds").get<double>();
    r["memsnapd_cpu_s"] = ticks1 - ticks0;
    r["bytes"] = a.value("bytes", std::uint64_t(0));
    r["data_bytes"] = a.value("data_bytes", std::uint64_t(0));
  }
  r["client_durable_s"] = client_durable;
  if (last.contains("report") && last["report"].is_object()) {
    r["report_wall_s"] = last["report"].value("wall_seconds", 0.0);
    r["report_cpu_s"] = last["report"].value("cpu_seconds", 0.0);
    // Where the time went (resolve, freeze, read, write, fsync, ...): kept for the reader of the
    // results file, not part of any table.
    if (last["report"].contains("phases")) r["phases"] = last["report"]["phases"];
  }
  r["seconds"] = last.value("seconds", 0.0);
  if (r["bytes"].get<std::uint64_t>() != size) {
    die("pause " + id + " exported " + r["bytes"].dump() + " bytes of " + std::to_string(size));
  }

  // Unregister (memsnapd drops the memfd it kept for a warm resume) and free the disk.
  auto removed = daemon.call("DELETE", "/v1/sandboxes/" + id);
  if (!removed.ok() || !removed->ok()) {
    die("delete " + id + ": " +
        (removed.ok() ? removed->error_text() : removed.error().to_string()));
  }
  for (const auto& p : removed->body.value("snapshots", json::array())) {
    std::error_code ec;
    fs::remove(p.get<std::string>(), ec);
  }
  std::error_code ec;
  fs::remove_all(fs::path(daemon.snapshot_dir()) / id, ec);
  // memsnapd must hold no guest memory now, or the next rounds pile it up.
  int memfds = 0;
  for (const auto& e : fs::directory_iterator("/proc/" + std::to_string(d) + "/fd", ec)) {
    std::error_code lec;
    if (fs::read_symlink(e.path(), lec).string().starts_with("/memfd:")) ++memfds;
  }
  r["memsnapd_memfds_after"] = memfds;
  if (memfds != 0)
    std::cerr << "warning: memsnapd still holds " << memfds << " memfd(s) after " << id << "\n";
  return r;
}

// The pause (handover) of a fresh stand-in, then its resume: early (at once, from the held
// memory) or late (once durable, warm). See the head of this file.
json run_resume(fleet::Daemon& daemon, const std::string& kind, std::uint64_t size,
                const std::string& id) {
  const bool early = kind != "late";
  const fleet::SandboxSpec spec = bench_spec(id, size);
  auto launched = fleet::Sandbox::launch(daemon, spec);
  if (!launched.ok()) die("launch " + id + ": " + launched.error().to_string());
  std::unique_ptr<fleet::Sandbox> sb = std::move(*launched);
  const std::string wait = "/v1/sandboxes/" + id + "?wait_while=exporting&timeout_ms=600000";

  const auto t0 = Clock::now();
  auto paused = sb->pause({{"strategy", "memfd"},
                           {"mode", "handover"},
                           {"sync", true},
                           {"parent", "none"},
                           {"after", "stop"}});  // kills the stopped VMM
  const double answer = seconds_since(t0);
  if (!paused.ok()) die("pause " + id + ": " + paused.error().to_string());
  if (paused->value("mode", "") != "handover") die("pause " + id + " did not hand over");
  json r = {{"kind", kind},
            {"client_answer_s", answer},
            {"handover_s", paused->at("handover_seconds").get<double>()}};
  if (!early) {
    auto waited = daemon.call("GET", wait, nullptr, std::chrono::seconds(610));
    if (!waited.ok() || !waited->ok() || !waited->body.value("durable", false)) {
      die("wait " + id);
    }
    r["durable_s"] = waited->body["last_pause"].at("durable_seconds").get<double>();
  }
  const auto r0 = Clock::now();
  auto resumed = sb->resume(kind == "late"        ? json{{"mode", "warm"}}
                            : kind == "early_map" ? json{{"map_ahead", true}}
                                                  : json{{"map_ahead", false}});
  r["pause_to_running_s"] = seconds_since(t0);
  r["resume_wall_s"] = seconds_since(r0);  // POST, the VMM's spawn and handshake, running
  if (!resumed.ok()) die("resume " + id + ": " + resumed.error().to_string());
  if (resumed->value("before_durable", false) != early) {
    die("resume " + id + ": before_durable is " + resumed->value("before_durable", json()).dump());
  }
  r["ready_s"] = resumed->at("ready_seconds").get<double>();
  r["resume_mode"] = resumed->value("mode", "");
  const auto v0 = Clock::now();
  auto bad = sb->verify();
  r["touch_all_s"] = seconds_since(v0);
  r["pause_to_work_s"] = seconds_since(t0);
  if (!bad.ok() || *bad != 0) die("the resumed guest " + id + " does not hold its memory");
  if (early) {
    auto waited = daemon.call("GET", wait, nullptr, std::chrono::seconds(610));
    if (!waited.ok() || !waited->ok() || !waited->body.value("durable", false)) {
      die("wait " + id);
    }
    r["durable_s"] = waited->body["last_pause"].at("durable_seconds").get<double>();
  }
  auto got = daemon.call("GET", "/v1/sandboxes/" + id);
  if (got.ok() && got->ok() && got->body.contains("faults")) {
    r["fill_s"] = got->body["faults"].value("fill_seconds", 0.0);
    r["faults"] = got->body["faults"].value("faults", std::uint64_t(0));
    r["mapped_ahead_bytes"] = got->body["faults"].value("mapped_ahead_bytes", std::uint64_t(0));
  }
  remove_sandbox(daemon, sb, id);
  return r;
}

// A pause with after "continue" of a served sandbox whose VMM sends its write faults to memsnap:
// mode live (kind live) or copy (kind copy_continue). See the head of this file.
json run_live(fleet::Daemon& daemon, const std::string& kind, std::uint64_t size,
              const std::string& id) {
  fleet::SandboxSpec spec = bench_spec(id, size);
  spec.write_faults = true;
  auto launched = fleet::Sandbox::launch(daemon, spec);
  if (!launched.ok()) die("launch " + id + ": " + launched.error().to_string());
  std::unique_ptr<fleet::Sandbox> sb = std::move(*launched);
  auto first = sb->pause({{"strategy", "memfd"}, {"parent", "none"}, {"after", "stop"}});
  if (!first.ok()) die("pause " + id + ": " + first.error().to_string());
  auto resumed = sb->resume();
  if (!resumed.ok()) die("resume " + id + ": " + resumed.error().to_string());
  if (!resumed->at("report").value("write_faults", false))
    die("resume " + id + ": no write faults");
  GuestProcess& vmm = *sb->vmm();
  const auto d0 = Clock::now();
  auto dirtied = sb->dirty(0.25, 11, /*sequential=*/false);
  const double dirty_s = seconds_since(d0);
  if (!dirtied.ok()) die("dirty " + id + ": " + dirtied.error().to_string());
  constexpr std::uint64_t kLoop = 4096;
  if (!vmm.write_loop(0, kLoop).ok()) die("write-loop " + id);
  // The loop's own speed, for as long as the pause will take at most (1 s is plenty at 1 GiB).
  auto rounds = [&] {
    auto n = vmm.write_rounds();
    if (!n.ok()) die("write-status " + id);
    return *n;
  };
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // past its first round's faults
  const std::uint64_t b0 = rounds();
  const auto bt = Clock::now();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const std::uint64_t b1 = rounds();
  const double before_rate = double(b1 - b0) / seconds_since(bt);

  const std::string mode = kind == "live" ? "live" : "copy";
  const std::uint64_t p0 = rounds();
  const auto t0 = Clock::now();
  auto paused =
      sb->pause({{"strategy", "memfd"}, {"mode", mode}, {"sync", true}, {"after", "continue"}});
  const double answer = seconds_since(t0);
  const std::uint64_t p1 = rounds();
  if (!paused.ok()) die("pause " + id + ": " + paused.error().to_string());
  if (paused->value("mode", "") != mode) die("pause " + id + " ran " + paused->dump());
  auto stopped = vmm.write_stop();
  if (!stopped.ok()) die("write-stop " + id);
  json r = {{"kind", kind},
            {"client_answer_s", answer},
            {"durable_s", paused->at("seconds").get<double>()},
            {"stopped_s", paused->at("stopped_seconds").get<double>()},
            {"bytes", paused->value("bytes", std::uint64_t(0))},
            {"dirty_s", dirty_s},
            {"pause_cpu_s", paused->value("cpu_seconds", 0.0)},
            {"loop_rounds_per_s_before", before_rate},
            {"loop_rounds_per_s_during", double(p1 - p0) / answer},
            {"loop_rate_ratio", before_rate > 0 ? double(p1 - p0) / answer / before_rate : 0.0},
            {"live_copies", paused->contains("live") ? paused->at("live").value("copies", 0) : 0}};
  if (paused->contains("report") && paused->at("report").contains("phases")) {
    r["phases"] = paused->at("report")["phases"];
  }
  auto bad = sb->verify();
  if (!bad.ok() || *bad != 0) die("the guest " + id + " does not hold its memory");
  remove_sandbox(daemon, sb, id);
  return r;
}

void write_json(const std::string& path, const json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump(1) << "\n";
    if (!out) die("cannot write " + tmp);
  }
  fs::rename(tmp, path);
}

int run(int argc, char** argv) {
  const Options o = parse(argc, argv);
  std::string templ = o.base_dir + "/memsnap-handover-bench-XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) die("mkdtemp " + templ + ": " + std::strerror(errno));
  const std::string dir = templ;

  fleet::DaemonOptions dopt;
  dopt.dir = dir;
  dopt.metrics = false;
  dopt.overrides = o.daemon_sets;
  auto started = fleet::Daemon::start(dopt);
  if (!started.ok()) die("memsnapd: " + started.error().to_string());
  std::unique_ptr<fleet::Daemon> daemon = std::move(*started);

  std::string command;
  for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);
  utsname u{};
  ::uname(&u);
  json sizes = json::array();
  for (std::size_t i = 0; i < o.sizes.size(); ++i) {
    sizes.push_back({{"bytes", o.sizes[i]}, {"name", size_name(o.sizes[i])}, {"reps", o.reps[i]}});
  }
  json results = {{"context",
                   {{"bench", "memsnap-handover-bench"},
                    {"command", command},
                    {"date",
                     [] {
                       char b[64];
                       const std::time_t t = std::time(nullptr);
                       std::strftime(b, sizeof(b), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
                       return std::string(b);
                     }()},
                    {"kernel", std::string(u.release)},
                    {"cpus", ::sysconf(_SC_NPROCESSORS_ONLN)},
                    {"dir", dir},
                    {"strategy", "memfd"},
                    {"sync", true},
                    {"load_start", loadavg()},
                    {"sizes", sizes},
                    {"refs",
                     [&] {
                       json r = json::array();
                       for (const auto& w : o.refs)
                         r.push_back({{"way", w.name}, {"label", w.label}});
                       return r;
                     }()}}},
                  {"runs", json::array()}};

  if (o.warmup) {  // the daemon's first pauses (plugin, exporter binary, page cache): not counted
    std::cerr << "warm-up (64M copy + handover, not recorded)\n";
    run_pause(*daemon, "copy", 64ULL << 20, "warmup-copy");
    run_pause(*daemon, "handover", 64ULL << 20, "warmup-handover");
  }

  for (std::size_t si = 0; si < o.sizes.size(); ++si) {
    const std::uint64_t size = o.sizes[si];
    const std::string sn = size_name(size);
    std::unique_ptr<Buffer> buf;
    if (!o.refs.empty()) buf = std::make_unique<Buffer>(size);
    // What one round runs; rotated by one each round so no kind is always first or last.
    std::vector<std::string> kinds = o.kinds;
    for (const auto& w : o.refs) kinds.push_back("ref:" + w.name);
    for (int rep = 0; rep < o.reps[si]; ++rep) {
      for (std::size_t k = 0; k < kinds.size(); ++k) {
        const std::string& kind = kinds[(k + std::size_t(rep)) % kinds.size()];
        const std::string load = loadavg();
        json r;
        if (kind.rfind("ref:", 0) == 0) {
          const auto& way = *std::find_if(o.refs.begin(), o.refs.end(),
                                          [&](const RefWay& w) { return "ref:" + w.name == kind; });
          r = run_reference(way, *buf, dir);
        } else if (kind == "live" || kind == "copy_continue") {
          r = run_live(*daemon, kind, size, "hb-" + sn + "-" + std::to_string(rep) + "-" + kind);
        } else if (kind == "early" || kind == "early_map" || kind == "late") {
          r = run_resume(*daemon, kind, size, "hb-" + sn + "-" + std::to_string(rep) + "-" + kind);
        } else {
          r = run_pause(*daemon, kind, size, "hb-" + sn + "-" + std::to_string(rep) + "-" + kind);
        }
        r["size"] = size;
        r["size_name"] = sn;
        r["rep"] = rep;
        r["order"] = k;
        r["load"] = load;
        std::fprintf(stderr, "%-5s rep %2d %-14s answer %9.3f ms  durable %8.3f s  (load %s)\n",
                     sn.c_str(), rep, kind.c_str(), r.value("client_answer_s", 0.0) * 1e3,
                     r.value("durable_s", 0.0), load.c_str());
        if (r.contains("stopped_s")) {
          std::fprintf(stderr, "      stopped %.3f ms  loop during/before %.2f  live copies %llu\n",
                       r["stopped_s"].get<double>() * 1e3, r["loop_rate_ratio"].get<double>(),
                       static_cast<unsigned long long>(r["live_copies"].get<std::uint64_t>()));
        }
        if (r.contains("ready_s")) {
          std::fprintf(stderr,
                       "      ready %.3f ms  running %.3f s  working %.3f s after the pause\n",
                       r["ready_s"].get<double>() * 1e3, r["pause_to_running_s"].get<double>(),
                       r["pause_to_work_s"].get<double>());
        }
        results["runs"].push_back(r);
      }
      write_json(o.out, results);  // partial results survive an interrupted run
    }
  }
  results["context"]["load_end"] = loadavg();
  write_json(o.out, results);
  daemon.reset();
  std::error_code ec;
  fs::remove_all(dir, ec);
  std::cerr << "results in " << o.out << " (tools/bench/handover_ratios.py " << o.out << ")\n";
  return 0;
}

}  // namespace
}  // namespace memsnap

int main(int argc, char** argv) { return memsnap::run(argc, argv); }
