// Registers the process_vm_readv strategy; the only file of the plugin that does.
#include "plugins/process_vm_readv/process_vm_readv.h"

MEMSNAP_PLUGIN("process_vm_readv", "1.0.0", memsnap::plugin::kCapNeedsPid,
               "copies guest memory out of the VMM with batched process_vm_readv(2)",
               memsnap::plugins::create_process_vm_readv)
