#!/usr/bin/env bash
# The CPU-only configuration (no CUDA, no MPI: what a laptop builds) into
# ${BUILD_DIR:-build-cpuonly}, and its tests: every unit suite and the fuzzer on one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
build_dir=${BUILD_DIR:-build-cpuonly}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DRINGATTN_WITH_CUDA=OFF \
  -DRINGATTN_WITH_MPI=OFF -DRINGATTN_BUILD_BENCH=OFF \
  -DRINGATTN_FUZZ_SECONDS="${RINGATTN_FUZZ_SECONDS:-20}" "$@"
cmake --build "$build_dir" -j "$(nproc)"
ctest --test-dir "$build_dir" --output-on-failure -j 2
