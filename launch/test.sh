#!/usr/bin/env bash
# The test command: installs what is missing, configures, builds and runs every test: the
# suites (single process, mpirun 1..4 ranks, the fuzzer), the Python package's pytest suite
# against the module in the build tree (interpreter and torch from launch/python_env.sh), the
# CPU-only configuration (no CUDA, no MPI: launch/cpu_only.sh), then the CPU suites under
# AddressSanitizer + UndefinedBehaviorSanitizer (launch/sanitize.sh). RINGATTN_SKIP_SANITIZE=1
# and RINGATTN_SKIP_CPU_ONLY=1 leave those out of a quick local run.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash launch/python_env.sh)
bash launch/build.sh -DRINGATTN_BUILD_PYTHON=ON -DPython_EXECUTABLE="$py" "$@"
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j 2
PYTHONPATH="$PWD/${BUILD_DIR:-build}/python" "$py" -m pytest -p no:cacheprovider -q tests/python
if [ "${RINGATTN_SKIP_CPU_ONLY:-0}" != 1 ]; then
  bash launch/cpu_only.sh
fi
if [ "${RINGATTN_SKIP_SANITIZE:-0}" != 1 ]; then
  BUILD_DIR=build-asan bash launch/sanitize.sh
fi
