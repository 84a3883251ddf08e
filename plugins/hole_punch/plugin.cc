// Registers the hole_punch strategy; the only file of the plugin that does.
#include "plugins/hole_punch/hole_punch.h"

MEMSNAP_PLUGIN("hole_punch", "0.1.0",
               memsnap::plugin::kCapNeedsMemfd | memsnap::plugin::kCapReleasesMemory |
                   memsnap::plugin::kCapExperimental,
               "memfd export that punches each chunk out of the memfd once it is durable",
               memsnap::plugins::create_hole_punch)
