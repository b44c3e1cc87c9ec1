#!/usr/bin/env bash
# The test command: installs what is missing, configures, builds and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/build.sh "$@"
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j 2
