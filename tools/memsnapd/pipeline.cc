#include "tools/memsnapd/pipeline.h"

#include <utility>

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
};

}  // namespace

Pipeline& core_pipeline() {
  static CorePipeline pipeline;
  return pipeline;
}

}  // namespace memsnap::daemon
