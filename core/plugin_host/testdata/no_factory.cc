// A valid ABI symbol and descriptor but no memsnap_plugin_create: kPluginNoFactory.
#include "plugins/plugin_api/plugin_api.h"

using namespace memsnap::plugin;

MEMSNAP_PLUGIN_EXPORT const std::uint32_t memsnap_plugin_abi_version = kAbiVersion;
MEMSNAP_PLUGIN_EXPORT const PluginDescriptor memsnap_plugin_descriptor = {
    kAbiVersion, "fixture_no_factory", "1.0.0", 0, "no factory"};
