#include "tools/memsnapd/pipeline.h"

#include <utility>

#include "tools/memsnapd/exporter_client.h"

namespace memsnap::daemon {
namespace {

class CorePipeline final : public Pipeline {
 public:
  Result<PauseReport> pause(const PluginRegistry& registry, const PauseRequest& request) override {
    return memsnap::pause(registry, request);
  }
  Result<std::unique_ptr<ResumeSession>> prepare_resume(const PluginRegistry& registry,
                                                        ResumeRequest request) override {
    return ResumeSession::prepare(registry, std::move(request));
  }
  // A separate process (memsnap-exporter), so that the export outlives memsnapd.
  Result<std::unique_ptr<BackgroundExport>> start_export(
      const PluginRegistry& registry, const PauseRequest& request,
      std::function<void(const ExportStatus&)> on_change) override {
    return start_exporter(registry, request, std::move(on_change));
  }
};

}  // namespace

std::string_view export_state_name(ExportState state) noexcept {
  switch (state) {
    case ExportState::kRunning:
      return "running";
    case ExportState::kDurable:
      return "durable";
    case ExportState::kFailed:
      return "failed";
  }
  return "running";
}

Pipeline& core_pipeline() {
  static CorePipeline pipeline;
  return pipeline;
}

}  // namespace memsnap::daemon
