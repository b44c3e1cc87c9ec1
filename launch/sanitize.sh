#!/usr/bin/env bash
# The test suites (single process, mpirun 1..4, the fuzzer) built with AddressSanitizer and
# UndefinedBehaviorSanitizer, CPU only, into ${BUILD_DIR:-build-asan}. Any report fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
build_dir=${BUILD_DIR:-build-asan}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRINGATTN_WITH_CUDA=OFF \
  -DRINGATTN_SANITIZE=address,undefined -DRINGATTN_BUILD_BENCH=OFF \
  -DRINGATTN_FUZZ_SECONDS="${RINGATTN_FUZZ_SECONDS:-20}" "$@"
cmake --build "$build_dir" -j "$(nproc)"
# Open MPI keeps allocations to the end of the process: leaks are not checked.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir "$build_dir" --output-on-failure -j 2
