// A descriptor that breaks one rule, chosen by FIXTURE_VARIANT; it also has no factory, so a
// host that checked the factory first would report kPluginNoFactory instead.
#include "plugins/plugin_api/plugin_api.h"

using namespace memsnap::plugin;

MEMSNAP_PLUGIN_EXPORT const std::uint32_t memsnap_plugin_abi_version = kAbiVersion;

#define FIXTURE_DESCRIPTOR(ABI, NAME, VERSION)                               \
  MEMSNAP_PLUGIN_EXPORT const PluginDescriptor memsnap_plugin_descriptor = { \
      ABI, NAME, VERSION, 0, "bad descriptor fixture"};

#if FIXTURE_VARIANT == 1  // empty name
FIXTURE_DESCRIPTOR(kAbiVersion, "", "1.0.0")
#elif FIXTURE_VARIANT == 2  // null name
FIXTURE_DESCRIPTOR(kAbiVersion, nullptr, "1.0.0")
#elif FIXTURE_VARIANT == 3  // characters outside [a-z0-9_]
FIXTURE_DESCRIPTOR(kAbiVersion, "Bad-Name", "1.0.0")
#elif FIXTURE_VARIANT == 4  // 65 characters
FIXTURE_DESCRIPTOR(kAbiVersion,
                   "a234567890123456789012345678901234567890123456789012345678901234"
                   "5",
                   "1.0.0")
#elif FIXTURE_VARIANT == 5  // null version
FIXTURE_DESCRIPTOR(kAbiVersion, "fixture_null_version", nullptr)
#elif FIXTURE_VARIANT == 6  // descriptor ABI differs from the ABI symbol
FIXTURE_DESCRIPTOR(kAbiVersion + 1, "fixture_descriptor_abi", "1.0.0")
#elif FIXTURE_VARIANT == 7  // no descriptor at all
#else
#error "unknown FIXTURE_VARIANT"
#endif
