// Speaks ABI 7. Its descriptor is also broken and it has no factory, so a host that looked at
// anything before the ABI version would report another error than kPluginAbiMismatch.
#include "plugins/plugin_api/plugin_api.h"

using namespace memsnap::plugin;

MEMSNAP_PLUGIN_EXPORT const std::uint32_t memsnap_plugin_abi_version = 7;
MEMSNAP_PLUGIN_EXPORT const PluginDescriptor memsnap_plugin_descriptor = {7, nullptr, nullptr, 0,
                                                                          nullptr};
