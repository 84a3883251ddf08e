// What memsnapd's sandbox service runs to move memory: the pause pipeline and the preparation of
// a resume session. memsnapd runs core's (core/pause.h, core/resume.h); the service's unit tests
// give a fake that records the requests, answers as scripted and can hold a pause half way, so
// that every state of the lifecycle is reached on purpose rather than by timing.
#pragma once

#include <memory>

#include "core/base/result.h"
#include "core/pause.h"
#include "core/plugin_host/plugin_registry.h"
#include "core/resume.h"

namespace memsnap::daemon {

class Pipeline {
 public:
  virtual ~Pipeline() = default;
  // Runs one pause (memsnap::pause's contract: nothing committed unless it succeeds).
  virtual Result<PauseReport> pause(const PluginRegistry& registry,
                                    const PauseRequest& request) = 0;
  // Checks a resume and listens for its VMM (ResumeSession::prepare's contract).
  virtual Result<std::unique_ptr<ResumeSession>> prepare_resume(const PluginRegistry& registry,
                                                                ResumeRequest request) = 0;
};

// core's pipelines; one for the process, stateless.
Pipeline& core_pipeline();

}  // namespace memsnap::daemon
