// memsnap's command table (commands.cc): every command, its options and help, in one place.
#pragma once

#include "tools/cli_spec/command_table.h"

namespace memsnap::cli {

const cli_spec::Program& program();

}  // namespace memsnap::cli
