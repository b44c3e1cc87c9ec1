#!/usr/bin/env bash
# The test command: installs what is missing, configures, builds and runs every test: the
# suites (single process, mpirun 1..4 ranks, the fuzzer), then the same CPU suites under
# AddressSanitizer + UndefinedBehaviorSanitizer (launch/sanitize.sh; RINGATTN_SKIP_SANITIZE=1
# leaves that out of a quick local run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/build.sh "$@"
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j 2
if [ "${RINGATTN_SKIP_SANITIZE:-0}" != 1 ]; then
  BUILD_DIR=build-asan bash launch/sanitize.sh
fi
