// Registers the memfd strategy; the only file of the plugin that does.
#include "plugins/memfd/memfd.h"

MEMSNAP_PLUGIN("memfd", "1.0.0", memsnap::plugin::kCapNeedsMemfd,
               "reads guest memory from its memfd (mmap windows or pread), skipping holes",
               memsnap::plugins::create_memfd)
