// Loads fine; its factory throws, which MEMSNAP_PLUGIN must turn into an error status.
#include <stdexcept>

#include "plugins/plugin_api/plugin_api.h"

using namespace memsnap::plugin;

namespace {
Status create(Strategy**, const Option*, std::size_t) {
  throw std::runtime_error("fixture factory throws");
}
}  // namespace

MEMSNAP_PLUGIN("fixture_factory_throws", "1.0.0", 0, "factory throws", create)
