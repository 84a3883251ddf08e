#!/usr/bin/env bash
# Builds memsnap and runs every test, from a fresh Debian 12 machine: installs what is missing,
# configures the release preset (warnings are errors), builds, runs ctest.
#   bash tools/run-tests.sh            # all tests
#   bash tools/run-tests.sh -R e2e     # extra arguments go to ctest
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release
ctest --preset release --output-on-failure "$@"
