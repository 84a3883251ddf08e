// A valid plugin linked against fixture_dep, a shared library that the loader cannot find (no
// RPATH, not in the system paths): dlopen fails on the missing dependency.
#include "plugins/plugin_api/plugin_api.h"

using namespace memsnap::plugin;

int memsnap_fixture_dep_value();

namespace {
Status create(Strategy**, const Option*, std::size_t) {
  return Status::Error(StatusCode::kInternal, 0, "dep says %d", memsnap_fixture_dep_value());
}
}  // namespace

MEMSNAP_PLUGIN("fixture_missing_dep", "1.0.0", 0, "needs a library that is not there", create)
