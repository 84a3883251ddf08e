#!/usr/bin/env bash
# The main job on built-in defaults, from a fresh Debian 12 machine: installs what is missing,
# builds, then starts memsnapd on its defaults with a few stand-in sandboxes split across the
# export strategies by a flag and across the pause modes (copy, handover) by another, pauses and
# resumes each of them through the control API, verifies every page and prints each pause's
# answer and durable latencies and a comparison per strategy and pause mode (and where the
# metrics are while it runs). memsnapd's build includes memsnap-exporter (handover pauses).
#   bash tools/run-demo.sh                              # defaults: 6 sandboxes x 3 rounds, 64 MiB
#   bash tools/run-demo.sh --sandboxes 9 --size 256M    # extra arguments go to `memsnap demo`
#   bash tools/run-demo.sh --keep /var/tmp/demo         # keep snapshots, log and flag file
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release --target memsnap memsnapd memsnap-guest memsnap_plugins
exec build/release/bin/memsnap demo "$@"
