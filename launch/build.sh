#!/usr/bin/env bash
# Configures and builds ringattn (Release) into ${BUILD_DIR:-build}. Extra arguments go to
# cmake, e.g. launch/build.sh -DRINGATTN_WITH_CUDA=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
build_dir=${BUILD_DIR:-build}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$build_dir" -j "$(nproc)"
