// Loads fine; its factory always returns an error status.
#include <cerrno>

#include "plugins/plugin_api/plugin_api.h"

using namespace memsnap::plugin;

namespace {
Status create(Strategy**, const Option*, std::size_t) {
  return Status::Error(StatusCode::kUnsupported, ENOSYS, "fixture factory always fails");
}
}  // namespace

MEMSNAP_PLUGIN("fixture_factory_fails", "1.0.0", 0, "factory fails", create)
