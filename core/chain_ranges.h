// What snapshots of a chain hold themselves, as guest byte ranges: the dirty set a diff must add
// when it is cut against an older parent than the newest snapshot.
#pragma once

#include <string>
#include <vector>

#include "core/base/result.h"
#include "plugins/plugin_api/plugin_api.h"

namespace memsnap {

// The guest ranges whose content any of the given snapshots records itself (DATA and ZERO runs;
// PARENT runs point further down the chain and add nothing), sorted and merged. Every block a
// snapshot records may differ from what its parent holds, so a diff whose parent is older than
// these snapshots must export all of them again, or what changed in between would be reverted.
Result<std::vector<plugin::ByteRange>> ranges_recorded_in(const std::vector<std::string>& paths);

}  // namespace memsnap
