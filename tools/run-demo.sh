#!/usr/bin/env bash
# The main job on built-in defaults, from a fresh Debian 12 machine: installs what is missing,
# builds, and pauses a 256 MiB stand-in VMM with every strategy, printing a comparison.
#   bash tools/run-demo.sh                     # defaults
#   bash tools/run-demo.sh --size 1G --json    # extra arguments go to `memsnap compare`
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release --target memsnap
exec build/release/bin/memsnap compare "$@"
