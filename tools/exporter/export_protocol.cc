#include "tools/exporter/export_protocol.h"

#include "core/report_json.h"

namespace memsnap::exporter {
namespace {

using nlohmann::json;

Result<DataWrite> data_write_of(std::string_view name) {
  for (DataWrite mode : {DataWrite::kBuffered, DataWrite::kDirect}) {
    if (data_write_name(mode) == name) return mode;
  }
  return make_error(Errc::kInvalidArgument, "unknown data_write \"" + std::string(name) + "\"");
}

}  // namespace

Status check_background_request(const ExporterRequest& request) {
  const PauseRequest& p = request.pause;
  std::string problem;
  if (p.pid > 0 || p.pidfd >= 0 || !p.regions.empty()) {
    problem = "it names a VMM process (pid, pidfd or regions): the export reads the memfd only";
  } else if (p.freeze) {
    problem = "it asks for a freeze: the VMM is stopped before the handover";
  } else if (p.dirty_source) {
    problem = "it has a dirty_source: the dirty set must be given, or nullopt (SEEK_DATA)";
  } else if (p.memfd < 0) {
    problem = "it has no memfd";
  } else if (p.out_path.empty()) {
    problem = "it has no output path";
  } else if (request.plugins.empty()) {
    problem = "it names no plugin file";
  }
  if (problem.empty()) return {};
  return make_error(Errc::kInvalidArgument,
                    "a background export cannot run this request: " + problem);
}

json to_json(const ExporterRequest& request) {
  const PauseRequest& p = request.pause;
  json dirty = nullptr;
  if (p.dirty) {
    dirty = json::array();
    for (const auto& r : *p.dirty) dirty.push_back({r.offset, r.length});
  }
  json options = json::array();
  for (const auto& [key, value] : p.strategy_options) options.push_back({key, value});
  return {{"version", kProtocolVersion},
          {"guest_size", p.guest_size},
          {"block_size", p.block_size},
          {"max_guest_size", p.reader_limits.max_guest_size},
          {"dirty", std::move(dirty)},
          {"strategy", p.strategy},
          {"strategy_options", std::move(options)},
          {"allow_fallback", p.allow_fallback},
          {"fallback_strategy", p.fallback_strategy},
          {"out_path", p.out_path},
          {"parent_path", p.parent_path},
          {"stay_frozen", p.stay_frozen},
          {"sync", p.sync},
          {"data_write", std::string(data_write_name(p.data_write))},
          {"plugins", request.plugins},
          {"retry_interval_ms", request.retry_interval.count()}};
}

Result<ExporterRequest> request_from_json(const json& j) {
  try {
    if (j.at("version").get<int>() != kProtocolVersion) {
      return make_error(Errc::kInvalidArgument, "request version " + j.at("version").dump() +
                                                    ", this exporter speaks " +
                                                    std::to_string(kProtocolVersion));
    }
    ExporterRequest r;
    PauseRequest& p = r.pause;
    p.memfd = kMemfdFd;
    p.guest_size = j.at("guest_size").get<std::uint64_t>();
    p.block_size = j.at("block_size").get<std::uint32_t>();
    p.reader_limits.max_guest_size = j.at("max_guest_size").get<std::uint64_t>();
    if (const auto& dirty = j.at("dirty"); !dirty.is_null()) {
      p.dirty.emplace();
      for (const auto& range : dirty) {
        p.dirty->push_back({range.at(0).get<std::uint64_t>(), range.at(1).get<std::uint64_t>()});
      }
    }
    p.strategy = j.at("strategy").get<std::string>();
    for (const auto& option : j.at("strategy_options")) {
      p.strategy_options.emplace_back(option.at(0).get<std::string>(),
                                      option.at(1).get<std::string>());
    }
    p.allow_fallback = j.at("allow_fallback").get<bool>();
    p.fallback_strategy = j.at("fallback_strategy").get<std::string>();
    p.out_path = j.at("out_path").get<std::string>();
    p.parent_path = j.at("parent_path").get<std::string>();
    p.stay_frozen = j.at("stay_frozen").get<bool>();
    p.sync = j.at("sync").get<bool>();
    MEMSNAP_ASSIGN_OR_RETURN(p.data_write, data_write_of(j.at("data_write").get<std::string>()));
    r.plugins = j.at("plugins").get<std::vector<std::string>>();
    r.retry_interval = std::chrono::milliseconds(j.at("retry_interval_ms").get<std::int64_t>());
    if (r.retry_interval.count() <= 0) {
      return make_error(Errc::kInvalidArgument, "retry_interval_ms must be positive");
    }
    MEMSNAP_RETURN_IF_ERROR(check_background_request(r));
    return r;
  } catch (const json::exception& e) {
    return make_error(Errc::kInvalidArgument, std::string("not an export request: ") + e.what());
  }
}

std::string_view event_kind_name(EventKind kind) noexcept {
  switch (kind) {
    case EventKind::kProgress:
      return "progress";
    case EventKind::kDurable:
      return "durable";
    case EventKind::kFailed:
      return "failed";
    case EventKind::kRetrying:
      return "retrying";
    case EventKind::kReleased:
      return "released";
  }
  return "progress";
}

Errc errc_from_name(std::string_view name) noexcept {
  // Every code from kOk to the last one declared (kDataAtRisk, the last group's): walked rather
  // than listed, so a code added to an earlier group is known here too.
  for (int i = 0; i <= static_cast<int>(Errc::kDataAtRisk); ++i) {
    const auto code = static_cast<Errc>(i);
    if (errc_name(code) == name) return code;
  }
  return Errc::kInternal;
}

std::string encode_event(const ExportEvent& e) {
  json j = {{"event", std::string(event_kind_name(e.kind))},
            {"attempt", e.attempt},
            {"bytes_done", e.bytes_done},
            {"bytes_total", e.bytes_total},
            {"cpu_seconds", e.cpu_seconds}};
  if (e.report) j["report"] = memsnap::to_json(*e.report);
  if (e.error) {
    j["error"] = memsnap::to_json(*e.error);
    j["error"]["errno"] = e.error->sys_errno;
    j["retryable"] = e.retryable;
  }
  return j.dump();
}

Result<ExportEvent> decode_event(std::string_view line) {
  try {
    const json j = json::parse(line);
    ExportEvent e;
    const auto kind = j.at("event").get<std::string>();
    bool known = false;
    for (EventKind k : {EventKind::kProgress, EventKind::kDurable, EventKind::kFailed,
                        EventKind::kRetrying, EventKind::kReleased}) {
      if (event_kind_name(k) == kind) {
        e.kind = k;
        known = true;
      }
    }
    if (!known) return make_error(Errc::kInvalidArgument, "unknown event \"" + kind + "\"");
    e.attempt = j.at("attempt").get<int>();
    e.bytes_done = j.at("bytes_done").get<std::uint64_t>();
    e.bytes_total = j.at("bytes_total").get<std::uint64_t>();
    e.cpu_seconds = j.at("cpu_seconds").get<double>();
    if (j.contains("report")) {
      MEMSNAP_ASSIGN_OR_RETURN(auto report, report_from_json(j.at("report")));
      e.report = std::move(report);
    }
    if (j.contains("error")) {
      const auto& err = j.at("error");
      e.error = make_error(errc_from_name(err.at("code").get<std::string>()),
                           err.at("message").get<std::string>(), err.at("errno").get<int>());
      e.retryable = j.at("retryable").get<bool>();
    }
    if (e.kind == EventKind::kDurable && !e.report) {
      return make_error(Errc::kInvalidArgument, "a durable event without its report");
    }
    if (e.kind == EventKind::kFailed && !e.error) {
      return make_error(Errc::kInvalidArgument, "a failed event without its error");
    }
    return e;
  } catch (const json::exception& ex) {
    return make_error(Errc::kInvalidArgument, std::string("not an export event: ") + ex.what());
  }
}

}  // namespace memsnap::exporter
