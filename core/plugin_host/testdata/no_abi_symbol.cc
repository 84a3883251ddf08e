// Everything but memsnap_plugin_abi_version: refused with kPluginNoAbiSymbol.
#include "plugins/plugin_api/plugin_api.h"

using namespace memsnap::plugin;

MEMSNAP_PLUGIN_EXPORT const PluginDescriptor memsnap_plugin_descriptor = {
    kAbiVersion, "fixture_no_abi_symbol", "1.0.0", 0, "no ABI symbol"};

MEMSNAP_PLUGIN_EXPORT Status memsnap_plugin_create(Strategy** out, const Option*,
                                                   std::size_t) noexcept {
  *out = nullptr;
  return Status::Error(StatusCode::kInternal, 0, "must never be called");
}
