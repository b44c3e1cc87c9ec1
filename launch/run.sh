#!/usr/bin/env bash
# The main job: installs what is missing, builds Release, and runs the benchmark on the
# seed's configurations (plus the dense-segment kernel rows) with a correctness pass.
# Extra arguments go to ringattn_bench, e.g. launch/run.sh --threads 2 --json results.json
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build} bash launch/build.sh >/dev/null
bench=${BUILD_DIR:-build}/bench/ringattn_bench
"$bench" --impl all --config all --check "$@"
"$bench" --impl dilated --config dense --head-dim 64 --check "$@"
"$bench" --impl dilated --config dense --head-dim 128 --check "$@"
