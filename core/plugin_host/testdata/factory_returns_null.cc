// Loads fine; its factory reports success without storing a strategy.
#include "plugins/plugin_api/plugin_api.h"

using namespace memsnap::plugin;

namespace {
Status create(Strategy** out, const Option*, std::size_t) {
  *out = nullptr;
  return Status::Ok();
}
}  // namespace

MEMSNAP_PLUGIN("fixture_factory_returns_null", "1.0.0", 0, "factory returns null", create)
