// memsnap's client mode: `memsnap --socket PATH COMMAND ...` (or $MEMSNAP_SOCKET) asks memsnapd
// to do the work, over its control API (HTTP/1.1 + JSON on a Unix socket, docs/api.md), instead
// of doing it in this process.
//
//   health | config | sandboxes | sandbox ID | register | pause ID | resume ID | strategy ID |
//   unregister ID [--force]
//
// Output: a short human summary on stdout, or with --json the server's JSON answer exactly as it
// came (also for an error answer). Errors: "memsnap: <code>: <message>" on stderr, where <code>
// is the API's stable error code (docs/api.md), and the exit code says who failed:
//   0  done
//   1  memsnapd answered with an error (or a resume --wait ended with the sandbox not running)
//   2  usage error (nothing was sent)
//   3  memsnapd could not be reached or gave no usable answer (no socket, refused, timed out)
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tools/control_api/http_client.h"
#include "tools/memsnap/cli.h"

namespace memsnap::cli {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;

// How long one call may take as a whole (connect, send, the server's work, the answer).
constexpr milliseconds kQuickCall{30000};
// A pause may wait up to memsnapd's queue timeout (60 s) for a slot, then export a large guest.
constexpr milliseconds kPauseCall{30 * 60 * 1000};
// A resume verifies every checksum of the chain before it answers.
constexpr milliseconds kResumeCall{10 * 60 * 1000};
// What a wait (GET ?wait_while=) may take beyond its own timeout_ms.
constexpr milliseconds kWaitMargin{30000};
// resume --wait without --timeout-ms.
constexpr std::uint64_t kDefaultResumeWaitMs = 60000;

// Percent-encodes everything but RFC 3986 unreserved characters (ids are [A-Za-z0-9._-], but
// a mistyped one must still reach the server as one path segment).
std::string encode(const std::string& text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '.' || c == '_' || c == '~') {
      out.push_back(c);
    } else {
      out.push_back('%');
      out.push_back(kHex[u >> 4]);
      out.push_back(kHex[u & 15]);
    }
  }
  return out;
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, sep)) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// A plain decimal integer (a pid, an fd number, milliseconds).
std::uint64_t parse_uint(const std::string& text, const std::string& what) {
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos ||
      text.size() > 19) {
    throw std::invalid_argument(what + " must be a non-negative integer, not '" + text + "'");
  }
  return std::stoull(text);
}

// ---- reading answers without throwing on a missing or differently typed field ----

std::string str(const json& j, const char* key, const std::string& fallback = "") {
  if (!j.is_object() || !j.contains(key)) return fallback;
  const json& v = j[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return fallback;
  return v.dump();
}

double num(const json& j, const char* key) {
  if (!j.is_object() || !j.contains(key) || !j[key].is_number()) return 0;
  return j[key].get<double>();
}

std::uint64_t uint_of(const json& j, const char* key) {
  if (!j.is_object() || !j.contains(key) || !j[key].is_number_unsigned()) return 0;
  return j[key].get<std::uint64_t>();
}

bool yes(const json& j, const char* key) {
  return j.is_object() && j.contains(key) && j[key].is_boolean() && j[key].get<bool>();
}

std::string ms(double seconds) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), seconds * 1e3 < 10 ? "%.2f ms" : "%.1f ms", seconds * 1e3);
  return buf;
}

// "freeze 0.1 ms, export 12.0 ms, ...": phases ({name: seconds}) in the order the pipelines run
// them (JSON objects come back sorted by name), then any others.
std::string phases_text(const json& phases) {
  if (!phases.is_object() || phases.empty()) return "-";
  static const char* const kOrder[] = {
      "resolve", "prepare_live", "freeze", "dirty_set", "arm_live", "export",    "commit",
      "thaw",    "open",         "listen", "wait_vmm",  "fill",     "hand_over", "serve"};
  std::vector<std::string> names;
  for (const char* n : kOrder) {
    if (phases.contains(n)) names.emplace_back(n);
  }
  for (const auto& [name, value] : phases.items()) {
    bool known = false;
    for (const char* n : kOrder) known = known || name == n;
    if (!known) names.push_back(name);
  }
  std::string out;
  for (const auto& n : names) {
    const json& v = phases[n];
    // A PauseReport's phases are {wall_seconds, cpu_seconds}; the API's own are plain seconds.
    const double seconds = v.is_number() ? v.get<double>() : num(v, "wall_seconds");
    out += (out.empty() ? "" : ", ") + n + " " + ms(seconds);
  }
  return out;
}

std::string fallback_text(const json& fallback) {
  if (!fallback.is_object()) return "none";
  return str(fallback, "from") + " -> " + str(fallback, "to") + ": " + str(fallback, "reason") +
         (str(fallback, "detail").empty() ? "" : " (" + str(fallback, "detail") + ")");
}

std::string list_text(const json& items) {
  if (!items.is_array() || items.empty()) return "none";
  std::string out;
  for (const auto& i : items)
    out += (out.empty() ? "" : ", ") + (i.is_string() ? i.get<std::string>() : i.dump());
  return out;
}

// ---- talking to memsnapd ----

class Client {
 public:
  Client(std::string socket, bool json_output)
      : socket_(std::move(socket)), json_output_(json_output) {}

  bool json_output() const { return json_output_; }

  // One call. On success (2xx with a JSON body) returns the body and, with --json, has printed
  // it. Otherwise prints the error, sets exit_code and returns nullopt.
  std::optional<json> call(const std::string& method, const std::string& target, const json& body,
                           milliseconds timeout, bool print = true) {
    control_api::UnixHttpClient client(socket_, timeout);
    auto answer = client.call(method, target, body.is_null() ? std::string() : body.dump());
    if (!answer.ok()) {
      const Error& e = answer.error();
      std::string hint;
      if (e.message.rfind("cannot connect", 0) == 0) {
        hint =
            " (is memsnapd running? its socket is control.socket in its configuration; give "
            "it with --socket PATH or $MEMSNAP_SOCKET)";
      }
      std::fprintf(stderr, "memsnap: %s: %s%s\n", std::string(errc_name(e.code)).c_str(),
                   e.message.c_str(), hint.c_str());
      exit_code = 3;
      return std::nullopt;
    }
    const control_api::ClientResponse& r = *answer;
    const bool success = r.status >= 200 && r.status < 300;
    if (json_output_ && (print || !success)) {
      std::fputs(r.body.c_str(), stdout);
      if (r.body.empty() || r.body.back() != '\n') std::fputc('\n', stdout);
      std::fflush(stdout);
    }
    if (!success) {
      if (auto e = control_api::parse_api_error(r.body)) {
        std::fprintf(stderr, "memsnap: %s: %s\n", e->code.c_str(), e->message.c_str());
      } else {
        std::fprintf(stderr, "memsnap: http_%d: %s %s answered HTTP %d: %s\n", r.status,
                     method.c_str(), target.c_str(), r.status, r.body.substr(0, 500).c_str());
      }
      exit_code = 1;
      return std::nullopt;
    }
    json parsed = json::parse(r.body, nullptr, /*allow_exceptions=*/false);
    if (parsed.is_discarded()) {
      std::fprintf(stderr,
                   "memsnap: io_error: %s answered %s %s with HTTP %d and a body that is "
                   "not JSON\n",
                   socket_.c_str(), method.c_str(), target.c_str(), r.status);
      exit_code = 3;
      return std::nullopt;
    }
    return parsed;
  }

  int exit_code = 0;

 private:
  std::string socket_;
  bool json_output_;
};

std::string one_id(Args& args, const std::string& command) {
  const auto words = args.positional();
  if (words.size() != 1) {
    throw std::invalid_argument(
        command + " takes one sandbox ID" +
        (words.empty() ? "" : " (got " + std::to_string(words.size()) + ")"));
  }
  return words.front();
}

std::string sandbox_path(const std::string& id) { return "/v1/sandboxes/" + encode(id); }

// ---- summaries ----

void print_pause(const json& a) {
  if (!a.value("durable", true)) {
    const json& e = a.value("export", json::object());
    std::printf("paused %s: handed over in %s; %s is being exported in the background (%s)\n",
                str(a, "id").c_str(), ms(num(a, "handover_seconds")).c_str(),
                str(a, "snapshot").c_str(), str(e, "state", "running").c_str());
    std::printf("  strategy   %s, mode handover\n", str(a, "strategy").c_str());
    std::printf("  durable    not yet: memsnap sandbox %s --wait-while exporting\n",
                str(a, "id").c_str());
    return;
  }
  std::printf("paused %s: generation %llu -> %s\n", str(a, "id").c_str(),
              static_cast<unsigned long long>(uint_of(a, "generation")),
              str(a, "snapshot").c_str());
  if (a.contains("mode")) {
    const json& f = a.value("mode_fallback", json());
    std::printf("  mode       %s%s (answered in %s%s)\n", str(a, "mode").c_str(),
                f.is_object() ? (" instead of " + str(f, "from") + ": " + str(f, "reason")).c_str()
                              : "",
                ms(num(a, "handover_seconds")).c_str(),
                a.contains("durable_seconds")
                    ? (", durable after " + ms(num(a, "durable_seconds"))).c_str()
                    : "");
  }
  std::string why = "requested " + str(a, "requested_strategy");
  if (!str(a, "variant").empty()) why += ", variant " + str(a, "variant");
  why += ", reason " + str(a, "reason");
  std::printf("  strategy   %s (%s)\n", str(a, "strategy").c_str(), why.c_str());
  std::printf("  fallback   %s\n", fallback_text(a.value("fallback", json())).c_str());
  std::printf("  parent     %s\n", str(a, "parent", "none (a base snapshot)").c_str());
  std::printf("  exported   %s (%s of data, %llu zero blocks); dirty set: %s\n",
              format_bytes(double(uint_of(a, "bytes"))).c_str(),
              format_bytes(double(uint_of(a, "data_bytes"))).c_str(),
              static_cast<unsigned long long>(uint_of(a, "zero_blocks")),
              str(a, "dirty_set_source", "-").c_str());
  std::printf("  released   %s of guest memory\n",
              format_bytes(double(uint_of(a, "memory_released"))).c_str());
  std::printf("  phases     %s (total %s)\n", phases_text(a.value("phases", json())).c_str(),
              ms(num(a, "seconds")).c_str());
  std::printf("  after      %s\n", str(a, "after") == "stop"
                                       ? "stop (the VMM stays stopped; the sandbox is paused)"
                                       : "continue (the VMM runs on; the sandbox is running)");
}

void print_resume_started(const json& a) {
  std::printf("resuming %s: memsnapd listens on %s (strategy %s, mode %s, %zu snapshot(s))\n",
              str(a, "id").c_str(), str(a, "handshake_socket").c_str(), str(a, "strategy").c_str(),
              str(a, "mode").c_str(),
              a.contains("snapshots") && a["snapshots"].is_array() ? a["snapshots"].size() : 0);
}

void print_last_resume(const json& r, const char* indent) {
  std::printf("%sVMM pid %s ready in %s (mode %s: %s)\n", indent, str(r, "vmm_pid").c_str(),
              ms(num(r, "ready_seconds")).c_str(), str(r, "mode").c_str(),
              str(r, "mode_reason").c_str());
  std::printf("%sphases %s; write tracking %s\n", indent,
              phases_text(r.value("phases", json())).c_str(),
              yes(r, "write_tracking") ? "on" : "off");
}

void print_sandbox(const json& s) {
  std::printf("%s: %s\n", str(s, "id").c_str(), str(s, "state").c_str());
  std::printf("  vmm pid     %s\n", str(s, "vmm_pid").c_str());
  const std::size_t regions =
      s.contains("regions") && s["regions"].is_array() ? s["regions"].size() : 0;
  std::printf("  guest       %s in %zu region(s), memfd %s\n",
              format_bytes(double(uint_of(s, "guest_size"))).c_str(), regions,
              yes(s, "memfd") ? "yes" : "no");
  std::printf("  strategy    %s\n", str(s, "strategy", "-").c_str());
  std::printf("  snapshots   %s\n", list_text(s.value("snapshots", json())).c_str());
  if (yes(s, "warm_memory_kept")) {
    std::printf("  warm memory kept, %s resident (a warm resume is possible)\n",
                format_bytes(double(uint_of(s, "warm_memory_bytes"))).c_str());
  } else {
    std::printf("  warm memory not kept\n");
  }
  const json last_pause = s.contains("last_pause") ? s["last_pause"] : json();
  if (last_pause.is_object()) {
    std::printf("  last pause  generation %llu with %s, %s exported in %s, fallback %s\n",
                static_cast<unsigned long long>(uint_of(last_pause, "generation")),
                str(last_pause, "strategy").c_str(),
                format_bytes(double(uint_of(last_pause, "bytes"))).c_str(),
                ms(num(last_pause, "seconds")).c_str(),
                fallback_text(last_pause.value("fallback", json())).c_str());
  }
  const json last_resume = s.contains("last_resume") ? s["last_resume"] : json();
  if (last_resume.is_object()) {
    std::printf("  last resume\n");
    print_last_resume(last_resume, "    ");
  }
  if (s.contains("faults") && s["faults"].is_object()) {
    const json& f = s["faults"];
    std::printf("  faults      %llu served (%llu copies, %llu zero pages, %llu minor), mean %s\n",
                static_cast<unsigned long long>(uint_of(f, "faults")),
                static_cast<unsigned long long>(uint_of(f, "copies")),
                static_cast<unsigned long long>(uint_of(f, "zeropages")),
                static_cast<unsigned long long>(uint_of(f, "minor_faults")),
                ms(num(f, "mean_service_seconds")).c_str());
  }
  if (!str(s, "last_error").empty()) {
    std::printf("  last error  %s\n", str(s, "last_error").c_str());
  }
}

// ---- the commands ----

int client_health(Client& c, Args& args) {
  args.expect_done();
  auto a = c.call("GET", "/v1/health", nullptr, kQuickCall);
  if (!a) return c.exit_code;
  if (c.json_output()) return 0;
  std::printf("memsnapd %s: %llu sandbox(es); %s pause(s) and %s resume(s) in flight\n",
              str(*a, "status").c_str(), static_cast<unsigned long long>(uint_of(*a, "sandboxes")),
              str(*a, "pauses_in_flight").c_str(), str(*a, "resumes_in_flight").c_str());
  std::printf("  snapshots  %s\n", str(*a, "snapshot_dir").c_str());
  std::string plugins;
  if (a->contains("plugins") && (*a)["plugins"].is_array()) {
    for (const auto& p : (*a)["plugins"]) {
      plugins += (plugins.empty() ? "" : ", ") + str(p, "name") + " (" + str(p, "status") + ")";
    }
  }
  std::printf("  plugins    %s\n", plugins.empty() ? "none" : plugins.c_str());
  const json flags = a->value("flags", json());
  if (flags.is_object()) {
    std::printf("  flags      %s (generation %s; reloads: %s, %s unchanged, %s failed%s%s)\n",
                str(flags, "path").c_str(), str(flags, "generation").c_str(),
                str(flags, "reloads", "0").c_str(), str(flags, "reloads_unchanged", "0").c_str(),
                str(flags, "reloads_failed", "0").c_str(),
                str(flags, "last_error").empty() ? "" : "; not in force: ",
                str(flags, "last_error").c_str());
  } else {
    std::printf("  flags      none (every sandbox gets the fallback strategy)\n");
  }
  return 0;
}

int client_config(Client& c, Args& args) {
  args.expect_done();
  auto a = c.call("GET", "/v1/config", nullptr, kQuickCall);
  if (!a) return c.exit_code;
  if (!c.json_output()) std::fputs(str(*a, "yaml").c_str(), stdout);
  return 0;
}

int client_list(Client& c, Args& args) {
  args.expect_done();
  auto a = c.call("GET", "/v1/sandboxes", nullptr, kQuickCall);
  if (!a) return c.exit_code;
  if (c.json_output()) return 0;
  const json all = a->value("sandboxes", json::array());
  if (!all.is_array() || all.empty()) {
    std::printf("no sandboxes\n");
    return 0;
  }
  std::printf("%-24s %-9s %-18s %-9s %s\n", "ID", "STATE", "STRATEGY", "VMM_PID", "SNAPSHOTS");
  for (const auto& s : all) {
    std::printf("%-24s %-9s %-18s %-9s %s\n", str(s, "id").c_str(), str(s, "state").c_str(),
                str(s, "strategy", "-").c_str(), str(s, "vmm_pid").c_str(),
                str(s, "snapshots").c_str());
  }
  return 0;
}

int client_get(Client& c, Args& args) {
  const std::string wait = args.value("--wait-while");
  const std::string timeout = args.value("--timeout-ms");
  const std::string id = one_id(args, "sandbox");
  args.expect_done();
  std::string target = sandbox_path(id);
  milliseconds call_timeout = kQuickCall;
  if (!wait.empty()) {
    target += "?wait_while=" + encode(wait);
    // The server waits 30 s by default and at most 10 minutes.
    std::uint64_t wait_ms = 30000;
    if (!timeout.empty()) {
      wait_ms = std::min<std::uint64_t>(parse_uint(timeout, "--timeout-ms"), 600000);
      target += "&timeout_ms=" + std::to_string(wait_ms);
    }
    call_timeout = milliseconds(wait_ms) + kWaitMargin;
  } else if (!timeout.empty()) {
    throw std::invalid_argument("--timeout-ms goes with --wait-while");
  }
  auto a = c.call("GET", target, nullptr, call_timeout);
  if (!a) return c.exit_code;
  if (!c.json_output()) print_sandbox(*a);
  return 0;
}

int client_register(Client& c, Args& args) {
  const std::string id = args.value("--id");
  const std::string pid = args.value("--pid");
  const std::vector<std::string> region_args = args.values("--region");
  const std::string memfd_fd = args.value("--memfd-fd");
  const std::string guest_size = args.value("--guest-size");
  const std::vector<std::string> snapshots = args.values("--snapshot");
  const std::string strategy = args.value("--strategy");
  const std::vector<std::string> attrs = args.values("--attr");
  args.expect_done();
  if (id.empty()) throw std::invalid_argument("register needs --id ID");
  if (pid.empty() == snapshots.empty()) {
    throw std::invalid_argument(
        "register needs either --pid PID --region OFF:ADDR:SIZE... (a running VMM) or "
        "--snapshot PATH... (a paused sandbox)");
  }
  json body = {{"id", id}};
  if (!pid.empty()) {
    if (region_args.empty()) throw std::invalid_argument("--pid needs --region OFF:ADDR:SIZE");
    body["vmm_pid"] = parse_uint(pid, "--pid");
    json regions = json::array();
    for (const auto& arg : region_args) {
      for (const auto& item : split(arg, ',')) {
        const auto parts = split(item, ':');
        if (parts.size() != 3) {
          throw std::invalid_argument("--region takes GUEST_OFFSET:HOST_ADDR:SIZE, not '" + item +
                                      "'");
        }
        regions.push_back({{"guest_offset", parse_size(parts[0])},
                           {"host_addr", parse_size(parts[1])},
                           {"size", parse_size(parts[2])}});
      }
    }
    body["regions"] = regions;
    if (!memfd_fd.empty()) body["memfd_fd"] = parse_uint(memfd_fd, "--memfd-fd");
    if (!guest_size.empty()) body["guest_size"] = parse_size(guest_size);
    if (!strategy.empty()) {
      throw std::invalid_argument(
          "--strategy is for a paused sandbox (--snapshot); a pause takes its own --strategy");
    }
  } else {
    if (!region_args.empty() || !memfd_fd.empty() || !guest_size.empty()) {
      throw std::invalid_argument("--region, --memfd-fd and --guest-size go with --pid");
    }
    body["snapshots"] = snapshots;
    // The snapshot records its strategy (format 2); --strategy only for version 1 files.
    if (!strategy.empty()) body["strategy"] = strategy;
  }
  if (!attrs.empty()) {
    json a = json::object();
    for (const auto& kv : attrs) {
      const auto eq = kv.find('=');
      if (eq == std::string::npos || eq == 0) {
        throw std::invalid_argument("--attr takes KEY=VALUE, not '" + kv + "'");
      }
      const std::string key = kv.substr(0, eq);
      const std::string value = kv.substr(eq + 1);
      if (key == "memory_mib") {
        a[key] = parse_uint(value, "--attr memory_mib");
      } else if (key == "hugepages") {
        if (value != "true" && value != "false") {
          throw std::invalid_argument("--attr hugepages takes true or false");
        }
        a[key] = value == "true";
      } else {
        a[key] = value;  // memsnapd refuses keys it does not know, naming the ones it does
      }
    }
    body["attributes"] = a;
  }
  auto a = c.call("POST", "/v1/sandboxes", body, kQuickCall);
  if (!a) return c.exit_code;
  if (c.json_output()) return 0;
  if (str(*a, "state") == "paused") {
    std::printf("registered %s: paused, %zu snapshot(s), strategy %s, %s guest\n",
                str(*a, "id").c_str(), (*a)["snapshots"].is_array() ? (*a)["snapshots"].size() : 0,
                str(*a, "strategy").c_str(),
                format_bytes(double(uint_of(*a, "guest_size"))).c_str());
  } else {
    std::printf("registered %s: %s, VMM pid %s, %s guest in %zu region(s), memfd %s\n",
                str(*a, "id").c_str(), str(*a, "state").c_str(), str(*a, "vmm_pid").c_str(),
                format_bytes(double(uint_of(*a, "guest_size"))).c_str(),
                (*a)["regions"].is_array() ? (*a)["regions"].size() : 0,
                yes(*a, "memfd") ? "yes" : "no");
  }
  return 0;
}

int client_pause(Client& c, Args& args) {
  const std::string output = args.value("--output");
  const std::string parent = args.value("--parent");
  const std::string strategy = args.value("--strategy");
  const std::string after = args.value("--after");
  const std::string dirty = args.value("--dirty");
  const std::string mode = args.value("--mode");
  const bool wait_durable = args.flag("--wait-durable");
  const bool no_sync = args.flag("--no-sync");
  const std::string id = one_id(args, "pause");
  args.expect_done();
  json body = json::object();
  if (!output.empty()) body["output"] = output;
  if (!parent.empty()) body["parent"] = parent;
  if (!strategy.empty()) body["strategy"] = strategy;
  if (!after.empty()) {
    if (after != "stop" && after != "continue") {
      throw std::invalid_argument("--after takes stop or continue");
    }
    body["after"] = after;
  }
  if (no_sync) body["sync"] = false;
  if (!dirty.empty()) {
    json ranges = json::array();
    for (const auto& item : split(dirty, ',')) {
      const auto parts = split(item, ':');
      if (parts.size() != 2) throw std::invalid_argument("--dirty takes OFFSET:LENGTH[,...]");
      ranges.push_back({{"offset", parse_size(parts[0])}, {"length", parse_size(parts[1])}});
    }
    body["dirty"] = ranges;
  }
  if (!mode.empty()) body["mode"] = mode;
  auto a = c.call("POST", sandbox_path(id) + "/pause", body, kPauseCall, /*print=*/!wait_durable);
  if (!a) return c.exit_code;
  if (wait_durable && !a->value("durable", true)) {
    // The sandbox's last pause, once its export left the running state.
    auto s = c.call("GET", sandbox_path(id) + "?wait_while=exporting&timeout_ms=600000", nullptr,
                    kPauseCall, /*print=*/false);
    if (!s) return c.exit_code;
    json done = s->value("last_pause", json::object());
    if (c.json_output()) {
      std::printf("%s\n", done.dump(2).c_str());
    } else {
      print_pause(done);
    }
    if (s->value("state", "") != "paused") {
      std::fprintf(stderr, "memsnap: the background export of %s failed: %s\n", id.c_str(),
                   str(*s, "last_error", "?").c_str());
      return 1;
    }
    return 0;
  }
  if (wait_durable && c.json_output()) std::printf("%s\n", a->dump(2).c_str());
  if (!c.json_output()) print_pause(*a);
  return 0;
}

int client_export_retry(Client& c, Args& args) {
  const std::string id = one_id(args, "export-retry");
  args.expect_done();
  auto a = c.call("POST", sandbox_path(id) + "/export/retry", json::object(), kQuickCall);
  if (!a) return c.exit_code;
  if (!c.json_output()) {
    std::printf("%s: the background export runs again; memsnap sandbox %s --wait-while "
                "exporting\n", id.c_str(), id.c_str());
  }
  return 0;
}

int client_resume(Client& c, Args& args) {
  std::string socket = args.value("--handshake-socket");
  const std::string mode = args.value("--mode");
  const bool no_track = args.flag("--no-track-writes");
  const std::string map_ahead = args.value("--map-ahead");
  const bool wait = args.flag("--wait");
  const std::string timeout = args.value("--timeout-ms");
  const std::string id = one_id(args, "resume");
  args.expect_done();
  if (socket.empty()) throw std::invalid_argument("resume needs --handshake-socket PATH");
  if (!timeout.empty() && !wait) throw std::invalid_argument("--timeout-ms goes with --wait");
  // memsnapd resolves nothing against our working directory: send an absolute path.
  socket = std::filesystem::absolute(socket).lexically_normal().string();
  json body = {{"handshake_socket", socket}};
  if (!mode.empty()) body["mode"] = mode;
  if (no_track) body["track_writes"] = false;
  if (!map_ahead.empty()) body["map_ahead"] = map_ahead == "yes";

  // With --wait and --json, only the final state is printed (one JSON document).
  auto started = c.call("POST", sandbox_path(id) + "/resume", body, kResumeCall, !wait);
  if (!started) return c.exit_code;
  if (!c.json_output()) {
    print_resume_started(*started);
    if (!wait) {
      std::printf(
          "  start the VMM now (it connects to %s), then wait with:\n"
          "  memsnap --socket ... sandbox %s --wait-while resuming\n",
          socket.c_str(), id.c_str());
    }
    std::fflush(stdout);
  }
  if (!wait) return 0;

  const std::uint64_t wait_ms =
      timeout.empty() ? kDefaultResumeWaitMs
                      : std::min<std::uint64_t>(parse_uint(timeout, "--timeout-ms"), 600000);
  auto state =
      c.call("GET", sandbox_path(id) + "?wait_while=resuming&timeout_ms=" + std::to_string(wait_ms),
             nullptr, milliseconds(wait_ms) + kWaitMargin);
  if (!state) return c.exit_code;
  if (str(*state, "state") != "running") {
    // last_error is "<code>: <message>" already.
    const std::string error = str(*state, "last_error");
    std::fprintf(stderr, "memsnap: %s (the resume of %s failed; it is %s)\n",
                 error.empty() ? "resume_failed: no VMM became ready" : error.c_str(), id.c_str(),
                 str(*state, "state").c_str());
    return 1;
  }
  if (!c.json_output()) {
    std::printf("resumed %s: running\n", id.c_str());
    print_last_resume(state->value("last_resume", json::object()), "  ");
  }
  return 0;
}

int client_strategy(Client& c, Args& args) {
  const std::string id = one_id(args, "strategy");
  args.expect_done();
  auto a = c.call("GET", sandbox_path(id) + "/strategy", nullptr, kQuickCall);
  if (!a) return c.exit_code;
  if (c.json_output()) return 0;
  std::printf("%s: the next pause uses %s\n", str(*a, "id").c_str(), str(*a, "strategy").c_str());
  std::string why = str(*a, "requested_strategy");
  if (!str(*a, "variant").empty()) why += ", variant " + str(*a, "variant");
  why += ", reason " + str(*a, "reason") + ", flag " + str(*a, "flag");
  std::printf("  requested  %s\n", why.c_str());
  std::printf("  fallback   %s\n", fallback_text(a->value("fallback", json())).c_str());
  std::printf("  context    %s\n", a->value("context", json::object()).dump().c_str());
  if (a->contains("trace")) std::printf("  (--json shows the flag evaluation trace)\n");
  return 0;
}

int client_unregister(Client& c, Args& args) {
  const bool force = args.flag("--force");
  const std::string id = one_id(args, "unregister");
  args.expect_done();
  auto a = c.call("DELETE", sandbox_path(id) + (force ? "?force=true" : ""), nullptr, kQuickCall);
  if (!a) return c.exit_code;
  if (c.json_output()) return 0;
  std::printf("unregistered %s; its snapshots stay: %s%s\n", str(*a, "id").c_str(),
              list_text(a->value("snapshots", json())).c_str(),
              a->value("vmm_ended", false) ? "; its VMM was ended" : "");
  return 0;
}

}  // namespace

int cmd_client(const std::string& command, const std::string& socket, Args& args) {
  Client client(socket, args.flag("--json"));
  try {
    if (command == "health") return client_health(client, args);
    if (command == "config") return client_config(client, args);
    if (command == "sandboxes") return client_list(client, args);
    if (command == "sandbox") return client_get(client, args);
    if (command == "register") return client_register(client, args);
    if (command == "pause") return client_pause(client, args);
    if (command == "resume") return client_resume(client, args);
    if (command == "strategy") return client_strategy(client, args);
    if (command == "unregister") return client_unregister(client, args);
    if (command == "export-retry") return client_export_retry(client, args);
  } catch (const json::exception& e) {
    // A summary could not be made of an answer (a server of another version?): the exit code
    // still says whether memsnapd did it.
    std::fprintf(stderr, "memsnap: cannot summarize memsnapd's answer (%s); use --json\n",
                 e.what());
    return 0;
  }
  throw std::invalid_argument("'" + command + "' has no client mode");
}

}  // namespace memsnap::cli
