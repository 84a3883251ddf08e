#include "core/report_json.h"

namespace memsnap {

nlohmann::json to_json(const Error& error) {
  return {{"code", std::string(errc_name(error.code))}, {"message", error.message}};
}

nlohmann::json to_json(const PluginInfo& info) {
  const bool loaded = info.state == PluginState::kLoaded;
  nlohmann::json caps = nlohmann::json::array();
  for (std::string_view name : capability_names(info.capabilities)) caps.push_back(name);
  return {{"name", info.name},
          {"version", info.version},
          {"abi", info.abi},
          {"status", loaded ? "loaded" : "refused"},
          {"reason", loaded ? "" : info.reason},
          {"error", loaded ? "" : std::string(errc_name(info.error))},
          {"experimental", (info.capabilities & plugin::kCapExperimental) != 0},
          {"capabilities", caps},
          {"description", info.description},
          {"path", info.path}};
}

nlohmann::json to_json(const PauseReport& r) {
  nlohmann::json phases = nlohmann::json::object();
  for (const auto& p : r.phases) {
    phases[p.name] = {{"wall_seconds", p.wall_seconds}, {"cpu_seconds", p.cpu_seconds}};
  }
  return {{"requested_strategy", r.requested_strategy},
          {"strategy", r.strategy},
          {"fallback",
           r.fallback_reason.empty()
               ? nlohmann::json(nullptr)
               : nlohmann::json{{"from", r.requested_strategy},
                                {"to", r.strategy},
                                {"reason", r.fallback_reason},
                                {"after_failure", r.fallback == FallbackCause::kStrategyFailed}}},
          {"snapshot", r.snapshot_path},
          {"snapshot_id", r.snapshot_id},
          {"parent_id", r.parent_id},
          {"generation", r.generation},
          {"guest_size", r.guest_size},
          {"block_size", r.block_size},
          {"dirty_bytes", r.dirty_bytes},
          {"dirty_set_source", r.dirty_set_source},
          {"bytes_exported", r.export_stats.bytes_read},
          {"data_bytes", r.data_bytes},
          {"data_blocks", r.data_blocks},
          {"zero_blocks", r.zero_blocks},
          {"parent_blocks", r.parent_blocks},
          {"data_write", r.data_write},
          {"data_write_fallback", r.data_write_fallback},
          {"memory_released", r.export_stats.bytes_released},
          {"read_calls", r.export_stats.read_calls},
          {"retries", r.export_stats.retries},
          {"partial_reads", r.export_stats.partial_reads},
          {"wall_seconds", r.wall_seconds},
          {"cpu_seconds", r.cpu_seconds},
          {"stopped_seconds", r.stopped_seconds},
          {"live", r.live},
          {"live_copies", r.live_copies},
          {"phases", phases}};
}

Result<PauseReport> report_from_json(const nlohmann::json& j) {
  try {
    PauseReport r;
    r.requested_strategy = j.at("requested_strategy").get<std::string>();
    r.strategy = j.at("strategy").get<std::string>();
    if (const auto& f = j.at("fallback"); !f.is_null()) {
      r.fallback_reason = f.at("reason").get<std::string>();
      r.fallback = f.at("after_failure").get<bool>() ? FallbackCause::kStrategyFailed
                                                     : FallbackCause::kPluginNotLoaded;
    }
    r.snapshot_path = j.at("snapshot").get<std::string>();
    r.snapshot_id = j.at("snapshot_id").get<std::string>();
    r.parent_id = j.at("parent_id").get<std::string>();
    r.generation = j.at("generation").get<std::uint64_t>();
    r.guest_size = j.at("guest_size").get<std::uint64_t>();
    r.block_size = j.at("block_size").get<std::uint32_t>();
    r.dirty_bytes = j.at("dirty_bytes").get<std::uint64_t>();
    r.dirty_set_source = j.at("dirty_set_source").get<std::string>();
    r.export_stats.bytes_read = j.at("bytes_exported").get<std::uint64_t>();
    r.data_bytes = j.at("data_bytes").get<std::uint64_t>();
    r.data_blocks = j.at("data_blocks").get<std::uint64_t>();
    r.zero_blocks = j.at("zero_blocks").get<std::uint64_t>();
    r.parent_blocks = j.at("parent_blocks").get<std::uint64_t>();
    r.data_write = j.at("data_write").get<std::string>();
    r.data_write_fallback = j.at("data_write_fallback").get<std::string>();
    r.export_stats.bytes_released = j.at("memory_released").get<std::uint64_t>();
    r.export_stats.read_calls = j.at("read_calls").get<std::uint64_t>();
    r.export_stats.retries = j.at("retries").get<std::uint64_t>();
    r.export_stats.partial_reads = j.at("partial_reads").get<std::uint64_t>();
    r.wall_seconds = j.at("wall_seconds").get<double>();
    r.cpu_seconds = j.at("cpu_seconds").get<double>();
    r.stopped_seconds = j.value("stopped_seconds", 0.0);
    r.live = j.value("live", false);
    r.live_copies = j.value("live_copies", std::uint64_t{0});
    const auto& phases = j.at("phases");
    // The pipeline's order (a live pause thaws before it exports).
    const std::vector<const char*> order =
        r.live ? std::vector<const char*>{"resolve",  "prepare_live", "freeze", "dirty_set",
                                          "arm_live", "thaw",         "export", "commit"}
               : std::vector<const char*>{"resolve", "freeze", "dirty_set",
                                          "export",  "commit", "thaw"};
    for (const char* name : order) {
      if (!phases.contains(name)) continue;
      const auto& p = phases.at(name);
      r.phases.push_back(
          {name, p.at("wall_seconds").get<double>(), p.at("cpu_seconds").get<double>()});
    }
    return r;
  } catch (const nlohmann::json::exception& e) {
    return make_error(Errc::kInvalidArgument, std::string("not a pause report: ") + e.what());
  }
}

nlohmann::json to_json(const ResumeReport& r) {
  nlohmann::json phases = nlohmann::json::object();
  for (const auto& p : r.phases) {
    phases[p.name] = {{"wall_seconds", p.wall_seconds}, {"cpu_seconds", p.cpu_seconds}};
  }
  return {{"strategy", r.strategy},
          {"mode", resume_mode_name(r.mode)},
          {"mode_reason", r.mode_reason},
          {"vmm_pid", r.vmm_pid},
          {"vmm_memfd", r.vmm_memfd},
          {"guest_size", r.guest_size},
          {"block_size", r.block_size},
          {"generation", r.generation},
          {"snapshot_id", r.snapshot_id},
          {"chain_length", r.chain_length},
          {"write_tracking", r.write_tracking},
          {"write_tracking_reason", r.write_tracking_reason},
          {"write_faults", r.write_faults},
          {"tracking_armed_in_background", r.tracking_armed_in_background},
          {"tracking_arm_seconds", r.tracking_arm_seconds},
          {"ready_seconds", r.ready_seconds},
          {"eager_bytes", r.eager_bytes},
          {"before_durable", r.before_durable},
          {"phases", phases}};
}

nlohmann::json to_json(const FaultStats& f) {
  return {{"faults", f.faults},
          {"minor_faults", f.minor_faults},
          {"copies", f.copies},
          {"zeropages", f.zeropages},
          {"continues", f.continues},
          {"eexist", f.eexist},
          {"copy_wp_downgrades", f.copy_wp_downgrades},
          {"continue_wp_downgrades", f.continue_wp_downgrades},
          {"zeropage_downgrades", f.zeropage_downgrades},
          {"eagain_retries", f.eagain_retries},
          {"remove_events", f.remove_events},
          {"removed_bytes", f.removed_bytes},
          {"write_faults", f.write_faults},
          {"live_copies", f.live_copies},
          {"filled_bytes", f.filled_bytes},
          {"mapped_ahead_bytes", f.mapped_ahead_bytes},
          {"fill_done", f.fill_done},
          {"fill_seconds", f.fill_seconds},
          {"vmm_gone", f.vmm_gone},
          {"service_seconds", f.service_seconds},
          {"mean_service_seconds", f.faults ? f.service_seconds / double(f.faults) : 0.0},
          {"max_service_seconds", f.max_service_seconds}};
}

}  // namespace memsnap
